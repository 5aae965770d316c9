"""Streaming statistics: batch updates and shard merges equal one pass over all samples."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ditscope.stats import RunningStats, metrics_from_sums, reduce_sums

values = st.lists(st.floats(0.0, 1e3, allow_nan=False, width=32), min_size=1, max_size=30)


@given(values, st.integers(0, 30))
@settings(max_examples=60, deadline=None)
def test_any_split_merges_to_the_same_moments(xs, cut):
    x = np.asarray(xs, np.float64).reshape(-1, 1)
    cut = min(cut, len(xs))
    whole = RunningStats.of(x)
    parts = RunningStats.empty((1,))
    for chunk in (x[:cut], x[cut:]):
        if len(chunk):
            parts = parts.update(chunk)
    np.testing.assert_array_equal(parts.count, whole.count)
    np.testing.assert_allclose(parts.mean, x.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(parts.std, x.std(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(parts.min, x.min(0))
    np.testing.assert_array_equal(parts.max, x.max(0))


def test_cov_is_std_over_mean_and_undefined_for_zero_mean():
    s = RunningStats.of(np.array([[1.0, 0.0], [3.0, 0.0]]))
    np.testing.assert_allclose(s.cov, [0.5, np.nan])


def test_reduce_and_metrics_match_a_hand_computation():
    import torch

    g = torch.Generator().manual_seed(0)
    prev = torch.randn(2, 3, 7, 4, generator=g)
    cur = prev + 0.1 * torch.randn(2, 3, 7, 4, generator=g)
    segments = [(0, 5), (5, 7)]
    s_prev = reduce_sums(prev, None, segments).double().numpy()
    s_cur = reduce_sums(cur, prev, segments).double().numpy()
    numel = np.array([3 * 5 * 4, 3 * 2 * 4], np.float64)
    got = metrics_from_sums(s_cur, s_prev[1], s_prev[3], numel)  # (N, segments, 3)
    for n in range(2):
        for j, (a, b) in enumerate(segments):
            x, p = cur[n, :, a:b].double(), prev[n, :, a:b].double()
            l1 = (x - p).abs().mean().item()
            rel = ((x - p).abs().sum() / p.abs().sum()).item()
            cos = 1 - (x * p).sum().item() / (x.norm() * p.norm()).item()
            np.testing.assert_allclose(got[n, j], [l1, rel, cos], rtol=1e-5)


def test_reduce_sums_on_the_layouts_attention_hands_over():
    """Contiguous, permuted (the (B, H, S, D) view of a (B, S, H, D) projection), a slice of a fused QKV
    projection, one entry, bfloat16, with a scratch dict reused across calls and kept tensors in either
    layout: the four sums equal a float64 hand computation."""
    import torch

    g = torch.Generator().manual_seed(1)

    def layouts(dtype):
        yield torch.randn(2, 3, 10, 4, generator=g).to(dtype)
        yield torch.randn(2, 10, 3, 4, generator=g).to(dtype).transpose(1, 2)
        yield torch.randn(2, 10, 3, 3, 4, generator=g).to(dtype)[:, :, 1].transpose(1, 2)
        yield torch.randn(1, 10, 3, 4, generator=g).to(dtype).transpose(1, 2)

    scratch = {}
    for dtype in (torch.float32, torch.bfloat16):
        for x in layouts(dtype):
            p = (x.double() + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).to(dtype)
            for prev in (p, p.contiguous(), torch.empty_like(x).copy_(p)):
                for segments in ([(0, 10)], [(0, 6), (6, 10)]):
                    got = reduce_sums(x, prev, segments, scratch).double()
                    for j, (a, b) in enumerate(segments):
                        xs, ps = x[:, :, a:b].double(), prev[:, :, a:b].double()
                        want = torch.stack(
                            [
                                (xs - ps).abs().sum((1, 2, 3)),
                                xs.abs().sum((1, 2, 3)),
                                ((xs - ps) ** 2).sum((1, 2, 3)),
                                (xs**2).sum((1, 2, 3)),
                            ]
                        )
                        torch.testing.assert_close(got[:, :, j], want, rtol=1e-5, atol=1e-5)


def test_identical_and_zero_tensors_have_zero_distance():
    sums = np.zeros((4, 1))
    np.testing.assert_array_equal(
        metrics_from_sums(sums, np.zeros(1), np.zeros(1), np.ones(1)), [[0.0, 0.0, 0.0]]
    )


def test_bootstrap_interval_holds_the_mean_narrows_with_samples_and_is_exact_when_nothing_varies():
    from ditscope.stats import mean_interval

    rng = np.random.default_rng(0)
    small, large = rng.normal(30, 3, 25), rng.normal(30, 3, 400)
    mean, lo, hi = mean_interval(small)
    assert lo < mean < hi and mean == small.mean()
    assert 27 < lo and hi < 33  # the true mean 30 lies about 1.2 dB either side
    _, lo_l, hi_l = mean_interval(large)
    assert (hi_l - lo_l) < 0.5 * (hi - lo)  # 16x the samples: about a quarter of the width
    assert mean_interval([0.0] * 64) == (0.0, 0.0, 0.0)  # no cached image changed: no uncertainty
    assert mean_interval([1.0, np.nan, 3.0])[0] == 2.0
    assert all(np.isnan(mean_interval([])))
    assert mean_interval(small) == mean_interval(small)  # seeded: a rerun writes the same table


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=150))
def test_the_quantile_lower_bound_is_the_order_statistic_a_binomial_tail_summed_by_hand_picks(values):
    """The 5th percentile's 95% lower bound: the largest k whose chance that at least k of n draws fall below
    the quantile, sum over j >= k of C(n, j) q^j (1 - q)^(n - j), is at least 0.95; the k-th smallest value
    (the smallest when no k qualifies)."""
    import math

    from ditscope.stats.intervals import quantile_lower_bound

    n, q = len(values), 0.05
    best = 0
    for k in range(1, n + 1):
        tail = 0.0
        for j in range(k, n + 1):
            tail += math.comb(n, j) * q**j * (1 - q) ** (n - j)
        if tail >= 0.95 - 1e-12:
            best = k
    ordered = sorted(values)
    assert quantile_lower_bound(values) == (ordered[best - 1] if best else ordered[0])
    if n < 59:  # 1 - 0.95^n < 0.95: not even the smallest is a 95% bound, and it is what there is
        assert best == 0


def test_the_quantile_lower_bound_falls_below_the_true_5th_percentile_at_least_95_percent_of_the_time():
    """Coverage on draws from a known distribution (exponential, scale 3: its 5th percentile is -3 ln 0.95):
    400 samples of 120 values each."""
    from ditscope.stats.intervals import quantile_lower_bound

    rng = np.random.default_rng(5)
    truth = -3 * np.log(0.95)
    below = [quantile_lower_bound(rng.exponential(3, 120)) <= truth for _ in range(400)]
    assert 0.93 <= np.mean(below) <= 1.0
    assert np.isnan(quantile_lower_bound([np.nan]))
