"""Where the model is while a cache runs: the step / branch clock a pipeline's transformers share, and the
per-transformer `Context` (generation, step, call slot, per-slot method state, per-call statistics)."""

from __future__ import annotations

import contextlib

import torch

from ..errors import DitscopeError
from ..families import Blocks, Family
from .flops import ScoreCounter
from .layout import BlockSite, Site

COMPUTE, REUSE, PARTIAL, PREDICT = "compute", "reuse", "partial", "predict"
WHOLE = "whole"  # a partial recompute asked for, the module computed whole instead (no token subset of it)


class Clock:
    """Generation, step and call of a pipeline run, shared by every transformer of a pipeline (Wan 2.2 calls
    `transformer` on the early steps and `transformer_2` on the late ones: one step axis for both)."""

    def __init__(self):
        self.num_steps: int | None = None
        self.schedule: list[float] | None = None
        self.generation = -1
        self.step = 0
        self.call = 0
        self.timestep: float | None = None
        self.fresh = True

    def new_generation(self, num_steps: int | None = None, schedule: list[float] | None = None):
        if num_steps is not None:
            self.num_steps = int(num_steps)
        self.schedule = schedule
        self.fresh = True

    def tick(self, t: float | None):
        """Advance to the model call with timestep `t`."""
        if self.fresh or self.timestep is None:
            restart = True
        elif t is not None and t == self.timestep:
            restart = False
            self.call += 1
        else:
            # a later step has a smaller timestep; a larger one, or more steps than set, is a new generation
            restart = (t is not None and t > self.timestep) or (
                self.num_steps is not None and self.step + 1 >= self.num_steps
            )
            if not restart:
                self.step += 1
                self.call = 0
        if restart:
            if self.num_steps is None:
                raise DitscopeError(
                    "the cache does not know the number of inference steps: apply it to the pipeline, or "
                    "pass num_inference_steps=N to ditscope.apply when applying it to a bare transformer"
                )
            self.fresh = False
            self.generation += 1
            self.step, self.call = 0, 0
        self.timestep = t


class Context:
    """Where the model is: generation, step, call slot; plus per-slot method state and statistics."""

    def __init__(
        self,
        family: Family,
        layout: Blocks,
        blocks: list[BlockSite],
        sites: list[Site],
        depths: int,
        clock: Clock | None = None,
    ):
        self.family, self.layout, self.blocks, self.sites, self.depths = family, layout, blocks, sites, depths
        self.clock = clock or Clock()
        self.generation = -1
        self.rows = 0  # batch size of the current model call
        self.active: Site | None = None  # the module running now (read by the attention tap)
        self.in_forward = False
        self.partial_batch = False  # a block is running on some of the batch rows only (actions.run_rows)
        self._slots: dict[int, dict] = {}
        self.records: list[dict] = []  # one per model call of the current generation
        self.record: dict = {}
        self.notes: dict[str, str] = {}  # unit -> what a method could not do there, and what it did instead
        self.flop_counting = False
        self.model: torch.nn.Module | None = None  # the transformer (set by the handle)
        self.scheduler: str | None = None  # the pipeline's scheduler class, when there is a pipeline
        self.prefix = ""  # unit-name prefix of a pipeline's second transformer ("transformer_2.")
        self.unit_names: set[str] = set()  # units of every transformer the handle caches (plans name them)
        self.sequence_group = None  # the ranks the sequence is split over (context parallelism; parallel.py)
        self.split = None  # how: "ulysses" (heads split in attention), "ring" (keys go round), "ulysses+ring"
        self.split_inputs: set[str] = set()  # the model's inputs split over the ranks (others: whole on each)
        self.run_layout: dict = {}  # processes, sequence split, compiled (cache/parallel.py's run_layout)

    # the step axis lives on the clock, shared between a pipeline's transformers
    step = property(lambda self: self.clock.step)
    call = property(lambda self: self.clock.call)
    timestep = property(lambda self: self.clock.timestep)
    num_steps = property(
        lambda self: self.clock.num_steps, lambda self, v: setattr(self.clock, "num_steps", v)
    )
    schedule = property(lambda self: self.clock.schedule)

    @property
    def state(self) -> dict:
        """The current call slot's method state."""
        return self._slots.setdefault(self.call, {})

    def new_generation(self, num_steps: int | None = None, schedule: list[float] | None = None):
        self.clock.new_generation(num_steps, schedule)

    @property
    def scheduler_timestep(self) -> float | None:
        """The step's timestep in the scheduler's units (0..1000), also for models fed sigma in [0, 1]."""
        if self.schedule and len(self.schedule) == self.num_steps:
            return self.schedule[self.step]
        if self.timestep is not None and self.timestep <= 1.0:
            return self.timestep * 1000
        return self.timestep

    def begin_call(self, timestep, rows: int):
        t = (
            float(timestep.flatten()[0])
            if torch.is_tensor(timestep)
            else (float(timestep) if timestep is not None else None)
        )
        self.clock.tick(t)
        if self.generation != self.clock.generation:
            self.generation = self.clock.generation
            self._slots.clear()
            self.records = []
        self.rows = rows
        self.record = {
            "step": self.step,
            "call": self.call,
            "timestep": self.timestep,
            "computed": 0,
            "reused": 0,
            "partial": 0,
            "predicted": 0,
            "whole": 0,
            "tokens": 0,
            "tokens_total": 0,
            "blocks_computed": 0,
            "blocks_reused": 0,
            "flops": None,
            "score_flops": 0,
        }
        if self.prefix:
            self.record["model"] = self.prefix.rstrip(".")
        self.records.append(self.record)

    def note(self, unit: str, text: str):
        """Say (in `stats()`) that a method could not do what it was asked at a unit, and what it did instead."""
        self.notes.setdefault(unit, text)

    def count(self, action: str, tokens: int, tokens_total: int):
        key = {
            COMPUTE: "computed",
            REUSE: "reused",
            PARTIAL: "partial",
            PREDICT: "predicted",
            WHOLE: "whole",
        }[action]
        self.record[key] += 1
        self.record["tokens"] += tokens
        self.record["tokens_total"] += tokens_total

    def scoring(self):
        """Context for a method's scoring work: its FLOPs are counted apart from the model's."""
        if not self.flop_counting:
            return contextlib.nullcontext()
        return ScoreCounter(self.record)
