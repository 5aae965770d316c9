"""Running a pipeline over prompts: the one loop that every command generates, times and shares work with.

A `Workload` is what determines the samples: the prompts (and seeds), the step count, the guidance and the
batch size. Sample (seed s, prompt i) always draws its noise from a generator seeded `s * 100_003 + i`,
whatever batch or rank it runs in, so a resumed, re-batched or shared run makes the same samples (within
float noise: a batch of another size may round differently).

Under `torchrun` the ranks share the samples (data parallel): each rank runs a contiguous share and every
rank then holds all the outputs in order. Whatever is computed from them (a plan's quality checks, a tuned
threshold, a bench row) is then the same on every rank. A measured time differs from rank to rank, so a
decision that rests on one takes the first rank's (`from_first`). Only the first rank writes files.
A model split over the ranks by context parallelism (parallel.py) is not data parallel: the group
runs every batch together.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from ..parallel import launched, sequence_group
from ..runtime import synchronize

SEED_STRIDE = (
    100_003  # a prime above any prompt count: seed s's samples never share a generator with seed s+1's
)


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of prompt `index` under `seed`."""
    return seed * SEED_STRIDE + index


def samples(output):
    """What a pipeline call produced: `.frames` of a video pipeline, else `.images`."""
    return output.frames if hasattr(output, "frames") else output.images


@dataclass
class Workload:
    """Every prompt x seed through a pipeline, in batches of `batch_size` that never mix seeds.

    `call_kwargs`: extra pipeline arguments (a zoo entry's, for instance); `prompt_kwargs(pipe, prompts)`:
    how the pipeline takes a batch of prompts (default: its first positional argument)."""

    prompts: list
    steps: int
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 8
    guidance_scale: float | None = None
    call_kwargs: dict = field(default_factory=dict)
    prompt_kwargs: object = None

    def __len__(self) -> int:
        return len(self.prompts) * len(self.seeds)

    def batches(self, items) -> list[list[int]]:
        """`items` (sample numbers: seed j's prompt i is j * len(prompts) + i) cut into batches."""
        out, n = [], len(self.prompts)
        for k in items:
            last = out[-1] if out else None
            if last and len(last) < self.batch_size and last[-1] // n == k // n:
                last.append(k)
            else:
                out.append([k])
        return out

    def call(self, pipe, batch: list[int], steps: int | None = None, **extra):
        """One pipeline call on the samples `batch`."""
        n = len(self.prompts)
        prompts = [self.prompts[k % n] for k in batch]
        kwargs = {
            "num_inference_steps": steps or self.steps,
            "output_type": "pt",
            **self.call_kwargs,
            **extra,
            "generator": [
                torch.Generator().manual_seed(sample_seed(self.seeds[k // n], k % n)) for k in batch
            ],
        }
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        if self.prompt_kwargs is not None:
            return pipe(**self.prompt_kwargs(pipe, prompts), **kwargs)
        return pipe(prompts, **kwargs)

    def run(
        self,
        pipe,
        steps: int | None = None,
        items=None,
        before_batch=None,
        after_batch=None,
        on_step=None,
        **extra,
    ) -> torch.Tensor | None:
        """The outputs (images or videos in [0, 1], on the CPU) of `items` (default: every sample, shared over
        the ranks of a torchrun launch and gathered on every rank), in order.

        `before_batch(batch)` and `after_batch(batch, outputs)` are called around each pipeline call, and
        `on_step(batch)` after each of its denoising steps; with `output_type="latent"` nothing is kept and None
        is returned."""
        from ..runtime import check_guidance

        check_guidance(self.guidance_scale, "guidance_scale")
        rank, world = data_parallel(pipe)
        shared = items is None
        if shared:
            items = share(len(self), rank, world)
        keep = extra.get("output_type", "pt") != "latent"
        outputs = []
        for batch in self.batches(items):
            if before_batch is not None:
                before_batch(batch)
            if on_step is not None:
                extra["callback_on_step_end"] = lambda _pipe, _i, _t, tensors, b=batch: (on_step(b), tensors)[
                    1
                ]
            got = samples(self.call(pipe, batch, steps, **extra))
            got = torch.as_tensor(got).float().cpu() if keep else None
            if keep:
                outputs.append(got)
            if after_batch is not None:
                after_batch(batch, got)
        if not keep:
            return None
        local = torch.cat(outputs) if outputs else None
        if not shared or world == 1:
            return local
        return torch.cat([part for part in gather(local, world) if part is not None])

    def seconds(self, pipe, repeats: int = 1, steps: int | None = None) -> list[float]:
        """Wall-clock seconds of `repeats` passes over the workload (under torchrun: the group's pass, the
        ranks started together and the clock stopped when the last is done)."""
        mine = share(len(self), *data_parallel(pipe))  # this rank's samples, not gathered: the pass alone
        return [timed(lambda: self.run(pipe, steps, items=mine))[1] for _ in range(repeats)]


def timed(fn):
    """(fn(), its wall-clock seconds): queued GPU work is waited for, and under torchrun every rank starts
    together and waits for the slowest."""
    barrier()
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    barrier()
    return result, time.perf_counter() - start


def median_seconds(fn, repeats: int = 3, warmup: bool = True) -> float:
    """Median seconds of `repeats` calls (after one that warms caches and allocators, unless `warmup` is off);
    under torchrun the first rank's, so that a choice made from it is the same on every rank."""
    if warmup:
        fn()
    return from_first(statistics.median(timed(fn)[1] for _ in range(repeats)))


class FirstBatchClock:
    """Times this rank's first batch of a `generate` run, the ranks in step (a barrier at its start and end):
    pass `tick` as both `before_batch` and `after_batch`. `seconds()` is the first rank's, on every rank; every
    rank must have a batch."""

    def __init__(self):
        self.clock: list[float] = []

    def tick(self, *_):
        if len(self.clock) < 2:
            barrier()
            synchronize()
            self.clock.append(time.perf_counter())

    def seconds(self) -> float:
        return from_first(self.clock[1] - self.clock[0])


def first_batch_prompts(n: int, batch_size: int, world: int) -> int:
    """How many prompts the first rank's first batch holds when `generate` runs `n` prompts over `world`
    ranks in batches of `batch_size`: what a `FirstBatchClock` times."""
    return min(batch_size, len(share(n, 0, world)))


def generate(
    pipe,
    prompts: list,
    steps: int,
    seed: int = 0,
    batch_size: int = 8,
    guidance_scale=None,
    before_batch=None,
    after_batch=None,
    items: list[int] | None = None,
) -> torch.Tensor:
    """Every prompt once (generator seeded `sample_seed(seed, i)`), images (or videos) in [0, 1], shared over
    the ranks of a torchrun launch. `items`: only the prompts of these indices, in this order (each with its
    own seed, so a sample is the one a run of every prompt makes). `before_batch(start, n)` gets the batch's
    place among the prompts (its first prompt's index: with `items` a batch need not be contiguous),
    `after_batch(done, total)` this rank's progress."""
    work = Workload(list(prompts), steps, (seed,), batch_size, guidance_scale)
    rank, world = data_parallel(pipe)
    chosen = range(len(work)) if items is None else list(items)
    mine = [chosen[i] for i in share(len(chosen), rank, world)]
    done = []
    local = work.run(
        pipe,
        items=mine,
        before_batch=(lambda b: before_batch(b[0], len(b))) if before_batch is not None else None,
        after_batch=(lambda b, _: (done.append(len(b)), after_batch(sum(done), len(mine))))
        if after_batch
        else None,
    )
    if world == 1:
        return local
    return torch.cat([part for part in gather(local, world) if part is not None])


# --------------------------------------------------------------------------------- sharing the ranks
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
