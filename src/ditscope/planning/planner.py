"""`ditscope.plan`: calibrate, search, check end to end, and return the plan (a `Schedule`).

1. Calibrate on the calibration prompts with the uncached model (`calibrate.py`): every unit's error of
   being served from 1..K steps back or forecast, and its measured cost.
2. For a price of error, compile the cheapest schedule (`search.py`).
3. Quality targets: compile the candidates without running them (each mode's schedules over a fine grid of
   prices, and the fixed-interval ones), each with its predicted speedup and predicted error, and check at
   most `max_checks` of them end to end (run on the calibration prompts, compared with the uncached images),
   ranked by their chance to hold times their speed gain under a model of the measured quality on the
   predicted error, fitted on the checks already run (`budget.py`). Speed targets hold by the cost model's
   prediction: `iterations` prices per search line are scanned. The search runs for each mode (stack and
   sites, stack only, sites only); the best of each is timed on this machine and the fastest measured is kept.

Targets: `psnr=DB`, `ssim=S` (mean over the calibration prompts), `speedup=X` (predicted from the
measured unit costs, then measured), `flops=X` (predicted from counted FLOPs). A planning run with a
`work_dir` keeps its calibration and every evaluation there, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact import Profile, sha256_of
from ..cache.actions import full_step
from ..cache.layout import find_transformer
from ..cache.plan import PlanConfig
from ..cache.schedule_data import STACK, Schedule, model_signature
from ..errors import DitscopeError, EveryRankError
from ..files import load_images, save_images, write_text_atomic
from ..holds import hold
from ..parallel import run_layout
from ..profiling.workload import (
    FirstBatchClock,
    data_parallel,
    first_batch_prompts,
    from_first,
    generate,
    median_seconds,
    writes,
)
from ..stats.intervals import mean_interval, quantile_lower_bound
from ..stats.quality import per_sample_psnr_ssim
from .calibrate import VERSION as CALIBRATION_VERSION
from .calibrate import calibrate, pipeline_identity
from .search import MODES, PREDICTORS, compile_schedule, costs_from, predicted_error, price_scale

TARGETS = ("psnr", "ssim", "psnr_p5", "speedup", "flops")  # psnr_p5: the worst images' (5th percentile) PSNR
GRANULARITIES = ("step", "kind", "site")
LOG_PRICE_RANGE = (-2.0, 3.0)  # log10 of the price, in units of `price_scale`


@dataclass(frozen=True)
class Target:
    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        kind, sep, raw = str(text).partition("=")
        kind = kind.strip().lower()
        if not sep or kind not in TARGETS:
            raise DitscopeError(
                f"unknown target {text!r}; use one of psnr=DB, ssim=S, psnr_p5=DB, speedup=X, flops=X"
            )
        try:
            value = float(raw)
        except ValueError:
            raise DitscopeError(f"target {text!r}: {raw!r} is not a number") from None
        limits = {
            "psnr": (0, 100),
            "psnr_p5": (0, 100),
            "ssim": (0, 1),
            "speedup": (1, math.inf),
            "flops": (1, math.inf),
        }[kind]
        if not limits[0] < value <= limits[1] or not math.isfinite(value):
            raise DitscopeError(
                f"target {text!r} is unreachable: {kind} must be in ({limits[0]}, {limits[1]}]"
            )
        return cls(kind, value)

    @property
    def quality(self) -> bool:
        return self.kind in ("psnr", "ssim", "psnr_p5")

    def met_by(self, row: dict, assurance: str = "lower") -> bool:
        """Whether an evaluation row meets this quality target: the mean over the calibration images, or with
        assurance "lower" the lower end of its 95% interval; psnr_p5, the worst images' target (a mean target
        lets a plan sacrifice a few images), on the 5th percentile of the images' PSNR, or with assurance
        "lower" its distribution-free 95% lower bound (stats.intervals.quantile_lower_bound: the worst image
        below 59 images)."""
        return row[self.field(assurance)] >= self.value

    def field(self, assurance: str = "lower") -> str:
        """The evaluation row's statistic this quality target is checked on."""
        return self.kind + ("_lo" if assurance == "lower" else "")

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


def check_calibration(prompts, batch_size, what: str) -> None:
    """The calibration prompts are a list of at least one prompt (a lone string is not: its characters would
    be the prompts) and the batch size an integer >= 1."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise DitscopeError(
            f"{what} takes a list of calibration prompts, not {type(prompts).__name__}: pass [prompt]"
        )
    if len(prompts) < 1:
        raise DitscopeError(f"{what} needs at least one calibration prompt")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise DitscopeError(f"{what} needs batch_size >= 1, not {batch_size!r}")


# an evaluation row's fields that are not a quality
NOT_QUALITY = ("key", "stamp", "speedup", "first_batch_seconds", "first_batch_prompts", "ran_on", "psnr_each")


class Evaluations:
    """Quality of schedules on the calibration prompts, run once each (and kept on disk to resume)."""

    def __init__(
        self,
        pipe,
        prompts,
        steps,
        seed,
        batch_size,
        guidance_scale,
        reference,
        path: Path | None,
        layout=None,
        narrow_to: int | None = None,
    ):
        """`reference`: the uncached images of every prompt. `narrow_to`: the first check runs on every prompt,
        the later ones only on the `narrow_to` prompts it found hardest (lowest PSNR), and every check's
        statistics are over those (default: every check on every prompt)."""
        self.pipe, self.prompts, self.steps, self.seed, self.layout = pipe, prompts, steps, seed, layout
        self.narrow_to = narrow_to if narrow_to is not None and narrow_to < len(prompts) else None
        self.items: list[int] | None = None  # the prompts the checks run on (None: every one)
        self.batch_size, self.guidance_scale, self.reference, self.path = (
            batch_size,
            guidance_scale,
            reference,
            path,
        )
        self.done: dict[str, dict] = {}
        # a kept row holds only where everything that made it is the same: the images it was compared with (they
        # stand for the model, prompts, seeds, steps, scheduler and guidance), and how the run was batched
        self.stamp = sha256_of(
            {
                "reference": hashlib.sha256(
                    reference.detach().cpu().contiguous().numpy().tobytes()
                ).hexdigest(),
                "prompts": [str(p) for p in prompts],
                "steps": steps,
                "seed": seed,
                "batch_size": batch_size,
                "guidance_scale": guidance_scale,
                "layout": repr(layout),
            }
            | ({"narrow_to": self.narrow_to} if self.narrow_to is not None else {})
        )
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    if (
                        "psnr_p5_lo" in row and row.get("stamp") == self.stamp
                    ):  # another run's rows: not this one's
                        self.done[row["key"]] = row
                        if self.narrow_to is not None and self.items is None:  # the first check's row
                            self.items = self._hardest(row["psnr_each"])
                except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                    continue
        self.runs = 0
        self.checked: dict[str, Schedule] = {}  # the schedules asked for, by key
        self._plain: float | None = None  # the uncached run's seconds, timed on first use

    @staticmethod
    def key(schedule: Schedule) -> str:
        return hashlib.sha1(json.dumps(schedule.rows, sort_keys=True).encode()).hexdigest()[:16]

    def __call__(self, schedule: Schedule) -> dict:
        from ..cache import apply

        self.checked[self.key(schedule)] = schedule
        return self.measure(
            self.key(schedule), lambda: apply(self.pipe, PlanConfig(schedule), layout=self.layout).remove
        )

    def measure(self, key: str, applied, timed: bool = False) -> dict:
        """Quality of the images made while `applied()` is in force (it applies a cache and returns its
        remove function); with `timed`, also the measured speedup on the first batch."""
        if key not in self.done or (timed and "speedup" not in self.done[key]):
            remove = applied()
            clock = FirstBatchClock()
            ran_on = self.items
            try:
                images = self._generate(ran_on, before_batch=clock.tick, after_batch=clock.tick)
                seconds = self.seconds_per_run() if timed else None
            finally:
                remove()
            reference = self.reference if ran_on is None else self.reference[ran_on]
            psnr_each, ssim_each = per_sample_psnr_ssim(images, reference)
            # as the row keeps them, so that a resumed run narrows alike
            kept_each = [float(f"{v:.6g}") for v in psnr_each]
            if self.narrow_to is not None and ran_on is None:
                self.items = self._hardest(kept_each)
            # the statistics are over the prompts the checks run on, this one's too when it ran on every prompt
            where = range(len(psnr_each)) if ran_on is not None or self.items is None else self.items
            psnr, ssim = [psnr_each[i] for i in where], [ssim_each[i] for i in where]
            row = {
                "key": key,
                "stamp": self.stamp,
                "ran_on": ran_on,  # the prompts of psnr_each (None: every one)
                "psnr_each": kept_each,
                "psnr": statistics.fmean(psnr),
                "psnr_lo": mean_interval(psnr)[1],
                "psnr_min": min(psnr),
                "psnr_p5": float(np.percentile(psnr, 5)),
                "psnr_p5_lo": quantile_lower_bound(psnr),
                "ssim": statistics.fmean(ssim),
                "ssim_lo": mean_interval(ssim)[1],
                # one timed pass of the first batch, which the planner's finalists are compared by (no extra runs)
                "first_batch_seconds": clock.seconds(),
                "first_batch_prompts": first_batch_prompts(
                    len(self.prompts if ran_on is None else ran_on),
                    self.batch_size,
                    data_parallel(self.pipe)[1],
                ),
            }
            if timed:
                row["speedup"] = self.plain_seconds() / seconds
            self.done[key] = row
            self.runs += 1
            if self.path is not None:
                if writes():  # under torchrun every rank holds the same row; the first keeps it
                    with open(self.path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    hold("evaluation saved")
        return self.done[key]

    def _hardest(self, psnr_each: list[float]) -> list[int]:
        """The `narrow_to` prompts of lowest PSNR (ties: the lower index), in index order."""
        order = sorted(range(len(psnr_each)), key=lambda i: (psnr_each[i], i))
        return sorted(order[: self.narrow_to])

    def seconds_per_run(self) -> float:
        """Median seconds of the first batch of prompts, as the pipeline stands now."""
        first = list(range(len(self.prompts)) if self.items is None else self.items)[: self.batch_size]
        return median_seconds(lambda: self._generate(first))

    def _generate(self, items, **callbacks):
        """The images of the calibration prompts `items` (None: every one) as the pipeline stands now."""
        return generate(
            self.pipe,
            self.prompts,
            self.steps,
            self.seed,
            self.batch_size,
            self.guidance_scale,
            items=items,
            **callbacks,
        )

    def plain_seconds(self) -> float:
        if self._plain is None:
            self._plain = self.seconds_per_run()
        return self._plain


def plan(
    pipe,
    prompts: list,
    target: str = "psnr=35",
    num_inference_steps: int = 20,
    seed: int = 0,
    batch_size: int = 8,
    guidance_scale=None,
    modes: tuple[str, ...] = MODES,
    granularity: str = "step",
    cost: str = "time",
    iterations: int = 8,
    assurance: str = "lower",
    max_checks: int = 10,
    work_dir=None,
    progress=None,
    log=None,
    layout=None,
    predictors: str = PREDICTORS,
    check_prompts: int | None = None,
    measure_prompts: int | None = None,
) -> Schedule:
    """Plan the cache of `pipe` from its measured redundancy on `prompts` so that `target` holds.

    Returns a `Schedule` (save it with `.save(path)`, run it with `ditscope.apply(pipe, PlanConfig(plan))`).
    `cost`: "time" (measured seconds per unit, the default), "flops", or "uniform" (every module the same:
    the ablation of the cost model); with "flops" or "uniform" the cost model also picks between the modes'
    finalists, so timing noise on a busy machine cannot change the plan (with "time" they are timed).
    `granularity`: "site" (per layer x step x module) or "kind" (module kind x step, SmoothCache's). `assurance`: a quality target holds when the lower end of the 95% bootstrap
    interval of the mean over the calibration prompts reaches it ("lower", the default: a margin for
    prompts the plan has not seen, wider when the calibration prompts disagree), or when the mean does
    ("mean"). `progress(text)` is called as the planning advances. `layout`: the declared block layout
    of a model outside the family table (`pipe` is then any callable with the pipeline call convention
    and a `.transformer`; see the README's "Any PyTorch DiT"); run the plan with the same layout.
    `predictors`: what a served module may be made of (R reuse, F linear forecast, T second-order Taylor,
    L fitted; cache/predictors.py), chosen per module and step by the search; R is always allowed.
    `max_checks`: quality targets check at most this many candidate plans end to end (each one run of the
    calibration prompts); `iterations`: speed targets scan this many prices per search line.
    `check_prompts`: the first check runs on every calibration prompt, the later ones only on the
    `check_prompts` it found hardest (lowest PSNR; default: every check on every prompt), and every check's
    quality, the plan's too, is over those. `measure_prompts`: the calibration measures the units' errors on
    the first `measure_prompts` prompts only, and runs the others uncached for the checks' reference alone
    (default: it measures on every prompt); the checks still run on every prompt (or the hardest of them).
    """
    goal = Target.parse(target)
    if cost not in ("time", "flops", "uniform"):
        raise DitscopeError(f"unknown cost model {cost!r}; use time, flops or uniform")
    if granularity not in GRANULARITIES:
        raise DitscopeError(f"unknown granularity {granularity!r}; use {', '.join(GRANULARITIES)}")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise DitscopeError(
            f"unknown planning mode {bad[0] if bad else '(none)'}; choose from {', '.join(MODES)}"
        )
    check_calibration(prompts, batch_size, "planning")
    if not isinstance(predictors, str) or set(predictors) - set(PREDICTORS):
        raise DitscopeError(
            f"unknown predictors {predictors!r}; use letters of {PREDICTORS} (R reuse, F linear, T Taylor, "
            "L fitted)"
        )
    if assurance not in ("lower", "mean"):
        raise DitscopeError(f"unknown assurance {assurance!r}; use lower or mean")
    if not isinstance(iterations, int) or iterations < 3:
        raise DitscopeError(f"planning needs iterations >= 3 (prices per search line), not {iterations!r}")
    if not isinstance(max_checks, int) or isinstance(max_checks, bool) or max_checks < 1:
        raise DitscopeError(
            f"planning needs max_checks >= 1 (end-to-end checks per plan), not {max_checks!r}"
        )
    world = data_parallel(pipe)[1]  # the ranks the prompts are shared over
    _check_prompt_count("check_prompts", check_prompts, len(prompts), world, "the checks run on")
    _check_prompt_count("measure_prompts", measure_prompts, len(prompts), world, "the errors are measured on")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 2:
        raise DitscopeError(f"planning needs num_inference_steps >= 2, not {num_inference_steps!r}")
    say = progress or (lambda text: None)
    started = time.perf_counter()
    transformer, _ = find_transformer(pipe)
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)

    # 1. calibration (resumed from the work folder when it matches)
    cal, reference, resumed = _calibration(
        pipe,
        transformer,
        prompts,
        num_inference_steps,
        seed,
        batch_size,
        guidance_scale,
        work,
        say,
        layout,
        measure_prompts,
    )
    # the plain model's step time on this machine, for the cost model and the finalists' measured speedups
    # timed at the calibration's batch, which the unit times were measured at (smaller where memory asked)
    cal_batch = cal.meta.get("calibration_batch", batch_size)
    if cal_batch < batch_size:
        say(
            f"calibration: ran in batches of {cal_batch}, as {batch_size} prompts' kept outputs would not fit in "
            "memory; the checks run in those batches too"
        )
    # each rank's share of these is one batch, the size of its checks' first (after the first check, where they
    # run on the hardest prompts alone): what a check's timed batch is compared with
    checked = check_prompts if check_prompts is not None else len(prompts)
    first = prompts[: min(cal_batch * world, checked)]
    plain_prompts = first_batch_prompts(len(first), cal_batch, world)

    def plain_run():
        return generate(pipe, first, num_inference_steps, seed, cal_batch, guidance_scale)

    timed_in_calibration = (
        cal.meta["plain_batch_seconds"] if cal.meta.get("plain_batch_prompts") == plain_prompts else None
    )
    plain_seconds = _plain_seconds(plain_run, work, resumed, timed_in_calibration)
    # the units were timed on the calibration's first batch, which can hold more prompts than the checks' later
    # ones: the plain step's time at that batch, taken as linear in the prompts, so that what no unit covers
    # is what is left of it
    per_step = (
        plain_seconds
        / num_inference_steps
        * cal.meta.get("timed_batch_prompts", plain_prompts)
        / plain_prompts
    )
    costs = costs_from(
        cal,
        per_step,
        uniform=cost == "uniform",
        flops=cost == "flops" or goal.kind == "flops",
    )
    unit = price_scale(cal, costs)
    evaluate = Evaluations(
        pipe,
        prompts,
        num_inference_steps,
        seed,
        cal_batch,  # as the calibration ran, so that a check's first batch is the plain pass's
        guidance_scale,
        reference,
        work / "evaluations.jsonl" if work else None,
        layout,
        check_prompts,
    )
    if evaluate.narrow_to is not None:
        say(f"checks: the first on every prompt, the others on the {check_prompts} it found hardest")
    full_cost = costs.step * num_inference_steps

    def schedule_at(stack: float | None, sites: float | None, allowed: str = predictors) -> Schedule:
        """The schedule at log prices for the stack and the sites (None: that level is not cached), its served
        steps made of the `allowed` predictors."""
        mode = (
            "both" if stack is not None and sites is not None else "stack" if stack is not None else "sites"
        )
        return compile_schedule(
            cal,
            costs,
            unit * 10 ** (stack if stack is not None else 0.0),
            mode,
            granularity=granularity,
            site_price=unit * 10**sites if sites is not None else None,
            predictors=allowed,
        )

    def predicted(schedule: Schedule) -> float:
        return full_cost / max(costs.of(schedule, num_inference_steps), 1e-12)

    def holds(schedule: Schedule) -> bool:
        if goal.quality:
            return goal.met_by(evaluate(schedule), assurance)
        return predicted(schedule) >= goal.value

    described: dict[int, str] = {}  # the fixed-interval schedules that held, by id: what they are
    search_meta = None
    if goal.quality:  # 2-3. candidates compiled without a check, at most max_checks of them checked
        lines, search_meta = _budgeted(
            cal,
            modes,
            schedule_at,
            predicted,
            evaluate,
            goal,
            assurance,
            max_checks,
            num_inference_steps,
            say,
            predictors,
        )
        for held in lines.values():
            described.update({id(s): f"fixed: {label}" for _, label, s in held if label})
        lines = {m: [(x, math.nan if label else 0.0, s) for x, label, s in held] for m, held in lines.items()}
    else:
        lines = _speed_lines(
            cal, modes, schedule_at, predicted, holds, iterations, num_inference_steps, described, say
        )
    candidates = []
    for mode in modes:
        held = lines.get(mode, [])
        if not held:
            continue
        if goal.quality:
            best = max(held, key=lambda h: h[0])[2]
        else:  # speed targets: among the plans fast enough, the one with the best measured quality
            best = max((h[2] for h in held), key=lambda s: evaluate(s)["psnr"])
        candidates.append((mode, best, evaluate(best)))
        say(f"{mode}: {predicted(best):.2f}x predicted, PSNR {evaluate(best)['psnr']:.1f} dB")
        # the fastest fixed-interval plan that held is timed too when the cost model ranked another above it:
        # the model's ranking within a mode can be wrong where FLOPs and time part (tiny-latte: FORA's schedule
        # held and ran faster than the plan kept; benchmarks/RESULTS.md)
        fixed = [h for h in held if math.isnan(h[1])]
        if goal.quality and cost == "time" and fixed:
            interval = max(fixed, key=lambda h: h[0])[2]
            if interval is not best:
                candidates.append((mode, interval, evaluate(interval)))
    if not candidates:
        lo = LOG_PRICE_RANGE[0]
        reach = max(predicted(schedule_at(lo, lo)), predicted(schedule_at(lo, None)))
        raise DitscopeError(
            f"no plan reaches {goal} on these prompts (the fastest plan predicts {reach:.2f}x); ask for less"
        )

    if goal.quality:  # a mode whose plan computes everything holds any target: it is no plan
        candidates = [c for c in candidates if predicted(c[1]) > 1 + 1e-9]
        if not candidates:
            raise DitscopeError(
                f"no plan that saves any work reaches {goal} on these prompts (only computing "
                "everything does); ask for less"
            )

    def runner(schedule: Schedule):
        return lambda: _run_plan(
            pipe, schedule, first, num_inference_steps, seed, cal_batch, guidance_scale, layout
        )

    # every finalist ran its first batch once in its check, timed there against the plain pass timed above on a
    # batch of as many prompts: no run of its own (on tiny-latte the finalists' timing rounds took 40% of the
    # planning). A row whose timed batch held another number of prompts (the first check, on every prompt where
    # the later ones run on the hardest; or a row of an older work folder, which kept no timing) is timed in
    # interleaved rounds with the plain model instead. Every one already ran, so no warm-up.
    timed: dict[int, float] = {}

    def speedups_of(schedules: list) -> list[float]:
        rows = [evaluate(s) for s in schedules]
        untimed = [
            i
            for i, r in enumerate(rows)
            if "first_batch_seconds" not in r or r.get("first_batch_prompts") != plain_prompts
        ]
        speedups = [
            None if i in untimed else plain_seconds / r["first_batch_seconds"] for i, r in enumerate(rows)
        ]
        for i, x in zip(
            untimed, _speedups(plain_run, [runner(schedules[i]) for i in untimed]) if untimed else []
        ):
            speedups[i] = x
        timed.update({id(s): x for s, x in zip(schedules, speedups)})
        return speedups

    mode, chosen, quality, measured_speedup = _choose(candidates, goal, cost, predicted, speedups_of, say)
    # every finalist with its prediction and timing, so that a plan that lost to a schedule a user knows (FORA's)
    # can be traced to the check or to the timing that decided it
    finalists = [
        {
            "mode": m,
            "schedule": described.get(id(s), "searched"),
            "predicted_speedup": round(predicted(s), 3),
            "measured_speedup": round(timed[id(s)], 3) if id(s) in timed else None,
            "psnr": round(q["psnr"], 4),
            "kept": s is chosen,
        }
        for m, s, q in candidates
    ]
    weights = chosen.meta.get("weights")  # the fitted forecasts' (search.compile_schedule)
    chosen.meta = {
        "model": model_signature(transformer),
        "pipeline": type(pipe).__name__,
        "scheduler": type(getattr(pipe, "scheduler", None)).__name__,
        "num_inference_steps": num_inference_steps,
        "target": str(goal),
        "mode": mode,
        "granularity": granularity,
        "predictors": "R" + "".join(a for a in predictors if a != "R"),
        "cost_model": cost,
        "assurance": assurance,
        "layout": run_layout(getattr(pipe, "transformer", transformer)),  # where the costs were measured
        "calibration": {
            "n_prompts": len(prompts),
            # the errors were measured on the first ones of the prompts
            "measured_prompts": cal.meta.get("measured_prompts", len(prompts)),
            "prompts_hash": sha256_of([str(p) for p in prompts]),
            "seed": seed,
            "guidance_scale": guidance_scale,
            "batch_size": batch_size,
            "calibration_batch": cal_batch,  # smaller where the kept outputs would not fit in memory
            "check_prompts": evaluate.items,  # the prompts the checks ran on after the first (None: every one)
        },
        "quality": {k: round(v, 4) for k, v in quality.items() if k not in NOT_QUALITY},
        "predicted_speedup": round(predicted(chosen), 3),
        "measured_speedup": round(measured_speedup, 3),
        # the uncached first batch's seconds (the first rank's), which the measured speedups are taken against
        "plain_seconds": float(f"{plain_seconds:.6g}"),
        "computed_fraction": round(chosen.fraction("C"), 4),
        "evaluations": len(evaluate.done),
        "checks": _checks(cal, evaluate),
        "planning_seconds": round(time.perf_counter() - started, 1),
        "finalists": finalists,
        # what PlanConfig(adaptive=True) compares the live signal with: per calibration prompt and step
        "signal": [
            [None if v is None else float(f"{v:.6g}") for v in row] for row in cal.meta.get("signal", [])
        ],
        # what PlanConfig(adaptive=True, signal="output") compares with: per step and lag k, the most any
        # calibration prompt's stack output changed from step t-k to t
        "stack_change": stack_change(cal),
    }
    if weights:
        chosen.meta["weights"] = weights
    if search_meta is not None:  # quality targets: the budgeted search's candidates, checks and fitted model
        chosen.meta["search"] = search_meta
    if log:
        log(
            f"plan: {mode}, {chosen.meta['predicted_speedup']:.2f}x predicted, {chosen.meta['measured_speedup']:.2f}x "
            f"measured, PSNR {quality['psnr']:.1f} dB on the calibration prompts"
        )
    return chosen


FINE_PRICES = 41  # candidates' log prices over LOG_PRICE_RANGE for the stack alone and the sites alone
FINE_PRICES_BOTH = 21  # per axis of "both": every stack price with every site price


def _budgeted(
    cal,
    modes,
    schedule_at,
    predicted,
    evaluate,
    goal,
    assurance,
    max_checks,
    steps,
    say,
    predictors,
):
    """Quality targets: every candidate compiled without a check (each mode's schedules over a fine price grid,
    a 2-D one of stack price x site price for "both", and the fixed-interval schedules of the stack and of
    the modules: FORA's), then at most `max_checks` of them checked end to end (`budget.budgeted_search`).
    Gives per mode [(predicted speedup, fixed-interval label or None, schedule)] of the checks that held, and
    the search's record for the plan's meta."""
    from .budget import Candidate, budgeted_search, prior_intercept, quality_scale

    lo, hi = LOG_PRICE_RANGE

    def prices(n: int) -> list[float]:
        return [lo + (hi - lo) * i / (n - 1) for i in range(n)]

    candidates: list[Candidate] = []
    seen: set = set()

    def add(mode: str, schedule: Schedule, fixed: str | None = None) -> None:
        key, speedup = Evaluations.key(schedule), predicted(schedule)
        if (mode, key) in seen or speedup <= 1 + 1e-9:  # a schedule twice, or one that computes everything
            return
        seen.add((mode, key))
        candidates.append(Candidate(mode, schedule, speedup, predicted_error(cal, schedule), key, fixed))

    # the fixed-interval schedules (FORA's for the modules, a uniform step skip for the stack) compete too, in
    # both phases (after one full step or two: which steps compute matters as much as how many)
    for mode in ("stack", "sites"):
        if mode in modes:
            for n in range(2, 7):
                for warmup in (1, 2):
                    fixed = f"one step in {n} after {warmup} full"
                    add(mode, _interval_schedule(cal, mode, n, steps, warmup), fixed)
    # each price compiled with the predictors allowed and with reuse alone: where the calibrated errors over-rate
    # the forecasts (tiny-pixart: benchmarks/RESULTS.md), the forecasting group's checks fail and lower its
    # offset, and the reusing candidates of the same price are still there
    for allowed in dict.fromkeys((predictors, "R")):
        if "stack" in modes:
            for p in prices(FINE_PRICES):
                add("stack", schedule_at(p, None, allowed))
        if "sites" in modes:
            for p in prices(FINE_PRICES):
                add("sites", schedule_at(None, p, allowed))
        if "both" in modes:
            for ps in prices(FINE_PRICES_BOTH):
                for p in prices(FINE_PRICES_BOTH):
                    add("both", schedule_at(ps, p, allowed))
    field = goal.field(assurance)
    say(f"{len(candidates)} candidates compiled; checking at most {max_checks}")

    def check(c: Candidate):
        row = evaluate(c.schedule)
        return goal.met_by(row, assurance), quality_scale(goal.kind, row[field]), row

    target = quality_scale(goal.kind, goal.value)
    outcome = budgeted_search(candidates, check, target, max_checks, say, prior_intercept(goal.kind))
    lines: dict[str, list] = {}
    for c, _ in outcome.held:
        lines.setdefault(c.mode, []).append((c.speedup, c.fixed, c.schedule))
    if not lines:
        best = "" if outcome.best_measured is None else f", the best measured {outcome.best_measured:.2f}"
        if outcome.left:
            raise DitscopeError(
                f"no plan held {goal} in {outcome.checks} end-to-end checks ({outcome.left} candidates left "
                f"untried{best}); raise --max-checks (max_checks) or ask for less"
            )
        raise DitscopeError(
            f"no plan that saves any work reaches {goal} on these prompts ({outcome.checks} checked{best}); "
            "ask for less"
        )
    record = {
        "max_checks": max_checks,
        "candidates": len(candidates),
        "checks": outcome.checks,
        "left_untried": outcome.left,
        "fitted_on": field if not goal.kind.startswith("ssim") else f"-10 log10(1 - {field})",
        "fit": outcome.fit.as_meta(),
    }
    return lines, record


def _speed_lines(cal, modes, schedule_at, predicted, holds, iterations, steps, described, say) -> dict:
    """Speed targets: per mode the plans on a grid of `iterations` log prices that are predicted fast enough
    (no end-to-end check needed for them to hold; the best measured quality among them is chosen), the stack and
    the sites alone, then the sites on top of three stack prices, and the fixed-interval schedules."""
    lo, hi = LOG_PRICE_RANGE
    grid = [lo + (hi - lo) * i / (iterations - 1) for i in range(iterations)]

    def scan(make, label: str) -> list[tuple[float, float, Schedule]]:
        return scan_prices(grid, make, predicted, holds, label, say)

    lines: dict[str, list] = {}
    if "stack" in modes or "both" in modes:
        lines["stack"] = scan(lambda p: schedule_at(p, None), "stack")
    if "sites" in modes:
        lines["sites"] = scan(lambda p: schedule_at(None, p), "sites")
    # the fixed-interval schedules (FORA's for the modules, a uniform step skip for the stack) compete too, in
    # both phases: after one full step or two
    for mode in ("stack", "sites"):
        if mode in lines:
            for n in range(2, 7):
                for warmup in (1, 2):
                    s = _interval_schedule(cal, mode, n, steps, warmup)
                    if holds(s):
                        say(
                            f"{mode}: one step in {n} computed after {warmup} full is predicted {predicted(s):.2f}x"
                        )
                        described[id(s)] = f"fixed: one step in {n} after {warmup} full"
                        lines[mode].append((predicted(s), math.nan, s))
    if "both" in modes:
        lines["both"] = []
        for ps in grid[1:4]:  # the sites on top of three stack prices
            lines["both"] += scan(lambda p, ps=ps: schedule_at(ps, p), f"stack 10^{ps:+.2f} + sites")
    return lines


def scan_prices(grid: list, make, predicted, holds, label: str, say) -> list[tuple[float, float, Schedule]]:
    """(predicted speedup, log price, schedule) of the prices on `grid` whose plan holds a speed target (by the
    cost model's prediction: no end-to-end check; every one is a choice, the best measured quality wins)."""
    held: list[tuple[float, float, Schedule]] = []
    for p in grid:
        s = make(p)
        ok = holds(s)
        say(f"{label}: price 10^{p:+.2f}, predicted {predicted(s):.2f}x, {'holds' if ok else 'fails'}")
        if ok:
            held.append((predicted(s), p, s))
    return held


TIMING_TIE = (
    0.05  # finalists' measured speedups this close (relative) count as equal: within one timed pass's noise
)


def _choose(candidates: list, goal: Target, cost: str, predicted, speedups_of, say) -> tuple:
    """The finalist to keep, of one (mode, schedule, quality) per mode, with its measured speedup.

    Quality targets: with the measured-time cost model the finalists are timed (`speedups_of`), since the cost
    model ranks plans within a mode but across modes its predictions were off by enough to pick a slower plan
    (benchmarks/RESULTS.md, ablation); those within TIMING_TIE of the fastest tie, and the best PSNR wins. With
    a FLOPs or uniform cost model the model's prediction chooses, so timing noise on a busy machine cannot
    change the plan. Speed targets: every finalist is fast enough, the best quality wins. Whatever chose it,
    the kept plan's speedup is measured."""
    if goal.quality and cost == "time":
        speedups = speedups_of([c[1] for c in candidates])
        # finalists that time within the noise of the fastest are a tie, and the tie goes to quality (two schedules
        # of the same FLOPs can time alike and still differ in quality on the test prompts: benchmarks/RESULTS.md)
        close = [i for i, x in enumerate(speedups) if x >= max(speedups) * (1 - TIMING_TIE)]
        best = max(close, key=lambda i: candidates[i][2]["psnr"])
        say("finalists: " + ", ".join(f"{c[0]} {x:.2f}x measured" for c, x in zip(candidates, speedups)))
        return (*candidates[best], speedups[best])
    if goal.quality:
        pick = max(candidates, key=lambda c: predicted(c[1]))
    else:
        pick = max(candidates, key=lambda c: c[2]["psnr"])
    return (*pick, speedups_of([pick[1]])[0])


def stack_change(cal: Profile) -> list[list]:
    """[step][k-1]: the largest relative change of the block stack's output (its blocks' residual changes
    over the stream, the calibration's `inject` metric) from step t-k to t over the calibration prompts;
    None where not measured (t < k)."""
    m = cal.metrics.index("inject")
    lags = sorted(int(t.partition("@")[2]) for t in cal.options("target") if t.startswith("reuse@"))
    out = [[None] * len(lags) for _ in range(cal.n_steps)]
    stack = cal.layer_names.index(STACK)
    for ki, (layer, target, _, _) in enumerate(cal.keys):
        if layer != stack or not target.startswith("reuse@"):
            continue
        j = lags.index(int(target.partition("@")[2]))
        values = cal.values[:, ki, :, m]
        worst = np.where(np.isfinite(values), values, -np.inf).max(axis=0)
        for s, v in enumerate(worst, start=1):
            if np.isfinite(v):
                out[s][j] = float(f"{v:.6g}")
    return out


def _interval_schedule(cal: Profile, mode: str, n: int, steps: int, warmup: int = 2) -> Schedule:
    """Every n-th step computed after `warmup` full steps, the others served: the stack's (a uniform step skip),
    or every module's (FORA's schedule)."""
    row = "".join("C" if full_step(s, n, warmup=warmup) else "R" for s in range(steps))
    if mode == "stack":
        return Schedule({"stack": row})
    sites = [u for u, v in cal.meta["units"].items() if v["kind"] not in ("block", "stack")]
    return Schedule({u: row for u in sites})


def _run_plan(pipe, schedule, prompts, steps, seed, batch_size, guidance_scale, layout=None):
    from ..cache import apply

    with apply(pipe, PlanConfig(schedule), layout=layout):
        return generate(pipe, prompts, steps, seed, batch_size, guidance_scale)


def _checks(cal, evaluate: Evaluations) -> dict:
    """How well the calibrated errors foretell the end-to-end checks: per checked schedule its predicted error
    (search.predicted_error) and measured mean PSNR, and Spearman's rank correlation between them (negative:
    more predicted error, less PSNR; None with fewer than three checks or no spread)."""
    from scipy.stats import spearmanr

    pairs = [
        [round(predicted_error(cal, s), 6), round(evaluate.done[k]["psnr"], 4)]
        for k, s in evaluate.checked.items()
        if k in evaluate.done
    ]
    rho = None
    if len(pairs) >= 3 and len({p[0] for p in pairs}) > 1 and len({p[1] for p in pairs}) > 1:
        rho = round(float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic), 4)
    return {"count": len(pairs), "rank_correlation": rho, "predicted_error_and_psnr": pairs}


def _check_prompt_count(name: str, count, n_prompts: int, world: int, what: str) -> None:
    """Refuses, on every rank, a count of calibration prompts (`check_prompts`, `measure_prompts`) outside
    1..n_prompts, or one that leaves a rank without a prompt where there are prompts enough for every rank."""
    if count is None:
        return
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= n_prompts:
        raise EveryRankError(  # every rank finds it: each says so before torchrun stops them
            f"{name} (--{name.replace('_', '-')}) must be between 1 and the {n_prompts} calibration prompts, "
            f"not {count!r}"
        )
    if count < min(n_prompts, world):
        raise EveryRankError(f"{world} ranks share the {count} prompts {what}: give at least one per rank")


def _plain_seconds(plain_run, work: Path | None, resumed: bool, timed_in_calibration: float | None) -> float:
    """The uncached first batch's seconds, kept in `work`: read back when the calibration was resumed, so that the
    run takes the decisions the interrupted one would have (the search's prices and the finalists' speedups scale
    with it; re-timed, a resumed run planned a different schedule from the same checks), else the calibration's
    (`timed_in_calibration`: its unmeasured prompts' first batch, when it held as many prompts), else timed in
    one pass (after the calibration's run, or a warm-up pass where the calibration was read)."""
    kept = work / "plain_seconds.json" if work is not None else None
    seconds = None
    if resumed and kept.exists():
        try:
            seconds = float(json.loads(kept.read_text())["seconds"])
        except (ValueError, KeyError, TypeError):  # damaged: the work folder is a cache, so time it again
            seconds = None
    seconds = from_first(seconds)  # every rank times, or none does
    if seconds is not None:
        return seconds
    if timed_in_calibration is not None:
        seconds = timed_in_calibration
    else:
        seconds = median_seconds(plain_run, repeats=1, warmup=resumed)
    if kept is not None and writes():
        write_text_atomic(kept, json.dumps({"seconds": seconds}))
    return seconds


def _speedups(plain, runs: list, rounds: int = 2) -> list[float]:
    """Per run in `runs`: the plain run's fastest seconds over `rounds` / its own fastest, each round timing the
    plain run and then every run once (all of them warm already). The fastest, not the median: on a shared or
    virtual machine noise only adds time, and in spikes (tiny-latte on 2 cores: the same cached pass took 51 s
    and 82-84 s within one process, with the kernel's page faulting a third of the uncached run's CPU time), so
    two rounds' medians could rank the finalists by the spikes (benchmarks/RESULTS.md)."""
    base = []
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        base.append(median_seconds(plain, repeats=1, warmup=False))
        for i, fn in enumerate(runs):
            times[i].append(median_seconds(fn, repeats=1, warmup=False))
    return [min(base) / min(t) for t in times]


def _calibration(
    pipe,
    transformer,
    prompts,
    steps,
    seed,
    batch_size,
    guidance_scale,
    work: Path | None,
    say,
    layout=None,
    measure: int | None = None,
):
    measure = measure or len(prompts)
    expected = {
        "model_signature": model_signature(transformer),
        "num_inference_steps": steps,
        "seed": seed,
        "prompts_hash": sha256_of([str(p) for p in prompts]),
        "guidance_scale": guidance_scale,
        "batch_size": batch_size,
        "identity": pipeline_identity(pipe),
        "calibration_version": CALIBRATION_VERSION,
        "measured_prompts": measure,
    }
    if (
        work is not None
        and (work / "calibration.ditscope").exists()
        and (work / "reference.safetensors").exists()
    ):
        try:
            cal = Profile.load(work / "calibration.ditscope")
            reference = load_images(work / "reference.safetensors")
        except Exception:  # damaged (checksum, a cut file): the work folder is a cache, so compute it again
            say("calibration: the work folder's files are damaged; computing them again")
            cal = None
        if cal is not None and all(cal.meta.get(k) == v for k, v in expected.items()):
            say("calibration: resumed from the work folder")
            return cal, reference, True
    measured = f", errors measured on the first {measure}" if measure < len(prompts) else ""
    say(f"calibration: {len(prompts)} prompts x {steps} steps{measured}")
    cal, reference = calibrate(
        pipe,
        prompts,
        steps,
        seed,
        batch_size,
        guidance_scale,
        layout=layout,
        progress=lambda done, total: say(f"calibration: {done}/{total} prompts"),
        measure=measure,
    )
    cal.meta = json.loads(json.dumps(cal.meta, default=str))
    if work is not None and writes():
        save_images(work / "reference.safetensors", reference)
        cal.save(work / "calibration.ditscope")
    return cal, reference, False
