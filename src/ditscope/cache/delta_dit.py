"""Delta-DiT (Chen et al., 2024): cache the deviation (residual) of a range of blocks. Early steps shape
the outline, which the rear blocks refine little, so the rear blocks are cached then; late steps refine
details, which the front blocks change little, so the front blocks are cached then."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DitscopeError
from .actions import full_step
from .context import Context
from .registry import Knob, register
from .schedule import ScheduleMethod


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


class DeltaDiTMethod(ScheduleMethod):
    """A static policy: the blocks of the cached range add their kept residual between full steps."""

    uses_modules = False

    def check(self):
        c = self.config
        if c.interval < 1 or not 0 <= c.blocks <= 1 or not 0 <= c.boundary <= 1:
            raise DitscopeError("Delta-DiT needs interval >= 1 and blocks, boundary in [0, 1]")

    def rows(self, ctx: Context, steps: int) -> dict[str, str]:
        c = self.config
        n = round(c.blocks * ctx.depths)

        def action(depth: int, t: int) -> str:
            early = t < c.boundary * steps
            in_range = depth >= ctx.depths - n if early else depth < n
            return "R" if in_range and not full_step(t, c.interval, c.warmup) else "C"

        return {b.name: "".join(action(b.depth, t) for t in range(steps)) for b in ctx.blocks}


register(
    "delta-dit",
    DeltaDiTConfig,
    DeltaDiTMethod,
    "block residuals of the back (early steps) or front (late steps) blocks",
    grid=[{}, {"interval": 3}],
    compact=[{}],
    knob=Knob("interval", 2, 10, integer=True),
    exact={"interval": 1},
    aggressive={},
)
