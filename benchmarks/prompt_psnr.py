"""Which calibration prompts a plan hurts: each one's PSNR against the uncached model, per plan file.

    python benchmarks/prompt_psnr.py tiny-latte runs/promises/tiny-latte-first4/psnr35.plan.json

Prints one line per plan: the prompts its checks ran on (`check_prompts`, None: every one) and each calibration
prompt's PSNR (zoo prompt seed 7000, batches of one). The hardest are the lowest.
"""

from __future__ import annotations

import statistics

import torch
import zoo_split

import ditscope
from ditscope import Schedule
from ditscope.profiling.workload import generate
from ditscope.stats.quality import per_sample_psnr_ssim


def main():
    ap = zoo_split.arguments(__doc__, target=None)
    ap.add_argument("plans", nargs="+")
    args = ap.parse_args()
    split = zoo_split.load(args)

    def run():
        return generate(split.pipe, split.calibration, split.steps, 0, 1, split.guidance)

    with torch.inference_mode():
        reference = run()
        for path in args.plans:
            plan = Schedule.load(path)
            with ditscope.apply(split.pipe, ditscope.PlanConfig(plan)):
                psnr, _ = per_sample_psnr_ssim(run(), reference)
            checked = plan.meta.get("calibration", {}).get("check_prompts")
            each = " ".join(f"{v:.1f}" for v in psnr)
            print(f"{path}: checks on {checked}; PSNR per prompt {each}; mean {statistics.fmean(psnr):.1f}")


if __name__ == "__main__":
    main()
