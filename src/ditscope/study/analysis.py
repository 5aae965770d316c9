"""The numbers behind the redundancy paper's findings, computed from profiles.

Curves are log10 distances (the paper plots them on a log scale), per layer, on a normalised step axis
(0 = the first measured step, 1 = the last) so that runs with different step counts line up. Two
profiles agree when their curves correlate (Pearson r); "overall" correlates the whole layer x step map.
"""

from __future__ import annotations

import numpy as np

from ..artifact import Profile

AXIS_POINTS = 64
DEPTH_POINTS = 8


def view(profile: Profile) -> dict:
    return profile.default_view()


def log_map(profile: Profile, target: str, metric: str = "l1", points: int = AXIS_POINTS) -> np.ndarray:
    """(layers, points) log10 mean distance, resampled onto the normalised step axis."""
    v = view(profile)
    grid = profile.grid(target, v["stream"], v["branch"], metric)  # (layers, steps - 1)
    # a layer whose tensor never changes (K, V of text in cross-attention) carries no signal: leave it out
    grid[~(np.nan_to_num(grid) > 0).any(axis=1)] = np.nan
    grid = np.log10(np.clip(grid, 1e-12, None))
    src = np.linspace(0, 1, grid.shape[1])
    dst = np.linspace(0, 1, points)
    return np.stack(
        [np.interp(dst, src, row) if np.isfinite(row).all() else np.full(points, np.nan) for row in grid]
    )


def resample_depth(m: np.ndarray, points: int = DEPTH_POINTS) -> np.ndarray:
    """Resample the layer axis onto normalised depth, so that models of different depth compare."""
    good = m[np.isfinite(m).all(1)]
    src = np.linspace(0, 1, len(good))
    dst = np.linspace(0, 1, points)
    return np.stack([np.interp(dst, src, good[:, j]) for j in range(good.shape[1])], axis=1)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a), np.ravel(b)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def change_point(curve: np.ndarray) -> float:
    """Normalised position of the largest change: the split of a two-segment piecewise-constant fit of
    the curve with the least squared error (a single mean-shift change point)."""
    y = curve[np.isfinite(curve)]
    n = len(y)
    if n < 4:
        return float("nan")
    csum, csq = np.cumsum(y), np.cumsum(y * y)
    best, where = np.inf, 0
    for k in range(2, n - 1):  # both segments at least 2 points
        left = csq[k - 1] - csum[k - 1] ** 2 / k
        rs, rq = csum[-1] - csum[k - 1], csq[-1] - csq[k - 1]
        right = rq - rs**2 / (n - k)
        if left + right < best:
            best, where = left + right, k
    return float(where / (n - 1))


def compare(profiles: dict[str, Profile], targets=("k", "v", "a"), metric: str = "l1") -> dict:
    """Within one model: pairwise correlation of profiles per layer and overall, and change points.

    Returns {"pairs": [{a, b, target, overall_r, layer_r: [...]}], "change_points": {name: {target: x}},
    "r": mean overall r over pairs and targets, "maps": {name: {target: (layers, points) log map}}}.
    """
    names = list(profiles)
    maps = {
        n: {t: log_map(p, t, metric) for t in targets if t in p.options("target")}
        for n, p in profiles.items()
    }
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for t in maps[a]:
                if t not in maps[b] or maps[a][t].shape != maps[b][t].shape:
                    continue
                layer_r = [pearson(x, y) for x, y in zip(maps[a][t], maps[b][t])]
                pairs.append(
                    {
                        "a": a,
                        "b": b,
                        "target": t,
                        "overall_r": pearson(maps[a][t], maps[b][t]),
                        "layer_r": layer_r,
                        "mean_layer_r": float(np.nanmean(layer_r)),
                    }
                )
    cps = {n: {t: change_point(np.nanmean(m, axis=0)) for t, m in ms.items()} for n, ms in maps.items()}
    rs = [p["overall_r"] for p in pairs if np.isfinite(p["overall_r"])]
    return {
        "pairs": pairs,
        "change_points": cps,
        "r": float(np.mean(rs)) if rs else float("nan"),
        "maps": maps,
    }


def cross_model(profiles: dict[str, Profile], targets=("k", "v", "a"), metric: str = "l1") -> dict:
    """Across models: correlation matrix of depth-resampled layer x step maps, averaged over targets."""
    names = list(profiles)
    maps = {
        n: {t: resample_depth(log_map(p, t, metric)) for t in targets if t in p.options("target")}
        for n, p in profiles.items()
    }
    mat = np.eye(len(names))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i < j:
                rs = [pearson(maps[a][t], maps[b][t]) for t in maps[a] if t in maps[b]]
                mat[i, j] = mat[j, i] = float(np.nanmean(rs)) if rs else np.nan
    off = mat[~np.eye(len(names), dtype=bool)]
    return {
        "names": names,
        "matrix": mat,
        "r": float(np.nanmean(off)) if off.size else float("nan"),
        "curves": {n: {t: m.mean(0) for t, m in ms.items()} for n, ms in maps.items()},
    }


def cov_over_prompts(
    profile: Profile, metric: str = "l1", n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """The paper's Table 2 with a bootstrap CI: per target, the CoV over prompts averaged over layers and
    steps (image stream, cond branch), and its BCa interval over prompt resamples.

    BCa, not the plain percentile interval: a resample repeats prompts, which lowers each cell's spread,
    so the resampled CoVs sit below the estimate and a percentile interval can miss it; BCa corrects that
    bias (from the share of resamples below the estimate) and the skew (from the leave-one-prompt-out
    jackknife)."""
    v = view(profile)
    m = profile.metrics.index(metric)
    rng = np.random.default_rng(seed)
    p = profile.n_prompts
    if p < 2:
        raise ValueError("the CoV over prompts needs at least 2 prompts")
    out = {}
    for target in profile.options("target"):
        by_layer = profile.key_rows(target, v["stream"], v["branch"])
        rows = [by_layer[layer] for layer in sorted(by_layer)]
        if not rows:
            continue
        # one layer at a time: `values[:, rows, :, m]` would put the list's axis first (numpy's rule for
        # advanced indices separated by a slice) and give (layers, prompts, steps)
        x = np.stack([profile.values[:, row, :, m] for row in rows], axis=1).astype(np.float64)  # (P, L, S)
        per_cell = _cov_cells(x)
        cov = float(np.nanmean(per_cell))
        boots = np.array([np.nanmean(_cov_cells(x[rng.integers(0, p, p)])) for _ in range(n_boot)])
        jack = np.array([np.nanmean(_cov_cells(np.delete(x, i, axis=0))) for i in range(p)])
        lo, hi = bca_interval(cov, boots, jack, level)
        out[target] = {"cov": cov, "lo": lo, "hi": hi, "per_cell": per_cell}
    return out


def bca_interval(
    estimate: float, boots: np.ndarray, jack: np.ndarray, level: float = 0.95
) -> tuple[float, float]:
    """Efron's bias-corrected and accelerated bootstrap interval from the resampled statistics `boots`
    and the leave-one-out statistics `jack`."""
    from scipy.stats import norm

    boots = boots[np.isfinite(boots)]
    if boots.size == 0 or np.all(boots == boots[0]):
        return estimate, estimate
    below = np.clip(np.mean(boots < estimate), 0.5 / boots.size, 1 - 0.5 / boots.size)
    z0 = norm.ppf(below)
    d = jack.mean() - jack
    spread = (d**2).sum()
    accel = (d**3).sum() / (6 * spread**1.5) if spread > 0 else 0.0
    z = norm.ppf([(1 - level) / 2, (1 + level) / 2])
    alpha = norm.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z)))
    lo, hi = np.percentile(boots, 100 * alpha)
    return float(lo), float(hi)


def _cov_cells(x: np.ndarray) -> np.ndarray:
    """(prompts, ...) -> the coefficient of variation over prompts of each cell (NaN where the mean is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return x.std(0) / np.abs(x.mean(0))
