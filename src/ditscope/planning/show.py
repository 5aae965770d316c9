"""A plan, for people: a summary table and a heatmap of its actions (units x steps)."""

from __future__ import annotations

from pathlib import Path

from ..cache.schedule import ACTIONS, STACK, Schedule

CODES = {"C": 0, "F": 1, "R": 2}


def summary_rows(plan: Schedule) -> list[tuple[str, str]]:
    m = plan.meta
    modules = any(u != STACK and not u.rsplit(".", 1)[-1].isdigit() for u in plan.rows)
    rows = [("units x steps", f"{len(plan.rows)} x {plan.steps}"),
            ("module cells computed", f"{plan.fraction('C'):.0%} (forecast {plan.fraction('F'):.0%}, "
                                      f"reused {plan.fraction('R'):.0%}) of the steps the stack runs"
             if modules else "all (no module rows) on the steps the stack runs"),
            ("stack skipped at", f"{plan.rows.get(STACK, '').count('R')} of {plan.steps} steps")]
    for key in ("target", "mode", "granularity", "cost_model", "predicted_speedup", "measured_speedup",
                "num_inference_steps", "scheduler", "planning_seconds"):
        if key in m:
            rows.append((key.replace("_", " "), str(m[key])))
    if "model" in m:
        rows.append(("model", f"{m['model'].get('class')} (config {m['model'].get('config_hash')})"))
    if "quality" in m:
        rows.append(("calibration quality", ", ".join(f"{k} {v}" for k, v in m["quality"].items())))
    if "calibration" in m:
        c = m["calibration"]
        rows.append(("calibration prompts", f"{c.get('n_prompts')} (hash {c.get('prompts_hash')}, seed {c.get('seed')})"))
    for f in m.get("finalists", []):  # what the kept plan was timed against (plans made since 2026-12-04)
        measured = "not timed" if f.get("measured_speedup") is None else f"{f['measured_speedup']}x measured"
        rows.append(("finalist" + (" (kept)" if f.get("kept") else ""),
                     f"{f.get('mode')} {f.get('schedule')}: {f.get('predicted_speedup')}x predicted, {measured}, "
                     f"PSNR {f.get('psnr')}"))
    return rows


def heatmap(plan: Schedule, path: Path) -> Path:
    """units (rows) x steps (columns): compute / forecast / reuse."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    units = list(plan.rows)
    grid = np.array([[CODES[a] for a in plan.rows[u]] for u in units])
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * plan.steps + 3), max(2, 0.22 * len(units) + 1.2)))
    cmap = ListedColormap(["#3b6fb6", "#f2b134", "#dddddd"])
    ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
    ax.set_yticks(range(len(units)), units, fontsize=7)
    ax.set_xlabel("step")
    title = f"plan: {plan.meta.get('target', '')} {plan.meta.get('model', {}).get('class', '')}".strip()
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(CODES[c])) for c in ("C", "F", "R")]
    ax.legend(handles, [ACTIONS[c] for c in ("C", "F", "R")], loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
