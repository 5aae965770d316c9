"""Block-residual caching, shared by the block-level methods (Delta-DiT, FBCache, TeaCache).

A computed block keeps what it added to each stream (its residual); a reused block returns its input
plus that residual. The sum of the per-block residuals of a run of blocks is the run's residual, so
reusing every block of a range is the same as adding the range's cached residual, and it stays right
on models whose blocks reshape the sequence in between (Latte's spatial and temporal blocks).
Decisions can differ per batch row: rows that reuse take input + residual, rows that compute take the
block's output, and the block only runs when some row computes.
"""

from __future__ import annotations

import torch

from .engine import (
    BlockSite,
    Context,
    add_residuals,
    block_inputs,
    block_outputs,
    pack_outputs,
    residuals,
    rows_mask,
)


def run_block(ctx: Context, bsite: BlockSite, run, args, kwargs, reuse_rows: torch.Tensor | None):
    """Run or reuse one block. `reuse_rows`: per model row, True = reuse (None = compute all rows)."""
    kept = ctx.state.setdefault("residual", {})
    inputs = block_inputs(ctx.layout, args, kwargs)
    res = kept.get(bsite.index)
    if res is None or reuse_rows is None or not bool(reuse_rows.any()):
        outputs = block_outputs(ctx.layout, run(*args, **kwargs))
        kept[bsite.index] = residuals(inputs, outputs)
        ctx.record["blocks_computed"] += 1
        return pack_outputs(ctx.layout, outputs)
    reused = add_residuals(inputs, res)
    if bool(reuse_rows.all()):
        ctx.record["blocks_reused"] += 1
        return pack_outputs(ctx.layout, reused)
    outputs = block_outputs(ctx.layout, run(*args, **kwargs))
    new_res = residuals(inputs, outputs)
    merged_out, merged_res = {}, {}
    for name, out in outputs.items():
        r = new_res[name]
        if r is None or res.get(name) is None:
            merged_out[name], merged_res[name] = out, r
            continue
        mask = rows_mask(ctx, reuse_rows, r.shape[0]).to(r.device).view(-1, *[1] * (r.dim() - 1))
        merged_out[name] = torch.where(mask, reused[name], out)
        merged_res[name] = torch.where(mask, res[name], r)
    kept[bsite.index] = merged_res
    ctx.record["blocks_computed"] += 1
    return pack_outputs(ctx.layout, merged_out)
