"""TaylorSeer (Liu et al., 2025): forecast features instead of reusing them. Full steps compute every
module; the steps between predict its output with a Taylor series in the number of steps since the last
full one, finite differences of the last computes standing for the derivatives: FORA's schedule plus a
predictor (`predictors.Taylor`), which plans use too."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from ..errors import DitscopeError
from .actions import full_step
from .context import Context
from .predictors import Predictor, Taylor
from .registry import Knob, register
from .schedule import ScheduleMethod


@dataclass
class TaylorSeerConfig:
    """Taylor-series forecasting of every attention and MLP output. The defaults (the paper's) trade quality for
    speed hard: three forecast steps of four were destructive on every zoo model (README); tune the interval.

    Attributes:
        interval: a full step every `interval` steps.
        order: highest finite difference kept (1 = linear extrapolation). An order needs that many full
            steps before it is used; until then a lower order predicts.
        warmup: the first steps, always full.
    """

    interval: int = 4
    order: int = 2
    warmup: int = 2

    @classmethod
    def dit(cls, **overrides) -> TaylorSeerConfig:
        """The released DiT setting: interval 4, order 4."""
        return replace(cls(interval=4, order=4, warmup=1), **overrides)

    @classmethod
    def flux(cls, **overrides) -> TaylorSeerConfig:
        """The released FLUX setting: interval 6, order 1, first 3 steps full."""
        return replace(cls(interval=6, order=1, warmup=3), **overrides)


class TaylorSeerMethod(ScheduleMethod):
    """FORA's schedule with a Taylor predictor: every module computes on full steps and is forecast between
    them by a Taylor series of the configured order (`predictors.Taylor`)."""

    uses_blocks = False

    def check(self):
        c = self.config
        if c.interval < 1 or c.order < 0:
            raise DitscopeError("TaylorSeer needs interval >= 1 and order >= 0")

    def rows(self, ctx: Context, steps: int) -> dict[str, str]:
        c = self.config
        row = "".join("C" if full_step(t, c.interval, c.warmup) else "T" for t in range(steps))
        return {site.name: row for site in ctx.sites}

    @cached_property
    def taylor(self) -> Taylor:
        """The configured order's predictor, made once: `predictor` is asked at every served call."""
        return Taylor(self.config.order)

    def predictor(self, action: str) -> Predictor:
        return self.taylor if action == "T" else super().predictor(action)


register(
    "taylorseer",
    TaylorSeerConfig,
    TaylorSeerMethod,
    "module outputs forecast by a Taylor series in the step",
    grid=[{"interval": 2}, {"interval": 3}, {}],
    compact=[{"interval": 2}, {}],
    knob=Knob("interval", 2, 10, integer=True),
    exact={"interval": 1},
    aggressive={},
)
