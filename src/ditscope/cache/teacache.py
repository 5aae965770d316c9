"""TeaCache (Liu et al., 2024): watch how much the timestep-modulated input of the first block changes;
accumulate that change, rescaled by a per-model polynomial, and skip every block (adding their cached
residuals) while the sum stays under a threshold."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DitscopeError
from .actions import run_block
from .context import Context
from .layout import BlockSite
from .method import CacheMethod
from .registry import Knob, register
from .tensors import hidden_arg, relative_change


@dataclass
class TeaCacheConfig:
    """Skip the whole transformer while the accumulated, rescaled input change stays small. The default threshold
    with copied coefficients is speed first (far from lossless on the zoo models: README); `ditscope tune` fits both.

    Attributes:
        threshold: the accumulated distance at which a step is computed again (TeaCache's rel_l1_thresh).
        coefficients: polynomial (highest degree first, as numpy.polyval) mapping the relative L1 change
            of the modulated input to the expected change of the output. The default (1, 0) is the
            identity; TeaCache fits a 4th-order one per model offline.
        per_sample: decide per batch row (True: an image never depends on its batch neighbours; the rows
            that compute run the blocks on their own, so a batch saves what its rows skip) or once for
            the whole batch from its mean change (False, as TeaCache and diffusers do).
    """

    threshold: float = 0.3
    coefficients: tuple[float, ...] = (1.0, 0.0)
    per_sample: bool = True


class _Probe(Exception):
    """Stops the first block as soon as its first module receives the modulated input."""


def modulated_input(bsite: BlockSite, run, args, kwargs, whole: bool = False):
    """What TeaCache watches: the input of the block's first cached module (the timestep-modulated hidden state).
    The block runs only up to that module; `whole=True` runs all of it and returns (input, block output)."""
    seen = {}

    def hook(module, a, kw):
        if "x" not in seen:  # the module's first call in this block
            seen["x"] = hidden_arg(a, kw, bsite.sites[0].hidden)
        if not whole:
            raise _Probe

    handle = bsite.sites[0].module.register_forward_pre_hook(hook, with_kwargs=True)
    out = None
    try:
        out = run(*args, **kwargs)
    except _Probe:
        pass
    finally:
        handle.remove()
    return (seen.get("x"), out) if whole else seen["x"]


class TeaCacheMethod(CacheMethod):
    uses_blocks = True

    def check(self):
        if self.config.threshold < 0 or not self.config.coefficients:
            raise DitscopeError("TeaCache needs threshold >= 0 and at least one coefficient")

    def validate(self, ctx: Context):
        super().validate(ctx)
        if not ctx.blocks[0].sites:
            raise DitscopeError(
                "TeaCache: the first block has no attention module to read its modulated input from"
            )

    def block(self, ctx: Context, bsite: BlockSite, run, args, kwargs):
        if bsite.index == 0:
            self._decide(ctx, modulated_input(bsite, run, args, kwargs))
        return run_block(ctx, bsite, run, args, kwargs, ctx.state.get("skip"))

    def _decide(self, ctx: Context, x: torch.Tensor):
        st = ctx.state
        prev = st.get("modulated")
        last = ctx.num_steps is not None and ctx.step == ctx.num_steps - 1
        skip = None
        if prev is not None and not last:
            change = relative_change(ctx, x, prev, self.config.per_sample).cpu()
            rescaled = torch.zeros_like(change)
            for c in self.config.coefficients:  # Horner
                rescaled = rescaled * change + c
            acc = st["accumulated"] + rescaled
            skip = acc < self.config.threshold
            st["accumulated"] = torch.where(skip, acc, torch.zeros_like(acc))
        else:
            st["accumulated"] = torch.zeros(ctx.rows)
        st["modulated"] = x.detach().clone()
        st["skip"] = skip


register(
    "teacache",
    TeaCacheConfig,
    TeaCacheMethod,
    "the whole block stack, skipped while the accumulated rescaled input change is small",
    grid=[{"threshold": 0.1}, {"threshold": 0.2}, {"threshold": 0.4}],
    compact=[{"threshold": 0.1}, {"threshold": 0.4}, {"threshold": 0.2, "per_sample": False}],
    knob=Knob("threshold", 0.01, 3.0, log=True),
    exact={"threshold": 0.0},
    aggressive={"threshold": 1e9},
)
