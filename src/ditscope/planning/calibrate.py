"""Calibration: what serving each cached unit from an earlier step would cost in error, and what computing
it costs in time, measured on the uncached model.

The model runs uncached on the calibration prompts, through the cache engine's own hooks (so the units
are the engine's sites and blocks, by the same names a plan uses). At every step t and for every unit u
(each self-, cross- or temporal attention and MLP of every block, each block's residual, and the whole
block stack) it measures, per prompt,

    reuse@k     |x_t - x_{t-k}|                    serving u's output from step t-k   (k = 1 .. max_lag)
    forecast@k  |x_t - (2 x_{t-k} - x_{t-2k})|     a first-order Taylor forecast from steps t-k and t-2k

with three metrics: `l1` (mean absolute error), `rel_l1` (over sum|x_t|) and `inject`, the error over
the magnitude of the residual stream the unit writes into (the block's input), which is what makes
errors of different units comparable. The stack's error is the sum of its blocks' residual errors over
the stream at the last block. The result is a `Profile` (same artifact as `ditscope profile`: layers are
the units, targets `reuse@k` / `forecast@k`, step s = 1 .. T-1 in the step axis), with the measured
seconds (median per call, this machine) and FLOPs of each unit in its metadata.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import numpy as np
import torch

from ..cache.context import Context
from ..cache.engine import CacheHandle
from ..cache.flops import flop_counter
from ..cache.layout import BlockSite, Site
from ..cache.method import CacheMethod
from ..cache.schedule_data import STACK, model_signature
from ..cache.tensors import block_inputs, block_outputs, relative_change, row_abs_sums
from ..errors import DitscopeError
from ..profiling.artifact import Profile, sha256_of
from ..stats.running import RunningStats
from .workload import data_parallel, from_first, gather, share

METRICS = ("l1", "rel_l1", "inject")


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, (tuple, list)):
        return [t for part in x for t in _tensors(part)]
    return [x] if torch.is_tensor(x) else []


def _numel_per_row(xs: list[torch.Tensor], rows: int) -> float:
    return float(sum(x.numel() for x in xs)) / rows


class _Observer(CacheMethod):
    """Computes everything (the uncached model), and measures every unit against its own past."""

    uses_modules = True
    uses_blocks = True

    def __init__(self, max_lag: int, forecast_lag: int):
        super().__init__(None)
        self.max_lag, self.forecast_lag = max_lag, forecast_lag
        self.keep = max(max_lag, 2 * forecast_lag)
        self.n_prompts = 1
        self.prompt_offset = 0
        self.errors: dict = defaultdict(lambda: defaultdict(float))  # (unit, target, metric) -> {(prompt, step): value}
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.flops: dict[str, float] = {}
        self.count_flops = False
        self.history: dict = {}  # (call, unit) -> {step: [tensors]}
        self.signal: dict = defaultdict(float)  # (prompt, step) -> the adaptive plan's live signal (see `watch`)

    def _prompt_of_rows(self, ctx: Context) -> np.ndarray:
        if ctx.rows % self.n_prompts:
            raise DitscopeError(f"calibration: {ctx.rows} model rows do not fold onto {self.n_prompts} prompts")
        return np.arange(ctx.rows) % self.n_prompts + self.prompt_offset

    def _measure(self, ctx: Context, unit: str, xs: list[torch.Tensor], stream_abs: torch.Tensor) -> dict:
        """Errors of serving `xs` from earlier steps (recorded per prompt and step); keeps `xs` for later
        steps. Returns the raw per-row error sums by target."""
        hist = self.history.setdefault((ctx.call, unit), {})
        step = ctx.step
        prompts = self._prompt_of_rows(ctx)
        branches = ctx.rows // self.n_prompts
        cur_abs = row_abs_sums(xs, ctx.rows)
        numel = _numel_per_row(xs, ctx.rows)
        served = {}
        for k in range(1, self.max_lag + 1):
            if step - k in hist:
                served[f"reuse@{k}"] = hist[step - k]
        for k in range(1, self.forecast_lag + 1):
            if step - k in hist and step - 2 * k in hist:
                served[f"forecast@{k}"] = [2 * a - b for a, b in zip(hist[step - k], hist[step - 2 * k])]
        raw = {}
        for target, ys in served.items():
            err = raw[target] = row_abs_sums([x - y for x, y in zip(xs, ys)], ctx.rows)
            for metric, value in (("l1", err / max(numel, 1.0)), ("rel_l1", err / cur_abs.clamp_min(1e-12)),
                                  ("inject", err / stream_abs.clamp_min(1e-12))):
                self._add(unit, target, metric, prompts, step, value / branches)
        hist[step] = [x.detach().clone() for x in xs]
        for old in [s for s in hist if s <= step - self.keep]:
            del hist[old]
        return raw

    def _add(self, unit, target, metric, prompts, step, values: torch.Tensor):
        acc = self.errors[(unit, target, metric)]
        for p, v in zip(prompts, values.tolist()):
            acc[(int(p), step)] += v

    def _timed(self, unit: str, run, args, kwargs):
        if self.count_flops and unit not in self.flops and "." in unit and not unit.rsplit(".", 1)[1].isdigit():
            with flop_counter() as counter:
                out = run(*args, **kwargs)
            self.flops[unit] = float(counter.get_total_flops())
            return out
        _sync()
        start = time.perf_counter()
        out = run(*args, **kwargs)
        _sync()
        self.seconds[unit].append(time.perf_counter() - start)
        return out

    def watch(self, ctx: Context, x: torch.Tensor):
        """The live signal an adaptive plan watches: the relative L1 change of the first block's input since
        the step before, per prompt (the mean over its guidance branches)."""
        key = (ctx.call, "signal")
        prev = self.history.get(key)
        if prev is not None:
            change = relative_change(ctx, x, prev).double().cpu()
            branches = ctx.rows // self.n_prompts
            for p, v in zip(self._prompt_of_rows(ctx), change.tolist()):
                self.signal[(int(p), ctx.step)] += v / branches
        self.history[key] = x.detach().clone()

    def block(self, ctx: Context, bsite: BlockSite, run, args, kwargs):
        inputs = block_inputs(bsite, args, kwargs)
        if bsite.index == 0:
            self.watch(ctx, inputs["hidden"])
        streams = {name: row_abs_sums([t], ctx.rows) for name, t in inputs.items() if t is not None}
        in_abs = sum(streams.values())
        ctx.state.setdefault("stream_abs", {})[bsite.index] = streams
        ctx.state["observing"] = 0.0
        out = self._timed(bsite.name, run, args, kwargs)
        if self.seconds.get(bsite.name):  # the block's time without the measuring done inside it
            self.seconds[bsite.name][-1] -= ctx.state["observing"]
        outputs = block_outputs(bsite, out)
        res = [o - inputs[n] for n, o in outputs.items()
               if o is not None and inputs.get(n) is not None and o.shape == inputs[n].shape]
        raw = self._measure(ctx, bsite.name, res, in_abs)
        stack = ctx.state.setdefault("stack", {"err": {}, "abs": None})
        for target, err in raw.items():
            stack["err"][target] = stack["err"].get(target, 0) + err
        stack["abs"] = in_abs
        return out

    def module(self, ctx: Context, site: Site, run, args, kwargs):
        out = self._timed(site.name, run, args, kwargs)
        streams = ctx.state.get("stream_abs", {}).get(site.block, {})
        if site.stream == "text":
            denom = streams.get("encoder")
        elif site.stream == "joint" and streams:
            denom = sum(streams.values())
        else:
            denom = streams.get("hidden")
        if denom is None:
            denom = row_abs_sums(_tensors(out), ctx.rows)
        start = time.perf_counter()
        self._measure(ctx, site.name, _tensors(out), denom)
        ctx.state["observing"] = ctx.state.get("observing", 0.0) + time.perf_counter() - start
        return out

    def end_call(self, ctx: Context, seconds: float):
        """The stack: its blocks' residual errors summed, over the stream at the last block."""
        self.seconds[STACK].append(seconds)
        stack = ctx.state.pop("stack", None)
        if not stack or stack["abs"] is None:
            return
        prompts = self._prompt_of_rows(ctx)
        branches = ctx.rows // self.n_prompts
        for target, err in stack["err"].items():
            self._add(STACK, target, "inject", prompts, ctx.step, err / stack["abs"].clamp_min(1e-12) / branches)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------- running
def generate(pipe, prompts: list, steps: int, seed: int = 0, batch_size: int = 8, guidance_scale=None,
             before_batch=None, after_batch=None) -> torch.Tensor:
    """Every prompt once, in batches; prompt i's generator seeded (seed, i). Images (or videos) in [0, 1].

    Under torchrun each rank generates its share of the prompts and every rank returns all the images
    (planning/workload.py); `before_batch(start, n)` gets the batch's place among all the prompts,
    `after_batch(done, total)` this rank's progress."""
    from ..runtime import check_guidance
    from ..zoo.pipeline import samples

    check_guidance(guidance_scale, "guidance_scale")
    rank, world = data_parallel(pipe)
    mine = share(len(prompts), rank, world)
    images = []
    for start in range(mine.start, mine.stop, batch_size):
        chunk = prompts[start : min(start + batch_size, mine.stop)]
        if before_batch is not None:
            before_batch(start, len(chunk))
        gens = [torch.Generator().manual_seed(seed * 100_003 + start + i) for i in range(len(chunk))]
        kwargs = {"num_inference_steps": steps, "generator": gens, "output_type": "pt"}
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
        images.append(torch.as_tensor(samples(pipe(chunk, **kwargs))).float().cpu())
        if after_batch is not None:
            after_batch(start + len(chunk) - mine.start, len(mine))
    local = torch.cat(images) if images else None
    if world == 1:
        return local
    return torch.cat([part for part in gather(local, world) if part is not None])


def calibrate(pipe, prompts: list, steps: int, seed: int = 0, batch_size: int = 8, guidance_scale=None,
              max_lag: int = 10, forecast_lag: int = 3, progress=None, layout=None) -> tuple[Profile, torch.Tensor]:
    """Measure every unit's reuse / forecast error and its cost on `prompts` with the uncached model.

    Returns the calibration profile and the uncached images (the reference a plan is checked against).
    `progress(done, total)` is called after each batch. `layout`: a declared block layout (`ditscope.Blocks`)
    for a model outside the family table.
    """
    from ..cache.layout import find_transformer

    if len(prompts) < 1:
        raise DitscopeError("calibration needs at least one prompt")
    transformer, _ = find_transformer(pipe)
    observer = _Observer(max_lag, forecast_lag)
    handle = CacheHandle(pipe, observer, num_inference_steps=steps, layout=layout)
    ctx = handle.ctx
    started = {}

    def pre(module, args, kwargs):
        _sync()
        started["t"] = time.perf_counter()

    def post(module, args, kwargs, output):
        _sync()
        observer.end_call(ctx, time.perf_counter() - started["t"])

    hooks = [transformer.register_forward_pre_hook(pre, with_kwargs=True),
             transformer.register_forward_hook(post, with_kwargs=True)]
    def before_batch(start, n):
        observer.n_prompts, observer.prompt_offset = n, start
        observer.history.clear()
        observer.count_flops = start == 0

    try:
        images = generate(pipe, prompts, steps, seed, batch_size, guidance_scale, before_batch, progress)
    finally:
        for h in hooks:
            h.remove()
        handle.remove()
    _merge_ranks(observer, data_parallel(pipe)[1])
    profile = _to_profile(observer, ctx, len(prompts), steps, max_lag, forecast_lag)
    profile.meta.update(model=type(transformer).__name__, model_signature=model_signature(transformer),
                        scheduler=type(getattr(pipe, "scheduler", None)).__name__, num_inference_steps=steps,
                        seed=seed, prompts_hash=sha256_of([str(p) for p in prompts]), n_prompts_total=len(prompts),
                        guidance_scale=guidance_scale, batch_size=batch_size, kind="calibration",
                        units=_units(ctx), seconds={u: statistics.median(v) for u, v in observer.seconds.items()},
                        flops=observer.flops, signal=_signal(observer, len(prompts), steps))
    return profile, images


def _merge_ranks(observer: _Observer, world: int):
    """Under torchrun: every rank's measured errors and signal (each rank saw its own prompts), and the first
    rank's timings and FLOPs (a plan's costs must be the same on every rank)."""
    if world == 1:
        return
    errors: dict = {}
    signal: dict = {}
    for part_errors, part_signal in gather(({k: dict(v) for k, v in observer.errors.items()}, dict(observer.signal)),
                                           world):
        for key, values in part_errors.items():
            errors.setdefault(key, {}).update(values)
        signal.update(part_signal)
    observer.errors, observer.signal = errors, signal
    observer.seconds, observer.flops = from_first((dict(observer.seconds), observer.flops))


def _signal(observer: _Observer, n_prompts: int, steps: int) -> list[list]:
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


def _to_profile(observer: _Observer, ctx: Context, n_prompts: int, steps: int, max_lag: int, forecast_lag: int) -> Profile:
    names = list(_units(ctx))
    targets = [f"reuse@{k}" for k in range(1, max_lag + 1)] + [f"forecast@{k}" for k in range(1, forecast_lag + 1)]
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
                    values[p, ki, step - 1, mi] = v
    schedule = [float(t) for t in (ctx.schedule or range(steps))]
    return Profile(keys=keys, layer_names=names, timesteps=schedule, prompt_index=np.arange(n_prompts),
                   values=values, stats=RunningStats.of(values), meta={}, metrics=METRICS)
