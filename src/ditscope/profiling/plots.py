"""Figures of a Profile (matplotlib, no pyplot state, PNG and SVG).

(a) `layers`: the paper's figure, one subplot per layer; x = diffusion step in sampling order,
    y = distance on a log scale, one line each for K, V and A (band: +-1 std over prompts).
(b) `heatmap_<target>`: layer x step heatmap per target.
(c) `cov_table`: the coefficient of variation over prompts, averaged over layers and steps, per
    target (the paper's Table 2), also written as CSV.
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
    for layer in range(rows * cols):
        ax = axes.flat[layer]
        if layer >= n:
            ax.set_visible(False)
            continue
        for t in targets:
            mean = profile.grid(t, stream, branch, metric)[layer]
            std = profile.grid(t, stream, branch, metric, stat="std")[layer]
            if not np.isfinite(mean).any() or not (mean > 0).any():
                continue
            ax.plot(steps, mean, color=COLORS.get(t), lw=1.2, label=t.upper())
            ax.fill_between(steps, np.clip(mean - std, mean * 1e-3, None), mean + std, color=COLORS.get(t), alpha=0.15, lw=0)
        ax.set_yscale("log")
        ax.set_title(f"{layer}: {profile.layer_names[layer]}", fontsize=6)
        ax.tick_params(which="both", labelsize=6)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncols=len(labels) or 1, fontsize=8)
    fig.suptitle(
        f"{profile.meta.get('model', '')}: {metric} distance between consecutive steps "
        f"({_stream_label(stream)}, {branch} branch, {profile.n_prompts} prompts)", fontsize=9,
    )
    fig.supxlabel("diffusion step (sampling order)", fontsize=8)
    return fig


def heatmap_figure(profile, target, metric="l1", stream=None, branch=None) -> Figure:
    view = profile.default_view()
    stream, branch = stream or view["stream"], branch or view["branch"]
    grid = profile.grid(target, stream, branch, metric)
    fig = Figure(figsize=(max(4.0, 0.25 * grid.shape[1] + 2), max(3.0, 0.18 * grid.shape[0] + 1.5)), layout="constrained")
    ax = fig.subplots()
    positive = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    img = ax.imshow(np.where(grid > 0, grid, np.nan), aspect="auto", cmap="viridis", norm=norm, interpolation="nearest",
                    extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] - 0.5, -0.5))
    fig.colorbar(img, ax=ax, label=f"{metric} (log)")
    ax.set_xlabel("diffusion step (sampling order)")
    ax.set_ylabel("layer")
    ax.set_title(f"{target.upper()}: {metric} distance ({_stream_label(stream)}, {branch})", fontsize=9)
    return fig


def cov_figure(table) -> Figure:
    cols = list(table.columns)
    cells = [[f"{v:.1%}" if isinstance(v, float) and np.isfinite(v) else ("-" if isinstance(v, float) else str(v))
              for v in row] for row in table.itertuples(index=False)]
    fig = Figure(figsize=(1.3 * len(cols), 0.35 * (len(cells) + 2)), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    ax.table(cellText=cells, colLabels=cols, loc="center").scale(1, 1.3)
    ax.set_title("coefficient of variation over prompts (mean over layers and steps)", fontsize=8)
    return fig


def plot_profile(profile, out_dir, formats=("png", "svg"), metric="l1") -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = _save(layers_figure(profile, metric), out_dir, "layers", formats)
    for target in profile.options("target"):
        paths += _save(heatmap_figure(profile, target, metric), out_dir, f"heatmap_{target}", formats)
    table = profile.cov_table(metric)
    table.to_csv(out_dir / "cov_table.csv", index=False)
    paths.append(out_dir / "cov_table.csv")
    paths += _save(cov_figure(table), out_dir, "cov_table", formats)
    return paths
