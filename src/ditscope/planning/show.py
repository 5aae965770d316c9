"""A plan, for people: a summary table and a heatmap of its actions (units x steps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..cache.layout import block_of, unit_kind
from ..cache.schedule_data import ACTIONS, STACK, Schedule

CODES = {"C": 0, "F": 1, "R": 2, "T": 3, "L": 4}


def summary_rows(plan: Schedule) -> list[tuple[str, str]]:
    m = plan.meta
    modules = any(unit_kind(u) == "module" for u in plan.rows)
    rows = [
        ("units x steps", f"{len(plan.rows)} x {plan.steps}"),
        (
            "module cells computed",
            f"{plan.fraction('C'):.0%} (forecast {sum(plan.fraction(a) for a in 'FTL'):.0%}: linear "
            f"{plan.fraction('F'):.0%}, Taylor {plan.fraction('T'):.0%}, fitted {plan.fraction('L'):.0%}; "
            f"reused {plan.fraction('R'):.0%}) of the steps the stack runs"
            if modules
            else "all (no module rows) on the steps the stack runs",
        ),
        ("stack skipped at", f"{plan.rows.get(STACK, '').count('R')} of {plan.steps} steps"),
    ]
    for key in (
        "target",
        "mode",
        "granularity",
        "cost_model",
        "predicted_speedup",
        "measured_speedup",
        "num_inference_steps",
        "scheduler",
        "planning_seconds",
    ):
        if key in m:
            rows.append((key.replace("_", " "), str(m[key])))
    if "model" in m:
        rows.append(("model", f"{m['model'].get('class')} (config {m['model'].get('config_hash')})"))
    checked = (m.get("calibration") or {}).get("check_prompts")
    if "quality" in m:
        on = f"on the {len(checked)} checked prompts: " if checked else ""
        rows.append(("calibration quality", on + ", ".join(f"{k} {v}" for k, v in m["quality"].items())))
    if "calibration" in m:
        c = m["calibration"]
        rows.append(
            (
                "calibration prompts",
                f"{c.get('n_prompts')} (hash {c.get('prompts_hash')}, seed {c.get('seed')})"
                + (
                    f"; errors measured on the first {c['measured_prompts']}"
                    if c.get("measured_prompts", c.get("n_prompts")) != c.get("n_prompts")
                    else ""
                )
                + (
                    f"; checks on the hardest {len(checked)}: {', '.join(map(str, checked))}"
                    if checked
                    else ""
                ),
            )
        )
    for f in m.get("finalists", []):  # what the kept plan was timed against (plans made since 2026-12-04)
        measured = "not timed" if f.get("measured_speedup") is None else f"{f['measured_speedup']}x measured"
        rows.append(
            (
                "finalist" + (" (kept)" if f.get("kept") else ""),
                f"{f.get('mode')} {f.get('schedule')}: {f.get('predicted_speedup')}x predicted, {measured}, "
                f"PSNR {f.get('psnr')}",
            )
        )
    if (
        "checks" in m
    ):  # how well the calibrated errors ranked the end-to-end checks (plans made since 2026-12-05)
        rho = m["checks"].get("rank_correlation")
        rows.append(
            (
                "checks",
                f"{m['checks'].get('count')} end-to-end; predicted error against PSNR: Spearman "
                f"{'n/a' if rho is None else rho}",
            )
        )
    if isinstance(
        m.get("search"), dict
    ):  # the budgeted search of a quality target (plans made since 2026-12-06)
        search, fit = m["search"], m["search"].get("fit", {})
        offsets = ", ".join(f"{g} {v:+.1f}" for g, v in fit.get("offsets", {}).items())
        rows.append(
            (
                "search",
                f"{search.get('checks')} of at most {search.get('max_checks')} checks among "
                f"{search.get('candidates')} candidates ({search.get('left_untried')} left untried); "
                f"{search.get('fitted_on')} = {fit.get('intercept')} {fit.get('slope'):+} log10(predicted error)"
                f" + offset ({offsets}), spread {fit.get('spread')} dB, held-out Spearman "
                f"{fit.get('held_out_rank_correlation')}",
            )
        )
    return rows


# categories of a heatmap cell: a unit's own action, or a unit that does not run at that step because
# its stack (or, for a module, its block) is served whole from kept or forecast residuals
NOT_RUN_STACK, NOT_RUN_BLOCK = 5, 6
CATEGORIES = {
    **{CODES[a]: name for a, name in ACTIONS.items()},
    NOT_RUN_STACK: "not run: stack reused/forecast",
    NOT_RUN_BLOCK: "not run: block reused/forecast",
}
COLORS = {
    0: "#3b6fb6",
    1: "#f2b134",
    2: "#dddddd",
    3: "#d9622b",
    4: "#8c5fb0",
    NOT_RUN_STACK: "#ffffff",
    NOT_RUN_BLOCK: "#ffffff",
}
HATCHES = {NOT_RUN_STACK: "////", NOT_RUN_BLOCK: "\\\\"}


SECOND = "transformer_2."


def _is_stack(unit: str) -> bool:
    return unit_kind(unit) == "stack"


def cell_categories(plan: Schedule) -> np.ndarray:
    """(units, steps) ints, rows in `plan.rows` order: what each unit does at each step, as the engine runs
        it (`ScheduleMethod.table`). 0 / 1 / 2 / 3 / 4: it computes / forecasts linearly / reuses / forecasts
    by second-order Taylor / by the fitted forecast (its own action, `CODES`);
        `NOT_RUN_STACK`: a unit other than a stack row at a step where its stack row (`stack`, or
        `transformer_2.stack` for a pipeline's second transformer) reuses or forecasts: every block is served
        from its residual, so neither the blocks nor their modules run; `NOT_RUN_BLOCK`: a module whose block's
        own row reuses or forecasts at that step (the block is served whole; its modules do not run)."""
    units = list(plan.rows)
    out = np.array([[CODES[a] for a in plan.rows[u]] for u in units], dtype=int).reshape(
        len(units), plan.steps
    )
    for i, u in enumerate(units):
        if _is_stack(u):
            continue
        # a pipeline's second transformer names its units `transformer_2.*` (engine.contexts_of), stack included
        stack = plan.rows.get((SECOND if u.startswith(SECOND) else "") + STACK)
        block = block_of(u, plan.rows)  # a module's block, when the plan has a row for it
        for t in range(plan.steps):
            if stack is not None and stack[t] != "C":
                out[i, t] = NOT_RUN_STACK
            elif block is not None and plan.rows[block][t] != "C":
                out[i, t] = NOT_RUN_BLOCK
    return out


def heatmap_figure(plan: Schedule):
    """units (rows) x steps (columns, 0 .. T-1 as the plan counts them): compute / forecast / reuse, and
    hatched white where a unit does not run because its stack or block is served (`cell_categories`)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    from ..plots import step_ticks

    units = list(plan.rows)
    grid = cell_categories(plan)
    fig = Figure(figsize=(max(5, 0.3 * plan.steps + 3), max(2, 0.22 * len(units) + 1.2)))
    ax = fig.subplots()
    cmap = ListedColormap([COLORS[c] for c in sorted(COLORS)])
    ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(COLORS) - 0.5, interpolation="nearest")
    present = set(np.unique(grid).tolist())
    for cat, hatch in HATCHES.items():
        cells = [Rectangle((t - 0.5, i - 0.5), 1, 1) for i, t in zip(*np.nonzero(grid == cat))]
        if cells:
            ax.add_collection(
                PatchCollection(cells, facecolor="none", edgecolor="#9a9a9a", hatch=hatch, lw=0)
            )
    ax.set_yticks(range(len(units)), units, fontsize=7)
    ax.set_xticks(step_ticks(0, plan.steps - 1, 40))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("step (sampling order, from 0)")
    title = f"plan: {plan.meta.get('target', '')} {plan.meta.get('model', {}).get('class', '')}".strip()
    ax.set_title(title, fontsize=9)
    shown = [c for c in sorted(CATEGORIES) if c < 3 or c in present]  # compute, forecast, reuse always
    handles = [
        Patch(facecolor=COLORS[c], edgecolor="#9a9a9a" if c in HATCHES else COLORS[c], hatch=HATCHES.get(c))
        for c in shown
    ]
    ax.legend(handles, [CATEGORIES[c] for c in shown], loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    fig.tight_layout()
    return fig


def heatmap(plan: Schedule, path: Path) -> Path:
    """Write `heatmap_figure(plan)` to `path` (PNG)."""
    fig = heatmap_figure(plan)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
