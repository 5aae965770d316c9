"""How much quality a plan loses when it runs at another step count or scheduler than it was calibrated at.

    python benchmarks/plan_transfer.py tiny-pixart --target psnr=30 --test-prompts 32

The base plan is fitted at the model's step count and scheduler on calibration prompts (seed 7000). For
each other condition (fewer steps, more steps, another scheduler) the base plan is run there (resampled
on the normalised step axis where the step count differs) and compared with a plan calibrated at that
condition itself, on test prompts (seed 3000): mean and 5th-percentile PSNR against the uncached images
at that condition, and the executed FLOPs speedup. Plans are kept in --work and reused on a rerun.
Results go to benchmarks/results/n64/MODEL/plan_transfer_TARGET.md (and into docs/FINDINGS.md by hand).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import zoo_split

import ditscope
from ditscope import PlanConfig, Schedule
from ditscope.planning.planner import plan
from ditscope.profiling.workload import generate
from ditscope.runtime import parse_scheduler
from ditscope.stats.quality import per_sample_psnr_ssim


def main():
    ap = zoo_split.arguments(__doc__)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", default="10,30", help="other step counts")
    ap.add_argument("--schedulers", default="ddim", help="other schedulers (at the model's step count)")
    ap.add_argument("--work", type=Path, default=Path("runs/plan_transfer"))
    args = ap.parse_args()
    split = zoo_split.load(args)
    pipe, entry = split.pipe, ditscope.zoo.ZOO[args.model]
    base_steps, guidance, bs = entry.steps, entry.guidance_scale, args.batch_size
    default_scheduler = pipe.scheduler
    args.work.mkdir(parents=True, exist_ok=True)
    calib, test = split.calibration, split.test
    tag = args.target.replace("=", "")

    def set_scheduler(name):
        if name is None:
            pipe.scheduler = default_scheduler
        else:
            cls, overrides = parse_scheduler(name)
            pipe.scheduler = cls.from_config(default_scheduler.config, **overrides)

    def fitted(steps, scheduler) -> Schedule:
        path = args.work / f"{args.model}.{tag}.{steps}steps.{scheduler or 'default'}.plan.json"
        if path.exists():
            return Schedule.load(path)
        set_scheduler(scheduler)
        result = plan(
            pipe,
            calib,
            args.target,
            steps,
            batch_size=8,
            guidance_scale=guidance,
            work_dir=path.with_suffix(".work"),
            progress=lambda t: print(f"plan {steps} {scheduler}: {t}", flush=True),
        )
        result.save(path)
        return result

    def scored(schedule, steps, scheduler, reference):
        set_scheduler(scheduler)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the resampling warning
            with ditscope.apply(pipe, PlanConfig(schedule), count_flops=True) as handle:
                images = generate(pipe, test, steps, 0, bs, guidance)
                summary = handle.stats().summary()
        psnr = np.array(per_sample_psnr_ssim(images, reference)[0])
        return psnr.mean(), np.percentile(psnr, 5), summary["speedup_flops"]

    lines = [
        f"# Plan transfer: {args.model}, target {args.target}, plans fitted on {args.calibration_prompts} "
        f"calibration prompts (seed 7000), scored on {args.test_prompts} test prompts (seed 3000)",
        "",
        f"`python benchmarks/plan_transfer.py {args.model} --target {args.target} --test-prompts {args.test_prompts} "
        f"--steps {args.steps} --schedulers '{args.schedulers}'`",
        "",
        "| run at | plan | PSNR mean | PSNR p5 | FLOPs speedup |",
        "|---|---|---|---|---|",
    ]
    with torch.inference_mode():
        base = fitted(base_steps, None)
        conditions = (
            [(base_steps, None)]
            + [(int(s), None) for s in args.steps.split(",") if s]
            + [(base_steps, s) for s in args.schedulers.split(",") if s]
        )
        for steps, scheduler in conditions:
            set_scheduler(scheduler)
            reference = generate(pipe, test, steps, 0, bs, guidance)
            where = f"{steps} steps, {scheduler or type(default_scheduler).__name__}"
            runs = [
                ("base plan" + ("" if (steps, scheduler) == (base_steps, None) else " (transferred)"), base)
            ]
            if (steps, scheduler) != (base_steps, None):
                runs.append(("calibrated here", fitted(steps, scheduler)))
            for label, schedule in runs:
                mean, p5, speed = scored(schedule, steps, scheduler, reference)
                lines.append(f"| {where} | {label} | {mean:.2f} | {p5:.2f} | {speed:.2f}x |")
                print(lines[-1], flush=True)
    set_scheduler(None)
    out = Path(__file__).parent / "results" / "n64" / args.model / f"plan_transfer_{tag}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
