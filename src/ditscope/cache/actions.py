"""The actions a cache method can take at a site, apart from the policies that choose them.

A method is a policy: per (step, site) it chooses an action. Static policies (FORA, Delta-DiT, a plan) say
their whole table up front and `schedule.ScheduleMethod` looks it up (TaylorSeer too: FORA's table with a
Taylor predictor); policies that decide from what the model computes (FBCache, TeaCache, PAB's live
timestep, ToCa) call these functions per call.
- module sites: compute and keep the output, or serve the kept one (`cached_module`);
- block sites: compute and keep the block's residual per stream, or add the kept residual (`run_block`).
  The sum of the per-block residuals of a run of blocks is the run's residual, so reusing every block
  of a range is the same as adding the range's cached residual, and it stays right on models whose
  blocks reshape the sequence in between (Latte's spatial and temporal blocks). Decisions can differ
  per batch row: rows that reuse take input + residual, rows that compute take the block's output, and
  the block runs only when some row computes, on those rows alone (`run_rows`).
- what a served unit is made of (reuse, a Taylor or a fitted forecast) is a predictor (`predictors.py`);
- the fixed-interval rule most policies start from (`full_step`: FORA, Delta-DiT, TaylorSeer, the planner).
ToCa's partial recompute keeps its state in its own file.
"""

from __future__ import annotations

import torch

from .context import COMPUTE, REUSE, Context
from .layout import BlockSite, Site
from .tensors import (
    add_residuals,
    block_inputs,
    block_outputs,
    hidden_arg,
    pack_outputs,
    residuals,
    rows_mask,
    take_rows,
)


def run_block(ctx: Context, bsite: BlockSite, run, args, kwargs, reuse_rows: torch.Tensor | None):
    """Run or reuse one block. `reuse_rows`: per model row, True = reuse (None = compute all rows)."""
    kept = ctx.state.setdefault("residual", {})
    inputs = block_inputs(bsite, args, kwargs)
    res = kept.get(bsite.index)
    if res is None or reuse_rows is None or not bool(reuse_rows.any()):
        outputs = block_outputs(bsite, run(*args, **kwargs))
        kept[bsite.index] = residuals(inputs, outputs)
        ctx.record["blocks_computed"] += 1
        return pack_outputs(bsite, outputs)
    reused = add_residuals(inputs, res)
    if bool(reuse_rows.all()):
        ctx.record["blocks_reused"] += 1
        return pack_outputs(bsite, reused)
    outputs = block_outputs(
        bsite,
        run_rows(
            ctx,
            run,
            args,
            kwargs,
            ~reuse_rows,
            pack_outputs(bsite, reused),
            inputs["hidden"].shape[0],
            bsite.name,
        ),
    )
    new_res = residuals(inputs, outputs)
    merged_res = {}
    for name, r in new_res.items():
        if r is None or res.get(name) is None:
            merged_res[name] = r
            continue
        mask = rows_mask(ctx, reuse_rows, r.shape[0]).to(r.device).view(-1, *[1] * (r.dim() - 1))
        merged_res[name] = torch.where(mask, res[name], r)
    kept[bsite.index] = merged_res
    ctx.record["blocks_computed"] += 1
    return pack_outputs(bsite, outputs)


def run_rows(ctx: Context, run, args, kwargs, rows: torch.Tensor, served, batch: int, unit: str):
    """`run`'s output with the rows marked in `rows` (per model row) computed by running it on those rows
    alone (k of B rows cost about k/B of the batch) and the other rows taken from `served` (the same
    structure: a tensor, or a tuple of tensors and None). `batch`: the rows of the hidden-states argument.
    A module that cannot run on part of its batch (an argument sliced wrongly on a declared model) runs on
    every row instead, and `stats()` says so at `unit`."""
    try:
        ctx.partial_batch = True
        try:
            part = run(*take_rows(ctx, args, rows, batch), **take_rows(ctx, kwargs, rows, batch))
        finally:
            ctx.partial_batch = False
        return _put_rows(ctx, rows, part, served)
    except (RuntimeError, ValueError, IndexError) as error:
        ctx.note(unit, f"ran on the whole batch when only some rows compute ({error})")
        return rows_where(ctx, rows, run(*args, **kwargs), served)


def _put_rows(ctx: Context, rows: torch.Tensor, part, served):
    if isinstance(part, tuple):
        return tuple(_put_rows(ctx, rows, p, s) for p, s in zip(part, served, strict=True))
    if part is None:
        return None
    if not torch.is_tensor(served) or served.shape[1:] != part.shape[1:]:
        raise ValueError("an output without a served value for the other rows")
    merged = served.clone()
    merged[rows_mask(ctx, rows, merged.shape[0]).to(merged.device)] = part
    return merged


def rows_where(ctx: Context, rows: torch.Tensor, a, b):
    """`a` on the model rows marked in `rows`, `b` elsewhere, over a tensor or a tuple of them."""
    if isinstance(a, tuple):
        return tuple(rows_where(ctx, rows, x, y) for x, y in zip(a, b))
    if not torch.is_tensor(a) or not torch.is_tensor(b) or a.shape != b.shape:
        return a
    mask = rows_mask(ctx, rows, a.shape[0]).to(a.device).view(-1, *[1] * (a.dim() - 1))
    return torch.where(mask, a, b)


def cached_module(ctx: Context, site: Site, run, args, kwargs, full: bool):
    """Compute and keep the module's output, or hand back the kept one."""
    cache = ctx.state.setdefault("out", {})
    x = hidden_arg(args, kwargs, site.hidden)
    tokens = x.shape[0] * x.shape[1] if x.dim() >= 3 else 0
    if full or site.index not in cache:
        out = run(*args, **kwargs)
        cache[site.index] = out
        ctx.count(COMPUTE, tokens, tokens)
        return out
    ctx.count(REUSE, 0, tokens)
    return cache[site.index]


def full_step(step: int, interval: int, warmup: int) -> bool:
    """Step 0 and the first `warmup` steps are full, then every `interval`-th step."""
    warmup = max(1, warmup)
    return step < warmup or (step - warmup + 1) % interval == 0 if interval > 1 else True
