"""TaylorSeer (Liu et al., 2025): forecast features instead of reusing them. Full steps keep finite
differences of each module's output; the steps between predict it with a Taylor series in the number
of steps since the last full one."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import DitscopeError
from .actions import full_step
from .context import COMPUTE, PREDICT, Context
from .layout import Site
from .method import CacheMethod
from .registry import Knob, register
from .tensors import hidden_arg


@dataclass
class TaylorSeerConfig:
    """Taylor-series forecasting of every attention and MLP output. The defaults (the paper's) trade quality for
    speed hard: three forecast steps of four were destructive on every zoo model (README); tune the interval.

    Attributes:
        interval: a full step every `interval` steps.
        order: highest finite difference kept (1 = linear extrapolation). An order needs that many full
            steps before it is used; until then a lower order predicts.
        warmup: the first steps, always full.
    """

    interval: int = 4
    order: int = 2
    warmup: int = 2

    @classmethod
    def dit(cls, **overrides) -> TaylorSeerConfig:
        """The released DiT setting: interval 4, order 4."""
        return replace(cls(interval=4, order=4, warmup=1), **overrides)

    @classmethod
    def flux(cls, **overrides) -> TaylorSeerConfig:
        """The released FLUX setting: interval 6, order 1, first 3 steps full."""
        return replace(cls(interval=6, order=1, warmup=3), **overrides)


def _map(fn, *trees):
    first = trees[0]
    if isinstance(first, tuple):
        return tuple(_map(fn, *parts) for parts in zip(*trees))
    return None if first is None else fn(*trees)


class TaylorSeerMethod(CacheMethod):
    uses_modules = True

    def check(self):
        c = self.config
        if c.interval < 1 or c.order < 0:
            raise DitscopeError("TaylorSeer needs interval >= 1 and order >= 0")

    def module(self, ctx: Context, site: Site, run, args, kwargs):
        c, st = self.config, ctx.state.setdefault("taylor", {})
        x = hidden_arg(args, kwargs, site.hidden)
        tokens = x.shape[0] * x.shape[1] if x.dim() >= 3 else 0
        kept = st.get(site.index)
        if full_step(ctx.step, c.interval, c.warmup) or kept is None:
            out = run(*args, **kwargs)
            diffs = [out]
            if kept is not None:
                gap = ctx.step - kept["step"]
                for i in range(min(c.order, len(kept["diffs"]))):
                    diffs.append(_map(lambda a, b: (a - b) / gap, diffs[i], kept["diffs"][i]))
            st[site.index] = {"step": ctx.step, "diffs": diffs}
            ctx.count(COMPUTE, tokens, tokens)
            return out
        k = ctx.step - kept["step"]
        coefs = [k**i / math.factorial(i) for i in range(len(kept["diffs"]))]

        def forecast(*ds):
            pred = ds[0].clone()
            for coef, d in zip(coefs[1:], ds[1:]):
                pred.add_(d, alpha=coef)
            return pred

        ctx.count(PREDICT, 0, tokens)
        with torch.no_grad():
            return _map(forecast, *kept["diffs"])


register(
    "taylorseer",
    TaylorSeerConfig,
    TaylorSeerMethod,
    "module outputs forecast by a Taylor series in the step",
    grid=[{"interval": 2}, {"interval": 3}, {}],
    compact=[{"interval": 2}, {}],
    knob=Knob("interval", 2, 10, integer=True),
    exact={"interval": 1},
    aggressive={},
)
