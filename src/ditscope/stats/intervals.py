"""Confidence intervals over samples (prompts x seeds): how sure a bench's quality number is.

A cached image is compared with the uncached image of the same prompt and seed, so every quality
number of a setting is a mean over per-sample values (PSNR, SSIM, or the paired difference of an
attribute hit). Its 95% interval is scipy's bootstrap over those samples.
"""

from __future__ import annotations

import numpy as np


def mean_interval(
    values, level: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its percentile-bootstrap `level` interval.

    Constant values (no cached image changed: every difference 0) get the degenerate interval [v, v];
    NaNs are dropped; no values give NaNs."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return (mean, mean, mean)
    from scipy.stats import bootstrap

    ci = bootstrap(
        (x,),
        np.mean,
        confidence_level=level,
        n_resamples=n_resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
        vectorized=True,
    ).confidence_interval
    return (mean, float(ci.low), float(ci.high))


def quantile_lower_bound(values, q: float = 0.05, level: float = 0.95) -> float:
    """A distribution-free lower confidence bound of the q-quantile of what `values` were drawn from: the
    largest order statistic x_(k) with P(Binomial(n, q) >= k) >= `level` (x_(k) falls below the quantile when
    at least k of the n draws do). Fewer values than that needs (n < log(1 - level) / log(1 - q): 59 for the
    5th percentile at 95%) give their smallest, the best bound they have. NaNs are dropped; no values give NaN."""
    from scipy.stats import binom

    x = np.sort(np.asarray(values, dtype=np.float64))
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan")
    k = np.arange(1, x.size + 1)
    covered = binom.sf(k - 1, x.size, q) >= level  # P(Binomial >= k), falling in k
    return float(x[k[covered][-1] - 1] if covered.any() else x[0])
