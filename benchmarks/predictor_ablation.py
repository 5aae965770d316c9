"""What each predictor is worth: plans searched with fewer predictors, and FORA's schedule served by each
predictor, fitted on calibration prompts and scored on test prompts.

    python benchmarks/predictor_ablation.py tiny-pixart --target psnr=30 --test-prompts 32

Plans (modules only, so that the predictors are what differs; FLOPs cost model, so that the choice does not
depend on a busy machine's timings): R (reuse only), RF (+ linear forecast), RFT (+ second-order Taylor),
RFL (+ the fitted forecast), RFTL (all). Fixed schedules: FORA's (one full step, then every n-th) with each
predictor on the served steps (R is FORA, F and T are TaylorSeer of order 1 and 2, L the fitted forecast
with the calibration's weights). Calibration prompts: zoo seed 7000; test prompts: seed 3000. FLOPs ratios
are exact (counted per module); PSNR mean and 5th percentile over the test images. Results go to
benchmarks/results/predictors/MODEL_TARGET.md; the planning work folder (runs/predictor_ablation/MODEL)
keeps the calibration and every check, so a stopped run resumes.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
import zoo_split

import ditscope
from ditscope import Profile, Schedule
from ditscope.cache.actions import full_step
from ditscope.planning.planner import plan
from ditscope.planning.search import costs_from, with_weights
from ditscope.profiling.workload import generate
from ditscope.stats.quality import per_sample_psnr_ssim

PLANS = ("R", "RF", "RFT", "RFL", "RFTL")


def fora_rows(cal: Profile, interval: int, action: str) -> Schedule:
    steps = cal.n_steps
    row = "".join("C" if full_step(t, interval, 1) else action for t in range(steps))
    sites = [u for u, v in cal.meta["units"].items() if v["kind"] not in ("block", "stack")]
    return with_weights(Schedule({u: row for u in sites}), cal)


def main():
    ap = zoo_split.arguments(__doc__)
    ap.add_argument("--intervals", default="2,3,4")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    split = zoo_split.load(args)
    pipe, steps, guidance, batch = split.pipe, split.steps, split.guidance, args.batch_size
    calib, test = split.calibration, split.test
    work = Path("runs/predictor_ablation") / args.model
    rows = []
    with torch.inference_mode():
        reference = generate(pipe, test, steps, guidance_scale=guidance, batch_size=batch)

        def score(schedule: Schedule) -> tuple[float, float, dict]:
            with ditscope.apply(pipe, ditscope.PlanConfig(schedule)):
                images = generate(pipe, test, steps, guidance_scale=guidance, batch_size=batch)
            psnr, _ = per_sample_psnr_ssim(images, reference)
            return statistics.fmean(psnr), float(np.percentile(psnr, 5))

        def served(schedule: Schedule) -> str:
            share = {a: schedule.fraction(a) for a in "RFTL"}
            return ", ".join(f"{a} {v:.0%}" for a, v in share.items() if v > 0) or "-"

        for predictors in PLANS:
            started = time.perf_counter()
            p = plan(
                pipe,
                calib,
                args.target,
                steps,
                batch_size=8,
                guidance_scale=guidance,
                modes=("sites",),
                cost="flops",
                predictors=predictors,
                work_dir=work,
                progress=lambda text: print(f"  {text}", flush=True),
            )
            seconds = time.perf_counter() - started
            mean, p5 = score(p)
            q = p.meta["quality"]
            rows.append(
                (
                    f"plan, predictors {predictors}",
                    served(p),
                    q["psnr"],
                    q["psnr_p5"],
                    mean,
                    p5,
                    p.meta["predicted_speedup"],
                    f"{p.meta['checks']['count']} checks, {seconds:.0f} s",
                )
            )
            print(rows[-1], flush=True)
        cal = Profile.load(work / "calibration.ditscope")
        costs = costs_from(cal, flops=True)
        full = costs.step * steps
        for interval in (int(n) for n in args.intervals.split(",")):
            for action, name in (
                ("R", "FORA"),
                ("F", "TaylorSeer order 1"),
                ("T", "TaylorSeer order 2"),
                ("L", "fitted"),
            ):
                schedule = fora_rows(cal, interval, action)
                mean, p5 = score(schedule)
                rows.append(
                    (
                        f"interval {interval}: {name}",
                        served(schedule),
                        None,
                        None,
                        mean,
                        p5,
                        full / costs.of(schedule, steps),
                        "",
                    )
                )
                print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / "predictors" / f"{args.model}_{args.target.replace('=', '')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# What each predictor is worth: {args.model}, target {args.target}",
        "",
        f"Fitted on {len(calib)} calibration prompts (seed 7000), scored on {len(test)} test prompts (seed 3000), "
        f"{steps} steps. Served module cells by predictor (of the steps the stack runs). FLOPs: counted per module.",
        "",
        "| variant | served by | PSNR calib | p5 calib | PSNR test | p5 test | FLOPs speedup | planning |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, by, qc, pc, mean, p5, speed, note in rows:
        calib_cells = f"{qc:.1f} | {pc:.1f}" if qc is not None else "- | -"
        lines.append(f"| {name} | {by} | {calib_cells} | {mean:.1f} | {p5:.1f} | {speed:.2f}x | {note} |")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
