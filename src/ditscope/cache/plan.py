"""The plan method: runs the Schedule that `ditscope plan` measured and compiled for a model (a plan file),
resampled to the step count it runs at, optionally watching a live signal to correct itself (adaptive)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DitscopeError
from .engine import Context, relative_change
from .registry import register
from .schedule import STACK, Schedule, ScheduleMethod, model_signature


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
        per_sample: adaptive decisions per batch row (True: an image never depends on its batch neighbours,
            and only the rows over their limit compute, on their own) or for the whole batch (False: one row
            over the limit computes every row).
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


class PlanMethod(ScheduleMethod):
    """Runs a plan file's Schedule, resampled to the step count, optionally adaptive."""

    def validate(self, ctx: Context):
        super().validate(ctx)
        self.adaptive = self.config.adaptive
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

    def schedule(self, ctx: Context, steps: int) -> Schedule:
        """The plan at `steps` steps: resampled on the normalised step axis (with a warning), or refused (strict)."""
        if steps == self.base.steps:
            return self.base
        if self.config.strict:
            raise DitscopeError(f"the plan was made for {self.base.steps} steps, not {steps} (strict=True)")
        warnings.warn(f"ditscope: plan made for {self.base.steps} steps resampled to {steps}", stacklevel=2)
        return self.base.at(steps)


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


register("plan", PlanConfig, PlanMethod, "a measured plan (ditscope plan): per step and module compute, reuse or forecast",
         grid=[{"target": "psnr=30"}, {"target": "psnr=35"}, {"target": "psnr=40"}, {"target": "speedup=3"}],
         compact=[{"target": "psnr=30"}, {"target": "psnr=35"}, {"target": "psnr=40"}])
