"""What a plan's calibration costs against the plain model: the uncached pipeline over the calibration prompts,
then `ditscope.planning.calibrate.calibrate` over the same prompts (which runs it once more, measuring every
unit's errors), alternating, each timed in wall clock and in this process's CPU time (which neighbours on a
shared machine disturb less).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/calibration_speed.py tiny-latte --calibration-prompts 4
    PYTHONPATH=/tmp/old/src python benchmarks/calibration_speed.py ...     # another version of ditscope

Prints one line per pass and the median ratio calibration / plain of each clock.
"""

from __future__ import annotations

import statistics
import time

import torch
import zoo_split

from ditscope.planning.calibrate import calibrate
from ditscope.profiling.workload import generate


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = zoo_split.arguments(__doc__, target=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    args.test_prompts = 0
    split = zoo_split.load(args)
    prompts, batch = split.calibration, len(split.calibration)

    def plain():
        generate(split.pipe, prompts, split.steps, 0, batch, split.guidance)

    def measured():
        calibrate(split.pipe, prompts, split.steps, 0, batch, split.guidance)

    plain()  # warm-up
    ratios = {"wall": [], "cpu": []}
    with torch.inference_mode():
        for i in range(args.repeats):
            p, c = timed(plain), timed(measured)
            print(
                f"pass {i}: plain {p[0]:.1f} s wall / {p[1]:.1f} s cpu, calibration {c[0]:.1f} / {c[1]:.1f}"
            )
            ratios["wall"].append(c[0] / p[0])
            ratios["cpu"].append(c[1] / p[1])
    print(
        f"{args.model}, {len(prompts)} prompts x {split.steps} steps: calibration / plain = "
        f"{statistics.median(ratios['wall']):.2f} wall, {statistics.median(ratios['cpu']):.2f} cpu"
    )


if __name__ == "__main__":
    main()
