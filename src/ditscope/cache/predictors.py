"""Predictors: how a cached unit's output at a served step is made from its last computed ones.

One interface for every policy that serves a unit instead of computing it: a plan's actions, FORA's and
TaylorSeer's schedules, and the calibration that measures what each predictor would get wrong. A predictor
reads the unit's history, the (step, value) pairs of its last computes (oldest first; a value is a tensor,
a tuple of them or a dict of them, with None where a module returns nothing), and returns its value at
`step`:

- `Reuse`: the last computed value (FORA, Delta-DiT, a plan's `R`);
- `Taylor(order)`: a Taylor series in the step, with finite differences of the last order + 1 computes
  standing for the derivatives (TaylorSeer; order 1 is the linear forecast, a plan's `F`; order 2 a
  plan's `T`);
- `Fitted`: the second-order Taylor series with each term scaled by a weight, y + w1 k d_1 + w2 k^2/2 d_2,
  fitted per unit, step and lag on the calibration trajectories (L2P's learned linear combination of past
  features, in units that hold at any spacing of the computes; a plan's `L`, its weights in the plan).
  Reuse is (0, 0), the linear forecast (1, 0) and the second-order one (1, 1).

A predictor given fewer computes than it reads falls back to the highest order they allow.
"""

from __future__ import annotations

import math

import torch


def tree_map(fn, *trees):
    """`fn` over matching tensors of tensors / tuples / dicts (None stays None)."""
    first = trees[0]
    if isinstance(first, tuple):
        return tuple(tree_map(fn, *parts) for parts in zip(*trees))
    if isinstance(first, dict):
        return {k: tree_map(fn, *(t[k] for t in trees)) for k in first}
    return None if first is None else fn(*trees)


class Predictor:
    """Serves a unit at `step` from `history`, its last computes [(step, value), ...] oldest first."""

    name = ""
    values = 1  # the computes it reads

    def __call__(self, history: list, step: int, weights=None):
        raise NotImplementedError

    def forecasts(self, history: list) -> bool:
        """Whether it serves anything but the last value with this history (a reuse otherwise)."""
        return self.values > 1 and len(history) > 1


class Reuse(Predictor):
    name = "reuse"

    def __call__(self, history, step, weights=None):
        return history[-1][1]


class Taylor(Predictor):
    """TaylorSeer's forecast: d_0 = y(s_n), d_{i+1}(s_n) = (d_i(s_n) - d_i(s_{n-1})) / (s_n - s_{n-1}), served
    as sum_i d_i k^i / i! at k = step - s_n."""

    def __init__(self, order: int):
        self.order = order
        self.values = order + 1
        self.name = "linear" if order == 1 else f"taylor{order}"

    def __call__(self, history, step, weights=None):
        kept = history[-self.values :]
        if len(kept) == 1:
            return kept[-1][1]
        (s0, y0), (s1, y1) = kept[-2], kept[-1]
        if len(kept) == 2 and weights is None:  # the linear forecast, in one kernel: y1 + k / gap (y1 - y0)
            ratio = (step - s1) / (s1 - s0)
            return tree_map(lambda a, b: torch.lerp(a, b, -ratio), y1, y0)
        return self.series(kept, step, weights)

    def series(self, kept: list, step: int, scale=None):
        """sum_i scale_i d_i k^i / i! over the differences of `kept` (scale_0 = 1; None: every scale 1)."""
        # the differences at each compute, built up as TaylorSeer builds them compute by compute
        diffs = [kept[0][1]]
        for (s_prev, _), (s, y) in zip(kept, kept[1:]):
            gap = s - s_prev
            new = [y]
            for d in diffs[: self.order]:
                new.append(tree_map(lambda a, b, gap=gap: (a - b) / gap, new[-1], d))
            diffs = new
        k = step - kept[-1][0]
        scale = [1.0, *(scale or [1.0] * self.order)]
        coefs = [w * k**i / math.factorial(i) for i, w in zip(range(len(diffs)), scale)]

        def add(*ds):
            out = ds[0].clone()
            for coef, d in zip(coefs[1:], ds[1:]):
                out.add_(d, alpha=coef)
            return out

        return tree_map(add, *diffs)


class Fitted(Taylor):
    """The second-order Taylor forecast with each term scaled by a weight fitted on the calibration
    trajectories: y + w1 k d_1 + w2 k^2 / 2 d_2 (`Taylor` says what the d_i are). In units of the Taylor terms
    the weights hold at any spacing of the computes (fitted where they are k apart, served k ahead). (0, 0)
    is reuse, (1, 0) the linear forecast, (1, 1) the second-order one. Without weights: the second-order
    forecast; with fewer computes, the highest order they allow."""

    name = "fitted"

    def __init__(self):
        super().__init__(2)
        self.name = "fitted"

    def __call__(self, history, step, weights=None):
        kept = history[-self.values :]
        if len(kept) == 1:
            return kept[-1][1]
        return self.series(
            kept, step, None if weights is None else [float(w) for w in weights][: len(kept) - 1]
        )


REUSE, LINEAR, TAYLOR2, FITTED = Reuse(), Taylor(1), Taylor(2), Fitted()
# a Schedule's serving actions -> their predictors (C computes)
BY_ACTION: dict[str, Predictor] = {"R": REUSE, "F": LINEAR, "T": TAYLOR2, "L": FITTED}
# the fitted predictor's weights for the predictors measured beside it, at evenly spaced computes
WEIGHTS_OF = {"reuse": (0.0, 0.0), "linear": (1.0, 0.0), "taylor2": (1.0, 1.0)}


# ---------------------------------------------------------------------------------- fitting `Fitted`
# The fit regresses r = y - y1 (what reuse gets wrong) on the Taylor terms at computes k apart served k ahead,
# k d_1 = y1 - y2 and k^2/2 d_2 = (y1 - 2 y2 + y3) / 2: least squares over every element of the calibration's
# outputs. Its sums, per model row, in this order (d1, d2 standing for the two terms):
GRAM = ("rr", "rd1", "rd2", "d1d1", "d1d2", "d2d2")


def gram_sums(r, first, second, rows: int) -> torch.Tensor:
    """The fit's sums (GRAM) per model row, (rows, 6) float64, over lists of tensors whose first dim folds onto
    the rows: what reuse gets wrong, and the two Taylor terms."""
    total = torch.zeros(rows, len(GRAM), dtype=torch.float64)
    for parts in zip(r, first, second):
        a, b, c = (t.detach().float().reshape(rows, 1, -1) for t in parts)  # views: one row per batch row
        pairs = ((a, a), (a, b), (a, c), (b, b), (b, c), (c, c))  # GRAM's order
        total += torch.cat([torch.bmm(u, v.transpose(1, 2)).flatten(1) for u, v in pairs], 1).double().cpu()
    return total


def fitted_weights(sums) -> tuple[float, float] | None:
    """The least-squares weights (w1, w2) from the fit's sums (GRAM order); None where they are not determined
    (no data, or d1 and d2 in one line)."""
    rr, rd1, rd2, d11, d12, d22 = (float(v) for v in sums)
    det = d11 * d22 - d12 * d12
    if not det > 1e-12 * (d11 + d22) ** 2 or not (d11 + d22) > 0:
        return None
    return ((rd1 * d22 - rd2 * d12) / det, (rd2 * d11 - rd1 * d12) / det)


def squared_error(sums, weights) -> float:
    """sum (r - w1 d1 - w2 d2)^2 from the fit's sums: what forecasting with `weights` gets wrong, squared."""
    rr, rd1, rd2, d11, d12, d22 = (float(v) for v in sums)
    w1, w2 = weights
    return rr - 2 * (w1 * rd1 + w2 * rd2) + w1 * w1 * d11 + 2 * w1 * w2 * d12 + w2 * w2 * d22
