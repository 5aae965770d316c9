"""How plans hold on prompts they were not made on: the mean and the worst images' (5th percentile) PSNR
against the uncached images, on zoo prompts drawn with another seed than the calibration's.

    python benchmarks/plan_unseen.py PLAN.plan.json [PLAN ...] --model tiny-pixart --prompts 32 --seed 3000
"""

import argparse

import numpy as np
import torch

import ditscope
from ditscope import zoo
from ditscope.profiling.workload import generate
from ditscope.stats.quality import per_sample_psnr_ssim
from ditscope.zoo import evaluator


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plans", nargs="+")
    ap.add_argument("--model", default="tiny-pixart")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--seed", type=int, default=3000, help="prompt seed (plans calibrate on seed 7000)")
    args = ap.parse_args(argv)
    pipe, entry = zoo.load(args.model), zoo.ZOO[args.model]
    pipe.set_progress_bar_config(disable=True)
    prompts = evaluator.evaluation_prompts(pipe, args.prompts, seed=args.seed)[1]
    print("| plan | target | calibration mean / p5 (dB) | unseen mean / p5 (dB) | predicted speedup |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        reference = generate(pipe, prompts, entry.steps, batch_size=16, guidance_scale=entry.guidance_scale)
        for path in args.plans:
            plan = ditscope.Plan.load(path)
            with ditscope.apply(pipe, ditscope.PlanConfig(plan)):
                images = generate(
                    pipe, prompts, entry.steps, batch_size=16, guidance_scale=entry.guidance_scale
                )
            psnr, _ = per_sample_psnr_ssim(images, reference)
            q = plan.meta["quality"]
            print(
                f"| {path} | {plan.meta['target']} | {q['psnr']:.2f} / {q.get('psnr_p5', float('nan')):.2f} | "
                f"{np.mean(psnr):.2f} / {np.percentile(psnr, 5):.2f} | {plan.meta['predicted_speedup']}x |"
            )


if __name__ == "__main__":
    main()
