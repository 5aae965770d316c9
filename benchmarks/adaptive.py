"""Adaptive plans against static ones on prompts like and unlike the calibration prompts.

    python benchmarks/adaptive.py tiny-pixart --targets psnr=30,psnr=35 --tolerances 1,2,4 --test-prompts 32

Plans are fitted on calibration prompts (seed 7000, one object per image), one per target, and each runs
static (`PlanConfig(plan)`) and adaptive per sample at each tolerance (`PlanConfig(plan, adaptive=True,
tolerance=x, signal=s)` for each `--signals` s: the first block's input change, or the stack output's change
between full steps; `--batch-level` adds `per_sample=False`) on two test sets. The test sets: prompts like the calibration ones
(seed 3000, one object) and a shifted set the plan never saw the like of (seed 3000, two objects per
image). Per row: mean / 5th-percentile / worst PSNR against the uncached images, executed FLOPs speedup
(torch's FLOP counter), the rows the adaptive check sent to compute, and the wall-clock speedup (median of
`--repeats` passes, every row timed in this one run). The plan is kept in --work and reused on a rerun.
Results go to --out (default benchmarks/results/n64/MODEL/adaptive.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import ditscope
from ditscope import PlanConfig, Schedule
from ditscope.planning.planner import plan, stack_change
from ditscope.profiling.workload import generate
from ditscope.stats.quality import per_sample_psnr_ssim
from ditscope.zoo import evaluator


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="tiny-pixart")
    ap.add_argument("--targets", default="psnr=30", help="comma list: a plan per target (kept in --work)")
    ap.add_argument("--tolerances", default="1", help="comma list of the adaptive runs' tolerances")
    ap.add_argument(
        "--batch-level", action="store_true", help="also run adaptive per_sample=False at tolerance 1"
    )
    ap.add_argument(
        "--signals", default="input", help="comma list of the adaptive runs' signals (input, output)"
    )
    ap.add_argument("--calibration-prompts", type=int, default=8)
    ap.add_argument("--test-prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per run (0: FLOPs only)")
    ap.add_argument("--work", type=Path, default=Path("runs/adaptive"))
    ap.add_argument(
        "--out", type=Path, default=None, help="the table (default benchmarks/results/n64/MODEL/adaptive.md)"
    )
    args = ap.parse_args()
    pipe = ditscope.zoo.load(args.model)
    pipe.set_progress_bar_config(disable=True)
    entry = ditscope.zoo.ZOO[args.model]
    steps, guidance, bs = entry.steps, entry.guidance_scale, args.batch_size
    args.work.mkdir(parents=True, exist_ok=True)
    targets = [t for t in args.targets.split(",") if t]
    runs = []  # (label, schedule, PlanConfig options)
    with torch.inference_mode():
        for target in targets:
            plan_path = args.work / f"{args.model}.{target.replace('=', '')}.plan.json"
            work = args.work / f"plan-{target}.work"
            if plan_path.exists():
                schedule = Schedule.load(plan_path)
                if "stack_change" not in schedule.meta and (work / "calibration.ditscope").exists():
                    # a plan kept from before the output signal: its calibration (same work folder) holds it
                    schedule.meta["stack_change"] = stack_change(
                        ditscope.Profile.load(work / "calibration.ditscope")
                    )
            else:
                _, calib = evaluator.evaluation_prompts(pipe, args.calibration_prompts, seed=7000)
                schedule = plan(
                    pipe,
                    calib,
                    target,
                    steps,
                    batch_size=8,
                    guidance_scale=guidance,
                    work_dir=work,
                    progress=lambda t: print("plan:", t, flush=True),
                )
                schedule.save(plan_path)
            runs.append((f"{target} static", schedule, {}))
            for signal in [t for t in args.signals.split(",") if t]:
                for tol in [float(t) for t in args.tolerances.split(",") if t]:
                    name = f"{target} adaptive x{tol:g}" + ("" if signal == "input" else f", {signal} signal")
                    runs.append((name, schedule, {"adaptive": True, "tolerance": tol, "signal": signal}))
            if args.batch_level:
                runs.append(
                    (f"{target} adaptive x1, whole batch", schedule, {"adaptive": True, "per_sample": False})
                )
        sets = evaluator.held_out_sets(pipe, args.test_prompts)
        lines = [
            f"# Adaptive plans: {args.model}, plans {args.targets} fitted on {args.calibration_prompts} calibration "
            f"prompts (seed 7000), {args.test_prompts} test prompts per set, {steps} steps, batch {bs}",
            "",
            f"`python benchmarks/adaptive.py {args.model} --targets {args.targets} --tolerances {args.tolerances}"
            f" --signals {args.signals} --test-prompts {args.test_prompts} --repeats {args.repeats}`",
            "",
            "| test set | run | PSNR mean | PSNR p5 | PSNR worst | FLOPs speedup | row-steps forced | wall speedup |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, prompts in sets.items():

            def run(prompts=prompts):
                return generate(pipe, prompts, steps, 0, bs, guidance)

            reference = run()
            plain = statistics.median(_times(run, args.repeats)) if args.repeats else None
            for label, schedule, opts in runs:
                with ditscope.apply(pipe, PlanConfig(schedule, **opts), count_flops=True) as handle:
                    images = run()
                    summary = handle.stats().summary()
                wall = "-"
                if plain is not None:
                    with ditscope.apply(pipe, PlanConfig(schedule, **opts)):
                        wall = f"{plain / statistics.median(_times(run, args.repeats)):.2f}x"
                psnr = np.array(per_sample_psnr_ssim(images, reference)[0])
                lines.append(
                    f"| {name} | {label} | {psnr.mean():.2f} | {np.percentile(psnr, 5):.2f} | {psnr.min():.2f} "
                    f"| {summary['speedup_flops']:.2f}x | {summary['rows_forced']} | {wall} |"
                )
                print(lines[-1], flush=True)
    out = args.out or Path(__file__).parent / "results" / "n64" / args.model / "adaptive.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def _times(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


if __name__ == "__main__":
    main()
