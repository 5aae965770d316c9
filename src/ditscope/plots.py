"""Figures of a Profile (matplotlib, no pyplot state, PNG and SVG). Every file name ends in the metric
drawn (`_l1`, `_rel_l1`, `_cos`), so figures of several metrics can share a folder.

(a) `layers_<metric>`: the paper's figure, one subplot per layer; x = diffusion step in sampling order,
    y = distance on a log scale, one line each for K, V and A: the arithmetic mean over prompts, with a
    band from the geometric mean divided by to multiplied by the geometric std over prompts (`geometric_band`).
(b) `heatmap_<target>_<metric>`: layer x step heatmap per target.
(c) `cov_table_<metric>`: the coefficient of variation over prompts, averaged over layers and steps, per
    target (the paper's Table 2), also written as CSV.

A profile's step s (1 .. T-1) is the distance between sampling steps s-1 and s; step axes are labelled so.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

COLORS = {"k": "tab:blue", "v": "tab:orange", "a": "tab:green", "q": "tab:purple", "out": "tab:red"}


def _stream_label(stream: str) -> str:
    return "image tokens; text K/V in cross-attention" if stream == "auto" else f"{stream} tokens"


def _save(fig: Figure, out_dir: Path, stem: str, formats) -> list[Path]:
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        paths.append(path)
    return paths


def step_ticks(first: int, last: int, max_ticks: int = 12) -> list[int]:
    """Integer ticks inside [first, last]: every step when they fit in `max_ticks`, else every other one from
    `first`, else the multiples of a round stride (5, 10, 20, 50, 100, ...) with `first` in front."""
    first, last, max_ticks = int(first), int(last), max(2, int(max_ticks))
    if last < first:
        return []
    if last - first + 1 <= max_ticks:
        return list(range(first, last + 1))
    stride = next(
        k * 10**e for e in range(20) for k in (1, 2, 5) if (last - first) / (k * 10**e) + 1 <= max_ticks
    )
    if stride <= 2:
        return list(range(first, last + 1, stride))
    ticks = list(range(-(-first // stride) * stride, last + 1, stride))
    if not ticks or ticks[0] - first >= stride / 2:
        ticks.insert(0, first)
    return ticks


def geometric_band(profile, target, stream, branch, metric="l1") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(geometric mean, its / geometric std, its x geometric std) over prompts, each (layers, steps-1).

    From the per-prompt values: exp(mean(log x)) and exp(std(log x)) (population std) over the prompts
    whose distance is positive and finite; zero distances have no logarithm and are left out. NaN where a
    layer has no such key or no positive value at a step."""
    m = profile.metrics.index(metric)
    shape = (profile.n_layers, profile.n_steps - 1)
    gmean, lo, hi = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    for layer, row in profile.key_rows(target, stream, branch).items():
        x = profile.values[:, row, :, m].astype(np.float64)  # (prompts, steps-1): one key row at a time
        ok = np.isfinite(x) & (x > 0)
        n = ok.sum(0)
        logs = np.log(np.where(ok, x, 1.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = np.where(ok, logs, 0.0).sum(0) / n
            sd = np.sqrt(np.where(ok, (logs - mu) ** 2, 0.0).sum(0) / n)
        g, f = np.exp(mu), np.exp(sd)
        gmean[layer], lo[layer], hi[layer] = g, g / f, g * f
    return gmean, lo, hi


def layers_figure(profile, metric="l1", stream=None, branch=None) -> Figure:
    view = profile.default_view()
    stream, branch = stream or view["stream"], branch or view["branch"]
    targets = [t for t in profile.options("target") if t != "out"] or profile.options("target")
    n = profile.n_layers
    cols = min(n, math.ceil(math.sqrt(n * 1.6)))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.4 * cols, 1.9 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    steps = np.arange(1, profile.n_steps)
    means = {t: profile.grid(t, stream, branch, metric) for t in targets}
    bands = {t: geometric_band(profile, t, stream, branch, metric) for t in targets}
    for layer in range(rows * cols):
        ax = axes.flat[layer]
        if layer >= n:
            ax.set_visible(False)
            continue
        for t in targets:
            mean = means[t][layer]
            if not np.isfinite(mean).any() or not (mean > 0).any():
                continue
            ax.plot(steps, mean, color=COLORS.get(t), lw=1.2, label=t.upper())
            _, lo, hi = bands[t]
            ax.fill_between(steps, lo[layer], hi[layer], color=COLORS.get(t), alpha=0.15, lw=0)
        ax.set_yscale("log")
        ax.set_title(f"{layer}: {profile.layer_names[layer]}", fontsize=6)
        ax.set_xticks(step_ticks(1, profile.n_steps - 1, 6))
        ax.tick_params(which="both", labelsize=6)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncols=len(labels) or 1, fontsize=8)
    fig.suptitle(
        f"{profile.meta.get('model', '')}: {metric} distance between consecutive steps "
        f"({_stream_label(stream)}, {branch} branch, {profile.n_prompts} prompts)\n"
        f"line: arithmetic mean over prompts; band: geometric mean \u00f7/\u00d7 geometric std over prompts "
        f"(zero distances left out)",
        fontsize=9,
    )
    fig.supxlabel("diffusion step s (sampling order; distance from step s-1 to s)", fontsize=8)
    return fig


def heatmap_figure(profile, target, metric="l1", stream=None, branch=None) -> Figure:
    view = profile.default_view()
    stream, branch = stream or view["stream"], branch or view["branch"]
    grid = profile.grid(target, stream, branch, metric)
    fig = Figure(
        figsize=(max(4.0, 0.25 * grid.shape[1] + 2), max(3.0, 0.18 * grid.shape[0] + 1.5)),
        layout="constrained",
    )
    ax = fig.subplots()
    positive = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    img = ax.imshow(
        np.where(grid > 0, grid, np.nan),
        aspect="auto",
        cmap="viridis",
        norm=norm,
        interpolation="nearest",
        extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] - 0.5, -0.5),
    )
    fig.colorbar(img, ax=ax, label=f"{metric} (log)")
    ax.set_xticks(step_ticks(1, grid.shape[1], 25))  # column j is step j+1 (the change from step j)
    ax.set_yticks(step_ticks(0, grid.shape[0] - 1, 20))
    ax.set_xlabel("diffusion step s (sampling order; distance from step s-1 to s)")
    ax.set_ylabel("layer")
    ax.set_title(f"{target.upper()}: {metric} distance ({_stream_label(stream)}, {branch})", fontsize=9)
    return fig


def cov_figure(table, metric="l1") -> Figure:
    cols = list(table.columns)
    cells = [
        [
            f"{v:.1%}"
            if isinstance(v, float) and np.isfinite(v)
            else ("-" if isinstance(v, float) else str(v))
            for v in row
        ]
        for row in table.itertuples(index=False)
    ]
    fig = Figure(figsize=(1.3 * len(cols), 0.35 * (len(cells) + 2)), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    ax.table(cellText=cells, colLabels=cols, loc="center").scale(1, 1.3)
    ax.set_title(
        f"coefficient of variation over prompts of the {metric} distance (mean over layers and steps)",
        fontsize=8,
    )
    return fig


def plot_profile(profile, out_dir, formats=("png", "svg"), metric="l1") -> list[Path]:
    """Write `layers_<metric>`, `heatmap_<target>_<metric>` and `cov_table_<metric>` (figure and CSV)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = _save(layers_figure(profile, metric), out_dir, f"layers_{metric}", formats)
    for target in profile.options("target"):
        paths += _save(
            heatmap_figure(profile, target, metric), out_dir, f"heatmap_{target}_{metric}", formats
        )
    table = profile.cov_table(metric)
    csv = out_dir / f"cov_table_{metric}.csv"
    table.to_csv(csv, index=False)
    paths.append(csv)
    paths += _save(cov_figure(table, metric), out_dir, f"cov_table_{metric}", formats)
    return paths
