"""Caching under context parallelism (diffusers' `enable_parallelism(ContextParallelConfig(...))`).

There each rank's blocks see a shard of the sequence. A method that decides from a signal over the tokens
(FBCache, TeaCache, an adaptive plan) must decide the same on every rank of the sequence group, or the ranks
that skip leave the others waiting in the attention's collective; and it should decide what one process
decides. Both hold when the per-row sums behind a signal are added over the group before any ratio is taken
(the ratio of global sums is the one-process ratio), and the sums rank 0 of the group holds are then given
to every rank (an all-reduce need not give bit-identical sums on every rank of a GPU group).
"""

from __future__ import annotations

import torch


def sequence_group(model: torch.nn.Module):
    """The process group `model`'s sequence is split over by diffusers' context parallelism, or None."""
    config = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    mesh = getattr(config, "_flattened_mesh", None)
    if mesh is None or mesh.size() < 2:
        return None
    return mesh.get_group()


def split_inputs(model: torch.nn.Module) -> set[str]:
    """The keyword inputs (of the model or of one of its modules) that diffusers' context-parallel plan
    splits over the ranks; every rank holds the others whole (Wan's text)."""
    names = set()
    for entry in (getattr(model, "_cp_plan", None) or {}).values():
        if isinstance(entry, dict):
            names |= {
                k
                for k, how in entry.items()
                if isinstance(k, str) and type(how).__name__ == "ContextParallelInput"
            }
    return names


def agree(sums: torch.Tensor, group) -> torch.Tensor:
    """Per-row sums (float64) added over the sequence group; every rank gets the group's first rank's result."""
    import torch.distributed as dist

    if group is None:
        return sums
    sums = sums.detach().to(torch.float64).cpu().contiguous()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    dist.broadcast(sums, src=dist.get_global_rank(group, 0), group=group)
    return sums


def forward_owner(module: torch.nn.Module) -> tuple[object, str]:
    """Where to wrap `module`'s forward so that the wrapper sees what the module computes on: inside diffusers'
    hooks when it has some (Wan's context-parallel plan splits the sequence in a hook on its first block;
    a wrapper outside it would see the whole sequence go in and a shard come out)."""
    registry = getattr(module, "_diffusers_hook", None)
    refs = getattr(registry, "_fn_refs", None)
    if refs and all(getattr(ref, "original_forward", None) is None for ref in refs):
        return refs[0], "forward"
    return module, "forward"


def launched() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def run_layout(model: torch.nn.Module) -> dict:
    """Where a transformer runs: processes, its sequence split, compiled or not. A plan records it (its
    costs were measured there) and warns when run elsewhere."""
    whole = type(model).__name__ == "OptimizedModule"
    model = getattr(model, "_orig_mod", model) if whole else model
    config = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    split = sequence_group(model) is not None
    compiled_blocks = any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    return {
        "world_size": launched()[1],
        "ulysses_degree": (getattr(config, "ulysses_degree", None) or 1) if split else 1,
        "ring_degree": (getattr(config, "ring_degree", None) or 1) if split else 1,
        "compiled": "whole" if whole else "regional" if compiled_blocks else "no",
    }
