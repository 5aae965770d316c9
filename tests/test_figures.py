"""Figures (issue 35): what each figure draws, checked against values recomputed here with plain loops.

- the plan heatmap (`ditscope show PLAN.plan.json`) draws modules as not run where the stack is served;
- `ditscope plot --metric M` names its files by the metric, so the l1 figures survive a rel_l1 plot;
- step axes are ticked at integer steps, labelled with the step numbers the data counts;
- the per-layer band is geometric (a log axis can show it), computed from the per-prompt values;
- the steps study draws every layer.

The profiles are built by hand with prompts, layers and steps all of different sizes (5, 3, 7), so that a
statistic over the wrong axis cannot agree by accident.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.collections import PatchCollection

from ditscope import Profile
from ditscope.cache.schedule_data import Schedule
from ditscope.planning import show
from ditscope.profiling import plots
from ditscope.stats.running import RunningStats
from ditscope.study import report

METRICS = ("l1", "rel_l1", "cos")
TARGETS = ("k", "v", "a")
N_PROMPTS, N_LAYERS, N_STEPS = 5, 3, 8  # 7 distances (steps 1..7)
# the plan heatmap's categories past compute 0, linear forecast 1, reuse 2, Taylor forecast 3, fitted forecast 4
NOT_RUN_STACK, NOT_RUN_BLOCK = 5, 6


def build_profile(seed: int = 0) -> Profile:
    """Every layer has image-stream keys for the cond and uncond branches (the uncond ones decoys with other
    values); layer 1's attention output also has a text-stream decoy. Some distances are 0: prompt 0 of
    layer 0's K at step 2, and every prompt of layer 2's V at step 4 (no positive value there at all)."""
    rng = np.random.default_rng(seed)
    keys = [(layer, t, "image", b) for layer in range(N_LAYERS) for t in TARGETS for b in ("cond", "uncond")]
    keys.append((1, "a", "text", "cond"))
    keys.sort(key=lambda k: (k[0], "qkvao".index(k[1]), k[2], k[3]))
    s = N_STEPS - 1
    values = rng.lognormal(-3.0, 0.8, size=(N_PROMPTS, len(keys), s, len(METRICS))).astype(np.float32)
    for ki, key in enumerate(keys):
        values[:, ki] *= np.float32(1 + ki)  # every key on its own level
        if key == (0, "k", "image", "cond"):
            values[0, ki, 1, :] = 0.0
        if key == (2, "v", "image", "cond"):
            values[:, ki, 3, :] = 0.0
    return Profile(
        keys=keys,
        layer_names=[f"blocks.{i}.attn" for i in range(N_LAYERS)],
        timesteps=list(np.linspace(999, 1, N_STEPS)),
        prompt_index=np.arange(N_PROMPTS),
        values=values,
        stats=RunningStats.of(values),
        meta={"model": "hand", "scheduler": "hand", "num_inference_steps": N_STEPS},
    )


def key_index(prof: Profile, layer: int, target: str, stream: str = "image", branch: str = "cond") -> int:
    for i, k in enumerate(prof.keys):
        if k == (layer, target, stream, branch):
            return i
    raise KeyError((layer, target, stream, branch))


def tick_labels(ax, axis: str = "x", draw: bool = True) -> list[str]:
    if draw:
        ax.figure.draw_without_rendering()
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text().replace("\u2212", "-") for t in labels]


def assert_integer_ticks(ax, axis: str, first: int, last: int, label_of=lambda pos: pos, draw: bool = True):
    """Every tick at an integer position inside [first, last] (positions as drawn), labelled with the
    integer `label_of(position)`."""
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    labels = tick_labels(ax, axis, draw)
    assert len(ticks) >= 2
    for pos, text in zip(ticks, labels):
        assert float(pos).is_integer(), f"{axis} tick at {pos}"
        assert text == str(int(label_of(int(pos)))), (pos, text)
    lo, hi = ax.get_xlim() if axis == "x" else sorted(ax.get_ylim())
    assert first <= min(ticks) and max(ticks) <= last and lo <= min(ticks) and max(ticks) <= hi


# ------------------------------------------------------------------------------------ the plan heatmap
def oracle_categories(rows: dict[str, str]) -> list[list[int]]:
    """Per unit and step what runs, after the engine (ScheduleMethod.table): a block is served whole where
    the stack row of its transformer says R or F (else its own row decides), and a module runs only where
    its block runs."""
    code = {"C": 0, "F": 1, "R": 2, "T": 3, "L": 4}
    out = []
    for unit, row in rows.items():
        line = []
        second = unit.startswith("transformer_2.")
        stack = rows.get("transformer_2.stack" if second else "stack")
        parts = unit.split(".")
        is_stack = parts[-1] == "stack"
        is_block = parts[-1].isdigit()
        block = ".".join(parts[:-1]) if not is_stack and not is_block else None
        for t, action in enumerate(row):
            if is_stack:
                line.append(code[action])
            elif stack is not None and stack[t] != "C":
                line.append(NOT_RUN_STACK)
            elif block in rows and rows[block][t] != "C":
                line.append(NOT_RUN_BLOCK)
            else:
                line.append(code[action])
        out.append(line)
    return out


def test_cell_categories_by_hand():
    assert (show.NOT_RUN_STACK, show.NOT_RUN_BLOCK) == (NOT_RUN_STACK, NOT_RUN_BLOCK)
    plan = Schedule(
        {"stack": "CCRCFC", "transformer_blocks.0.attn1": "CFCRCT", "transformer_blocks.0.ff": "CCCCCL"}
    )
    r, f, c, s, t, fit = 2, 1, 0, NOT_RUN_STACK, 3, 4
    assert show.cell_categories(plan).tolist() == [
        [c, c, r, c, f, c],
        [c, f, s, r, s, t],
        [c, c, s, c, s, fit],
    ]


def test_cell_categories_oracle_and_drawn_grid(tmp_path):
    rng = np.random.default_rng(3)
    steps = 9
    units = [
        "stack",
        "transformer_blocks.0",
        "transformer_blocks.0.attn1",
        "transformer_blocks.0.ff",
        "transformer_blocks.1.attn1",
        "transformer_blocks.1.ff",
        "transformer_2.stack",
        "transformer_2.blocks.0.attn1",
        "transformer_2.blocks.1",
        "transformer_2.blocks.1.attn1",
    ]
    rows = {u: "C" + "".join(rng.choice(list("CCRFTL"), steps - 1)) for u in units}
    rows["stack"] = "CCRCFCCRC"  # both served kinds at known steps
    rows["transformer_2.stack"] = "CCCCCRCCC"
    plan = Schedule(rows, {"target": "psnr=40", "model": {"class": "Hand"}})
    expected = np.array(oracle_categories(rows))
    got = show.cell_categories(plan)
    assert got.shape == (len(units), steps)
    assert got.tolist() == expected.tolist()
    assert (got[:, 2] == NOT_RUN_STACK)[1:6].all() and (got[:, 4] == NOT_RUN_STACK)[1:6].all()
    assert (got[7:, 5] == NOT_RUN_STACK).all()  # transformer 2 follows its own stack row only
    assert got[0].tolist() == [{"C": 0, "F": 1, "R": 2, "T": 3, "L": 4}[a] for a in rows["stack"]]

    fig = show.heatmap_figure(plan)
    ax = fig.axes[0]
    assert np.asarray(ax.images[0].get_array()).tolist() == expected.tolist()  # the drawn grid
    hatched = sum(len(col.get_paths()) for col in ax.collections if isinstance(col, PatchCollection))
    assert hatched == int(np.isin(expected, (NOT_RUN_STACK, NOT_RUN_BLOCK)).sum())
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:3] == ["compute", "forecast (linear)", "reuse"]
    for code, name in (
        (3, "forecast (Taylor, second order)"),
        (4, "forecast (fitted)"),
    ):  # drawn where present
        assert (name in legend) == bool((expected == code).any())
    assert "not run: stack reused/forecast" in legend
    assert ("not run: block reused/forecast" in legend) == bool((expected == NOT_RUN_BLOCK).any())
    assert list(ax.get_xticks()) == list(range(steps))  # every step, counted from 0 as the plan does
    assert_integer_ticks(ax, "x", 0, steps - 1)
    assert [t.get_text() for t in ax.get_yticklabels()] == units

    path = show.heatmap(plan, tmp_path / "p.plan.png")
    assert path.stat().st_size > 1000


# ------------------------------------------------------------------------------ file names per metric
def oracle_cov_table(prof: Profile, metric: str) -> dict[tuple[str, str, str], float]:
    """Per (stream, branch, target): the mean over layers and steps of std/|mean| over prompts (population
    std; cells with mean 0 left out), on the layer's key of that stream, or for stream 'auto' image first."""
    m = METRICS.index(metric)
    out = {}
    for stream in ("image", "text"):
        for branch in ("cond", "uncond"):
            for target in TARGETS:
                covs = []
                for layer in range(N_LAYERS):
                    ki = next(
                        (i for i, k in enumerate(prof.keys) if k == (layer, target, stream, branch)), None
                    )
                    if ki is None:
                        continue
                    for s in range(N_STEPS - 1):
                        xs = [float(prof.values[p, ki, s, m]) for p in range(N_PROMPTS)]
                        mean = sum(xs) / len(xs)
                        if mean == 0:
                            continue
                        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
                        covs.append(std / abs(mean))
                out[(stream, branch, target.upper())] = sum(covs) / len(covs) if covs else float("nan")
    return out


def test_plot_profile_names_files_by_metric(tmp_path):
    import pandas as pd

    prof = build_profile()
    out = tmp_path / "figs"
    l1 = plots.plot_profile(prof, out, formats=("png",), metric="l1")
    rel = plots.plot_profile(prof, out, formats=("png",), metric="rel_l1")
    for metric, written in (("l1", l1), ("rel_l1", rel)):
        names = [
            f"layers_{metric}.png",
            *(f"heatmap_{t}_{metric}.png" for t in TARGETS),
            f"cov_table_{metric}.png",
            f"cov_table_{metric}.csv",
        ]
        assert sorted(p.name for p in written) == sorted(names)
        for name in names:
            assert (out / name).stat().st_size > 0
    assert not (out / "layers.png").exists() and not (out / "cov_table.csv").exists()
    assert len(list(out.iterdir())) == 12  # nothing overwritten: both sets are there
    for stem in ("layers", "heatmap_a", "cov_table"):
        assert (out / f"{stem}_l1.png").read_bytes() != (out / f"{stem}_rel_l1.png").read_bytes()
    # each CSV is the CoV table of its own metric
    for metric in ("l1", "rel_l1"):
        table = pd.read_csv(out / f"cov_table_{metric}.csv")
        expected = oracle_cov_table(prof, metric)
        for row in table.itertuples(index=False):
            for target in ("K", "V", "A"):
                want = expected[(row.stream, row.branch, target)]
                got = getattr(row, target)
                assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, rel=1e-6)
    a = pd.read_csv(out / "cov_table_l1.csv")
    b = pd.read_csv(out / "cov_table_rel_l1.csv")
    assert not np.allclose(a[["K", "V", "A"]].to_numpy(float)[:2], b[["K", "V", "A"]].to_numpy(float)[:2])


# -------------------------------------------------------------------------------------- integer ticks
@pytest.mark.parametrize(
    "first,last,most", [(1, 7, 12), (1, 19, 8), (0, 27, 40), (1, 49, 12), (0, 0, 5), (1, 999, 10), (3, 40, 6)]
)
def test_step_ticks(first, last, most):
    ticks = plots.step_ticks(first, last, most)
    assert ticks and all(isinstance(t, int) for t in ticks)
    assert ticks == sorted(set(ticks)) and first <= ticks[0] and ticks[-1] <= last
    assert ticks[0] == first or ticks[0] - first < 0.5 * (ticks[1] - ticks[0]) if len(ticks) > 1 else True
    assert len(ticks) <= most + 1  # the stride's multiples, and `first` in front


def test_profile_heatmap_ticks_are_steps():
    prof = build_profile()
    fig = plots.heatmap_figure(prof, "k")
    ax = fig.axes[0]
    # a profile's column j is step j+1 (the change from step j); the image is drawn with x = step
    left, right = ax.get_xlim()
    assert (left, right) == (0.5, N_STEPS - 1 + 0.5)
    assert_integer_ticks(ax, "x", 1, N_STEPS - 1)
    assert_integer_ticks(ax, "y", 0, N_LAYERS - 1)
    assert ax.get_ylabel() == "layer"


def test_layers_figure_ticks_are_steps():
    prof = build_profile()
    fig = plots.layers_figure(prof)
    fig.draw_without_rendering()
    for ax in fig.axes[:N_LAYERS]:
        assert_integer_ticks(ax, "x", 1, N_STEPS - 1, draw=False)
        for line in ax.lines:
            assert list(line.get_xdata()) == list(range(1, N_STEPS))


def test_study_heatmap_ticks_are_steps():
    rng = np.random.default_rng(1)
    n_layers, n_cols = 4, 11  # per_cell of a 12-step profile: column j is step j+1
    cells = {"k": rng.uniform(0, 1, (n_layers, n_cols)), "a": rng.uniform(0, 1, (n_layers, n_cols))}
    fig = report.heatmap_figure(cells, "hand")
    try:
        for ax in [a for a in fig.axes if a.get_title()]:
            assert_integer_ticks(ax, "x", 0, n_cols - 1, label_of=lambda pos: pos + 1)  # labelled 1..T-1
            labels = [int(t) for t in tick_labels(ax, "x")]
            assert min(labels) >= 1 and max(labels) <= n_cols and labels[0] == 1
            assert_integer_ticks(ax, "y", 0, n_layers - 1)
            assert ax.get_ylabel() == "layer" and "step" in ax.get_xlabel()
        # explicit step numbers (one per column) label the columns instead
        fig2 = report.heatmap_figure(cells, "hand", steps=list(range(2, 2 + n_cols)))
        ax = fig2.axes[0]
        assert_integer_ticks(ax, "x", 0, n_cols - 1, label_of=lambda pos: pos + 2)
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")


# --------------------------------------------------------------------------------- the geometric band
def oracle_band(prof: Profile, target: str, metric: str):
    """Per layer and step: exp(mean log x), exp(mean log x) / exp(std log x), exp(mean log x) * exp(std log x)
    over the prompts with x > 0 (population std); None where no prompt has x > 0."""
    m = METRICS.index(metric)
    out = []
    for layer in range(N_LAYERS):
        ki = key_index(prof, layer, target)
        per_step = []
        for s in range(N_STEPS - 1):
            logs = [
                math.log(float(prof.values[p, ki, s, m]))
                for p in range(N_PROMPTS)
                if prof.values[p, ki, s, m] > 0
            ]
            if not logs:
                per_step.append(None)
                continue
            mu = sum(logs) / len(logs)
            sd = math.sqrt(sum((x - mu) ** 2 for x in logs) / len(logs))
            per_step.append((math.exp(mu), math.exp(mu - sd), math.exp(mu + sd)))
        out.append(per_step)
    return out


@pytest.mark.parametrize("metric", ["l1", "rel_l1"])
def test_geometric_band_oracle(metric):
    prof = build_profile(seed=7)
    for target in TARGETS:
        gmean, lo, hi = plots.geometric_band(prof, target, "auto", "cond", metric)
        assert gmean.shape == lo.shape == hi.shape == (N_LAYERS, N_STEPS - 1)
        expected = oracle_band(prof, target, metric)
        for layer in range(N_LAYERS):
            for s in range(N_STEPS - 1):
                want = expected[layer][s]
                if want is None:
                    assert np.isnan(gmean[layer, s]) and np.isnan(lo[layer, s]) and np.isnan(hi[layer, s])
                    continue
                assert (gmean[layer, s], lo[layer, s], hi[layer, s]) == pytest.approx(want, rel=1e-6)
    # the constructed zeros: one prompt left out, and a step with no positive value at all
    gmean, _, _ = plots.geometric_band(prof, "v", "auto", "cond", metric)
    assert np.isnan(gmean[2, 3]) and np.isfinite(np.delete(gmean[2], 3)).all()


def test_layers_figure_draws_mean_and_geometric_band():
    prof = build_profile(seed=7)
    fig = plots.layers_figure(prof, "l1")
    assert "line: arithmetic mean over prompts" in fig.get_suptitle()
    assert "band: geometric mean" in fig.get_suptitle()
    m = METRICS.index("l1")
    for layer in range(N_LAYERS):
        ax = fig.axes[layer]
        assert ax.get_yscale() == "log"
        lines = {line.get_label(): line for line in ax.lines}
        bands = ax.collections
        assert set(lines) == {"K", "V", "A"} and len(bands) == 3
        expected_band = {t: oracle_band(prof, t, "l1")[layer] for t in TARGETS}
        for band, target in zip(bands, TARGETS):
            ki = key_index(prof, layer, target)
            mean = [
                sum(float(prof.values[p, ki, s, m]) for p in range(N_PROMPTS)) / N_PROMPTS
                for s in range(N_STEPS - 1)
            ]
            assert list(lines[target.upper()].get_ydata()) == pytest.approx(mean, rel=1e-6)
            # the band polygon: its vertices at step s lie on the oracle's lower and upper edge
            verts = np.concatenate([p.vertices for p in band.get_paths()])
            for s, want in enumerate(expected_band[target]):
                ys = verts[np.isclose(verts[:, 0], s + 1), 1]
                if want is None:
                    continue
                assert ys.size and ys.min() == pytest.approx(want[1], rel=1e-6)
                assert ys.max() == pytest.approx(want[2], rel=1e-6)
            assert (verts[:, 1][np.isfinite(verts[:, 1])] > 0).all()  # nothing a log axis cannot show


# ------------------------------------------------------------------------------ the steps study's panels
def test_study_layers_figure_draws_every_layer():
    import matplotlib.pyplot as plt

    n_layers = 16  # tiny-latte's attention layers: more than the 12 panels the figure once stopped at
    rng = np.random.default_rng(2)
    maps = {"10 steps": rng.normal(-2, 0.3, (n_layers, 10)), "20 steps": rng.normal(-2, 0.3, (n_layers, 20))}
    fig = report.layers_figure(maps, "a", "tiny-latte")
    try:
        panels = [ax for ax in fig.axes if ax.axison]
        assert len(panels) == n_layers
        assert [ax.get_title() for ax in panels] == [f"layer {i}" for i in range(n_layers)]
        for i, ax in enumerate(panels):
            assert [list(line.get_ydata()) for line in ax.lines] == [list(m[i]) for m in maps.values()]
    finally:
        plt.close(fig)
