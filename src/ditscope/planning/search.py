"""The search: from a calibration profile to a `Schedule`, for a given price of error.

Each unit's choice over the steps is a shortest path. For a unit with cost c (seconds, measured) and
calibrated errors E_a(t, k) of serving step t from the compute at step t-k with each predictor a (reuse
`R`, linear `F`, second-order Taylor `T`, fitted `L`: cache/predictors.py), the plan minimises

    sum over steps it computes of c  +  lambda * sum over steps it serves of w * min_a E_a(t, k)

by dynamic programming over (step, last computed step): O(T * K) per unit. The error of a run of
cached steps is measured, not modelled: E(t, k) is the distance to the compute k steps back, so errors
growing over consecutive cached steps are in the table. One price lambda for all units makes their
marginal seconds-per-error equal (the Lagrangian relaxation of "fastest plan within an error budget");
the planner then moves lambda by bisection until the end-to-end quality target holds.

Two levels: first the whole stack per step (a skipped step serves every block's residual; weight
`stack_weight`), then every module site on the steps the stack computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..artifact import Profile, profile_column
from ..cache.schedule_data import STACK, Schedule

MODES = ("both", "stack", "sites")  # what the search may cache: stack and sites, the stack only, sites only


@dataclass
class Costs:
    """The cost model: per-unit seconds (or FLOPs) of one model call, from the calibration."""

    site: dict[str, float]  # module site -> cost of computing it
    block_extra: dict[str, float]  # block -> its cost beyond its sites (norms, modulation)
    fixed: float  # per step, outside the blocks (embeddings, final layer, scheduler)
    site_block: dict[str, str]  # module site -> its block

    @property
    def step(self) -> float:
        return self.fixed + sum(self.block_extra.values()) + sum(self.site.values())

    def of(self, schedule: Schedule, steps: int) -> float:
        """Predicted cost of a generation under `schedule` (reuse and forecast taken as free)."""
        stack = schedule.rows.get(STACK, "C" * steps)
        total = 0.0
        for s in range(steps):
            total += self.fixed
            if stack[s] == "R":
                continue
            total += sum(self.block_extra.values())
            total += sum(c for u, c in self.site.items() if schedule.rows.get(u, "C" * steps)[s] == "C")
        return total


def costs_from(
    cal: Profile, step_seconds: float | None = None, uniform: bool = False, flops: bool = False
) -> Costs:
    """The cost model of a calibration: measured seconds per unit (or FLOPs, or 1 per site: `uniform`)."""
    units = cal.meta["units"]
    sites = {u: v for u, v in units.items() if v["kind"] not in ("block", "stack")}
    blocks = [u for u, v in units.items() if v["kind"] == "block"]
    measured = cal.meta["flops"] if flops else cal.meta["seconds"]
    site = {u: (1.0 if uniform else float(measured.get(u, 0.0))) for u in sites}
    site_block = {u: sites[u]["block"] for u in sites}
    if uniform or flops:
        block_extra = {b: 0.0 for b in blocks}
        fixed = 0.0
    else:
        block_extra = {
            b: max(0.0, float(measured.get(b, 0.0)) - sum(c for u, c in site.items() if site_block[u] == b))
            for b in blocks
        }
        inside = sum(site.values()) + sum(block_extra.values())
        fixed = max(0.0, (step_seconds or inside) - inside)
    return Costs(site, block_extra, fixed, site_block)


TARGETS = {"reuse": "R", "forecast": "F", "taylor2": "T", "fitted": "L"}  # calibration target -> action
PREDICTORS = "".join(TARGETS.values())  # every serving action the search may choose


def error_tables(cal: Profile, metric: str = "inject") -> dict[str, dict[str, np.ndarray]]:
    """unit -> {action: (T, K+1)}: the mean error of serving step t from step t-k with the action's predictor
    (R, F, T, L), inf where not measured. Read-only, and built once per calibration: a plan compiles a
    hundred schedules or more from the same tables."""
    memo = cal.__dict__.get("_error_tables")
    # kept with the statistics they were built from: a profile whose statistics were replaced gets new tables
    if memo is None or memo[0] is not cal.stats.mean or memo[1] != metric:
        memo = cal.__dict__["_error_tables"] = (cal.stats.mean, metric, _error_tables(cal, metric))
    return memo[2]


def _error_tables(cal: Profile, metric: str) -> dict[str, dict[str, np.ndarray]]:
    T = cal.n_steps
    m = cal.metrics.index(metric)
    lags = {t: int(t.partition("@")[2]) for t in cal.options("target")}
    K = max(lags.values())
    out: dict[str, dict[str, np.ndarray]] = {}
    steps = np.arange(1, T)  # a profile has no column for step 0 (artifact.profile_column)
    columns = profile_column(steps)
    for ki, (layer, target, _, _) in enumerate(cal.keys):
        kind, k = TARGETS[target.partition("@")[0]], lags[target]
        tables = out.setdefault(cal.layer_names[layer], {})
        if kind not in tables:
            tables[kind] = np.full((T, K + 1), np.inf)
        col = cal.stats.mean[ki, :, m]
        tables[kind][steps, k] = np.where(np.isfinite(col), col, np.inf)[columns]
    for tables in out.values():
        for table in tables.values():
            table.flags.writeable = False
    return out


def plan_row(served: dict[str, np.ndarray], cost: float, price: float, active: list[bool]) -> str:
    """One unit's actions over the steps: the DP described in the module docstring. `served`: action -> its
    (T, K+1) error table; `R` must be among them (the forecasts read computes before the last one: `F` from
    the second compute on, `T` and `L` from the third, else they fall back at run time).

    `active[t]` is False where the unit does not run at step t (the stack skipped it): no cost, no error,
    and the step counts towards the lag since its last compute."""
    reuse = served["R"]
    T, K1 = reuse.shape
    forecasts = [(a, table, 1 if a == "F" else 2) for a, table in served.items() if a != "R"]
    INF = math.inf
    # best[c] = cost so far with the last compute at step c; back[t][c] = (action, previous last compute)
    best = {0: cost}
    back: list[dict[int, tuple[str, int]]] = [{0: ("C", -1)}]
    for t in range(1, T):
        choices: dict[int, tuple[float, str, int]] = {}
        if not active[t]:
            back.append({c: ("-", c) for c in best})
            continue
        cheapest = min(best.items(), key=lambda kv: kv[1])
        choices[t] = (cheapest[1] + cost, "C", cheapest[0])
        for c, value in best.items():
            k = t - c
            if k >= K1:
                continue
            err, action = reuse[t, k], "R"
            for a, table, first in forecasts:
                if c >= first and k < table.shape[1] and table[t, k] < err:
                    err, action = table[t, k], a
            if not math.isfinite(err):
                continue
            total = value + price * err
            if total < choices.get(c, (INF,))[0]:
                choices[c] = (total, action, c)
        best = {c: v[0] for c, v in choices.items()}
        back.append({c: (v[1], v[2]) for c, v in choices.items()})
    # walk back from the cheapest end state
    c = min(best, key=best.get)
    actions = []
    for t in range(T - 1, -1, -1):
        action, prev = back[t][c]
        actions.append("C" if t == 0 else ("R" if action == "-" else action))
        c = prev if action == "C" else c
    row = "".join(reversed(actions))
    return "".join(a if active[t] else "C" for t, a in enumerate(row))


def compile_schedule(
    cal: Profile,
    costs: Costs,
    price: float | None,
    mode: str = "both",
    stack_weight: float = 1.0,
    granularity: str = "site",
    forecast: bool = True,
    site_price: float | None = None,
    stack_forecast: bool = False,
    predictors: str = PREDICTORS,
) -> Schedule:
    """The schedule at one price of error. `granularity`: "site" plans a row per module of every block;
    "kind" one row per module kind (every block's self-attention alike, SmoothCache's granularity), from
    the kind's mean error; "step" one row for every module (FORA's granularity, with measured steps).
    `site_price` prices the module sites apart from the stack (default: `price`). `predictors`: the serving
    actions the modules may take (R reuse, F linear, T second-order Taylor, L fitted; `forecast=False` is
    reuse alone). `stack_forecast` lets a skipped step forecast the blocks' residuals linearly instead of
    reusing them (off: measured worse end to end on the zoo models, where the calibrated forecast error
    under-predicts the damage). A schedule whose modules take the fitted forecast carries its weights."""
    T = cal.n_steps
    site_price = price if site_price is None else site_price
    tables = error_tables(cal)
    allowed = "R" + ("".join(a for a in predictors if a != "R") if forecast else "")

    def served(table: dict, weight: float = 1.0) -> dict:
        return {a: t * weight for a, t in table.items() if a in allowed}

    rows: dict[str, str] = {}
    active = [True] * T
    if mode in ("both", "stack") and STACK in tables:
        blocks_cost = costs.step - costs.fixed
        stack = {a: t for a, t in tables[STACK].items() if a in ("RF" if stack_forecast else "R")}
        row = plan_row({a: t * stack_weight for a, t in stack.items()}, blocks_cost, price, active)
        rows[STACK] = row
        active = [a == "C" for a in row]
    if mode in ("both", "sites"):
        if granularity in ("kind", "step"):
            units = cal.meta["units"]
            kinds: dict[str, list[str]] = {}
            for u in costs.site:
                kinds.setdefault(units[u]["kind"] if granularity == "kind" else "all", []).append(u)
            for members in kinds.values():
                mean = {a: np.mean([tables[u][a] for u in members], axis=0) for a in tables[members[0]]}
                row = plan_row(
                    served(mean), sum(costs.site[u] for u in members), site_price * len(members), active
                )
                rows.update({u: row for u in members})
        else:
            for u, cost in costs.site.items():
                rows[u] = plan_row(served(tables[u]), cost, site_price, active)
    rows = {u: r for u, r in rows.items() if set(r) != {"C"}}
    return with_weights(Schedule(rows or {STACK: "C" * T}), cal)


def with_weights(schedule: Schedule, cal: Profile) -> Schedule:
    """`schedule` with the calibration's fitted weights for every step a unit takes the fitted forecast (`L`),
    at the lag the schedule serves it from (a step without fitted weights forecasts linearly)."""
    fitted = cal.meta.get("fitted_weights") or {}
    weights: dict = {}
    for unit, t, action, k in served_steps(schedule, cal.n_steps):
        if action == "L" and str(k) in fitted.get(unit, {}).get(str(t), {}):
            weights.setdefault(unit, {})[str(t)] = fitted[unit][str(t)][str(k)]
    if weights:
        schedule.meta["weights"] = weights
    return schedule


def served_steps(schedule: Schedule, steps: int):
    """(unit, step, action, lag) of every step a unit is served, the lag counted from its last compute. A unit
    does not run where the stack is served, and such steps count towards its lag."""
    stack = schedule.rows.get(STACK, "C" * steps)
    runs = [a == "C" for a in stack]
    for unit, row in schedule.rows.items():
        last = 0
        for t, action in enumerate(row):
            if unit != STACK and not runs[t]:
                continue
            if action == "C":
                last = t
            else:
                yield unit, t, action, t - last


def predicted_error(cal: Profile, schedule: Schedule) -> float:
    """The end-to-end error a schedule is predicted to inject: the calibrated error of every served step of
    every unit with its action's predictor, summed (the quantity the search trades against cost)."""
    tables = error_tables(cal)
    total = 0.0
    for unit, t, action, k in served_steps(schedule, cal.n_steps):
        table = tables.get(unit, {}).get(action)
        if table is not None and k < table.shape[1]:
            value = table[t, k]
            total += float(value) if np.isfinite(value) else 0.0
    return total


def price_scale(cal: Profile, costs: Costs) -> float:
    """A price that makes one unit of typical error worth one typical unit cost (the bisection's centre)."""
    tables = error_tables(cal)
    errs = [t["R"][1:, 1] for t in tables.values()]
    typical_err = float(np.median(np.concatenate(errs)[np.isfinite(np.concatenate(errs))])) or 1e-6
    typical_cost = float(np.median(list(costs.site.values()))) or 1e-6
    return typical_cost / typical_err
