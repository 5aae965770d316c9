"""FORA: fast-forward caching (Selvaraju et al., 2024). Every `interval`-th step computes every block's
attention and MLP; the steps between reuse their cached outputs."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DitscopeError
from ..families import CROSS, MLP, SELF, TEMPORAL
from .actions import full_step
from .context import Context
from .registry import Knob, register
from .schedule import ScheduleMethod


@dataclass
class FORAConfig:
    """Reuse attention and MLP outputs between full steps.

    Attributes:
        interval: N, a full step every N steps (step 0 is always full).
        warmup: the first steps, always full; the N-step cycle starts after them.
        kinds: which module kinds are cached (self, cross, mlp, temporal).
    """

    interval: int = 3
    warmup: int = 1
    kinds: tuple[str, ...] = (SELF, CROSS, MLP, TEMPORAL)


class FORAMethod(ScheduleMethod):
    """A static policy: the cached kinds' sites compute on full steps and reuse between them."""

    uses_blocks = False

    def check(self):
        if self.config.interval < 1:
            raise DitscopeError(f"FORA interval must be >= 1, not {self.config.interval}")

    def rows(self, ctx: Context, steps: int) -> dict[str, str]:
        c = self.config
        row = "".join("C" if full_step(t, c.interval, c.warmup) else "R" for t in range(steps))
        return {site.name: row for site in ctx.sites if site.kind in c.kinds}


register(
    "fora",
    FORAConfig,
    FORAMethod,
    "every attention and MLP output, recomputed every N steps",
    grid=[{"interval": 2}, {}, {"interval": 4}],
    compact=[{"interval": 2}, {}],
    knob=Knob("interval", 2, 10, integer=True),
    exact={"interval": 1},
    aggressive={},
)
