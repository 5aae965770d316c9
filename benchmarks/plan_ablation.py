"""What each part of the planner is worth: the same search with one part taken away, scored on held-out prompts.

    python benchmarks/plan_ablation.py tiny-pixart --target psnr=30 --test-prompts 32

Variants: the default (measured time costs, one row for all modules, stack and modules), a uniform cost
model (every module costs the same), module-kind granularity (SmoothCache's), per-site granularity
(every module of every block its own row), the stack alone, and the modules alone. Each plan is fitted
on the calibration prompts (seed 7000) and scored on test prompts (seed 3000) against the uncached
images: mean and 5th-percentile PSNR, and the wall-clock speedup (median of `--repeats` passes, all
variants timed in this one run). Results go to benchmarks/results/n64/MODEL/plan_ablation_TARGET.md.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
import zoo_split

import ditscope
from ditscope.planning.planner import plan
from ditscope.profiling.workload import generate
from ditscope.stats.quality import per_sample_psnr_ssim

VARIANTS = {
    "default (time costs, step rows, stack + modules)": {},
    "uniform cost model": {"cost": "uniform"},
    "module-kind granularity (SmoothCache)": {"granularity": "kind"},
    "per-site granularity": {"granularity": "site"},
    "stack only": {"modes": ("stack",)},
    "modules only": {"modes": ("sites",)},
}


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = zoo_split.arguments(__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    split = zoo_split.load(args)
    pipe, steps, guidance = split.pipe, split.steps, split.guidance
    calib, test = split.calibration, split.test
    rows = []
    with torch.inference_mode():
        reference = generate(pipe, test, steps, guidance_scale=guidance, batch_size=16)
        plain = timed(
            lambda: generate(pipe, test, steps, guidance_scale=guidance, batch_size=16), args.repeats
        )
        for name, opts in VARIANTS.items():
            started = time.perf_counter()
            p = plan(pipe, calib, args.target, steps, guidance_scale=guidance, **opts)
            planning = time.perf_counter() - started
            with ditscope.apply(pipe, ditscope.PlanConfig(p)):
                images = generate(pipe, test, steps, guidance_scale=guidance, batch_size=16)
                seconds = timed(
                    lambda: generate(pipe, test, steps, guidance_scale=guidance, batch_size=16), args.repeats
                )
            psnr, _ = per_sample_psnr_ssim(images, reference)
            rows.append(
                (
                    name,
                    p.meta["quality"]["psnr"],
                    statistics.fmean(psnr),
                    float(np.percentile(psnr, 5)),
                    p.meta["predicted_speedup"],
                    plain / seconds,
                    planning,
                )
            )
            print(rows[-1], flush=True)
    name = args.target.replace("=", "")
    out = Path(__file__).parent / "results" / "n64" / args.model / f"plan_ablation_{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Planner ablation on {args.model}, target {args.target}",
        "",
        f"Fitted on {len(calib)} calibration prompts (seed 7000), scored on {len(test)} test prompts (seed 3000), "
        f"{steps} steps; wall clock = median of {args.repeats} passes against the uncached pass in the same run.",
        "",
        "| variant | PSNR calib | PSNR test | PSNR test p5 | predicted speedup | measured speedup | planning s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.2f}x | {e:.2f}x | {f:.0f} |"
        for n, a, b, c, d, e, f in rows
    ]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
