"""Turn bench rows into what a user reads: a tidy table, a Pareto plot, markdown tables and an image grid."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from ..files import atomic_path, load_images, write_text_atomic
from ..stats import mean_interval
from .grid import BASELINE
from .runner import samples_file

# (name, PSNR floor in dB, allowed attribute-accuracy drop in points)
QUALITY_BARS = (("near-lossless", 30.0, 1.0), ("good", 25.0, 3.0))
# A bar is decided only on this many samples: below it one changed attribute moves the accuracy by
# more than the near-lossless bar allows, and the intervals are too wide to tell methods apart.
MIN_SAMPLES = {"image": 64, "video": 24}
MARKERS = {
    "baseline": "s",
    "ditscope": "o",
    "diffusers": "^",
    "cache-dit": "D",
    "smoothcache": "v",
    "t-gate": "P",
}


def table(rows: list[dict]) -> pd.DataFrame:
    """One row per setting with speedups against the uncached run (wall clock and executed FLOPs), and the
    95% bootstrap intervals of its quality over samples (paired with the uncached sample of the same
    prompt and seed): `psnr_lo/hi`, `psnr_p5` (the worst images), `ssim_lo/hi`, and in points
    `accuracy_drop_lo/hi`, `all_drop` (share of samples that lost "all attributes right") and its interval."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    base = df[df["method"] == BASELINE]
    if base.empty or "seconds" not in df:
        return df
    base = base.iloc[0]
    df["flops_speedup"] = base["flops"] / df["flops"]
    timed = not _missing(base["seconds"])  # a bench run with --repeats 0 is not timed: its speed is FLOPs
    df["speedup"] = base["seconds"] / df["seconds"].astype(float) if timed else df["flops_speedup"]
    if "accuracy" in df:
        df["accuracy_drop"] = 100 * (base["accuracy"] - df["accuracy"])
    if "per_sample" in df:
        intervals = [_intervals(r, base.get("per_sample")) for r in df["per_sample"]]
        df = pd.concat([df, pd.DataFrame(intervals, index=df.index)], axis=1)
    df.attrs["speed"] = "wall-clock" if timed else "FLOPs"
    return df


def _intervals(per_sample, base) -> dict:
    """Interval columns of one setting from its per-sample values and the uncached run's."""
    if not isinstance(per_sample, dict):  # a skipped setting, or a row from before per-sample values
        return {}
    out = {}
    for key in ("psnr", "ssim"):
        if per_sample.get(key):
            _, out[f"{key}_lo"], out[f"{key}_hi"] = mean_interval(per_sample[key])
    if per_sample.get("psnr"):
        out["psnr_p5"] = float(np.percentile(per_sample["psnr"], 5))
    if not isinstance(base, dict):
        return out
    for key, name in (("accuracy", "accuracy_drop"), ("all", "all_drop")):
        mine, theirs = per_sample.get(key), base.get(key)
        if mine and theirs and len(mine) == len(theirs):
            drop = 100 * (np.asarray(theirs) - np.asarray(mine))
            mean, lo, hi = mean_interval(drop)
            out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
            if name == "all_drop":
                out[name] = mean
    return out


def min_samples(df: pd.DataFrame) -> int:
    video = "video" in df and bool(df["video"].fillna(False).astype(bool).any())
    return MIN_SAMPLES["video" if video else "image"]


def meets(df: pd.DataFrame, psnr_floor: float, max_drop: float) -> pd.Series:
    ok = df["psnr"].fillna(-math.inf) >= psnr_floor
    if "accuracy_drop" in df:
        ok &= df["accuracy_drop"].fillna(math.inf) <= max_drop
    return ok


def best_at_bars(df: pd.DataFrame) -> pd.DataFrame:
    """Per method: the best wall-clock speedup among its settings that meet each quality bar, with the
    PSNR and accuracy-drop intervals of that setting, or "-" where none does; either is marked undecided on
    fewer samples than MIN_SAMPLES (none meeting a bar on a few samples does not decide it either)."""
    ran = df[df["method"] != BASELINE].dropna(subset=["speedup"])
    need = min_samples(df)
    out = []
    for (system, method), group in ran.groupby(["system", "method"], sort=False):
        row = {"system": system, "method": method}
        for name, floor, drop in QUALITY_BARS:
            ok = group[meets(group, floor, drop)]
            if ok.empty:
                n = group["n_images"].max() if "n_images" in group else None
                row[name] = "-" + (
                    f" undecided: {int(n)} < {need} samples" if not _missing(n) and n < need else ""
                )
                continue
            best = ok.loc[ok["speedup"].idxmax()]
            text = f"{best['speedup']:.2f}x ({best['label']}; PSNR {_with_interval(best, 'psnr', '{:.1f}')}"
            if "accuracy_drop" in best and not _missing(best["accuracy_drop"]):
                text += f", drop {_with_interval(best, 'accuracy_drop', '{:+.1f}')}"
            text += ")"
            n = best.get("n_images")
            if not _missing(n) and n < need:
                text += f" undecided: {int(n)} < {need} samples"
            row[name] = text
        out.append(row)
    return pd.DataFrame(out)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _with_interval(row, col: str, fmt: str) -> str:
    """`value [lo, hi]` where the row has the interval, else the value alone."""
    lo, hi = row.get(f"{col}_lo"), row.get(f"{col}_hi")
    if _missing(lo) or _missing(hi):
        return fmt.format(row[col])
    return f"{fmt.format(row[col])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def markdown(df: pd.DataFrame, title: str) -> str:
    """The full results table and the best-at-bars table, as markdown; intervals are 95% bootstrap over samples."""
    shown = pd.DataFrame(index=df.index)
    formats = (
        ("system", "{}"),
        ("label", "{}"),
        ("seconds", "{:.2f}"),
        ("speedup", "{:.2f}x"),
        ("flops_speedup", "{:.2f}x"),
        ("psnr", "{:.1f}"),
        ("psnr_p5", "{:.1f}"),
        ("ssim", "{:.3f}"),
        ("lpips", "{:.3f}"),
        ("accuracy", "{:.1%}"),
        ("accuracy_drop", "{:+.1f}"),
        ("all", "{:.1%}"),
        ("all_drop", "{:+.1f}"),
        ("frechet", "{:.3f}"),
        ("note", "{}"),
    )
    timed = _speed(df) == "wall-clock"
    for col, fmt in formats:
        if col in df and (timed or col not in ("seconds", "speedup")):
            shown[col] = ["" if _missing(r[col]) else _with_interval(r, col, fmt) for _, r in df.iterrows()]
    shown = shown.fillna("")
    n = int(df["n_images"].max()) if "n_images" in df and df["n_images"].notna().any() else 0
    lines = [
        f"## {title}",
        "",
        f"Quality over {n} samples; [low, high] = 95% bootstrap interval of the mean over "
        "samples, paired with the uncached sample of the same prompt and seed; psnr_p5 = the 5th-percentile "
        "sample's PSNR; drops in points (positive = worse than uncached)."
        + ("" if timed else " Not timed (--repeats 0): speeds are executed FLOPs."),
        "",
        _md(shown),
        "",
        f"Best {_speed(df)} speedup per method at each quality bar "
        "(near-lossless: PSNR >= 30 dB against uncached and attribute accuracy within 1 point; "
        f"good: PSNR >= 25 dB, within 3 points; decided on at least {min_samples(df)} samples):",
        "",
        _md(best_at_bars(df)),
        "",
    ]
    return "\n".join(lines)


SUMMARY_WIDTH = 100  # what `ditscope bench` prints fits this many columns; results.md keeps every column


def summary(df: pd.DataFrame, title: str = "", width: int = SUMMARY_WIDTH) -> str:
    """What `ditscope bench` prints: per setting the key columns (method and setting, speedup, PSNR with its
    95% interval, worst-image PSNR, SSIM, accuracy drop) and the best speedup at each quality bar, in `width`
    columns (a long setting wraps in its cell); notes follow the table, and the one every row carries (LPIPS
    skipped, and why) is said once. The full table is results.md's (`markdown`)."""
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    timed = _speed(df) == "wall-clock"
    columns = (
        ("speedup" if timed else "flops_speedup", f"{'' if timed else 'FLOPs '}speedup", "{:.2f}x"),
        ("psnr", "PSNR [95%]", "{:.1f}"),
        ("psnr_p5", "p5 PSNR", "{:.1f}"),
        ("ssim", "SSIM", "{:.3f}"),
        ("accuracy_drop", "acc. drop", "{:+.1f}"),
    )
    columns = [c for c in columns if c[0] in df]
    lpips = {
        part
        for note in df.get("note", pd.Series(dtype=object)).dropna()
        for part in str(note).split("; ")
        if part.startswith("LPIPS skipped")
    }
    notes = [
        "; ".join(p for p in str(n).split("; ") if p and p not in lpips) if not _missing(n) else ""
        for n in df.get("note", pd.Series([""] * len(df), index=df.index))
    ]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column(
        "method and setting", overflow="fold", min_width=24
    )  # what wraps when the width is short
    for _, header, _ in columns:
        table.add_column(header, justify="right", no_wrap=True)
    said = []  # (setting, note): after the table, where a note has the width to be read
    for (_, r), note in zip(df.iterrows(), notes):
        if note:
            said.append(f"{r['label']}: {note}")
        cells = [r["label"] if r["method"] != BASELINE else "none (uncached)"]
        for col, _, fmt in columns:
            value = r[col]
            if _missing(value):
                cells.append("-")
            elif col == "psnr":  # the interval as [lo, hi] beside the mean, which the width allows only here
                cells.append(_with_interval(r, col, fmt))
            else:
                cells.append(fmt.format(value))
        table.add_row(*cells)
    best = best_at_bars(df)
    bars = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title=f"best {_speed(df)} speedup at each quality bar",
        title_justify="left",
    )
    best = best.drop(columns=["system"], errors="ignore")  # the method names its system
    for col in best.columns:
        bars.add_column(str(col), overflow="fold")
    for row in best.itertuples(index=False):
        bars.add_row(*[str(v) for v in row])
    n = int(df["n_images"].max()) if "n_images" in df and df["n_images"].notna().any() else 0
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False, emoji=False)
    if title:
        console.print(title, markup=False)
    console.print(table)
    console.print(
        f"PSNR and SSIM against the uncached images over {n} samples; [low, high] = 95% interval of the mean; "
        "p5 = the 5th-percentile sample's PSNR; acc. drop in points (positive = worse).",
        markup=False,
    )
    for line in said:
        console.print(f"note: {line}", markup=False)
    if not best.empty:
        console.print(bars)
        console.print(
            "near-lossless: PSNR >= 30 dB and accuracy within 1 point; good: PSNR >= 25 dB, within 3 "
            f"points; decided on at least {min_samples(df)} samples.",
            markup=False,
        )
    for part in sorted(lpips):
        console.print(f"{part} (every setting).", markup=False)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def _speed(df: pd.DataFrame) -> str:
    """What the speedup column measures: wall clock, or executed FLOPs for a bench that was not timed."""
    return df.attrs.get("speed", "wall-clock")


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
        ax.scatter(
            g["psnr"],
            g["speedup"],
            marker=MARKERS.get(g["system"].iloc[0], "o"),
            s=45,
            color=colors[i % len(colors)],
            label=f"{method} ({g['system'].iloc[0]})",
            zorder=3,
        )
        if "psnr_lo" in g:  # the 95% interval of the mean PSNR over samples
            err = np.stack(
                [
                    (g["psnr"] - g["psnr_lo"]).fillna(0).clip(lower=0),
                    (g["psnr_hi"] - g["psnr"]).fillna(0).clip(lower=0),
                ]
            )
            ax.errorbar(
                g["psnr"],
                g["speedup"],
                xerr=err,
                fmt="none",
                ecolor=colors[i % len(colors)],
                elinewidth=0.8,
                alpha=0.6,
                zorder=2,
            )
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
    ax.set_xlabel("PSNR against the uncached image (dB, higher = closer; bars: 95% interval)")
    ax.set_ylabel(f"{_speed(df)} speedup")
    ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=9)  # a bench's title runs past the axes
    ax.legend(fontsize=7, loc="best", ncols=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    for suffix in (".png", ".svg"):
        fig.savefig(path.with_suffix(suffix), dpi=130)
    plt.close(fig)


def image_grid(df: pd.DataFrame, out: Path, path: Path, prompts: list, n_prompts: int = 4):
    """The first prompts (first seed) under the uncached run and each method's fastest good setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [df[df["method"] == BASELINE].iloc[0]]
    ran = df[df["method"] != BASELINE].dropna(subset=["speedup"])
    for _, group in ran.groupby("method", sort=False):
        good = group[meets(group, QUALITY_BARS[1][1], QUALITY_BARS[1][2])]
        picks.append((good if not good.empty else group).sort_values("speedup").iloc[-1])
    n = min(n_prompts, len(prompts))
    fig, axes = plt.subplots(n, len(picks), figsize=(1.6 * len(picks), 1.7 * n + 0.6), squeeze=False)
    for j, row in enumerate(picks):
        file = samples_file(out, row["key"])
        images = load_images(file) if file.exists() else None
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
        axes[i][0].text(
            -0.1,
            0.5,
            textwrap.fill(str(prompts[i]), 28),
            transform=axes[i][0].transAxes,
            fontsize=5,
            ha="right",
            va="center",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_outputs(rows: list[dict], out: Path, title: str, prompts: list) -> pd.DataFrame:
    """results.csv, results.md, pareto.png/svg and grid.png under `out`."""
    df = table(rows)
    dropped = ("seconds_all", "per_sample") + (
        () if _speed(df) == "wall-clock" else ("speedup",)
    )  # FLOPs only
    export = df.drop(
        columns=[c for c in dropped if c in df]
    )  # results.jsonl keeps the per-pass and per-sample values
    with atomic_path(out / "results.csv") as tmp:
        export.to_csv(tmp, index=False)
    write_text_atomic(out / "results.md", markdown(df, title))
    if "speedup" in df and "psnr" in df:
        pareto_plot(df, out / "pareto", title)
        image_grid(df, out, out / "grid.png", prompts)
    return df
