"""Calibration: what serving each cached unit from an earlier step would cost in error, and what computing
it costs in time, measured on the uncached model.

The model runs uncached on the calibration prompts, through the cache engine's own hooks (so the units
are the engine's sites and blocks, by the same names a plan uses). At every step t and for every unit u
(each self-, cross- or temporal attention and MLP of every block, each block's residual, and the whole
block stack) it measures, per prompt,

    reuse@k     |x_t - x_{t-k}|                    serving u's output from step t-k   (k = 1 .. max_lag)
    forecast@k  |x_t - (2 x_{t-k} - x_{t-2k})|     a first-order Taylor forecast from steps t-k and t-2k
    taylor2@k   |x_t - Taylor-2(x_{t-k}, x_{t-2k}, x_{t-3k})|   the second-order forecast
    fitted@k    the fitted forecast (predictors.Fitted), weights fitted per unit, step and lag on the other
                calibration prompts (leave one out): its error is the measured error of the predictor
                nearest to it in squared error, times the root of their squared errors' ratio (the fit
                minimises squared error; the sums it needs are kept, the outputs are not)

with three metrics: `l1` (mean absolute error), `rel_l1` (over sum|x_t|) and `inject`, the error over
the magnitude of the residual stream the unit writes into (the block's input), which is what makes
errors of different units comparable. The stack's error is the sum of its blocks' residual errors over
the stream at the last block. The result is a `Profile` (same artifact as `ditscope profile`: layers are
the units, targets `reuse@k` / `forecast@k` / `taylor2@k` / `fitted@k`, step s = 1 .. T-1 in the step
axis), with the measured seconds (median per call, this machine) and FLOPs of each unit, and the fitted
predictor's weights fitted on every calibration prompt (what a plan runs), in its metadata.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import numpy as np
import torch

from ..artifact import Profile, profile_column, sha256_of
from ..cache.context import Context
from ..cache.engine import CacheHandle
from ..cache.observe import Calibrator
from ..cache.predictors import WEIGHTS_OF, fitted_weights, squared_error
from ..cache.schedule_data import STACK, config_hash, model_signature, weights_fingerprint
from ..errors import DitscopeError
from ..parallel import launched
from ..profiling.workload import (
    FirstBatchClock,
    data_parallel,
    first_batch_prompts,
    from_first,
    gather,
    generate,
    share,
)
from ..runtime import free_memory
from ..stats.running import RunningStats

METRICS = ("l1", "rel_l1", "inject")
# what a calibration measures; a work folder's calibration of another version is measured again
# (2: the second-order and the fitted forecasts)
VERSION = 2


def pipeline_identity(pipe) -> dict:
    """What a resumed run's kept work must match beyond its arguments: the transformer's weights and dtype
    (schedule_data.weights_fingerprint) and the scheduler's class and config."""
    from ..cache.layout import find_transformer

    scheduler = getattr(pipe, "scheduler", None)
    return {
        "weights": weights_fingerprint(find_transformer(pipe)[0]),
        "scheduler": f"{type(scheduler).__name__} {config_hash(scheduler)}",
    }


def calibrate(
    pipe,
    prompts: list,
    steps: int,
    seed: int = 0,
    batch_size: int = 8,
    guidance_scale=None,
    max_lag: int = 10,
    forecast_lag: int = 3,
    progress=None,
    layout=None,
    memory_budget: float | None = None,
    measure: int | None = None,
) -> tuple[Profile, torch.Tensor]:
    """Measure every unit's reuse / forecast error and its cost on `prompts` with the uncached model.

    Returns the calibration profile and the uncached images (the reference a plan is checked against).
    `progress(done, total)` is called after each batch. `layout`: a declared block layout (`ditscope.Blocks`)
    for a model outside the family table. The measuring keeps every unit's outputs of the last `max_lag`
    steps, which grows with the batch: when that would take more than `memory_budget` bytes (default: a
    third of the device's free memory), the calibration runs in smaller batches, and its metadata says
    which (`calibration_batch`).

    `measure`: the errors are measured on the first `measure` prompts only (the profile's prompts); the others
    run once uncached, at the calibration's batch, for their images alone. That run's first batch is timed
    (`plain_batch_seconds`, of `plain_batch_prompts` prompts on the first rank; when every rank has one): a
    plan needs that time and would otherwise run a pass for it.
    """
    from ..cache.layout import find_transformer

    if len(prompts) < 1:
        raise DitscopeError("calibration needs at least one prompt")
    measure = len(prompts) if measure is None else measure
    if not 1 <= measure <= len(prompts):
        raise DitscopeError(f"the calibration measures between 1 and {len(prompts)} prompts, not {measure}")
    transformer, _ = find_transformer(pipe)
    if memory_budget is None:
        free = free_memory(next(transformer.parameters()).device)
        memory_budget = free / 3 if free is not None else math.inf
    rank, world = data_parallel(pipe)
    measured_here, rest_here = (
        len(share(measure, rank, world)),
        len(share(len(prompts) - measure, rank, world)),
    )

    def measured_progress(done, _):  # this rank's prompts, over both runs
        if progress is not None:
            progress(done, measured_here + rest_here)

    def rest_progress(done, _):
        if clock is not None:
            clock.tick()
        measured_progress(measured_here + done, None)

    clock = FirstBatchClock() if len(prompts) - measure >= world else None
    batch = batch_size
    while True:
        observer = Calibrator(max_lag, forecast_lag)
        if batch > 1:
            observer.check_memory = _batch_check(batch, min(observer.keep + 1, steps), memory_budget)
        try:
            ctx, images = _observe(
                pipe,
                observer,
                prompts[:measure],
                steps,
                seed,
                batch,
                guidance_scale,
                measured_progress,
                layout,
            )
            break
        except _SmallerBatch as e:
            batch = e.batch
    plain = {}
    if measure < len(prompts):
        # the prompts whose images alone are needed: the plain model, its first batch timed
        rest = generate(
            pipe,
            prompts,
            steps,
            seed,
            batch,
            guidance_scale,
            clock.tick if clock else None,
            rest_progress,
            items=list(range(measure, len(prompts))),
        )
        images = torch.cat([images, rest.to(images.device)])
        if clock is not None:
            plain = {
                "plain_batch_seconds": clock.seconds(),
                "plain_batch_prompts": first_batch_prompts(len(prompts) - measure, batch, world),
            }
    _merge_ranks(observer, world)
    weights = fit_forecasts(observer)
    profile = _to_profile(observer, ctx, measure, steps, max_lag, forecast_lag)
    profile.meta.update(
        model=type(transformer).__name__,
        model_signature=model_signature(transformer),
        scheduler=type(getattr(pipe, "scheduler", None)).__name__,
        num_inference_steps=steps,
        seed=seed,
        prompts_hash=sha256_of([str(p) for p in prompts]),
        n_prompts_total=len(prompts),
        measured_prompts=measure,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        calibration_batch=batch,
        timed_batch_prompts=first_batch_prompts(measure, batch, world),  # what `seconds` were timed on
        kind="calibration",
        calibration_version=VERSION,
        identity=pipeline_identity(pipe),
        units=_units(ctx),
        seconds={u: statistics.median(v) for u, v in observer.seconds.items()},
        flops=observer.flops,
        signal=_signal(observer, measure, steps),
        fitted_weights=weights,
        **plain,
    )
    return profile, images


def _observe(pipe, observer: Calibrator, prompts, steps, seed, batch, guidance_scale, progress, layout):
    """One uncached run over `prompts` with `observer` on the engine's hooks: (the engine's context, images)."""
    handle = CacheHandle(pipe, observer, num_inference_steps=steps, layout=layout)

    def before_batch(start, n):
        observer.n_prompts, observer.prompt_offset = n, start
        observer.history.clear()
        observer.count_flops = observer.timing = start == 0

    try:
        return handle.ctx, generate(pipe, prompts, steps, seed, batch, guidance_scale, before_batch, progress)
    finally:
        handle.remove()


class _SmallerBatch(Exception):
    """The calibration's kept outputs would not fit in memory at this batch: run again in batches of `batch`."""

    def __init__(self, batch: int):
        self.batch = batch


def _batch_check(batch: int, steps_kept: int, budget: float):
    """The Calibrator's memory check: how many prompts' kept outputs fit in `budget`, agreed by every rank (the
    first rank's answer, so that all of them go on or start again together)."""

    def check(bytes_per_prompt_step: float):
        fits = int(budget // max(bytes_per_prompt_step * steps_kept, 1.0))
        fits = from_first(max(1, min(batch, fits)))
        if fits < batch:
            raise _SmallerBatch(fits)

    return check


MEASURED = {
    "reuse": "reuse",
    "linear": "forecast",
    "taylor2": "taylor2",
}  # predictor -> its calibration target


def fit_forecasts(observer: Calibrator) -> dict:
    """The fitted predictor of every unit, step and lag: records its error per prompt (`fitted@k`, with the
    weights fitted on the other prompts) beside the measured ones, and returns its weights fitted on every
    prompt, unit -> step -> lag -> [w1, w2] (keys as text: the calibration's metadata is JSON)."""
    weights: dict = {}
    for (unit, k), sums in sorted(observer.gram.items()):
        for step in sorted({s for _, s in sums}):
            own = {p: np.asarray(v, dtype=np.float64) for (p, s), v in sums.items() if s == step}
            total = sum(own.values())
            fit = fitted_weights(total)
            if fit is not None:
                weights.setdefault(unit, {}).setdefault(str(step), {})[str(k)] = [
                    float(f"{w:.6g}") for w in fit
                ]
            for p, mine in own.items():
                others = fitted_weights(total - mine)
                if others is None:
                    continue
                squared = {name: squared_error(mine, WEIGHTS_OF[name]) for name in MEASURED}
                nearest = min(squared, key=squared.get)
                ratio = math.sqrt(max(squared_error(mine, others), 0.0) / max(squared[nearest], 1e-30))
                for metric in METRICS:
                    measured = observer.errors.get((unit, f"{MEASURED[nearest]}@{k}", metric), {}).get(
                        (p, step)
                    )
                    if measured is not None:
                        observer.errors[(unit, f"fitted@{k}", metric)][(p, step)] = measured * ratio
    return weights


def _merge_ranks(observer: Calibrator, world: int):
    """Under torchrun: every rank's measured errors and signal (each rank saw its own prompts), and the first
    rank's timings and FLOPs (a plan's costs must be the same on every rank; with the model split by context
    parallelism the ranks ran the same prompts, and their errors are already the same)."""
    if world == 1:
        if launched()[1] > 1:  # the model split over the ranks: one batch, but each rank timed its own part
            observer.seconds, observer.flops = from_first((dict(observer.seconds), observer.flops))
        return
    errors: dict = {}
    signal: dict = {}
    grams: dict = {}
    for part_errors, part_signal, part_grams in gather(
        (
            {k: dict(v) for k, v in observer.errors.items()},
            dict(observer.signal),
            {k: dict(v) for k, v in observer.gram.items()},
        ),
        world,
    ):
        for key, values in part_errors.items():
            errors.setdefault(key, {}).update(values)
        for key, values in part_grams.items():
            grams.setdefault(key, {}).update(values)
        signal.update(part_signal)
    observer.errors, observer.signal = defaultdict(lambda: defaultdict(float), errors), signal
    observer.gram = defaultdict(dict, grams)
    observer.seconds, observer.flops = from_first((dict(observer.seconds), observer.flops))


def _signal(observer: Calibrator, n_prompts: int, steps: int) -> list[list]:
    """signal[prompt][step]: the first block's input change from the step before (None at step 0)."""
    return [[observer.signal.get((p, s)) if s else None for s in range(steps)] for p in range(n_prompts)]


def _units(ctx: Context) -> dict:
    """unit name -> what it is: kind (self, cross, mlp, temporal, block, stack), its block and depth."""
    units = {STACK: {"kind": "stack"}}
    for b in ctx.blocks:
        units[b.name] = {"kind": "block", "block": b.name, "depth": b.depth}
        for s in b.sites:
            units[s.name] = {"kind": s.kind, "stream": s.stream, "block": b.name, "depth": s.depth}
    return units


def _to_profile(
    observer: Calibrator, ctx: Context, n_prompts: int, steps: int, max_lag: int, forecast_lag: int
) -> Profile:
    names = list(_units(ctx))
    targets = [f"reuse@{k}" for k in range(1, max_lag + 1)] + [
        f"{kind}@{k}" for kind in ("forecast", "taylor2", "fitted") for k in range(1, forecast_lag + 1)
    ]
    keys = []
    for i, name in enumerate(names):
        for target in targets:
            if any((name, target, m) in observer.errors for m in METRICS):
                keys.append((i, target, "all", "all"))
    values = np.full((n_prompts, len(keys), steps - 1, len(METRICS)), np.nan, np.float32)
    for ki, (i, target, _, _) in enumerate(keys):
        for mi, metric in enumerate(METRICS):
            for (p, step), v in observer.errors.get((names[i], target, metric), {}).items():
                if step >= 1:
                    values[p, ki, profile_column(step), mi] = v
    schedule = [float(t) for t in (ctx.schedule or range(steps))]
    return Profile(
        keys=keys,
        layer_names=names,
        timesteps=schedule,
        prompt_index=np.arange(n_prompts),
        values=values,
        stats=RunningStats.of(values),
        meta={},
        metrics=METRICS,
    )
