"""One self-contained HTML page per study: the verdict first, then tables, then figures (embedded PNG)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from ..files import write_text_atomic

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.verdict{background:#eef2f8;border-left:5px solid #58a;padding:.8em 1em;font-size:1.05em}
.verdict.holds{background:#eef6ee;border-left-color:#3a3} .verdict.fails{background:#fbeeee;border-left-color:#c33}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.4em 0} .meta{color:#666;font-size:.85em}
"""


def figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def table_html(rows: list[dict], floatfmt: str = "{:.3f}") -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            text = (
                floatfmt.format(v)
                if isinstance(v, (float, np.floating)) and np.isfinite(v)
                else ("-" if isinstance(v, (float, np.floating)) else str(v))
            )
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def write_report(
    path: Path,
    title: str,
    verdict: str,
    sections: list[tuple[str, str]],
    meta: str = "",
    holds: bool | None = None,
) -> Path:
    """`sections`: (heading, html) pairs; figures are <img> tags from `figure_png`. The verdict box is green
    when the finding holds, red when it fails, blue when the study decides nothing. Written atomically."""
    kind = {True: " holds", False: " fails", None: ""}[holds]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p class='verdict{kind}'>{html.escape(verdict)}</p>",
    ]
    if meta:
        parts.append(f"<p class='meta'>{html.escape(meta)}</p>")
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append("</body></html>")
    return write_text_atomic(path, "\n".join(parts))


def img(src: str, alt: str) -> str:
    return f"<img src='{src}' alt='{html.escape(alt)}'>"


def curves_figure(curves: dict[str, dict[str, np.ndarray]], title: str):
    """One panel per target: each run's layer-mean log10 distance on the normalised step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({t for c in curves.values() for t in c}, key="kvaqo".find)
    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 3), squeeze=False)
    for ax, t in zip(axes[0], targets):
        for name, c in curves.items():
            if t in c:
                ax.plot(np.linspace(0, 1, len(c[t])), c[t], label=name)
        ax.set_title(f"{t.upper()}: mean over layers")
        ax.set_xlabel("normalised step (0 = first, 1 = last)")
        ax.set_ylabel("log10 distance")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def layers_figure(maps: dict[str, np.ndarray], target: str, title: str, max_layers: int | None = None):
    """The paper's per-layer panels, every run overlaid on the normalised axis: a grid with one panel per
    layer (row i of the maps is layer i), all of them unless `max_layers` says fewer."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = min(m.shape[0] for m in maps.values())
    if max_layers is not None:
        n_layers = min(n_layers, max_layers)
    cols = max(1, min(n_layers, max(4, math.ceil(math.sqrt(n_layers)))))
    rows = max(1, -(-n_layers // cols))
    width = min(3.0, 18.0 / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols, 0.75 * width * rows + 0.6), squeeze=False, sharex=True
    )
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= n_layers:
            ax.axis("off")
            continue
        for name, m in maps.items():
            ax.plot(np.linspace(0, 1, m.shape[1]), m[i], label=name, lw=1)
        ax.set_title(f"layer {i}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{title}: {target.upper()}, log10 distance per layer ({n_layers} layers)")
    fig.supxlabel("normalised step (0 = first, 1 = last)", fontsize=9)
    fig.tight_layout()
    return fig


def matrix_figure(names: list[str], mat: np.ndarray, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 0.9 + 0.8 * len(names)))
    im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(
                j,
                i,
                f"{mat[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if abs(mat[i, j]) > 0.5 else "black",
            )
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def heatmap_figure(cells: dict[str, np.ndarray], title: str, steps=None, layers=None):
    """Per target: the CoV over prompts per (layer, step). `cells[t]` is (layers, T-1) with column j the
    distance from step j to step j+1, i.e. step j+1 (`analysis.cov_over_prompts`'s `per_cell`): the x axis is
    labelled with those step numbers, 1 .. T-1, unless `steps` (one per column) says otherwise; `layers`
    (one per row) names the rows' layers, 0 .. L-1 by default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import step_ticks

    fig, axes = plt.subplots(1, len(cells), figsize=(4 * len(cells), 3), squeeze=False)
    for ax, (t, c) in zip(axes[0], cells.items()):
        n_rows, n_cols = c.shape
        xs = np.arange(1, n_cols + 1) if steps is None else np.asarray(steps)
        ys = np.arange(n_rows) if layers is None else np.asarray(layers)
        # columns sit at positions 0 .. n-1 (rows likewise); the ticks there carry the real step / layer numbers
        im = ax.imshow(c, aspect="auto", cmap="viridis", interpolation="nearest")
        xt = [int(np.searchsorted(xs, v)) for v in step_ticks(xs[0], xs[-1], 8) if v in xs]
        yt = [int(np.searchsorted(ys, v)) for v in step_ticks(ys[0], ys[-1], 10) if v in ys]
        ax.set_xticks(xt, [str(int(xs[i])) for i in xt])
        ax.set_yticks(yt, [str(int(ys[i])) for i in yt])
        ax.set_title(f"{t.upper()}: CoV over prompts")
        ax.set_xlabel("step s (change from step s-1)")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
