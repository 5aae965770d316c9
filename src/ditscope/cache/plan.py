"""The plan method: runs the Schedule that `ditscope plan` measured and compiled for a model (a plan file),
resampled to the step count it runs at, optionally watching a live signal to correct itself (adaptive)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DitscopeError, DitscopeWarning
from ..parallel import agree
from .context import Context
from .layout import BlockSite
from .registry import register
from .schedule import ScheduleMethod
from .schedule_data import STACK, Schedule, model_signature
from .tensors import relative_change, row_abs_sums


@dataclass
class PlanConfig:
    """Run a plan (a `Schedule`, or the path of a plan file from `ditscope plan`).

    Attributes:
        plan: the Schedule (or a path to its JSON file).
        path: the path of a plan file (the CLI's `--cache plan --cache-opt path=PLAN.json`).
        strict: refuse to run at another step count, scheduler or layout (context-parallel degrees, compiled)
            than the plan's (default: resample it to the step count, with a warning; warn about the others).
        adaptive: watch a live signal and compute where the plan would serve stale features, per batch row.
            A row whose signal exceeds the most any calibration prompt showed (times `tolerance`) computes
            everything up to the plan's next full step. Prompts like the calibration ones run the plan
            unchanged; a prompt the calibration saw nothing like is not served stale features.
        signal: what an adaptive plan watches. "output" (the default): how much the block stack's output
            changed between the plan's last two full steps (its blocks' residual changes over the stream, the
            calibration's measure of the error of reusing the stack), checked at each full step for the run of
            served steps that follows: a sample whose model output is moving faster than any calibration
            prompt's computes that run (its guidance branches together: rows given the same input are one
            sample's branches). It costs one subtraction per block at full steps, where every block computes
            anyway. "input": the relative L1 change of the first block's input, summed since the row's last
            full step, checked at every step (free: that input exists whether or not the stack runs). The
            output signal ranks images by the damage a plan does and the input signal hardly does
            (docs/FINDINGS.md).
        tolerance: the multiple of the calibration maximum a live signal may reach before computing.
        per_sample: adaptive decisions per batch row (True: an image never depends on its batch neighbours,
            and only the rows over their limit compute, on their own) or for the whole batch (False: one row
            over the limit computes every row).
    """

    plan: object = None
    path: str = ""
    strict: bool = False
    adaptive: bool = False
    signal: str = "output"
    tolerance: float = 1.0
    per_sample: bool = True

    def schedule(self) -> Schedule:
        if isinstance(self.plan, Schedule):
            return self.plan
        source = self.plan if isinstance(self.plan, (str, Path)) and str(self.plan) else self.path
        if source:
            return Schedule.load(source)
        raise DitscopeError(
            "the plan method needs a plan: PlanConfig(plan) or --cache-opt path=PLAN.json "
            "(make one with ditscope plan)"
        )


SIGNALS = {
    "input": "signal",
    "output": "stack_change",
}  # an adaptive signal -> the plan's calibrated record of it
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PlanConfig)}


class PlanMethod(ScheduleMethod):
    """Runs a plan file's Schedule, resampled to the step count, optionally adaptive."""

    def check(self):
        self.base = self.config.schedule()  # a missing or damaged plan file fails before a model loads
        if not self.config.tolerance > 0 or self.config.tolerance == float("inf"):  # nan fails the first test
            raise DitscopeError(
                f"PlanConfig tolerance must be a finite number > 0, not {self.config.tolerance}"
            )
        for unit, steps in (self.base.meta.get("weights") or {}).items():  # the fitted forecasts' weights
            for w in steps.values() if isinstance(steps, dict) else [None]:
                if not (
                    isinstance(w, list)
                    and len(w) == 2
                    and all(isinstance(v, (int, float)) and math.isfinite(v) for v in w)
                ):
                    raise DitscopeError(
                        f"the plan's fitted weights for {unit} are not pairs of finite numbers: the file is "
                        "damaged; make the plan again"
                    )
        adaptive_only = [
            f for f in ("signal", "tolerance", "per_sample") if getattr(self.config, f) != _DEFAULTS[f]
        ]
        if adaptive_only and not self.config.adaptive:  # it would be ignored
            raise DitscopeError(
                f"PlanConfig {adaptive_only[0]} applies to an adaptive plan: add adaptive=true or drop it"
            )
        if self.config.adaptive:
            if self.config.signal not in SIGNALS:
                raise DitscopeError(
                    f"unknown adaptive signal {self.config.signal!r}; use {' or '.join(SIGNALS)}"
                )
            if not self.base.meta.get(SIGNALS[self.config.signal]):
                raise DitscopeError(
                    f"this plan carries no calibrated signal for signal={self.config.signal!r} (made "
                    "by hand or by an older ditscope); make it again with ditscope plan to run it "
                    "adaptively"
                )
            for name in SIGNALS.values():  # the calibrated records a plan carries: numbers, or None at step 0
                record = self.base.meta.get(name) or []
                values = [
                    v for row in record for v in (row if isinstance(row, list) else [row]) if v is not None
                ]
                if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
                    raise DitscopeError(
                        f"the plan's calibrated {name} holds a value that is not a finite number >= 0: "
                        "the file is damaged; make the plan again"
                    )

    def validate(self, ctx: Context):
        super().validate(ctx)  # check(): the plan and the adaptive options
        self.adaptive = self.config.adaptive
        self.observes = self.adaptive and self.config.signal == "output"
        expected = self.base.meta.get("model")
        if expected and ctx.model is not None and not ctx.prefix and expected != model_signature(ctx.model):
            raise DitscopeError(
                f"the plan was made for another model ({expected.get('class')}, config "
                f"{expected.get('config_hash')}); make a plan for this one with ditscope plan"
            )
        # units of a pipeline's other transformer (transformer_2.*) are that one's to run
        names = ctx.unit_names | {s.name for s in ctx.sites} | {b.name for b in ctx.blocks}
        names |= {STACK} | {n.split(".", 1)[0] + "." + STACK for n in names if n.startswith("transformer_2.")}
        unknown = [u for u in self.base.rows if u not in names]
        if unknown:
            raise DitscopeError(
                f"the plan names units this model does not have ({unknown[0]}, ...): it was made "
                "for another model"
            )
        made_for = self.base.meta.get("scheduler")
        if (
            made_for and ctx.scheduler and made_for != ctx.scheduler
        ):  # plans do not transfer across schedulers
            if self.config.strict:
                raise DitscopeError(
                    f"the plan was made under {made_for}, not {ctx.scheduler} (strict=True); plan again"
                )
            warnings.warn(
                f"ditscope: plan made under {made_for} runs under {ctx.scheduler}: plans measured much worse "
                "across schedulers (docs/FINDINGS.md); plan again for this one",
                DitscopeWarning,
                stacklevel=2,
            )
        made_in = {k: v for k, v in (self.base.meta.get("layout") or {}).items() if k in MODEL_LAYOUT}
        runs_in = {k: v for k, v in ctx.run_layout.items() if k in made_in}
        if (
            made_in and not ctx.prefix and made_in != runs_in
        ):  # its costs (the finalists' times) were measured there
            if self.config.strict:
                raise DitscopeError(
                    f"the plan was made with {_layout_text(made_in)}, not {_layout_text(runs_in)} "
                    "(strict=True); plan again in this layout"
                )
            warnings.warn(
                f"ditscope: plan made with {_layout_text(made_in)} runs with {_layout_text(runs_in)}: its "
                "costs were measured there; plan again in this layout for its speed",
                DitscopeWarning,
                stacklevel=2,
            )
        self._limits: dict[int, list] = {}
        self._full: dict[int, list] = {}

    def full_steps(self, ctx: Context) -> list[bool]:
        """Per step: does the plan compute every unit?"""
        steps = ctx.num_steps
        if steps not in self._full:
            sites, blocks, _, _ = self.table(ctx)
            self._full[steps] = [
                all(r[t] == "C" for r in (*sites.values(), *blocks.values())) for t in range(steps)
            ]
        return self._full[steps]

    def limits(self, ctx: Context) -> list:
        """Per step: None where the plan computes everything, else the most any calibration prompt's input
        signal summed since the last full step reached (times the tolerance)."""
        steps = ctx.num_steps
        if steps not in self._limits:
            full = self.full_steps(ctx)
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
        if self.config.signal == "output":  # decided at the last full step (observe); applied here
            force = None if self.full_steps(ctx)[ctx.step] or ctx.step == 0 else st.get("forced")
            st["force"] = force
            if force is not None:
                ctx.record["rows_forced"] = int(force.sum())
            return
        limit = self.limits(ctx)[ctx.step]
        prev = st.get("watch_input")
        st["watch_input"] = x.detach().clone()
        if prev is None or prev.shape != x.shape or limit is None:  # a full step: every row computes anyway
            st["watch_sum"], st["forced"], st["force"] = (
                torch.zeros(ctx.rows, dtype=torch.float64),
                None,
                None,
            )
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

    def observe(self, ctx: Context, bsite: BlockSite, inputs: dict, res: dict):
        """The output signal: at a full step, each block's residual change since the plan's last full step
        (both computed fresh, as in the calibration; a residual computed beside served modules is not
        compared), summed over the blocks; at the last block, over the stream there (the calibration's
        measure), and compared with the calibration prompts' largest at this step and lag. The samples over
        it compute the served steps that follow, up to the plan's next full step."""
        if not self.full_steps(ctx)[ctx.step]:
            return
        st = ctx.state
        observed = st.setdefault("observed", {})  # block -> (full step, residual)
        previous = observed.get(bsite.index)
        observed[bsite.index] = (ctx.step, res)
        if bsite.index == ctx.blocks[0].index:
            st["forced"], st["output_change"] = None, (None, 0.0)
            st["samples"] = same_input_groups(inputs["hidden"], ctx.rows, ctx.sequence_group)
        lag, total = st.get("output_change", (None, None))
        if total is None or previous is None:  # a block without an earlier full step: no decision this step
            st["output_change"] = (None, None)
            return
        last_step, last = previous
        if lag is not None and ctx.step - last_step != lag:
            st["output_change"] = (None, None)
            return
        # a stream a block does not return (SD3's last block drops the text stream) has no residual
        diff = [
            res[n] - last[n]
            for n in res
            if res[n] is not None and last.get(n) is not None and res[n].shape == last[n].shape
        ]
        st["output_change"] = (ctx.step - last_step, total + row_abs_sums(diff, ctx.rows, ctx.sequence_group))
        if bsite.index != ctx.blocks[-1].index:
            return
        stream = row_abs_sums(
            [t for t in inputs.values() if t is not None], ctx.rows, ctx.sequence_group
        ).clamp_min(1e-12)
        limit = self.output_limit(ctx, ctx.step, ctx.step - last_step)
        if limit is None:
            return
        over = st["output_change"][1] / stream > self.config.tolerance * limit
        # a sample's guidance branches decide together: computing the conditional branch fresh while the
        # unconditional one stays stale does not mend the guided output (the stale error is scaled by the
        # guidance), and the branches' outputs change by different amounts
        group = st["samples"]
        over = (torch.zeros(ctx.rows).index_add_(0, group, over.float()) > 0)[group]
        if not self.config.per_sample and bool(over.any()):
            over = torch.ones_like(over)
        st["forced"] = over if bool(over.any()) else None

    def output_limit(self, ctx: Context, step: int, lag: int) -> float | None:
        """The calibration prompts' largest stack change from `step - lag` to `step`, read on the plan's step
        axis (a resampled plan: the same normalised step and interval); None where it was not measured."""
        table = self.base.meta["stack_change"]
        steps, planned = ctx.num_steps, len(table)
        if steps != planned:
            scale = (planned - 1) / max(1, steps - 1)
            step, lag = round(step * scale), max(1, round(lag * scale))
        if not 0 <= step < planned or lag > len(table[step]):
            return None
        return table[step][lag - 1]

    def default_steps(self) -> int | None:
        return self.config.schedule().steps or None

    def schedule(self, ctx: Context, steps: int) -> Schedule:
        """The plan at `steps` steps: resampled on the normalised step axis (with a warning), or refused (strict)."""
        if steps == self.base.steps:
            return self.base
        if self.config.strict:
            raise DitscopeError(f"the plan was made for {self.base.steps} steps, not {steps} (strict=True)")
        fewer = (
            (
                "; a resampled step computes if any planned step it stands for did, so the plan keeps its quality "
                f"(measured at half the steps on the zoo) but not its speed: plan again at {steps} steps for that"
            )
            if steps < self.base.steps
            else ""
        )
        warnings.warn(
            f"ditscope: plan made for {self.base.steps} steps resampled to {steps}{fewer}",
            DitscopeWarning,
            stacklevel=2,
        )
        return self.base.at(steps)


MODEL_LAYOUT = (
    "ulysses_degree",
    "ring_degree",
    "compiled",
)  # how the model runs (data parallel ranks do not change it)


def _layout_text(layout: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in layout.items())


def same_input_groups(x: torch.Tensor, rows: int, group=None) -> torch.Tensor:
    """Per model row, the index of the first row with the same input: a sample's guidance branches (a
    pipeline repeats the latents for each branch) share one, different samples do not."""
    fingerprint = agree(
        torch.stack(
            [row_abs_sums([x], rows), x.detach().double().flatten(1).sum(1).cpu().reshape(rows, -1).sum(1)], 1
        ),
        group,
    )
    first = torch.arange(rows)
    for i in range(rows):
        same = (fingerprint == fingerprint[i]).all(1).nonzero()
        first[i] = int(same[0])
    return first


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
        new = (
            np.interp(np.arange(steps) / max(1, steps - 1), src, values[known]) * (n - 1) / max(1, steps - 1)
        )
        new[0] = 0.0
        out.append(new.tolist())
    return out


def _test_plan(site_row, stack_row):
    """A plan for a model's every module site on `site_row(steps)` and its stack on `stack_row(steps)`: the tests'
    exact and aggressive settings of a plan (a plan names the units of the model it runs on)."""

    def build(model, steps: int, layout=None) -> PlanConfig:
        from .layout import layout_of

        _, _, sites, _ = layout_of(model, layout)
        return PlanConfig(Schedule({STACK: stack_row(steps), **{s.name: site_row(steps) for s in sites}}))

    return build


register(
    "plan",
    PlanConfig,
    PlanMethod,
    "a measured plan (ditscope plan): per step and module compute, reuse or forecast",
    grid=[{"target": "psnr=30"}, {"target": "psnr=35"}, {"target": "psnr=40"}, {"target": "speedup=3"}],
    compact=[{"target": "psnr=30"}, {"target": "psnr=35"}, {"target": "psnr=40"}],
    exact=_test_plan(lambda steps: "C" * steps, lambda steps: "C" * steps),
    # module sites reuse and forecast, the whole stack skipped at two steps (8 steps; resampled to others)
    aggressive=_test_plan(lambda steps: "CCRFCRFC", lambda steps: "CCCCRCCR"),
)
