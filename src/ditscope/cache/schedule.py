"""`ScheduleMethod`: executes a `Schedule` (schedule_data.py) by one table look-up per step and unit, and
`schedule_of`, the schedule a static method runs at a step count."""

from __future__ import annotations

import torch

from ..errors import DitscopeError
from .actions import run_rows
from .context import COMPUTE, PREDICT, REUSE, Context
from .engine import contexts_of
from .layout import BlockSite, Site, find_transformers
from .method import CacheMethod
from .predictors import BY_ACTION, Predictor
from .schedule_data import STACK, Schedule, model_signature
from .tensors import add_residuals, block_inputs, block_outputs, hidden_arg, pack_outputs, residuals

__all__ = ["ScheduleMethod", "schedule_of"]


class ScheduleMethod(CacheMethod):
    """Executes a Schedule: per (step, unit) one table look-up. A method whose actions depend only on the
    step (FORA, Delta-DiT) is a static policy: it says its rows for a step count in `rows` and this class
    runs them; a plan (`PlanMethod`) reads its rows from the planner's file. Methods that decide from the
    data as it runs (ToCa, FBCache, TeaCache, PAB's live timestep) call the actions in actions.py instead.
    Counting follows what runs: a FORA schedule counts modules, a Delta-DiT one blocks, a plan both."""

    uses_modules = True
    uses_blocks = True
    adaptive = False  # a plan may watch a live signal (PlanMethod); a static policy never does
    observes = False  # ...and may look at each computed block's residual (`observe`)

    def validate(self, ctx: Context):
        super().validate(ctx)
        self._tables: dict[int, tuple] = {}
        self._units: dict[int, tuple] = {}  # per step count: (computes kept, fitted weights) per unit

    def rows(self, ctx: Context, steps: int) -> dict[str, str]:
        """The action rows (unit name -> one of C / R / F per step) at `steps` steps on `ctx`'s units."""
        raise NotImplementedError

    def schedule(self, ctx: Context, steps: int) -> Schedule:
        return Schedule(self.rows(ctx, steps))

    def table(self, ctx: Context):
        """(site rows, block rows, keep flags) for this generation's step count, built once per count."""
        steps = ctx.num_steps
        if steps not in self._tables:
            schedule = self.schedule(ctx, steps)
            stack = schedule.rows.get(ctx.prefix + STACK, "C" * steps)
            sites = {s.index: schedule.rows.get(s.name, "C" * steps) for s in ctx.sites}
            blocks = {}
            for b in ctx.blocks:
                own = schedule.rows.get(b.name, "C" * steps)
                blocks[b.index] = "".join(s if s != "C" else a for a, s in zip(own, stack))
            keep_block = {i: _keeps(r) for i, r in blocks.items()}
            # a site does not run where its block is served whole: skip those steps when deciding what to keep
            block_of = {s.index: s.block for s in ctx.sites}
            keep_site = {
                i: _keeps("".join("-" if blocks[block_of[i]][t] == "R" else a for t, a in enumerate(r)))
                for i, r in sites.items()
            }
            self._tables[steps] = (sites, blocks, keep_site, keep_block)
            # how many computes each unit keeps: the most its row's predictors read
            names = {s.index: s.name for s in ctx.sites} | {b.index + _BLOCK: b.name for b in ctx.blocks}
            rows = {**sites, **{i + _BLOCK: r for i, r in blocks.items()}}
            depth = {
                i: max([1, *(self.predictor(a).values for a in set(r) - {"C"})]) for i, r in rows.items()
            }
            weights = {i: (schedule.meta.get("weights") or {}).get(names[i], {}) for i in rows}
            self._units[steps] = (depth, weights)
        return self._tables[steps]

    def predictor(self, action: str) -> Predictor:
        """The predictor behind a serving action of the rows (TaylorSeer's `T` is its own order)."""
        return BY_ACTION[action]

    def serve(self, ctx: Context, unit: int, action: str, history: list):
        """A served unit's value at this step, from its kept computes by the action's predictor."""
        predictor = self.predictor(action)
        with torch.no_grad():
            weights = self._units[ctx.num_steps][1][unit].get(str(ctx.step))
            return predictor(history, ctx.step, weights), predictor.forecasts(history)

    def block(self, ctx: Context, bsite: BlockSite, run, args, kwargs):
        _, blocks, _, keep_block = self.table(ctx)
        action, keep = blocks[bsite.index][ctx.step], keep_block[bsite.index][ctx.step]
        history = ctx.state.setdefault("kept_residuals", {}).get(bsite.index)
        inputs = block_inputs(bsite, args, kwargs)
        if self.adaptive and bsite.index == 0:
            self.watch(ctx, inputs["hidden"])
        force = ctx.state.get("force")
        if action != "C" and history:
            res, _ = self.serve(ctx, bsite.index + _BLOCK, action, history)
            served = add_residuals(inputs, res)
            if force is None:
                ctx.record["blocks_reused"] += 1
                return pack_outputs(bsite, served)
            # adaptive: the rows over their limit compute (on their own); the others keep what the plan serves them.
            # What is kept stays as computed at step s1: the forced rows compute every step up to the plan's next
            # full step, and a fresh row kept under s1's label would give the next forecast a wrong slope
            out = run_rows(
                ctx,
                run,
                args,
                kwargs,
                force,
                pack_outputs(bsite, served),
                inputs["hidden"].shape[0],
                bsite.name,
            )
            ctx.record["blocks_computed"] += 1
            return out
        ctx.record["blocks_computed"] += 1
        out = run(*args, **kwargs)
        if keep or self.observes:
            res = residuals(inputs, block_outputs(bsite, out))
            if self.observes:
                self.observe(ctx, bsite, inputs, res)
            if keep:
                depth = self._units[ctx.num_steps][0][bsite.index + _BLOCK]
                ctx.state["kept_residuals"][bsite.index] = [*(history or []), (ctx.step, res)][-depth:]
        return out

    def observe(self, ctx: Context, bsite: BlockSite, inputs: dict, res: dict):
        """An adaptive method's look at a block it computed: its inputs and its residual `res` this step."""

    def module(self, ctx: Context, site: Site, run, args, kwargs):
        sites, _, keep_site, _ = self.table(ctx)
        action = sites[site.index][ctx.step]
        kept = ctx.state.setdefault("kept_outputs", {})
        history = kept.get(site.index)
        x = hidden_arg(args, kwargs, site.hidden)
        tokens = x.shape[0] * x.shape[1] if x.dim() >= 3 else 0
        if action == "C" or history is None:
            out = run(*args, **kwargs)
            if keep_site[site.index][ctx.step]:
                depth = self._units[ctx.num_steps][0][site.index]
                kept[site.index] = [*(history or []), (ctx.step, out)][-depth:]
            ctx.count(COMPUTE, tokens, tokens)
            return out
        force = ctx.state.get("force")
        served, forecast = self.serve(ctx, site.index, action, history)
        if force is None:
            ctx.count(PREDICT if forecast else REUSE, 0, tokens)
            return served
        ctx.count(COMPUTE, tokens, tokens)
        # adaptive: rows over their limit compute (on their own); what is kept stays as computed (see block())
        return run_rows(ctx, run, args, kwargs, force, served, x.shape[0], site.name)


_BLOCK = 1 << 20  # blocks' keys beside the sites' in the per-unit tables (site and block indices overlap)


def _keeps(row: str) -> list[bool]:
    """Per step: does a computed output have to be kept (a later step before the next compute serves it)?
    `-` marks steps where the unit does not run."""
    out = []
    for s, a in enumerate(row):
        nxt = next((b for b in row[s + 1 :] if b != "-"), "C")
        out.append(a == "C" and nxt != "C")
    # forecasting needs the computes before the last one as well: keep every compute when a row forecasts
    if set(row) - {"C", "R", "-"}:
        out = [a == "C" for a in row]
    return out


def schedule_of(target, config, steps: int, layout=None) -> Schedule:
    """The Schedule a static method (FORA, Delta-DiT, a plan) runs at `steps` steps on a pipeline or
    transformer: the table its run looks up, to read, draw (`ditscope.planning.show`), save and edit as a
    plan. Methods that decide from the data at run time (ToCa, FBCache, TeaCache, PAB, TaylorSeer) have none."""
    from .registry import for_config

    entry = for_config(config)
    if entry is None or isinstance(config, type):
        raise DitscopeError(f"{getattr(config, '__name__', type(config).__name__)} is not a cache config")
    if not issubclass(entry.method, ScheduleMethod):
        raise DitscopeError(
            f"{entry.name} decides at run time from what the model computes; it has no fixed "
            "schedule to show (FORA, Delta-DiT and plans have one)"
        )
    found, _ = find_transformers(target)
    rows = {}
    for ctx in contexts_of(found, layout):
        ctx.num_steps = steps
        method = entry.method(config)
        method.validate(ctx)
        rows.update(method.schedule(ctx, steps).rows)
    return Schedule(rows, {"method": entry.name, "model": model_signature(found[0][1])})
