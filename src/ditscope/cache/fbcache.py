"""First-block cache (ParaAttention, diffusers' FirstBlockCache): always run the first block; when its
residual barely changed since the last computed step, skip the other blocks and add their cached
residuals instead."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DitscopeError
from .actions import run_block
from .context import Context
from .layout import BlockSite
from .method import CacheMethod
from .registry import Knob, register
from .tensors import block_inputs, block_outputs, relative_change, rows_mask


@dataclass
class FBCacheConfig:
    """Skip all blocks but the first while the first block's residual is stable. The default threshold is safe and
    nearly idle (it skipped almost nothing on the zoo models, README); `ditscope tune` fits it.

    Attributes:
        threshold: skip when `mean|R_t - R_prev| / mean|R_prev|` of the first block's residual is below it
            (R_prev: the residual at the last step that computed the rest). Decided per batch row.
        warmup: the first steps, always computed.
        per_sample: decide per batch row (True: an image never depends on its batch neighbours; the rows
            that compute run the blocks on their own, so a batch saves what its rows skip) or once for
            the whole batch from its mean change (False, as diffusers' FirstBlockCache).
    """

    threshold: float = 0.05
    warmup: int = 1
    per_sample: bool = True


class FBCacheMethod(CacheMethod):
    uses_blocks = True

    def check(self):
        if self.config.threshold < 0:
            raise DitscopeError(f"FBCache threshold must be >= 0, not {self.config.threshold}")

    def block(self, ctx: Context, bsite: BlockSite, run, args, kwargs):
        st = ctx.state
        if bsite.index != 0:
            return run_block(ctx, bsite, run, args, kwargs, st.get("skip"))
        inputs = block_inputs(bsite, args, kwargs)
        out = run(*args, **kwargs)
        residual = block_outputs(bsite, out)["hidden"] - inputs["hidden"]
        prev = st.get("first_residual")
        skip = None
        if prev is not None and ctx.step >= self.config.warmup:
            change = relative_change(ctx, residual, prev, self.config.per_sample)
            skip = (change < self.config.threshold).cpu()  # the one host sync of the step
        if skip is None:
            st["first_residual"] = residual
        else:  # rows that compute the rest refresh their reference
            keep = (
                rows_mask(ctx, skip, residual.shape[0])
                .to(residual.device)
                .view(-1, *[1] * (residual.dim() - 1))
            )
            st["first_residual"] = torch.where(keep, prev, residual)
        st["skip"] = skip
        ctx.record["blocks_computed"] += 1
        return out


register(
    "fbcache",
    FBCacheConfig,
    FBCacheMethod,
    "all blocks after the first, skipped when the first block's residual changed little",
    grid=[{"threshold": 0.03}, {"threshold": 0.05}, {"threshold": 0.1}, {"threshold": 0.2}],
    compact=[{"threshold": 0.05}, {"threshold": 0.2}, {"threshold": 0.2, "per_sample": False}],
    knob=Knob("threshold", 0.005, 1.0, log=True),
    exact={"threshold": 0.0},
    aggressive={"threshold": 1e9},
)
