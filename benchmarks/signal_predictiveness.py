"""Can a live signal tell which images a plan will hurt? The question under the adaptive bar.

    python benchmarks/signal_predictiveness.py tiny-pixart --plans runs/adaptive/tiny-pixart.psnr30.plan.json \
        --test-prompts 32

An adaptive plan can be as fast as a static plan at the same mean quality only if it spends its extra
computation on the images the static plan hurts most, so the signal it watches must rank images by the
damage to come. This measures that ranking directly. For each test set (prompts like the calibration ones,
and a shifted set with two objects per image) it runs the uncached model once with the calibration
recorder (`ditscope.planning.calibrate`: every unit's per-prompt reuse error, the first block's input
change), then each plan statically, and scores per image:

- `input`: the adaptive input signal's largest ratio to its calibrated limit (`PlanConfig(signal="input")`);
- `output`: the stack output change between the plan's full steps over its calibrated limit (`signal="output"`);
- `model`: the planner's own error model summed over what the plan serves, with this prompt's errors
  (the most any per-prompt signal measured on the uncached run can know).

Per signal: Spearman's rho against the image's PSNR (a useful signal is strongly negative), and the
recall of the worst 10% of images among the 25% the signal ranks highest (0.25 is chance). The signals
are taken from the uncached run; the live ones see the cached run, so this is an upper bound on what
they can know. Results go to --out (default benchmarks/results/n64/MODEL/signal_predictiveness.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import ditscope
from ditscope import PlanConfig, Schedule
from ditscope.cache.plan import _resampled_signal
from ditscope.cache.schedule_data import STACK
from ditscope.planning.planner import _calibration, stack_change
from ditscope.profiling.artifact import sha256_of
from ditscope.profiling.workload import generate
from ditscope.stats.quality import per_sample_psnr_ssim
from ditscope.zoo import evaluator


def per_prompt_error(cal, schedule: Schedule, steps: int) -> np.ndarray:
    """Per prompt: the sum over every (unit, served step) of that prompt's calibrated error of serving it
    (reuse or forecast from the unit's last computed step), the planner's additive error model."""
    m = cal.metrics.index("inject")
    index = {(cal.layer_names[layer], target): ki for ki, (layer, target, _, _) in enumerate(cal.keys)}
    stack = schedule.rows.get(STACK, "C" * steps)
    total = np.zeros(cal.values.shape[0])
    for unit, row in schedule.rows.items():
        last = 0
        for t, action in enumerate(row):
            if unit != STACK and stack[t] == "R":
                continue  # the whole stack is served: the stack's error counts it
            if action == "C":
                last = t
                continue
            kind = "forecast" if action == "F" else "reuse"
            ki = index.get((unit, f"{kind}@{t - last}"))
            if ki is not None:
                total += np.nan_to_num(cal.values[:, ki, t - 1, m], nan=0.0, posinf=0.0)
    return total


def full_steps(schedule: Schedule, steps: int) -> list[bool]:
    return [all(r[t] == "C" for r in schedule.rows.values()) for t in range(steps)]


def input_exceedance(cal, schedule: Schedule, steps: int) -> np.ndarray:
    """Per prompt: the largest ratio of the input signal summed since the last full step to the plan's limit."""
    full = full_steps(schedule, steps)
    calib = np.array(_resampled_signal(schedule.meta["signal"], steps))
    live = np.array([[0.0 if v is None else v for v in row] for row in cal.meta["signal"]])
    worst, last = np.zeros(len(live)), 0
    for t in range(steps):
        if full[t] or t == 0:
            last = t
            continue
        limit = calib[:, last + 1 : t + 1].sum(1).max()
        worst = np.maximum(worst, live[:, last + 1 : t + 1].sum(1) / max(limit, 1e-12))
    return worst


def output_exceedance(cal, schedule: Schedule, steps: int) -> np.ndarray:
    """Per prompt: the largest ratio, over the plan's full steps, of the stack's output change since the
    previous full step to the calibration prompts' largest at that step and lag."""
    m = cal.metrics.index("inject")
    stack = cal.layer_names.index(STACK)
    index = {target: ki for ki, (layer, target, _, _) in enumerate(cal.keys) if layer == stack}
    table = schedule.meta["stack_change"]
    full = [t for t, f in enumerate(full_steps(schedule, steps)) if f]
    worst = np.zeros(cal.values.shape[0])
    for prev, t in zip(full, full[1:]):
        lag = t - prev
        ki = index.get(f"reuse@{lag}")
        limit = table[t][lag - 1] if lag <= len(table[t]) else None
        if ki is None or not limit:
            continue
        worst = np.maximum(worst, np.nan_to_num(cal.values[:, ki, t - 1, m]) / limit)
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="tiny-pixart")
    ap.add_argument(
        "--plans", required=True, help="comma list of plan files (from ditscope plan or adaptive.py)"
    )
    ap.add_argument("--test-prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--work",
        type=Path,
        default=Path("runs/adaptive"),
        help="adaptive.py's folder: plans without the output signal's table take it from their calibration "
        "there; the test sets' calibration runs are kept there for a rerun",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    pipe = ditscope.zoo.load(args.model)
    pipe.set_progress_bar_config(disable=True)
    entry = ditscope.zoo.ZOO[args.model]
    steps, guidance, bs = entry.steps, entry.guidance_scale, args.batch_size
    plans = [(Path(p).name, Schedule.load(p)) for p in args.plans.split(",") if p]
    for _, schedule in plans:  # a plan kept from before the output signal: its calibration holds the table
        if "stack_change" in schedule.meta:
            continue
        work = args.work / f"plan-{schedule.meta.get('target')}.work"
        made = schedule.meta["calibration"]
        if not (
            work / "calibration.ditscope"
        ).exists():  # recomputed once per calibration: adaptive.py's prompts
            work = (
                args.work
                / f"calibration-{made['prompts_hash']}-{made['seed']}-{made['batch_size']}-{made['guidance_scale']}"
            )
        if not (work / "calibration.ditscope").exists():
            _, calib = evaluator.evaluation_prompts(pipe, made["n_prompts"], seed=7000)
            if sha256_of([str(c) for c in calib]) != made["prompts_hash"]:
                raise SystemExit(
                    f"error: {schedule.meta.get('target')} plan: its calibration prompts are not the zoo's "
                    "seed-7000 draw; give the --work folder it was made in"
                )
            work.mkdir(parents=True, exist_ok=True)
            _calibration(
                pipe,
                pipe.transformer,
                calib,
                steps,
                made["seed"],
                made["batch_size"],
                made["guidance_scale"],
                work,
                print,
            )
        schedule.meta["stack_change"] = stack_change(ditscope.Profile.load(work / "calibration.ditscope"))
    sets = evaluator.held_out_sets(pipe, args.test_prompts)
    lines = [
        f"# Does a signal rank images by the damage a plan does? {args.model}, {args.test_prompts} test prompts "
        f"per set, {steps} steps",
        "",
        f"`python benchmarks/signal_predictiveness.py {args.model} --plans {args.plans} --test-prompts "
        f"{args.test_prompts}`",
        "",
        "Spearman's rho of each per-image signal against the image's PSNR under the static plan (useful: "
        "strongly negative); recall: the share of the worst 10% of images among the 25% the signal ranks "
        "highest (chance: 0.25).",
        "",
        "| test set | plan | PSNR mean / p5 | rho input | rho output | rho model | recall input | recall output "
        "| recall model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with torch.inference_mode():
        for name, prompts in sets.items():
            print(f"{name}: calibration run on {len(prompts)} prompts", flush=True)
            # the planner's own calibration step: kept in the work folder and read back on a rerun
            kept = (
                args.work / f"signal-{args.model}-{'shifted' if 'shifted' in name else 'like'}-{len(prompts)}"
            )
            kept.mkdir(parents=True, exist_ok=True)
            cal, reference, _ = _calibration(
                pipe, pipe.transformer, prompts, steps, 0, bs, guidance, kept, print
            )
            for label, schedule in plans:
                with ditscope.apply(pipe, PlanConfig(schedule)):
                    images = generate(pipe, prompts, steps, 0, bs, guidance)
                psnr = np.array(per_sample_psnr_ssim(images, reference)[0])
                signals = {
                    "input": input_exceedance(cal, schedule, steps),
                    "output": output_exceedance(cal, schedule, steps),
                    "model": per_prompt_error(cal, schedule, steps),
                }
                worst = set(np.argsort(psnr)[: max(1, len(psnr) // 10)])
                top = max(1, len(psnr) // 4)
                rho = {k: spearmanr(v, psnr).statistic for k, v in signals.items()}
                recall = {k: len(worst & set(np.argsort(-v)[:top])) / len(worst) for k, v in signals.items()}
                lines.append(
                    f"| {name} | {label} ({schedule.meta.get('mode', '?')}) | {psnr.mean():.1f} / "
                    f"{np.percentile(psnr, 5):.1f} | "
                    + " | ".join(f"{rho[k]:+.2f}" for k in signals)
                    + " | "
                    + " | ".join(f"{recall[k]:.2f}" for k in signals)
                    + " |"
                )
                print(lines[-1], flush=True)
    out = args.out or Path(__file__).parent / "results" / "n64" / args.model / "signal_predictiveness.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
