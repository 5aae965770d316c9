"""DuCa: dual feature caching (Zou et al., 2024). Cycles of full, conservative (token-wise, ToCa's
partial step) and aggressive (reuse everything) steps; tokens ranked by value norm, which needs no
attention map and so works with any attention kernel."""

from __future__ import annotations

from dataclasses import dataclass

from .registry import Knob, register
from .toca import ToCaConfig, ToCaMethod


@dataclass
class DuCaConfig(ToCaConfig):
    """ToCa's knobs, with DuCa's step pattern: in each cycle of `interval` steps the first is full and the
    rest alternate conservative (token-wise, odd offsets) and aggressive (reuse all, even offsets).
    Defaults: kv-norm scores, a fixed schedule, interval 4: speed first (attributes changed on three zoo
    models, README); interval 3 or `ditscope tune` for near-lossless."""

    interval: int = 4
    schedule: str = "fixed"
    score: str = "kv_norm"


class DuCaMethod(ToCaMethod):
    def step_kinds(self, total: int) -> list[str]:
        kinds = super().step_kinds(total)
        offset = 0
        for step, kind in enumerate(kinds):
            offset = 0 if kind == "full" else offset + 1
            if kind != "full" and offset % 2 == 0:
                kinds[step] = "reuse"
        return kinds


register(
    "duca",
    DuCaConfig,
    DuCaMethod,
    "ToCa's partial steps alternating with plain reuse steps, kv-norm score",
    grid=[{"interval": 3}, {}, {"interval": 6}],
    compact=[{"interval": 3}],
    knob=Knob("interval", 2, 10, integer=True),  # ratio: --knob ratio
    exact={"interval": 1},
    aggressive={},
)
