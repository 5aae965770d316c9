"""`ditscope recommend`: which cache to use for a quality target, answered by measurement.

Every candidate is fitted to the target on the calibration prompts with the helper that fits it, then scored
on held-out prompts it was not fitted on, against the uncached images at the full step count:

- `steps`: the uncached model at fewer steps (the baseline every cache has to beat), its step count fitted
  to the target by bisection on the calibration prompts (quality is taken to grow with the step count);
- `plan`: `ditscope.plan` at the target (`planning/planner.py`; FLOPs cost model, so that a busy machine
  cannot sway it, and fewer prices per search line than `ditscope plan`, for the time box);
- any method with a knob (`fora`, `teacache`, `fbcache`, `toca`, ...): `ditscope.tune` at the target
  (`bench/tune.py`).

A fitted candidate holds when the lower end of the 95% bootstrap interval of the mean over the held-out prompts
(`stats/intervals.py`) reaches the target, as `tune` and `plan` decide on the calibration prompts. Speed is
executed FLOPs (`torch.utils.flop_counter`, counted on the held-out run, `bench/runner.py`) against the uncached
model: on a machine shared with other work, measured time would rank the candidates by the neighbours' load.
The recommendation is the fastest candidate that holds (ties: the better lower end); one that misses is listed,
never chosen, and so is one that saves no work (1.00x FLOPs); when none is left, no cache.

Time box: candidates run in the order given (the default puts the cheap fits that did well on the zoo models
first: `benchmarks/RESULTS.md`). One is started only while the budget leaves time for a fit step and its scoring,
and a fit is stopped at its next evaluation once the time left is what scoring needs; what did not run is named.
Resumable: every finished candidate, the references and the fits' own work live in a work folder keyed by a hash
of everything that decides the result; the same command continues, another argument set starts apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DitscopeError
from ..files import load_images, save_images, write_text_atomic
from ..planning.planner import Target
from ..stats.intervals import mean_interval, quantile_lower_bound

DEFAULT_TARGET = "psnr=35"
FEWER_STEPS = "steps"
PLAN = "plan"
# cheap fits first: fewer steps (a bisection over step counts) and FORA (an integer knob) found the strongest
# settings at psnr=35 on tiny-pixart (benchmarks/RESULTS.md); the plan's search costs the most; ToCa missed the target
CANDIDATES = (FEWER_STEPS, "fora", PLAN, "teacache", "fbcache", "toca")
PLAN_MAX_CHECKS = 10  # end-to-end checks of the plan's search at most (ditscope plan's default)
FORMAT, VERSION = "ditscope-recommend", 1


class OutOfBudget(Exception):
    """Raised from a fit's progress report when the time box closes (its work stays, to resume)."""


# ------------------------------------------------------------------------------------------ checks
def parse_budget(text: str) -> float:
    """'10m', '90s', '1h', '1.5m' or plain seconds -> seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)", str(text).strip().lower())
    if not match:
        raise DitscopeError(f"--budget {text!r}: use a duration such as 10m, 90s or 1h")
    seconds = float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]
    if not seconds > 0:
        raise DitscopeError(f"--budget {text!r}: the time box must be longer than 0")
    return seconds


def check_target(text: str) -> Target:
    goal = Target.parse(text)
    if not goal.quality:
        raise DitscopeError(
            f"--target {text!r}: recommend keeps a quality target (psnr=DB or ssim=S) and finds the "
            "fastest setting that holds it; for a speed target use ditscope tune or plan"
        )
    return goal


def check_candidates(names) -> list[str]:
    """The candidate list: `steps`, `plan`, and ditscope methods with a knob `tune` fits."""
    from ..cache.registry import REGISTRY

    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not names:
        raise DitscopeError("--candidates is empty; give a comma list such as " + ",".join(CANDIDATES))
    fitted = [m for m, e in REGISTRY.items() if e.knob is not None]
    for name in names:
        if name not in (FEWER_STEPS, PLAN, *fitted):
            from .peers import PEERS

            peer = " (peers run in ditscope bench; generate cannot apply them)" if name in PEERS else ""
            raise DitscopeError(
                f"unknown candidate {name!r}{peer}; choose from {', '.join([FEWER_STEPS, PLAN, *fitted])}"
            )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DitscopeError(f"candidate {dup[0]!r} is listed twice")
    return names


def work_key(**parts) -> str:
    """A hash of everything that determines a recommendation (the work folder's name)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------- scoring rules
def summarize(record: dict, reference_flops: float | None, goal: Target) -> dict:
    """One table row from a candidate's saved record: speedup (uncached FLOPs over its FLOPs), mean PSNR and
    SSIM over the held-out prompts with the lower ends of their 95% intervals, the 5th-percentile PSNR, and
    whether the target holds (the lower end of the target's metric reaches it)."""
    row = {
        "name": record["name"],
        "setting": record.get("setting", ""),
        "status": record["status"],
        "note": record.get("note", ""),
    }
    if record["status"] != "scored":
        return row
    psnr, ssim = record["per_sample"]["psnr"], record["per_sample"]["ssim"]
    p_mean, p_lo, _ = mean_interval(psnr)
    s_mean, s_lo, _ = mean_interval(ssim)
    row.update(
        speedup=reference_flops / record["flops"],
        psnr=p_mean,
        psnr_lo=p_lo,
        psnr_p5=float(np.percentile(psnr, 5)),
        psnr_p5_lo=quantile_lower_bound(psnr),
        ssim=s_mean,
        ssim_lo=s_lo,
        n=len(psnr),
    )
    row["holds"] = bool(row[goal.field()] >= goal.value)
    return row


SAVES_NOTHING = 1e-6  # a FLOPs speedup within this of 1


def choose(rows: list[dict], goal: Target) -> dict | None:
    """The fastest scored row that holds `goal` on the held-out prompts (ties: the higher lower end), or None.
    A row that saves no work (1.00x FLOPs: a knob fitted so mild that it computes everything) is no cache."""
    held = [
        r
        for r in rows
        if r["status"] == "scored" and r[goal.field()] >= goal.value and r["speedup"] > 1 + SAVES_NOTHING
    ]
    if not held:
        return None
    return max(held, key=lambda r: (r["speedup"], r[goal.field()]))


def ranked(rows: list[dict], goal: Target) -> list[dict]:
    """Rows that hold (fastest first), then those that miss (fastest first), then the unreachable and the
    untried, in their order."""
    order = {"unreachable": 2, "skipped": 3}

    def key(item):
        i, r = item
        if r["status"] == "scored":
            return (0 if r["holds"] else 1, -r["speedup"], -r[goal.kind + "_lo"], i)
        return (order.get(r["status"], 4), 0, 0, i)

    return [r for _, r in sorted(enumerate(rows), key=key)]


# --------------------------------------------------------------------------------------- the result
@dataclass
class Recommendation:
    goal: Target
    steps: int
    rows: list[dict]  # ranked table rows
    records: list[dict]  # what each candidate saved (per-prompt values included)
    reference_flops: float
    n_calibration: int
    n_test: int
    chosen: dict | None
    skipped: list[str] = field(default_factory=list)
    work: Path | None = None
    seconds: float = 0.0

    def record(self, name: str) -> dict:
        return next(r for r in self.records if r["name"] == name)

    def table(self) -> list[str]:
        """The ranked table as text lines (what the command prints)."""
        lines = [
            f"{'#':>2}  {'method':<10} {'setting':<30} {'speedup':>8} {'PSNR':>6} {'lower':>6} {'p5':>6} "
            f"{'SSIM':>6} {'lower':>6}  held-out"
        ]
        for i, r in enumerate(self.rows, 1):
            if r["status"] == "scored":
                lines.append(
                    f"{i:>2}  {r['name']:<10} {r['setting'][:30]:<30} {r['speedup']:>7.2f}x {r['psnr']:>6.1f} "
                    f"{r['psnr_lo']:>6.1f} {r['psnr_p5']:>6.1f} {r['ssim']:>6.3f} {r['ssim_lo']:>6.3f}  "
                    f"{'holds' if r['holds'] else 'misses'}"
                )
            else:
                lines.append(f"{'-':>2}  {r['name']:<10} {r['note']}")
        return lines

    def use_line(self, config_path: Path | None, steps_flag: bool) -> str:
        """The one-line answer, e.g. `use: --cache fora.json   2.84x FLOPs, 38.7 dB on 16 held-out prompts`."""
        n = f"{self.n_test} held-out prompts"
        if self.chosen is None:
            return f"use: no cache (no candidate that saves work held {self.goal} on the {n})"
        r = self.chosen
        quality = (
            f"{r['psnr']:.1f} dB (lower {r['psnr_lo']:.1f})"
            if self.goal.kind == "psnr"
            else f"SSIM {r['ssim']:.3f} (lower {r['ssim_lo']:.3f})"
        )
        tail = f"{r['speedup']:.2f}x FLOPs, {quality} on {n}"
        if r["name"] == FEWER_STEPS:
            return f"use: --steps {self.record(FEWER_STEPS)['steps']} (no cache)   {tail}"
        at = f" --steps {self.steps}" if steps_flag else ""
        if r["name"] == PLAN:
            return f"use: --cache plan --cache-opt path={config_path}{at}   {tail}"
        return f"use: --cache {config_path}{at}   {tail}"


def config_name(model: str, chosen: dict | None) -> str | None:
    """The file the winning config is written to, inside the output folder (None: nothing to write)."""
    if chosen is None or chosen["name"] == FEWER_STEPS:
        return None
    stem = Path(model).name
    return f"{stem}.plan.json" if chosen["name"] == PLAN else f"{stem}.{chosen['name']}.json"


def write_result(
    rec: Recommendation, out: Path, model: str, steps_flag: bool, extra: dict | None = None
) -> tuple[str, Path, Path | None]:
    """Write the winning config (a plan file or a tuned config) and OUT/MODEL.recommend.json (the table, every
    candidate's per-prompt values, the answer); returns (the use line, the result file, the config file)."""
    from ..cache.schedule_data import Schedule
    from .tune import Tuned

    out.mkdir(parents=True, exist_ok=True)
    name = config_name(model, rec.chosen)
    config = out / name if name else None
    if config is not None:
        source = (
            Path(rec.work or ".") / rec.record(rec.chosen["name"])["config"]
        )  # kept relative to the work folder
        (Schedule.load(source) if rec.chosen["name"] == PLAN else Tuned.load(source)).save(config)
    line = rec.use_line(config, steps_flag)
    body = {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "target": str(rec.goal),
        "steps": rec.steps,
        "speed": "executed FLOPs against the uncached model",
        "reference_flops": rec.reference_flops,
        "n_calibration": rec.n_calibration,
        "n_test": rec.n_test,
        **(extra or {}),
        "table": rec.rows,
        "chosen": rec.chosen["name"] if rec.chosen else None,
        "use": line,
        "config": str(config) if config else None,
        "skipped": rec.skipped,
        "seconds": round(rec.seconds, 1),
        "candidates": [{k: v for k, v in r.items() if k != "config"} for r in rec.records],
    }
    result = out / f"{Path(model).name}.recommend.json"
    write_text_atomic(result, json.dumps(body, indent=1, default=str) + "\n")
    return line, result, config


# ------------------------------------------------------------------------------------------- the run
def recommend(
    pipe,
    calibration: list,
    test: list,
    target: str = DEFAULT_TARGET,
    num_inference_steps: int = 20,
    candidates=CANDIDATES,
    budget: float = 600.0,
    batch_size: int = 8,
    guidance_scale=None,
    work_dir=None,
    progress=None,
    advance=None,
    started: float | None = None,
    clock=time.monotonic,
) -> Recommendation:
    """Fit every candidate to `target` on `calibration`, score it on `test` against the uncached model at
    `num_inference_steps`, and rank them (module docstring). `budget`: seconds from `started` (default: now).
    `progress(text)` reports each evaluation, `advance(done, total)` each finished part (the two references
    and each candidate). `work_dir` keeps everything finished: the same call resumes."""
    from .grid import BASELINE, Setting
    from .runner import BenchInputs, run_setting

    goal = check_target(target)
    names = check_candidates(candidates)
    if not calibration or not test:
        raise DitscopeError("recommend needs calibration prompts and held-out prompts")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 2:
        raise DitscopeError(f"recommend needs num_inference_steps >= 2, not {num_inference_steps!r}")
    say = progress or (lambda text: None)
    tick = advance or (lambda done, total: None)
    t0 = clock() if started is None else started
    work = Path(work_dir) if work_dir is not None else Path(".")
    (work / "candidates").mkdir(parents=True, exist_ok=True)  # one record per finished candidate
    total = len(names) + 1
    inputs = BenchInputs(
        model="",
        prompts=list(test),
        seeds=[0],
        steps=num_inference_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        repeats=0,
    )

    # the uncached images of the held-out prompts at the full step count, and their FLOPs
    ref_json, ref_file = work / "test_reference.json", work / "test_reference.safetensors"
    if ref_json.exists() and ref_file.exists():
        meta = json.loads(ref_json.read_text())
        reference = load_images(ref_file)
        say("held-out reference: resumed from the work folder")
    else:
        say(f"held-out reference: {len(test)} prompts x {num_inference_steps} steps, uncached")
        start = clock()
        row = run_setting(pipe, Setting("baseline", BASELINE), inputs, None, None, None, None)
        reference = row["_images"]
        meta = {"flops": row["flops"], "seconds": clock() - start}
        save_images(ref_file, reference)
        write_text_atomic(ref_json, json.dumps(meta))
    tick(1, total)
    score_seconds = meta["seconds"]  # what scoring one candidate costs at most (an uncached pass over `test`)
    calib_seconds = (
        score_seconds * len(calibration) / len(test)
    )  # one uncached pass over the calibration prompts

    records, skipped = [], []
    for done, name in enumerate(names, 2):
        path = work / "candidates" / f"{name}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
            say(f"{name}: resumed from the work folder")
            tick(done, total)
            continue
        left = budget - (clock() - t0)
        if left < score_seconds + calib_seconds:
            records.append({"name": name, "status": "skipped", "note": "not tried: the time box ran out"})
            skipped.append(name)
            tick(done, total)
            continue
        deadline = t0 + budget - score_seconds

        def watch(text, name=name, deadline=deadline):
            say(f"{name}: {text}")
            if clock() > deadline:
                raise OutOfBudget

        try:
            record = _fit(
                pipe, name, calibration, goal, num_inference_steps, batch_size, guidance_scale, work, watch
            )
        except OutOfBudget:
            records.append(
                {
                    "name": name,
                    "status": "skipped",
                    "note": "stopped while fitting: the time box ran out (its work is kept)",
                }
            )
            skipped.append(name)
            tick(done, total)
            continue
        except DitscopeError as e:  # the target is out of this candidate's reach on the calibration prompts
            record = {"name": name, "status": "unreachable", "note": str(e)}
        if record["status"] == "fitted":
            say(f"{name}: scoring on {len(test)} held-out prompts")
            row = run_setting(pipe, record.pop("run"), inputs, reference, None, None, None)
            record.update(
                status="scored",
                flops=row["flops"],
                per_sample={k: row["per_sample"][k] for k in ("psnr", "ssim")},
            )
        write_text_atomic(path, json.dumps(record, default=str))
        records.append(record)
        tick(done, total)

    rows = ranked([summarize(r, meta["flops"], goal) for r in records], goal)
    return Recommendation(
        goal,
        num_inference_steps,
        rows,
        records,
        meta["flops"],
        len(calibration),
        len(test),
        choose(rows, goal),
        skipped,
        work,
        clock() - t0,
    )


def _fit(
    pipe,
    name: str,
    calibration: list,
    goal: Target,
    steps: int,
    batch_size: int,
    guidance_scale,
    work: Path,
    say,
) -> dict:
    """Fit candidate `name` on the calibration prompts: a record with its setting, the Setting that runs it
    (`run`), and for plans and tuned methods the config file kept in the work folder."""
    from .grid import FEWER_STEPS as BENCH_FEWER_STEPS
    from .grid import Setting

    fit_work = work / "fit"  # the tuned methods and the fewer-steps fit share the calibration reference
    if name == FEWER_STEPS:
        k, row = _fit_steps(pipe, calibration, goal, steps, batch_size, guidance_scale, fit_work, say)
        return {
            "name": name,
            "status": "fitted",
            "setting": f"{k} of {steps} steps",
            "steps": k,
            "fit": _rounded(row),
            "run": Setting("baseline", BENCH_FEWER_STEPS, steps=k),
        }
    if name == PLAN:
        from ..planning.planner import plan

        schedule = plan(
            pipe,
            calibration,
            str(goal),
            steps,
            batch_size=batch_size,
            guidance_scale=guidance_scale,
            cost="flops",
            max_checks=PLAN_MAX_CHECKS,
            work_dir=work / "plan.work",
            progress=say,
        )
        config = schedule.save(work / "configs" / f"{PLAN}.plan.json")
        setting = _plan_setting(schedule)
        return {
            "name": name,
            "status": "fitted",
            "setting": setting,
            "config": str(config.relative_to(work)),
            "fit": schedule.meta["quality"],
            "run": Setting("ditscope", PLAN, {"path": str(config)}),
        }
    from .tune import tune

    tuned = tune(
        pipe,
        name,
        calibration,
        str(goal),
        steps,
        batch_size=batch_size,
        guidance_scale=guidance_scale,
        work_dir=fit_work,
        progress=say,
        timed=False,
    )
    config = work / "configs" / f"{name}.tuned.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    tuned.save(config)
    value = tuned.meta["value"]
    setting = f"{tuned.meta['knob']}={value if isinstance(value, int) else f'{value:.4g}'}"
    return {
        "name": name,
        "status": "fitted",
        "setting": setting,
        "options": tuned.options,
        "config": str(config.relative_to(work)),
        "fit": tuned.meta["quality"],
        "run": Setting("ditscope", name, dict(tuned.options)),
    }


def _fit_steps(pipe, calibration, goal: Target, steps: int, batch_size: int, guidance_scale, work: Path, say):
    """The fewest steps whose uncached images hold `goal` against the full-step ones on the calibration prompts
    (the lower end of the 95% interval, as `tune` decides): a bisection between 1 (taken to miss) and `steps`."""
    from ..planning.planner import Evaluations
    from .tune import _reference

    work.mkdir(parents=True, exist_ok=True)
    reference = _reference(pipe, calibration, steps, 0, batch_size, guidance_scale, work, say)

    def measure(k: int) -> dict:
        evaluations = Evaluations(
            pipe, calibration, k, 0, batch_size, guidance_scale, reference, work / "evaluations.jsonl"
        )
        row = evaluations.measure(json.dumps([FEWER_STEPS, k]), lambda: lambda: None)
        ok = row[goal.kind + "_lo"] >= goal.value
        say(
            f"{k} steps: PSNR {row['psnr']:.2f} dB (lower {row['psnr_lo']:.2f}), SSIM {row['ssim']:.3f}: "
            f"{'holds' if ok else 'misses'}"
        )
        return row | {"holds": ok}

    lo, hi, rows = 1, steps, {}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        rows[mid] = measure(mid)
        lo, hi = (lo, mid) if rows[mid]["holds"] else (mid, hi)
    if hi == steps:
        if steps - 1 < 2:
            raise DitscopeError(f"no step count between 2 and {steps - 1} to try")
        row = rows[steps - 1]
        raise DitscopeError(
            f"{steps - 1} steps miss {goal} on the calibration prompts (PSNR {row['psnr']:.2f} dB, "
            f"lower {row['psnr_lo']:.2f})"
        )
    return hi, rows[hi]


def _plan_setting(schedule) -> str:
    """What a plan computes, in a few words: the steps its block stack runs, and the share of modules computed
    on them when it plans modules too."""
    from ..cache.schedule_data import STACK

    mode = schedule.meta.get("mode", "plan")
    stack = schedule.rows.get(STACK)
    parts = [mode]
    if stack is not None:
        parts.append(f"{stack.count('C')}/{len(stack)} steps run")
    if mode != "stack":
        parts.append(f"{schedule.fraction('C'):.0%} modules")
    return ", ".join(parts)


def _rounded(row: dict) -> dict:
    return {k: round(v, 4) for k, v in row.items() if isinstance(v, float) and math.isfinite(v)}
