"""PAB: Pyramid Attention Broadcast (Zhao et al., 2024). Inside a middle range of timesteps, attention
outputs are broadcast (reused) for a number of steps that grows with how little the attention kind
changes: spatial self-attention least, temporal more, cross-attention most. MLPs are always computed."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DitscopeError
from ..families import CROSS, SELF, TEMPORAL
from .actions import cached_module
from .context import Context
from .layout import Site
from .method import CacheMethod
from .registry import Knob, register


@dataclass
class PABConfig:
    """Per-kind attention broadcast inside a timestep window (diffusers' PAB defaults).

    Attributes:
        spatial_interval: self-attention is computed every this many steps inside its window.
        temporal_interval: the same for temporal attention (video models).
        cross_interval: the same for cross-attention.
        spatial_range, temporal_range, cross_range: (low, high) timesteps in the scheduler's units (0..1000)
            inside which each kind is broadcast; outside it is always computed.
    """

    spatial_interval: int = 2
    temporal_interval: int = 4
    cross_interval: int = 6
    spatial_range: tuple[float, float] = (100, 800)
    temporal_range: tuple[float, float] = (100, 800)
    cross_range: tuple[float, float] = (100, 900)


class PABMethod(CacheMethod):
    uses_modules = True

    def check(self):
        c = self.config
        if min(c.spatial_interval, c.temporal_interval, c.cross_interval) < 1:
            raise DitscopeError("PAB intervals must be >= 1")
        for name in ("spatial_range", "temporal_range", "cross_range"):
            span = getattr(c, name)
            ok = (
                isinstance(span, (tuple, list))
                and len(span) == 2
                and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1000 for v in span
                )
            )
            if not ok or span[0] > span[1]:
                raise DitscopeError(
                    f"PAB {name} must be (low, high) timesteps with 0 <= low <= high <= 1000, not {span!r}"
                )

    def module(self, ctx: Context, site: Site, run, args, kwargs):
        c = self.config
        rule = {
            SELF: (c.spatial_interval, c.spatial_range),
            TEMPORAL: (c.temporal_interval, c.temporal_range),
            CROSS: (c.cross_interval, c.cross_range),
        }.get(site.kind)
        full = True
        t = ctx.scheduler_timestep
        if rule is not None and t is not None:
            interval, (low, high) = rule
            if low < t < high:
                st = ctx.state.setdefault("pab_since", {})
                since = st.get(site.index, interval)  # steps since this module was last computed
                full = since >= interval
                st[site.index] = 1 if full else since + 1
        return cached_module(ctx, site, run, args, kwargs, full=full)


register(
    "pab",
    PABConfig,
    PABMethod,
    "attention outputs broadcast over a timestep range, per kind",
    grid=[{}, {"spatial_interval": 3, "cross_interval": 8}],
    compact=[{}],
    knob=Knob("spatial_interval", 2, 10, integer=True),
    exact={"spatial_interval": 1, "temporal_interval": 1, "cross_interval": 1},
    aggressive={"spatial_range": (0, 1000), "temporal_range": (0, 1000), "cross_range": (0, 1000)},
)
