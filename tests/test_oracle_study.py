"""Every number the studies, `ditscope show` and `to_pandas()` report, recomputed from the raw per-prompt
values with plain loops written here, apart from the implementation.

The profiles are built by hand with prompts, layers, steps and metrics all of different sizes (and one
with more prompts than layers), so that a statistic taken over the wrong axis cannot agree by accident.
The prompts study once averaged over layers instead of prompts (numpy moves a list index's axis first
when an integer index stands after a slice): these tests are what would have caught it.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from ditscope import Profile
from ditscope.cli.main import app
from ditscope.stats.running import RunningStats
from ditscope.study import analysis
from ditscope.study import runner as study_runner

METRICS = ("l1", "rel_l1", "cos")
TARGETS = ("k", "v", "a")


# ------------------------------------------------------------------------------- hand-built profiles
def build(
    n_prompts: int, n_layers: int, n_steps: int, seed: int, cross_every: int = 3, model: str = "hand"
) -> Profile:
    """A profile of `n_steps` sampling steps (n_steps - 1 distances). Every layer has image-stream keys for
    the cond and uncond branches; every `cross_every`-th layer is a cross-attention layer whose K and V are
    text keys that never change (distance 0), as in PixArt's attn2. Decoy keys (the uncond branch, a text
    stream of the attention output) hold other values, so a statistic that reads the wrong key disagrees."""
    rng = np.random.default_rng(seed)
    keys = []
    for layer in range(n_layers):
        cross = layer % cross_every == cross_every - 1
        for t in TARGETS:
            for branch in ("cond", "uncond"):
                if cross and t in ("k", "v"):
                    keys.append((layer, t, "text", branch))
                else:
                    keys.append((layer, t, "image", branch))
        if not cross:
            keys.append((layer, "a", "text", "cond"))
    keys.sort(key=lambda k: (k[0], "qkvao".index(k[1]), k[2], k[3]))
    s = n_steps - 1
    values = np.empty((n_prompts, len(keys), s, len(METRICS)), np.float32)
    for ki, (layer, t, stream, _) in enumerate(keys):
        if stream == "text" and t in ("k", "v"):
            values[:, ki] = 0.0
            continue
        # a layer- and step-dependent level, and a prompt effect that differs per layer
        level = np.exp(-0.3 * layer + 0.8 * np.sin(np.arange(s) / 2.0 + layer))
        prompt_effect = rng.lognormal(0.0, 0.1 + 0.05 * layer, size=(n_prompts, 1))
        noise = rng.lognormal(0.0, 0.15, size=(n_prompts, s))
        for mi in range(len(METRICS)):
            values[:, ki, :, mi] = level * prompt_effect * noise * (1 + mi)
    return Profile(
        keys=keys,
        layer_names=[f"blocks.{i}.attn" for i in range(n_layers)],
        timesteps=list(np.linspace(999, 1, n_steps)),
        prompt_index=np.arange(n_prompts),
        values=values,
        stats=RunningStats.of(values),
        meta={"model": model, "scheduler": "hand", "seed": 0, "num_inference_steps": n_steps},
    )


def key_index(prof: Profile, layer: int, target: str, stream: str, branch: str) -> int | None:
    for i, k in enumerate(prof.keys):
        if k == (layer, target, stream, branch):
            return i
    return None


def auto_key(prof: Profile, layer: int, target: str, branch: str = "cond") -> int | None:
    """The image-stream key of a layer, else its text-stream key (the studies' default view)."""
    i = key_index(prof, layer, target, "image", branch)
    return i if i is not None else key_index(prof, layer, target, "text", branch)


def over_prompts(prof: Profile, ki: int, step: int, metric: int, prompts=None) -> list[float]:
    prompts = range(prof.n_prompts) if prompts is None else prompts
    return [float(prof.values[p][ki][step][metric]) for p in prompts]


def mean(xs):
    return sum(xs) / len(xs)


def pop_std(xs):
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def percentile(xs, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(xs)
    pos = q / 100 * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def pearson(xs, ys):
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    mx, my = mean([p[0] for p in pairs]), mean([p[1] for p in pairs])
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    return sxy / math.sqrt(sxx * syy)


def interp(xs_src, ys, x):
    """Piecewise-linear y at x, for increasing xs_src."""
    for j in range(len(xs_src) - 1):
        if xs_src[j] <= x <= xs_src[j + 1]:
            w = (x - xs_src[j]) / (xs_src[j + 1] - xs_src[j])
            return ys[j] + w * (ys[j + 1] - ys[j])
    return ys[-1]


# --------------------------------------------------------------------------- CoV over prompts (Table 2)
def hand_mean_cov(prof: Profile, target: str, prompts=None, metric: int = 0) -> float:
    cells = []
    for layer in range(prof.n_layers):
        ki = auto_key(prof, layer, target)
        if ki is None:
            continue
        for step in range(prof.n_steps - 1):
            xs = over_prompts(prof, ki, step, metric, prompts)
            if mean(xs) != 0:
                cells.append(pop_std(xs) / abs(mean(xs)))
    return mean(cells)


SHAPES = [
    (5, 7, 10),
    (13, 4, 7),
]  # (prompts, layers, steps): all different; the second has more prompts than layers


@pytest.mark.parametrize("n_prompts,n_layers,n_steps", SHAPES)
def test_cov_over_prompts_and_its_interval_equal_a_hand_computation(n_prompts, n_layers, n_steps):
    prof = build(n_prompts, n_layers, n_steps, seed=n_prompts)
    n_boot = 60
    got = analysis.cov_over_prompts(prof, n_boot=n_boot, seed=3)
    assert set(got) == set(TARGETS)
    for t in TARGETS:
        assert got[t]["cov"] == pytest.approx(hand_mean_cov(prof, t), rel=1e-9)
        # the per-cell map is (layers, steps): one CoV over prompts for each layer and step
        cells = got[t]["per_cell"]
        assert cells.shape == (n_layers, n_steps - 1)
        ki = auto_key(prof, n_layers - 1, t)
        xs = over_prompts(prof, ki, n_steps - 2, 0)
        assert cells[n_layers - 1, n_steps - 2] == pytest.approx(pop_std(xs) / mean(xs), rel=1e-9)
    # the interval resamples prompts with replacement: the same draws (the documented generator and
    # seed, one draw of n_prompts indices per resample and target), each statistic by hand, then Efron's
    # BCa interval by its textbook formulas
    rng = np.random.default_rng(3)
    for t in got:
        boots = [
            hand_mean_cov(prof, t, [int(i) for i in rng.integers(0, n_prompts, n_prompts)])
            for _ in range(n_boot)
        ]
        jack = [hand_mean_cov(prof, t, [q for q in range(n_prompts) if q != i]) for i in range(n_prompts)]
        lo, hi = hand_bca(hand_mean_cov(prof, t), boots, jack)
        assert got[t]["lo"] == pytest.approx(lo, rel=1e-9)
        assert got[t]["hi"] == pytest.approx(hi, rel=1e-9)


def normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def normal_ppf(q):
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if normal_cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def hand_bca(estimate, boots, jack, level=0.95):
    b = len(boots)
    below = min(max(sum(x < estimate for x in boots) / b, 0.5 / b), 1 - 0.5 / b)
    z0 = normal_ppf(below)
    jm = mean(jack)
    accel = sum((jm - j) ** 3 for j in jack) / (6 * sum((jm - j) ** 2 for j in jack) ** 1.5)
    ends = []
    for q in ((1 - level) / 2, (1 + level) / 2):
        z = normal_ppf(q)
        ends.append(percentile(boots, 100 * normal_cdf(z0 + (z0 + z) / (1 - accel * (z0 + z)))))
    return ends


def test_prompts_study_reports_the_hand_numbers(tmp_path, monkeypatch):
    """The study's result.json and report table, end to end, on a profile with more prompts than layers."""
    prof = build(17, 5, 9, seed=1)
    monkeypatch.setattr(study_runner, "ensure_profile", lambda *a, **k: prof)
    result = study_runner.study_prompts("hand", None, tmp_path, n_boot=50)
    saved = json.loads((tmp_path / "prompts" / "result.json").read_text())
    html = (tmp_path / "prompts" / "report.html").read_text()
    for t in TARGETS:
        want = hand_mean_cov(prof, t)
        assert saved["cov"][t]["cov"] == pytest.approx(want, rel=1e-9)
        assert f"{want:.3f}" in html  # the report's table
        assert f"{t.upper()} {want:.1%}" in result["verdict"]
    # these prompts vary by more than 20% on every target: the verdict says so, in a red box
    assert all(saved["cov"][t]["hi"] >= 0.2 for t in TARGETS)
    assert "Not stable across prompts" in result["verdict"] and "class='verdict fails'" in html


def test_prompts_verdict_box_is_green_only_when_the_finding_holds(tmp_path, monkeypatch):
    prof = build(9, 5, 8, seed=2)
    rng = np.random.default_rng(0)
    prof.values[:] = prof.values[:1] * rng.uniform(0.97, 1.03, size=prof.values.shape).astype(np.float32)
    prof.stats = RunningStats.of(prof.values)
    monkeypatch.setattr(study_runner, "ensure_profile", lambda *a, **k: prof)
    result = study_runner.study_prompts("hand", None, tmp_path, n_boot=50)
    html = (tmp_path / "prompts" / "report.html").read_text()
    assert all(hand_mean_cov(prof, t) < 0.05 for t in TARGETS)
    assert "Stable across prompts" in result["verdict"] and "class='verdict holds'" in html


# ------------------------------------------------------------------------ the steps / scheduler study
def hand_log_map(prof: Profile, target: str, points: int = analysis.AXIS_POINTS) -> list[list[float]]:
    """Per layer: the log10 mean over prompts on the normalised step axis (NaN rows for layers whose tensor
    never changes)."""
    s = prof.n_steps - 1
    src = [j / (s - 1) for j in range(s)]
    rows = []
    for layer in range(prof.n_layers):
        ki = auto_key(prof, layer, target)
        means = [mean(over_prompts(prof, ki, step, 0)) for step in range(s)] if ki is not None else [0.0] * s
        if not any(m > 0 for m in means):
            rows.append([math.nan] * points)
            continue
        logs = [math.log10(max(m, 1e-12)) for m in means]
        rows.append([interp(src, logs, i / (points - 1)) for i in range(points)])
    return rows


def hand_change_point(curve: list[float]) -> float:
    y = [v for v in curve if math.isfinite(v)]
    n = len(y)
    best, where = math.inf, None
    for k in range(2, n - 1):
        left, right = y[:k], y[k:]
        sse = sum((v - mean(left)) ** 2 for v in left) + sum((v - mean(right)) ** 2 for v in right)
        if sse < best - 1e-12:
            best, where = sse, k
    return where / (n - 1)


def layer_mean_curve(rows):
    out = []
    for i in range(len(rows[0])):
        col = [r[i] for r in rows if math.isfinite(r[i])]
        out.append(mean(col))
    return out


@pytest.mark.parametrize("kind", ["steps", "scheduler"])
def test_steps_and_scheduler_studies_equal_a_hand_computation(tmp_path, monkeypatch, kind):
    # one model (6 layers) at 7, 12 and 23 steps (or three schedulers whose runs differ in length): the
    # distances differ in length, and are compared on the normalised step axis
    profiles = {"7": build(5, 6, 7, seed=7), "12": build(5, 6, 12, seed=12), "23": build(5, 6, 23, seed=23)}
    monkeypatch.setattr(
        study_runner, "ensure_profile", lambda out, model, variant, *a, **k: profiles[variant.split("-")[1]]
    )
    result = study_runner.study_variants(kind, "hand", {n: {} for n in profiles}, None, tmp_path)
    maps = {n: {t: hand_log_map(p, t) for t in TARGETS} for n, p in profiles.items()}
    flat = {n: {t: [v for row in m for v in row] for t, m in ms.items()} for n, ms in maps.items()}
    got_pairs = {(p["a"], p["b"], p["target"]): p for p in result["pairs"]}
    assert len(got_pairs) == 3 * 3
    overall = []
    for a, b in (("7", "12"), ("7", "23"), ("12", "23")):
        for t in TARGETS:
            p = got_pairs[(a, b, t)]
            want = pearson(flat[a][t], flat[b][t])
            assert p["overall_r"] == pytest.approx(want, abs=1e-9)
            overall.append(want)
            for layer in range(6):
                ra, rb = maps[a][t][layer], maps[b][t][layer]
                if all(math.isfinite(v) for v in ra):
                    assert p["layer_r"][layer] == pytest.approx(pearson(ra, rb), abs=1e-9)
                else:  # cross-attention K / V: never changes, no correlation to speak of
                    assert p["layer_r"][layer] is None or not math.isfinite(p["layer_r"][layer])
    assert result["r"] == pytest.approx(mean(overall), abs=1e-9)
    for n in profiles:
        for t in TARGETS:
            want = hand_change_point(layer_mean_curve(maps[n][t]))
            assert result["change_points"][n][t] == pytest.approx(want, abs=1e-12)
    html = (tmp_path / kind / "hand" / "report.html").read_text()
    assert f"r = {mean(overall):.2f}" in html


def test_change_point_on_a_known_step():
    curve = [0.0] * 20 + [1.0] * 44
    assert analysis.change_point(np.array(curve)) == pytest.approx(20 / 63)
    assert hand_change_point(curve) == pytest.approx(20 / 63)


# --------------------------------------------------------------------------------- the models study
def hand_depth_map(rows, points: int = analysis.DEPTH_POINTS):
    good = [r for r in rows if all(math.isfinite(v) for v in r)]
    src = [i / (len(good) - 1) for i in range(len(good))]
    return [
        [interp(src, [r[j] for r in good], d / (points - 1)) for j in range(len(good[0]))]
        for d in range(points)
    ]


def test_models_study_matrix_equals_a_hand_computation(tmp_path, monkeypatch):
    # three models of 5, 7 and 9 layers at 8, 11 and 15 steps
    profiles = {
        "m5": build(4, 5, 8, seed=5),
        "m7": build(6, 7, 11, seed=7, cross_every=2),
        "m9": build(3, 9, 15, seed=9),
    }
    monkeypatch.setattr(study_runner, "ensure_profile", lambda out, model, *a, **k: profiles[model])
    result = study_runner.study_models(list(profiles), None, tmp_path)
    depth = {n: {t: hand_depth_map(hand_log_map(p, t)) for t in TARGETS} for n, p in profiles.items()}
    names = list(profiles)
    off = []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                assert result["matrix"][i][j] == 1.0
                continue
            rs = [
                pearson([v for r in depth[a][t] for v in r], [v for r in depth[b][t] for v in r])
                for t in TARGETS
            ]
            assert result["matrix"][i][j] == pytest.approx(mean(rs), abs=1e-9)
            off.append(mean(rs))
    assert result["r"] == pytest.approx(mean(off), abs=1e-9)
    saved = json.loads((tmp_path / "models" / "result.json").read_text())
    assert saved["r"] == pytest.approx(mean(off), abs=1e-9)


# ------------------------------------------------------------------- ditscope show and to_pandas()
def test_to_pandas_rows_equal_the_raw_values():
    prof = build(6, 4, 9, seed=2)
    df = prof.to_pandas()
    assert len(df) == len(prof.keys) * (prof.n_steps - 1) * len(METRICS)
    rng = np.random.default_rng(0)
    for r in rng.choice(len(df), 40, replace=False):
        row = df.iloc[int(r)]
        ki = key_index(prof, int(row.layer), row.target, row.stream, row.branch)
        step, m = int(row.step), METRICS.index(row.metric)
        xs = over_prompts(prof, ki, step - 1, m)
        assert row.layer_name == f"blocks.{int(row.layer)}.attn"
        assert row.timestep == pytest.approx(prof.timesteps[step])
        assert row["mean"] == pytest.approx(mean(xs), rel=1e-6)
        assert row["std"] == pytest.approx(pop_std(xs), rel=1e-5, abs=1e-12)
        if mean(xs) == 0:
            assert math.isnan(row["cov"])
        else:
            assert row["cov"] == pytest.approx(pop_std(xs) / mean(xs), rel=1e-5)
        assert row.n == prof.n_prompts


def test_show_prints_the_hand_summary(tmp_path):
    prof = build(7, 5, 10, seed=4)
    path = prof.save(tmp_path / "p.ditscope")
    out = CliRunner().invoke(app, ["show", str(path)], terminal_width=200)
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    # the per-layer table: mean over steps of the mean over prompts, per target, and the step of the
    # smallest A distance (1-based: step s is the change from step s-1 to s)
    for layer in range(prof.n_layers):
        row = next(line for line in lines if re.match(rf"^\W*{layer}\W+blocks\.{layer}\.attn\b", line))
        cells = [c.strip() for c in re.split(r"[│|]", row) if c.strip()]
        assert cells[:2] == [str(layer), f"blocks.{layer}.attn"]
        for t, cell in zip(TARGETS, cells[2:5]):
            ki = auto_key(prof, layer, t)
            want = mean([mean(over_prompts(prof, ki, s, 0)) for s in range(prof.n_steps - 1)])
            assert float(cell) == pytest.approx(want, rel=5e-3, abs=1e-12)
        ka = auto_key(prof, layer, "a")
        a_means = [mean(over_prompts(prof, ka, s, 0)) for s in range(prof.n_steps - 1)]
        assert int(cells[5]) == a_means.index(min(a_means)) + 1
    # the CoV table: per stream and branch, per target, the mean over cells of std / mean over prompts
    for stream in ("image", "text"):
        for branch in ("cond", "uncond"):
            row = next(line for line in lines if re.search(rf"\b{stream}\W+{branch}\b", line))
            cells = [c.strip() for c in re.split(r"[│|]", row) if c.strip()][2:]
            for t, cell in zip(TARGETS, cells):
                covs = []
                for layer in range(prof.n_layers):
                    ki = key_index(prof, layer, t, stream, branch)
                    if ki is None:
                        continue
                    for s in range(prof.n_steps - 1):
                        xs = over_prompts(prof, ki, s, 0)
                        if mean(xs) != 0:
                            covs.append(pop_std(xs) / mean(xs))
                if covs:
                    assert float(cell.rstrip("%")) == pytest.approx(100 * mean(covs), abs=0.051)
                else:
                    assert cell == "-"
