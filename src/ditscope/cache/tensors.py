"""Tensor helpers of the cache methods: a call's hidden-state argument, a block's inputs and outputs by role,
residuals, batch rows, and relative change per model row (agreed over the ranks under context parallelism)."""

from __future__ import annotations

import torch

from ..errors import DitscopeError
from ..families import Blocks
from ..parallel import agree
from .context import Context
from .layout import BlockSite


def hidden_arg(args: tuple, kwargs: dict, name: str = "hidden_states") -> torch.Tensor:
    return kwargs[name] if name in kwargs else args[0]


def with_hidden(
    args: tuple, kwargs: dict, x: torch.Tensor, name: str = "hidden_states"
) -> tuple[tuple, dict]:
    if name in kwargs:
        return args, {**kwargs, name: x}
    return (x, *args[1:]), kwargs


# The block helpers take the block (its list's returns, its argument names); a `Blocks` layout works too
# (the layout's defaults), for code written before returns were per list.
def block_inputs(bsite: BlockSite | Blocks, args: tuple, kwargs: dict) -> dict[str, torch.Tensor | None]:
    names = getattr(bsite, "names", None) or {"hidden": bsite.hidden, "encoder": bsite.encoder}
    found = {}
    for i, role in enumerate(bsite.args):
        key = names[role]
        found[role] = kwargs[key] if key in kwargs else (args[i] if i < len(args) else None)
    return found


def block_outputs(bsite: BlockSite | Blocks, out) -> dict[str, torch.Tensor | None]:
    if len(bsite.returns) == 1:
        return {bsite.returns[0]: out}
    return dict(zip(bsite.returns, out))


def pack_outputs(bsite: BlockSite | Blocks, outs: dict):
    if len(bsite.returns) == 1:
        return outs[bsite.returns[0]]
    return tuple(outs[name] for name in bsite.returns)


def residuals(inputs: dict, outputs: dict) -> dict:
    """What a block adds to each of its streams."""
    return {
        n: (o - inputs[n] if o is not None and inputs.get(n) is not None else None)
        for n, o in outputs.items()
    }


def add_residuals(inputs: dict, res: dict) -> dict:
    return {n: (inputs[n] + r if r is not None else None) for n, r in res.items()}


def rows_mask(ctx: Context, per_sample: torch.Tensor, rows: int) -> torch.Tensor:
    """Expand a per-model-row mask to a block's rows (Latte blocks run B x frames or B x patches rows)."""
    if rows == per_sample.shape[0]:
        return per_sample
    if rows % per_sample.shape[0]:
        raise DitscopeError(f"block batch {rows} does not fold onto model batch {per_sample.shape[0]}")
    return per_sample.repeat_interleave(rows // per_sample.shape[0])


def take_rows(ctx: Context, tree, rows: torch.Tensor, block_rows: int):
    """`tree` (a call's args or kwargs, nested in tuples, lists and dicts) restricted to the batch rows marked
    in `rows` (a per-model-row mask): every tensor whose first dimension is the block's batch `block_rows` or
    the model's is indexed; other values (rotary tables, flags, a mask shared by all rows) pass unchanged."""
    if torch.is_tensor(tree):
        if tree.dim() and tree.shape[0] == block_rows:
            return tree[rows_mask(ctx, rows, block_rows).to(tree.device)]
        if tree.dim() and tree.shape[0] == rows.shape[0]:
            return tree[rows.to(tree.device)]
        return tree
    if type(tree) in (tuple, list):
        return type(tree)(take_rows(ctx, t, rows, block_rows) for t in tree)
    if type(tree) is dict:
        return {k: take_rows(ctx, v, rows, block_rows) for k, v in tree.items()}
    return tree


def row_abs_sums(xs: list[torch.Tensor], rows: int, group=None) -> torch.Tensor:
    """sum|x| per model row over a list of tensors whose first dim folds onto the model's rows: (rows,) float64;
    over the whole sequence when it is split over `group` (context parallelism)."""
    total = torch.zeros(rows, dtype=torch.float64)
    for x in xs:
        per = x.detach().float().abs().flatten(1).sum(1).double().cpu()
        total += per.reshape(rows, -1).sum(1)
    return agree(total, group)


def per_sample_mean(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Mean over everything but the batch, folded onto the model's rows: (rows,) float32."""
    per_row = x.float().flatten(1).mean(1)
    if per_row.shape[0] == ctx.rows or ctx.rows == 0:
        return per_row
    return per_row.reshape(ctx.rows, -1).mean(1)


def relative_change(
    ctx: Context, x: torch.Tensor, prev: torch.Tensor, per_sample: bool = True
) -> torch.Tensor:
    """`mean|x - prev| / mean|prev|` per model row, or the batch's mean of it on every row (per_sample=False:
    one decision for the whole batch, as diffusers' caches make it). Under context parallelism, the ratio of
    the sums over the whole sequence, the same on every rank."""
    if ctx.sequence_group is not None:
        sums = agree(
            torch.stack([row_abs_sums([x - prev], ctx.rows), row_abs_sums([prev], ctx.rows)], 1),
            ctx.sequence_group,
        )
        change = (sums[:, 0] / sums[:, 1].clamp_min(1e-300)).float().to(x.device)
    else:
        change = per_sample_mean(ctx, (x - prev).abs()) / per_sample_mean(ctx, prev.abs()).clamp_min(1e-12)
    return change if per_sample else change.mean().expand_as(change)
