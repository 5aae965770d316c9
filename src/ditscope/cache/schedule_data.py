"""A `Schedule`: the action of every cached unit at every step, its file (a plan) and its resampling; the data
only (`schedule.ScheduleMethod` executes one, by a table look-up per step and unit).

It is the per-site generalisation of cache-dit's step mask, and what `ditscope plan` compiles a measured
plan into. Units are named as the engine names them (`ditscope.cache.layout.layout_of`):

- a module site, e.g. `transformer_blocks.3.attn1`: `C` compute (and keep), `R` reuse the kept output,
  `F` forecast it from its last two computed outputs (first-order Taylor in the step), `T` from its last
  three (second order), `L` with weights fitted on the calibration trajectories (the plan's `weights`:
  unit -> step -> (w1, w2); `predictors.py` says what each computes);
- a block, e.g. `transformer_blocks.3`: `C` run it, `R` add its kept residual instead, `F` add its
  forecast residual;
- `stack`: `R` serves every block from its kept residual at that step (the whole stack skipped), `F`
  forecasts every block's residual from its last two computed ones.

One row per unit is a string of one character per step, so a plan file can be read (and edited) by a
person. `ditscope plan` writes a `checksum` (SHA-256 of the rest) that loading verifies, so a damaged
plan is refused rather than run; a plan without one (hand-written, or older than checksums) loads
unverified, and deleting the line is how a deliberately hand-edited plan is run. Units the schedule does not name are always computed. Steps are the engine's: 0 .. T-1 in
sampling order; step 0 always computes.

Applied at another step count than it was made for, a schedule is resampled on the normalised step
axis (step s of T' takes the action of step round(s (T-1) / (T'-1)) of T): the redundancy of a model
is stable across step counts (the paper's finding), which is what makes this valid. `strict=True`
refuses instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DitscopeError
from ..files import json_checksum, write_text_atomic
from ..versioned import FileFormat
from .layout import STACK, unit_kind

FORMAT = "ditscope-plan"
FORMAT_VERSION = 1
PLAN_FILE = FileFormat(
    "plan file",
    FORMAT,
    FORMAT_VERSION,
    ".plan.json",
    "ditscope plan",
    "make it again with ditscope plan",
    edited="delete its checksum line to run a hand-edited plan",
)
ACTIONS = {
    "C": "compute",
    "R": "reuse",
    "F": "forecast (linear)",
    "T": "forecast (Taylor, second order)",
    "L": "forecast (fitted)",
}


def model_signature(model: torch.nn.Module) -> dict:
    """What a plan must match: the transformer's class and a hash of its config (its weights may differ). The
    config's private entries (`_name_or_path`: where it was loaded from; `_diffusers_version`) are left out: a
    plan made in one checkout or with one diffusers release holds in another."""
    return {"class": type(model).__name__, "config_hash": config_hash(model)}


def config_hash(owner) -> str:
    """A hash of `owner.config` (a diffusers model's or scheduler's) without its private entries."""
    config = getattr(owner, "config", None)
    public = {
        k: v for k, v in (dict(config) if config is not None else {}).items() if not str(k).startswith("_")
    }
    text = json.dumps(public, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_SAME_SIZE_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of what makes a model's outputs beyond its config: every parameter's and buffer's name, dtype,
    shape and two sums of its values' bit patterns read as integers (the patterns and their squares, modulo
    2^64; one reduction each, on its device; not the bytes). Work kept from a run (uncached images, a
    calibration) holds for another run only if this matches: another checkpoint or dtype makes other images.
    Integer sums are exact in any order, so the hash does not depend on how many threads reduce a tensor: a
    float64 sum's last digits did, and a run resumed with another thread count refused its own work."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            bits = t.detach().reshape(-1).view(_SAME_SIZE_INTEGER[t.element_size()]).to(torch.int64)
            total, squares = int(bits.sum()), int((bits * bits).sum())
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{total}|{squares}".encode())
    return h.hexdigest()[:16]


@dataclass
class Schedule:
    """Actions per (unit, step). `rows[unit]` is a string over steps of C / R / F; `meta` says what the
    schedule was made for (model signature, scheduler, step count, calibration and measured quality)."""

    rows: dict[str, str]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.rows, dict) or not self.rows:
            raise DitscopeError(
                "a schedule needs at least one row (unit -> actions per step); an empty one would run "
                "uncached while claiming a plan"
            )
        for unit, row in self.rows.items():
            if not isinstance(unit, str) or not isinstance(row, str) or not row:
                raise DitscopeError(
                    f"schedule row {unit!r} must be a non-empty string of {' / '.join(ACTIONS)}, one per step "
                    f"(got {row!r})"
                )
        lengths = {len(r) for r in self.rows.values()}
        if len(lengths) > 1:
            raise DitscopeError(
                f"a schedule's rows must all have one action per step (lengths {sorted(lengths)})"
            )
        for unit, row in self.rows.items():
            bad = set(row) - set(ACTIONS)
            if bad:
                raise DitscopeError(
                    f"schedule row {unit!r} has unknown actions {''.join(sorted(bad))!r} (use {', '.join(ACTIONS)})"
                )
            if row and row[0] != "C":
                raise DitscopeError(f"schedule row {unit!r} must compute at step 0")

    @property
    def steps(self) -> int:
        return len(next(iter(self.rows.values()), ""))

    def at(self, steps: int) -> Schedule:
        """This schedule resampled to `steps` steps on the normalised step axis.

        To more steps each new step takes the action of the nearest planned one. To fewer, each new step
        stands for the planned steps since the previous new one and computes if any of them did (else
        forecasts if any did, else reuses): picking the nearest would alias a periodic plan (every other
        step computed, halved, can land on the served steps only). A fitted forecast (`L`) becomes the
        linear one: its weights were fitted for the planned steps."""
        if steps == self.steps or not self.rows:
            return self
        if steps < 1:
            raise DitscopeError(f"cannot resample a schedule to {steps} steps")
        src = [round(s * (self.steps - 1) / max(1, steps - 1)) for s in range(steps)]
        if steps > self.steps:
            rows = {u: "C" + "".join(r[i] for i in src[1:]) for u, r in self.rows.items()}
        else:
            spans = [range(a + 1, b + 1) for a, b in zip(src, src[1:])]
            rows = {
                u: "C" + "".join(_merged(r[i] for i in span) for span in spans) for u, r in self.rows.items()
            }
        rows = {u: r.replace("L", "F") for u, r in rows.items()}
        meta = {k: v for k, v in self.meta.items() if k != "weights"}
        return Schedule(rows, {**meta, "resampled_from": self.steps})

    def fraction(self, action: str = "C") -> float:
        """Share of (module site, step) cells with this action, on the steps the stack runs (a stack-skipped
        step runs no module; blocks reused on their own are not taken out)."""
        stack = self.rows.get(STACK, "C" * self.steps)
        cells = [
            c for u, r in self.rows.items() if unit_kind(u) == "module" for c, s in zip(r, stack) if s != "R"
        ]
        return sum(c == action for c in cells) / max(1, len(cells))

    # ------------------------------------------------------------------------------ persistence
    def to_json(self) -> dict:
        body = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "steps": self.steps,
            "meta": self.meta,
            "rows": self.rows,
        }
        return {**body, "checksum": json_checksum(json.loads(json.dumps(body)))}

    def save(self, path) -> Path:
        """Write the plan file atomically (versioned JSON, one row per unit)."""
        path = Path(path)
        if path.is_dir():
            raise DitscopeError(
                f"plan path {path} is a folder; give a file name such as {path / 'model.plan.json'}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path) -> Schedule:
        path, raw = PLAN_FILE.read_json(path)
        rows, meta = raw.get("rows"), raw.get("meta", {})
        if not isinstance(rows, dict) or not all(isinstance(r, str) for r in rows.values()):
            raise DitscopeError(f"plan file {path} is corrupt: 'rows' must map unit names to action strings")
        if not isinstance(meta, dict) or any(
            not isinstance(meta.get(k, {}), dict) for k in ("model", "quality", "calibration")
        ):
            raise DitscopeError(
                f"plan file {path} is corrupt: 'meta' and its model, quality and calibration entries "
                "must be objects"
            )
        if "steps" in raw and rows and raw["steps"] != len(next(iter(rows.values()))):
            raise DitscopeError(
                f"plan file {path} is corrupt: its rows do not have 'steps' ({raw['steps']!r}) actions"
            )
        return cls(rows, meta)

    def __repr__(self) -> str:
        return (
            f"Schedule({len(self.rows)} units x {self.steps} steps, {self.fraction('C'):.0%} of module cells "
            f"computed, stack skipped at {self.rows.get(STACK, '').count('R')} steps)"
        )


def _merged(actions) -> str:
    """One action for planned steps merged into one: compute if any computes, else forecast if any does (the
    second-order forecast where all do, else the linear one)."""
    actions = set(actions)
    if "C" in actions:
        return "C"
    return "T" if actions == {"T"} else "F" if actions - {"R"} else "R"
