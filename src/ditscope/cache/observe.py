"""Observers: cache methods that compute everything (the uncached model) and measure what they see, through
the engine's calls (`block`, `module`, and the per-call `before_call` / `after_call` hooks of `CacheMethod`):

- `Calibrator`: what `ditscope.planning.calibrate` measures, every unit's reuse / forecast error, its cost,
  and the adaptive plan's live signal;
- `TeaCacheProbe`: the step pairs `ditscope.bench.tune.fit_teacache` fits TeaCache's polynomial to, read
  with TeaCache's own modulated-input code.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist

from ..errors import DitscopeError
from ..parallel import agree
from ..runtime import synchronize
from .context import Context
from .flops import flop_counter
from .layout import BlockSite, Site, unit_kind
from .method import CacheMethod
from .predictors import GRAM, gram_sums
from .schedule_data import STACK
from .teacache import modulated_input
from .tensors import block_inputs, block_outputs, relative_change, row_abs_sums


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, (tuple, list)):
        return [t for part in x for t in _tensors(part)]
    return [x] if torch.is_tensor(x) else []


def _whole(ctx: Context, sums: list[torch.Tensor], split: list[bool] | None = None) -> list[torch.Tensor]:
    """Per-row sums over a sequence split by context parallelism: every rank's parts added (parallel.agree),
    the same on every rank, so that the errors are the one-process errors. A sum marked not `split` is of a
    tensor every rank holds whole: its ranks' copies are added, then divided by their number."""
    whole = agree(torch.stack(sums, 1), ctx.sequence_group).to(sums[0].device, sums[0].dtype)
    world = dist.get_world_size(ctx.sequence_group)
    return [part if split is None or split[i] else part / world for i, part in enumerate(whole.unbind(1))]


def _numel_per_row(xs: list[torch.Tensor], rows: int) -> float:
    return float(sum(x.numel() for x in xs)) / rows


class Calibrator(CacheMethod):
    """Calibration's observer (`ditscope.planning.calibrate`): computes everything (the uncached model), and
    measures every unit against its own past: module outputs, block residuals, and (`after_call`) the whole
    stack, with each unit's seconds and FLOPs and the adaptive plan's live signal."""

    uses_modules = True
    uses_blocks = True

    def __init__(self, max_lag: int, forecast_lag: int):
        super().__init__(None)
        self.max_lag, self.forecast_lag = max_lag, forecast_lag
        self.keep = max(max_lag, 3 * forecast_lag)
        self.n_prompts = 1
        self.prompt_offset = 0
        self.errors: dict = defaultdict(
            lambda: defaultdict(float)
        )  # (unit, target, metric) -> {(prompt, step): value}
        # (unit, lag) -> {(prompt, step): the fitted predictor's sums (predictors.GRAM), over the prompt's rows}
        self.gram: dict = defaultdict(dict)
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.flops: dict[str, float] = {}
        self.count_flops = False
        # units are timed on the first batch only: batches of other sizes would mix into the median
        self.timing = True
        self.history: dict = {}  # (call, unit) -> {step: [tensors]}
        self.signal: dict = defaultdict(
            float
        )  # (prompt, step) -> the adaptive plan's live signal (see `watch`)
        # called once, at the first call of the second step, with the bytes one step's kept outputs take per
        # prompt (what the history costs grows with the batch: calibrate() fits the batch to memory)
        self.check_memory = None

    def _prompt_of_rows(self, ctx: Context) -> np.ndarray:
        if ctx.rows % self.n_prompts:
            raise DitscopeError(
                f"calibration: {ctx.rows} model rows do not fold onto {self.n_prompts} prompts"
            )
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
        wrong = {}  # target -> what serving the unit that way gets wrong, per tensor of xs
        for k in range(1, self.max_lag + 1):
            if step - k in hist:
                wrong[f"reuse@{k}"] = [x - y for x, y in zip(xs, hist[step - k])]
        grams = {}
        # the forecasts from computes k steps apart, k steps ahead: reuse's error less the Taylor terms each
        # predictor adds (predictors.WEIGHTS_OF; at even spacing the terms are y1 - y2 and (y1 - 2 y2 + y3) / 2)
        for k in range(1, self.forecast_lag + 1):
            if step - k not in hist or step - 2 * k not in hist:
                continue
            y1, y2 = hist[step - k], hist[step - 2 * k]
            r = wrong.get(f"reuse@{k}") or [x - y for x, y in zip(xs, y1)]
            first = [a - b for a, b in zip(y1, y2)]
            wrong[f"forecast@{k}"] = [e - t for e, t in zip(r, first)]
            if step - 3 * k in hist:
                second = [(t - b).add_(c).mul_(0.5) for t, b, c in zip(first, y2, hist[step - 3 * k])]
                wrong[f"taylor2@{k}"] = [e - t for e, t in zip(wrong[f"forecast@{k}"], second)]
                grams[k] = gram_sums(r, first, second, rows=ctx.rows)
        raw = {target: row_abs_sums(errs, ctx.rows) for target, errs in wrong.items()}
        if (
            ctx.sequence_group is not None
        ):  # context parallelism: each rank holds its tokens' part of every sum
            sums = [cur_abs, *raw.values(), *(g for gram in grams.values() for g in gram.unbind(1))]
            cur_abs, *errs = _whole(ctx, sums)
            raw = dict(zip(raw, errs[: len(raw)], strict=True))
            width = len(GRAM)
            parts = errs[len(raw) :]
            grams = {k: torch.stack(parts[i * width : (i + 1) * width], 1) for i, k in enumerate(grams)}
            numel *= dist.get_world_size(ctx.sequence_group)
        for k, gram in grams.items():
            acc = self.gram[(unit, k)]
            for p, values in zip(prompts, gram.double().cpu().numpy()):
                key = (int(p), step)
                acc[key] = acc.get(key, 0) + values
        for target, err in raw.items():
            for metric, value in (
                ("l1", err / max(numel, 1.0)),
                ("rel_l1", err / cur_abs.clamp_min(1e-12)),
                ("inject", err / stream_abs.clamp_min(1e-12)),
            ):
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
        if self.count_flops and unit not in self.flops and unit_kind(unit) == "module":
            with flop_counter() as counter:
                out = run(*args, **kwargs)
            self.flops[unit] = float(counter.get_total_flops())
            return out
        if not self.timing:
            return run(*args, **kwargs)
        synchronize()
        start = time.perf_counter()
        out = run(*args, **kwargs)
        synchronize()
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
        if ctx.sequence_group is not None:
            names = getattr(bsite, "names", None) or {"hidden": bsite.hidden, "encoder": bsite.encoder}
            split = [names[role] in ctx.split_inputs for role in streams]
            streams = dict(zip(streams, _whole(ctx, list(streams.values()), split), strict=True))
        in_abs = sum(streams.values())
        ctx.state.setdefault("stream_abs", {})[bsite.index] = streams
        ctx.state["observing"] = 0.0
        out = self._timed(bsite.name, run, args, kwargs)
        if self.timing and self.seconds.get(
            bsite.name
        ):  # the block's time without the measuring done inside it
            self.seconds[bsite.name][-1] -= ctx.state["observing"]
        outputs = block_outputs(bsite, out)
        res = [
            o - inputs[n]
            for n, o in outputs.items()
            if o is not None and inputs.get(n) is not None and o.shape == inputs[n].shape
        ]
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
            if ctx.sequence_group is not None:
                denom = _whole(ctx, [denom])[0]
        start = time.perf_counter()
        self._measure(ctx, site.name, _tensors(out), denom)
        ctx.state["observing"] = ctx.state.get("observing", 0.0) + time.perf_counter() - start
        return out

    def history_bytes(self) -> int:
        """What the kept outputs (and the signal's last input) take now, in bytes."""
        kept = [
            v if torch.is_tensor(v) else [t for ts in v.values() for t in ts] for v in self.history.values()
        ]
        return sum(t.numel() * t.element_size() for t in _tensors(kept))

    def before_call(self, ctx: Context):
        if self.check_memory is not None and ctx.step >= 1:
            check, self.check_memory = self.check_memory, None
            check(self.history_bytes() / self.n_prompts)
        if (
            self.timing and not ctx.prefix
        ):  # the stack is timed and measured on the (first) transformer the profile describes
            synchronize()
            self.started = time.perf_counter()

    def after_call(self, ctx: Context, out):
        """The stack: its blocks' residual errors summed, over the stream at the last block."""
        if ctx.prefix:
            return
        if self.timing:
            synchronize()
            self.seconds[STACK].append(time.perf_counter() - self.started)
        stack = ctx.state.pop("stack", None)
        if not stack or stack["abs"] is None:
            return
        prompts = self._prompt_of_rows(ctx)
        branches = ctx.rows // self.n_prompts
        for target, err in stack["err"].items():
            self._add(
                STACK, target, "inject", prompts, ctx.step, err / stack["abs"].clamp_min(1e-12) / branches
            )


class TeaCacheProbe(CacheMethod):
    """Computes everything; per step, pairs the relative change of the first block's modulated input (what
    TeaCache watches, read as TeaCache reads it) with that of the last block's output (what skipping the stack
    would get wrong): `pairs`, one (x, y) per model row and step."""

    uses_blocks = True

    def __init__(self):
        super().__init__(None)
        self.pairs: list[tuple[float, float]] = []

    def validate(self, ctx: Context):
        super().validate(ctx)
        self.read_input = bool(ctx.blocks[0].sites)

    def block(self, ctx: Context, bsite: BlockSite, run, args, kwargs):
        st = ctx.state
        if bsite.index == 0 and self.read_input:
            x, out = modulated_input(bsite, run, args, kwargs, whole=True)
            if x is not None:
                x = x.detach().clone()
                prev = st.get("x")
                st["x_change"] = relative_change(ctx, x, prev).cpu() if prev is not None else None
                st["x"] = x
        else:
            out = run(*args, **kwargs)
        if bsite.index == len(ctx.blocks) - 1:
            y = block_outputs(bsite, out)["hidden"].detach().clone()
            if st.get("y") is not None and st.get("x_change") is not None:
                self.pairs.extend(
                    zip(st["x_change"].tolist(), relative_change(ctx, y, st["y"]).cpu().tolist())
                )
            st["y"] = y
        return out
