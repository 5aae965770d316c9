"""Whether a plan keeps its promise on prompts it never saw, and what planning costs: for each target, plan on
calibration prompts (zoo seed 7000) with the default settings, then score the plan on test prompts (seed 3000)
against the uncached model.

    python benchmarks/plan_promises.py tiny-pixart --targets psnr=30,psnr=35,psnr=40 --test-prompts 32

Per target: the checks run and the planning seconds (this machine; say whether it was quiet), the calibration
PSNR (mean, the lower end of its 95% interval, 5th percentile) and the test PSNR (mean, 5th percentile), and
the FLOPs and measured speedups the plan records. Plans are kept in runs/promises/MODEL/ (a stopped run
resumes: a target whose plan file exists is not planned again); the table goes to
benchmarks/results/promises/MODEL.md (MODEL-calibrationN.md with --calibration-prompts N other than 8; --tag
TAG appends TAG to both names).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
import zoo_split

import ditscope
from ditscope import Schedule
from ditscope.cli.plan import zoo_count
from ditscope.planning.planner import plan
from ditscope.profiling.workload import generate
from ditscope.stats.quality import per_sample_psnr_ssim


def main():
    ap = zoo_split.arguments(__doc__, target=None)
    ap.add_argument("--targets", default="psnr=30,psnr=35,psnr=40")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cost", default="time")
    ap.add_argument(
        "--check-prompts",
        type=int,
        default=None,
        help="the checks after the first run on this many calibration prompts, the first's hardest "
        "(default: the zoo row's)",
    )
    ap.add_argument(
        "--measure-prompts",
        type=int,
        default=None,
        help="the calibration measures the errors on this many calibration prompts (default: the zoo row's)",
    )
    ap.add_argument(
        "--tag", default="", help="appended to the folder and table names: a run of another version"
    )
    args = ap.parse_args()
    split = zoo_split.load(args)
    pipe, steps, guidance, batch = split.pipe, split.steps, split.guidance, args.batch_size
    calib, test = split.calibration, split.test
    checks = zoo_count(args.model, "check_prompts", args.check_prompts, len(calib))
    measured = zoo_count(args.model, "measure_prompts", args.measure_prompts, len(calib))
    name = args.model + (f"-calibration{len(calib)}" if len(calib) != 8 else "") + args.tag
    folder = Path("runs/promises") / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with torch.inference_mode():
        for target in args.targets.split(","):
            path = folder / f"{target.replace('=', '')}.plan.json"
            if not path.exists():
                started = time.perf_counter()
                p = plan(
                    pipe,
                    calib,
                    target,
                    steps,
                    batch_size=batch,
                    guidance_scale=guidance,
                    cost=args.cost,
                    check_prompts=checks,
                    measure_prompts=measured,
                    work_dir=folder / f"{target.replace('=', '')}.work",
                    progress=lambda text: print(f"  {text}", flush=True),
                )
                p.meta["benchmark_planning_seconds"] = round(time.perf_counter() - started, 1)
                p.save(path)
            rows.append((target, Schedule.load(path)))
        reference = generate(pipe, test, steps, guidance_scale=guidance, batch_size=batch)
        lines = [
            f"# Plans on unseen prompts: {args.model}",
            "",
            f"Planned on {len(calib)} calibration prompts (seed 7000), scored on {len(test)} test prompts "
            f"(seed 3000), {steps} steps, cost model {args.cost}"
            + (
                f"; the checks after the first ran on the {checks} calibration prompts it found hardest "
                "(the calibration columns are theirs)."
                if checks
                else "."
            )
            + (f" The errors were measured on the first {measured}." if measured else ""),
            "",
            "| target | checks | planning s | calib mean / lower / p5 | test mean / p5 | test - target (mean; p5 for psnr_p5=) "
            "| predicted speedup | measured speedup (planning) | served |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for target, p in rows:
            with ditscope.apply(pipe, ditscope.PlanConfig(p)):
                images = generate(pipe, test, steps, guidance_scale=guidance, batch_size=batch)
            psnr, _ = per_sample_psnr_ssim(images, reference)
            mean, p5 = statistics.fmean(psnr), float(np.percentile(psnr, 5))
            q, m = p.meta["quality"], p.meta
            kind, value = target.split("=")
            shortfall = (p5 if kind == "psnr_p5" else mean) - float(value)
            served = ", ".join(f"{a} {p.fraction(a):.0%}" for a in "RFTL" if p.fraction(a) > 0) or "-"
            stack = p.rows.get("stack", "")
            served += f"; stack skipped {stack.count('R')}/{p.steps}" if stack.count("R") else ""
            lines.append(
                f"| {target} | {m['evaluations']} | {m.get('benchmark_planning_seconds', m['planning_seconds']):.0f} "
                f"| {q['psnr']:.1f} / {q['psnr_lo']:.1f} / {q['psnr_p5']:.1f} | {mean:.1f} / {p5:.1f} "
                f"| {shortfall:+.1f} | {m['predicted_speedup']:.2f}x | {m['measured_speedup']:.2f}x | {served} |"
            )
            print(lines[-1], flush=True)
    out = Path(__file__).parent / "results" / "promises" / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
