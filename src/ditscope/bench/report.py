"""Turn bench rows into what a user reads: a tidy table, a Pareto plot, markdown tables and an image grid."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pandas as pd

from .grid import BASELINE

# (name, PSNR floor in dB, allowed attribute-accuracy drop in points)
QUALITY_BARS = (("near-lossless", 30.0, 1.0), ("good", 25.0, 3.0))
MARKERS = {"baseline": "s", "ditscope": "o", "diffusers": "^", "cache-dit": "D"}


def table(rows: list[dict]) -> pd.DataFrame:
    """One row per setting with speedups against the uncached run (wall clock and executed FLOPs)."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    base = df[df["method"] == BASELINE]
    if base.empty or "seconds" not in df:
        return df
    base = base.iloc[0]
    df["speedup"] = base["seconds"] / df["seconds"]
    df["flops_speedup"] = base["flops"] / df["flops"]
    if "accuracy" in df:
        df["accuracy_drop"] = 100 * (base["accuracy"] - df["accuracy"])
    return df


def meets(df: pd.DataFrame, psnr_floor: float, max_drop: float) -> pd.Series:
    ok = df["psnr"].fillna(-math.inf) >= psnr_floor
    if "accuracy_drop" in df:
        ok &= df["accuracy_drop"].fillna(math.inf) <= max_drop
    return ok


def best_at_bars(df: pd.DataFrame) -> pd.DataFrame:
    """Per method: the best wall-clock speedup among its settings that meet each quality bar."""
    ran = df[df["method"] != BASELINE].dropna(subset=["speedup"])
    out = []
    for (system, method), group in ran.groupby(["system", "method"], sort=False):
        row = {"system": system, "method": method}
        for name, floor, drop in QUALITY_BARS:
            ok = group[meets(group, floor, drop)]
            if ok.empty:
                row[name] = "-"
            else:
                best = ok.loc[ok["speedup"].idxmax()]
                row[name] = f"{best['speedup']:.2f}x ({best['label']})"
        out.append(row)
    return pd.DataFrame(out)


def markdown(df: pd.DataFrame, title: str) -> str:
    """The full results table and the best-at-bars table, as markdown."""
    cols = [c for c in ("system", "label", "seconds", "speedup", "flops_speedup", "psnr", "ssim", "lpips", "accuracy",
                        "accuracy_drop", "all", "frechet", "note") if c in df]
    shown = df[cols].copy()
    for c, fmt in (("seconds", "{:.2f}"), ("speedup", "{:.2f}x"), ("flops_speedup", "{:.2f}x"), ("psnr", "{:.1f}"),
                   ("ssim", "{:.3f}"), ("lpips", "{:.3f}"), ("accuracy", "{:.1%}"), ("accuracy_drop", "{:+.1f}"),
                   ("all", "{:.1%}"), ("frechet", "{:.3f}")):
        if c in shown:
            shown[c] = shown[c].map(lambda v, f=fmt: "" if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v))
    shown = shown.fillna("")
    lines = [f"## {title}", "", _md(shown), "", "Best wall-clock speedup per method at each quality bar "
             "(near-lossless: PSNR >= 30 dB against uncached and attribute accuracy within 1 point; "
             "good: PSNR >= 25 dB, within 3 points):", "", _md(best_at_bars(df)), ""]
    return "\n".join(lines)


def _md(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no rows)"
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(str(v).replace("|", "/") for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def pareto_plot(df: pd.DataFrame, path: Path, title: str):
    """Speedup against PSNR to the uncached images: one marker style per system, the frontier drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = df[(df["method"] != BASELINE)].dropna(subset=["speedup", "psnr"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(ran["method"]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(methods):
        g = ran[ran["method"] == method]
        ax.scatter(g["psnr"], g["speedup"], marker=MARKERS.get(g["system"].iloc[0], "o"), s=45,
                   color=colors[i % len(colors)], label=f"{method} ({g['system'].iloc[0]})", zorder=3)
    # the frontier: settings that no other setting beats on both speed and quality
    pts = ran.sort_values("psnr", ascending=False)
    front, best = [], -math.inf
    for _, r in pts.iterrows():
        if r["speedup"] > best:
            front.append((r["psnr"], r["speedup"]))
            best = r["speedup"]
    if front:
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", color="black", lw=1, alpha=0.6, label="frontier", zorder=2)
    for floor, style in ((30, ":"), (25, "--")):
        ax.axvline(floor, color="grey", ls=style, lw=0.8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("PSNR against the uncached image (dB, higher = closer)")
    ax.set_ylabel("wall-clock speedup")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best", ncols=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    for suffix in (".png", ".svg"):
        fig.savefig(path.with_suffix(suffix), dpi=130)
    plt.close(fig)


def image_grid(df: pd.DataFrame, image_dir: Path, path: Path, prompts: list, n_prompts: int = 4):
    """The first prompts (first seed) under the uncached run and each method's fastest good setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from safetensors.torch import load_file

    picks = [df[df["method"] == BASELINE].iloc[0]]
    ran = df[df["method"] != BASELINE].dropna(subset=["speedup"])
    for _, group in ran.groupby("method", sort=False):
        good = group[meets(group, QUALITY_BARS[1][1], QUALITY_BARS[1][2])]
        picks.append((good if not good.empty else group).sort_values("speedup").iloc[-1])
    n = min(n_prompts, len(prompts))
    fig, axes = plt.subplots(n, len(picks), figsize=(1.6 * len(picks), 1.7 * n + 0.6), squeeze=False)
    for j, row in enumerate(picks):
        file = image_dir / f"{row['key']}.safetensors"
        images = load_file(str(file))["images"] if file.exists() else None
        for i in range(n):
            ax = axes[i][j]
            ax.axis("off")
            if images is not None:
                img = images[i]
                img = img[0] if img.dim() == 4 else img  # video: first frame
                ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            if i == 0:
                speed = "" if row["method"] == BASELINE else f"\n{row['speedup']:.2f}x"
                label = row["label"] if row["method"] != BASELINE else "uncached"
                # wrapped, so long peer labels do not run into their neighbours' titles
                ax.set_title(textwrap.fill(label, 22) + speed, fontsize=6)
    for i in range(n):
        axes[i][0].text(-0.1, 0.5, textwrap.fill(str(prompts[i]), 28), transform=axes[i][0].transAxes,
                        fontsize=5, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_outputs(rows: list[dict], out: Path, title: str, prompts: list) -> pd.DataFrame:
    """results.csv, results.md, pareto.png/svg and grid.png under `out`."""
    df = table(rows)
    export = df.drop(columns=[c for c in ("seconds_all",) if c in df])
    tmp = out / "results.csv.tmp"
    export.to_csv(tmp, index=False)
    tmp.replace(out / "results.csv")
    (out / "results.md").write_text(markdown(df, title))
    if "speedup" in df and "psnr" in df:
        pareto_plot(df, out / "pareto", title)
        image_grid(df, out / "images", out / "grid.png", prompts)
    return df
