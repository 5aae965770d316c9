"""A `Schedule`: the action of every cached unit at every step, executed by the engine as a table look-up.

It is the per-site generalisation of cache-dit's step mask, and what `ditscope plan` compiles a measured
plan into. Units are named as the engine names them (`ditscope.cache.engine.layout_of`):

- a module site, e.g. `transformer_blocks.3.attn1`: `C` compute (and keep), `R` reuse the kept output,
  `F` forecast it from its last two computed outputs (first-order Taylor in the step);
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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DitscopeError
from ..files import json_checksum, write_text_atomic
from .engine import (
    COMPUTE,
    PREDICT,
    REUSE,
    BlockSite,
    CacheMethod,
    Context,
    Site,
    add_residuals,
    block_inputs,
    block_outputs,
    hidden_arg,
    pack_outputs,
    relative_change,
    residuals,
    rows_mask,
)
from .registry import register

FORMAT = "ditscope-plan"
FORMAT_VERSION = 1
STACK = "stack"
ACTIONS = {"C": "compute", "R": "reuse", "F": "forecast"}


def model_signature(model: torch.nn.Module) -> dict:
    """What a plan must match: the transformer's class and a hash of its config (its weights may differ)."""
    config = getattr(model, "config", None)
    text = json.dumps(dict(config) if config is not None else {}, sort_keys=True, default=str)
    return {"class": type(model).__name__, "config_hash": hashlib.sha256(text.encode()).hexdigest()[:16]}


@dataclass
class Schedule:
    """Actions per (unit, step). `rows[unit]` is a string over steps of C / R / F; `meta` says what the
    schedule was made for (model signature, scheduler, step count, calibration and measured quality)."""

    rows: dict[str, str]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        lengths = {len(r) for r in self.rows.values()}
        if len(lengths) > 1:
            raise DitscopeError(f"a schedule's rows must all have one action per step (lengths {sorted(lengths)})")
        for unit, row in self.rows.items():
            bad = set(row) - set(ACTIONS)
            if bad:
                raise DitscopeError(f"schedule row {unit!r} has unknown actions {''.join(sorted(bad))!r} (use C, R, F)")
            if row and row[0] != "C":
                raise DitscopeError(f"schedule row {unit!r} must compute at step 0")

    @property
    def steps(self) -> int:
        return len(next(iter(self.rows.values()), ""))

    def at(self, steps: int) -> Schedule:
        """This schedule resampled to `steps` steps on the normalised step axis."""
        if steps == self.steps or not self.rows:
            return self
        if steps < 1:
            raise DitscopeError(f"cannot resample a schedule to {steps} steps")
        src = [round(s * (self.steps - 1) / max(1, steps - 1)) for s in range(steps)]
        rows = {u: "C" + "".join(r[i] for i in src[1:]) for u, r in self.rows.items()}
        return Schedule(rows, {**self.meta, "resampled_from": self.steps})

    def fraction(self, action: str = "C") -> float:
        """Share of (module site, step) cells with this action, on the steps the stack runs (a stack-skipped
        step runs no module; blocks reused on their own are not taken out)."""
        stack = self.rows.get(STACK, "C" * self.steps)
        cells = [c for u, r in self.rows.items() if u != STACK and "." in u and not u.rsplit(".", 1)[1].isdigit()
                 for c, s in zip(r, stack) if s != "R"]
        return sum(c == action for c in cells) / max(1, len(cells))

    # ------------------------------------------------------------------------------ persistence
    def to_json(self) -> dict:
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, "steps": self.steps, "meta": self.meta,
                "rows": self.rows}
        return {**body, "checksum": json_checksum(json.loads(json.dumps(body)))}

    def save(self, path) -> Path:
        """Write the plan file atomically (versioned JSON, one row per unit)."""
        path = Path(path)
        if path.is_dir():
            raise DitscopeError(f"plan path {path} is a folder; give a file name such as {path / 'model.plan.json'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path) -> Schedule:
        path = Path(path)
        if path.is_dir():
            inside = sorted(path.glob("*.plan.json"))
            hint = f"pass {inside[0]}" if inside else "pass a .plan.json file (ditscope plan writes one)"
            raise DitscopeError(f"{path} is a folder, not a plan file; {hint}")
        if not path.is_file():
            raise DitscopeError(f"plan file {path} does not exist")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DitscopeError(f"plan file {path} is corrupt or truncated (not JSON); make it again with ditscope plan") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise DitscopeError(f"{path} is not a ditscope plan file")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise DitscopeError(f"plan file {path} has format version {version!r}; this ditscope reads version {FORMAT_VERSION}")
        if "checksum" in raw and raw["checksum"] != json_checksum({k: v for k, v in raw.items() if k != "checksum"}):
            raise DitscopeError(f"plan file {path} does not match its checksum: it is damaged or was edited; make it "
                                "again with ditscope plan (or delete its checksum line to run a hand-edited plan)")
        rows, meta = raw.get("rows"), raw.get("meta", {})
        if not isinstance(rows, dict) or not all(isinstance(r, str) for r in rows.values()):
            raise DitscopeError(f"plan file {path} is corrupt: 'rows' must map unit names to action strings")
        if not isinstance(meta, dict) or any(not isinstance(meta.get(k, {}), dict) for k in ("model", "quality", "calibration")):
            raise DitscopeError(f"plan file {path} is corrupt: 'meta' and its model, quality and calibration entries "
                                "must be objects")
        if "steps" in raw and rows and raw["steps"] != len(next(iter(rows.values()))):
            raise DitscopeError(f"plan file {path} is corrupt: its rows do not have 'steps' ({raw['steps']!r}) actions")
        return cls(rows, meta)

    def __repr__(self) -> str:
        return (f"Schedule({len(self.rows)} units x {self.steps} steps, {self.fraction('C'):.0%} of module cells "
                f"computed, stack skipped at {self.rows.get(STACK, '').count('R')} steps)")


@dataclass
class PlanConfig:
    """Run a plan (a `Schedule`, or the path of a plan file from `ditscope plan`).

    Attributes:
        plan: the Schedule (or a path to its JSON file).
        path: the path of a plan file (the CLI's `--cache plan --cache-opt path=PLAN.json`).
        strict: refuse to run at another step count or scheduler than the plan's (default: resample it to the
            step count, with a warning; warn about another scheduler).
        adaptive: watch a live signal and compute where the plan would serve stale features. The signal is
            the relative L1 change of the first block's input (read at every step, free: that input exists
            whether or not the stack runs), summed since the row's last full step. The plan file carries what
            the calibration prompts gave (per prompt and step); where a row's sum exceeds the largest
            calibration prompt's sum over the same steps (times `tolerance`), that row computes everything
            from this step to the plan's next full step. A prompt the calibration saw nothing like is not
            served stale features; prompts like the calibration ones run the plan unchanged.
        tolerance: the multiple of the calibration maximum a live sum may reach before computing.
        per_sample: adaptive decisions per batch row (True: an image never depends on its batch neighbours)
            or for the whole batch (False: one row over the limit computes every row).
    """

    plan: object = None
    path: str = ""
    strict: bool = False
    adaptive: bool = False
    tolerance: float = 1.0
    per_sample: bool = True

    def schedule(self) -> Schedule:
        if isinstance(self.plan, Schedule):
            return self.plan
        source = self.plan if isinstance(self.plan, (str, Path)) and str(self.plan) else self.path
        if source:
            return Schedule.load(source)
        raise DitscopeError("the plan method needs a plan: PlanConfig(plan) or --cache-opt path=PLAN.json "
                            "(make one with ditscope plan)")


class PlanMethod(CacheMethod):
    """Executes a Schedule: per (step, unit) one table look-up."""

    uses_modules = True
    uses_blocks = True

    def validate(self, ctx: Context):
        self.base = self.config.schedule()
        expected = self.base.meta.get("model")
        if expected and ctx.model is not None and not ctx.prefix and expected != model_signature(ctx.model):
            raise DitscopeError(f"the plan was made for another model ({expected.get('class')}, config "
                                f"{expected.get('config_hash')}); make a plan for this one with ditscope plan")
        # units of a pipeline's other transformer (transformer_2.*) are that one's to run
        names = ctx.unit_names | {s.name for s in ctx.sites} | {b.name for b in ctx.blocks}
        names |= {STACK} | {n.split(".", 1)[0] + "." + STACK for n in names if n.startswith("transformer_2.")}
        unknown = [u for u in self.base.rows if u not in names]
        if unknown:
            raise DitscopeError(f"the plan names units this model does not have ({unknown[0]}, ...): it was made "
                                "for another model")
        made_for = self.base.meta.get("scheduler")
        if made_for and ctx.scheduler and made_for != ctx.scheduler:  # plans do not transfer across schedulers
            if self.config.strict:
                raise DitscopeError(f"the plan was made under {made_for}, not {ctx.scheduler} (strict=True); plan again")
            warnings.warn(f"ditscope: plan made under {made_for} runs under {ctx.scheduler}: plans measured much worse "
                          "across schedulers (docs/FINDINGS.md); plan again for this one", stacklevel=2)
        if self.config.adaptive:
            if not self.base.meta.get("signal"):
                raise DitscopeError("this plan carries no calibrated signal (made by hand or by an older ditscope); "
                                    "make it again with ditscope plan to run it adaptively")
            if not self.config.tolerance > 0:
                raise DitscopeError(f"PlanConfig tolerance must be > 0, not {self.config.tolerance}")
        self._tables: dict[int, tuple] = {}
        self._limits: dict[int, list] = {}

    def limits(self, ctx: Context) -> list:
        """Per step: None where the plan computes everything, else the most any calibration prompt's signal
        summed since the last full step reached (times the tolerance)."""
        steps = ctx.num_steps
        if steps not in self._limits:
            sites, blocks, _, _ = self.table(ctx)
            full = [all(r[t] == "C" for r in (*sites.values(), *blocks.values())) for t in range(steps)]
            signal = _resampled_signal(self.base.meta["signal"], steps)
            out, last = [], 0
            for t in range(steps):
                if full[t] or t == 0:
                    out.append(None)
                    last = t
                    continue
                sums = [sum(row[last + 1 : t + 1]) for row in signal]
                out.append(self.config.tolerance * max(sums))
            self._limits[steps] = out
        return self._limits[steps]

    def watch(self, ctx: Context, x: torch.Tensor):
        """Decide which rows compute this step although the plan serves them (`ctx.state["force"]`). A row over
        its limit computes every step up to the plan's next full step: computing one step of a skipped run
        and serving the next from it mixes fresh and stale outputs in the sampler's multistep history, which
        measured worse than not computing at all (benchmarks/RESULTS.md, adaptive plans)."""
        st = ctx.state
        limit = self.limits(ctx)[ctx.step]
        prev = st.get("watch_input")
        st["watch_input"] = x.detach().clone()
        if prev is None or prev.shape != x.shape or limit is None:  # a full step: every row computes anyway
            st["watch_sum"], st["forced"], st["force"] = torch.zeros(ctx.rows, dtype=torch.float64), None, None
            return
        total = st["watch_sum"] + relative_change(ctx, x, prev).double().cpu()
        force = total > limit
        if st.get("forced") is not None:
            force = force | st["forced"]
        if not self.config.per_sample and bool(force.any()):
            force = torch.ones_like(force)
        st["watch_sum"], st["forced"] = total, force
        st["force"] = force if bool(force.any()) else None
        ctx.record["rows_forced"] = int(force.sum())

    def default_steps(self) -> int | None:
        return self.config.schedule().steps or None

    def table(self, ctx: Context):
        """(site rows, block rows, keep flags) for this generation's step count, built once per count."""
        steps = ctx.num_steps
        if steps not in self._tables:
            schedule = self.base
            if steps != schedule.steps:
                if self.config.strict:
                    raise DitscopeError(f"the plan was made for {schedule.steps} steps, not {steps} (strict=True)")
                warnings.warn(f"ditscope: plan made for {schedule.steps} steps resampled to {steps}", stacklevel=2)
                schedule = schedule.at(steps)
            stack = schedule.rows.get(ctx.prefix + STACK, "C" * steps)
            sites = {s.index: schedule.rows.get(s.name, "C" * steps) for s in ctx.sites}
            blocks = {}
            for b in ctx.blocks:
                own = schedule.rows.get(b.name, "C" * steps)
                blocks[b.index] = "".join(s if s != "C" else a for a, s in zip(own, stack))
            keep_block = {i: _keeps(r) for i, r in blocks.items()}
            # a site does not run where its block is served whole: skip those steps when deciding what to keep
            block_of = {s.index: s.block for s in ctx.sites}
            keep_site = {i: _keeps("".join("-" if blocks[block_of[i]][t] == "R" else a for t, a in enumerate(r)))
                         for i, r in sites.items()}
            self._tables[steps] = (sites, blocks, keep_site, keep_block)
        return self._tables[steps]

    def block(self, ctx: Context, bsite: BlockSite, run, args, kwargs):
        _, blocks, _, keep_block = self.table(ctx)
        action, keep = blocks[bsite.index][ctx.step], keep_block[bsite.index][ctx.step]
        history = ctx.state.setdefault("plan_residual", {}).get(bsite.index)
        inputs = block_inputs(bsite, args, kwargs)
        if self.config.adaptive and bsite.index == 0:
            self.watch(ctx, inputs["hidden"])
        force = ctx.state.get("force")
        if action != "C" and history:
            (s0, r0), (s1, r1) = history[0], history[-1]
            if action == "F" and s1 > s0:  # first-order Taylor forecast of the block's residual
                res = {n: _forecast(r1[n], r0[n], (ctx.step - s1) / (s1 - s0)) for n in r1}
            else:
                res = r1
            served = add_residuals(inputs, res)
            if force is None:
                ctx.record["blocks_reused"] += 1
                return pack_outputs(bsite, served)
            # adaptive: the rows over their limit compute; the others keep exactly what the plan serves them
            computed = block_outputs(bsite, run(*args, **kwargs))
            ctx.record["blocks_computed"] += 1
            fresh = residuals(inputs, computed)
            history[-1] = (s1, {n: _rows_where(ctx, force, fresh[n], r1[n]) for n in r1})
            return pack_outputs(bsite, {n: _rows_where(ctx, force, computed[n], served[n]) for n in computed})
        ctx.record["blocks_computed"] += 1
        out = run(*args, **kwargs)
        if keep:
            res = residuals(inputs, block_outputs(bsite, out))
            ctx.state["plan_residual"][bsite.index] = [*(history or [])[-1:], (ctx.step, res)]
        return out

    def module(self, ctx: Context, site: Site, run, args, kwargs):
        sites, _, keep_site, _ = self.table(ctx)
        action = sites[site.index][ctx.step]
        kept = ctx.state.setdefault("plan", {})
        history = kept.get(site.index)
        x = hidden_arg(args, kwargs, site.hidden)
        tokens = x.shape[0] * x.shape[1] if x.dim() >= 3 else 0
        if action == "C" or history is None:
            out = run(*args, **kwargs)
            if keep_site[site.index][ctx.step]:
                previous = history[-1:] if history else []
                kept[site.index] = [*previous, (ctx.step, out)]
            ctx.count(COMPUTE, tokens, tokens)
            return out
        force = ctx.state.get("force")
        if action == "R" or len(history) < 2:
            served = history[-1][1]
        else:
            (s0, y0), (s1, y1) = history
            with torch.no_grad():
                served = _forecast(y1, y0, (ctx.step - s1) / (s1 - s0))
        if force is None:
            ctx.count(REUSE if action == "R" or len(history) < 2 else PREDICT, 0, tokens)
            return served
        ctx.count(COMPUTE, tokens, tokens)
        out = run(*args, **kwargs)  # adaptive: rows over their limit compute, and refresh what is kept for them
        s_last, y_last = history[-1]
        history[-1] = (s_last, _rows_where(ctx, force, out, y_last))
        return _rows_where(ctx, force, out, served)


def _rows_where(ctx: Context, rows: torch.Tensor, a, b):
    """`a` on the model rows marked in `rows`, `b` elsewhere, over a tensor or a tuple of them."""
    if isinstance(a, tuple):
        return tuple(_rows_where(ctx, rows, x, y) for x, y in zip(a, b))
    if not torch.is_tensor(a) or not torch.is_tensor(b) or a.shape != b.shape:
        return a
    mask = rows_mask(ctx, rows, a.shape[0]).to(a.device).view(-1, *[1] * (a.dim() - 1))
    return torch.where(mask, a, b)


def _resampled_signal(signal: list, steps: int) -> list[list[float]]:
    """The calibration signal (per prompt, per step of the plan's step count) at `steps` steps: interpolated
    on the normalised step axis; a step-to-step change scales with the step size, hence the factor."""
    import numpy as np

    out = []
    for row in signal:
        values = np.array([np.nan if v is None else float(v) for v in row])
        n = len(values)
        if n == steps:
            out.append([0.0 if np.isnan(v) else float(v) for v in values])
            continue
        known = ~np.isnan(values)
        src = np.arange(n)[known] / max(1, n - 1)
        new = np.interp(np.arange(steps) / max(1, steps - 1), src, values[known]) * (n - 1) / max(1, steps - 1)
        new[0] = 0.0
        out.append(new.tolist())
    return out


def _forecast(last, before, ratio: float):
    """last + ratio * (last - before), over a tensor or a tuple of them."""
    if isinstance(last, tuple):
        return tuple(_forecast(a, b, ratio) for a, b in zip(last, before))
    if last is None:
        return None
    return torch.lerp(last, before, -ratio)


def _keeps(row: str) -> list[bool]:
    """Per step: does a computed output have to be kept (a later step before the next compute serves it)?
    `-` marks steps where the unit does not run."""
    out = []
    for s, a in enumerate(row):
        nxt = next((b for b in row[s + 1:] if b != "-"), "C")
        out.append(a == "C" and nxt != "C")
    # forecasting needs the compute before the last one as well: keep every compute when a row forecasts
    if "F" in row:
        out = [a == "C" for a in row]
    return out


register("plan", PlanConfig, PlanMethod, "a measured plan (ditscope plan): per step and module compute, reuse or forecast",
         grid=[{"target": "psnr=30"}, {"target": "psnr=35"}, {"target": "psnr=40"}, {"target": "speedup=3"}],
         compact=[{"target": "psnr=30"}, {"target": "psnr=35"}, {"target": "psnr=40"}])
