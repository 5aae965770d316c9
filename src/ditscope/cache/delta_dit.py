"""Delta-DiT (Chen et al., 2024): cache the deviation (residual) of a range of blocks. Early steps shape
the outline, which the rear blocks refine little, so the rear blocks are cached then; late steps refine
details, which the front blocks change little, so the front blocks are cached then."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DitscopeError
from .actions import full_step, run_block
from .engine import BlockSite, CacheMethod, Context
from .registry import Knob, register


@dataclass
class DeltaDiTConfig:
    """Block-range residual caching.

    Attributes:
        interval: a full step every `interval` steps; the steps between reuse the range's residual.
        blocks: fraction of the blocks in the cached range.
        boundary: fraction of the steps before which the rear blocks are cached, after which the front.
        warmup: the first steps, always full.
    """

    interval: int = 2
    blocks: float = 0.5
    boundary: float = 0.5
    warmup: int = 1


class DeltaDiTMethod(CacheMethod):
    uses_blocks = True

    def validate(self, ctx: Context):
        c = self.config
        if c.interval < 1 or not 0 <= c.blocks <= 1 or not 0 <= c.boundary <= 1:
            raise DitscopeError("Delta-DiT needs interval >= 1 and blocks, boundary in [0, 1]")

    def block(self, ctx: Context, bsite: BlockSite, run, args, kwargs):
        c = self.config
        n = round(c.blocks * ctx.depths)
        early = ctx.step < c.boundary * ctx.num_steps
        in_range = bsite.depth >= ctx.depths - n if early else bsite.depth < n
        reuse = in_range and not full_step(ctx.step, c.interval, c.warmup)
        return run_block(ctx, bsite, run, args, kwargs, torch.ones(ctx.rows, dtype=torch.bool) if reuse else None)


register("delta-dit", DeltaDiTConfig, DeltaDiTMethod, "block residuals of the back (early steps) or front (late steps) blocks",
         grid=[{}, {"interval": 3}],
         compact=[{}],
         knob=Knob("interval", 2, 10, integer=True))
