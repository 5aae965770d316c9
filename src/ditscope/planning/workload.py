"""The ranks of a `torchrun` launch sharing a pipeline run over prompts (data parallel).

Each rank generates a contiguous share of the prompts with the generators one process would give them, and
every rank then holds all the images in prompt order. Whatever is computed from them (a plan's quality
checks, a tuned threshold, a recommendation) is then the same on every rank and equal to one process's
within float noise (a share runs in a smaller batch). A measured time differs from rank to rank, so a
decision that rests on one takes the first rank's (`from_first`). Only the first rank writes files.

A model split over the ranks by context parallelism (cache/parallel.py) is not data parallel: the group
runs every batch together.
"""

from __future__ import annotations

from ..cache.parallel import launched, sequence_group


def data_parallel(pipe) -> tuple[int, int]:
    """(rank, world size) over which `pipe`'s prompts are shared: (0, 1) in one process, and when the
    pipeline's transformer is split over the ranks by context parallelism."""
    from ..cache.layout import find_transformer

    rank, world = launched()
    if world > 1 and sequence_group(find_transformer(pipe)[0]) is not None:
        return 0, 1
    return rank, world


def share(n: int, rank: int, world: int) -> range:
    """This rank's contiguous part of n items (the first n % world ranks take one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def gather(part, world: int) -> list:
    """Every rank's `part`, in rank order, on every rank."""
    if world == 1:
        return [part]
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, part)
    return parts


def from_first(value):
    """The first rank's `value` on every rank (one process: `value`)."""
    import torch.distributed as dist

    if launched()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def writes() -> bool:
    """Whether this process writes the files (the first rank, or the only process)."""
    return launched()[0] == 0


def barrier():
    import torch.distributed as dist

    if launched()[1] > 1:
        dist.barrier()

