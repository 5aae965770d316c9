"""The budgeted search for a quality target: at most `max_checks` end-to-end checks per plan.

Every candidate schedule (each mode's schedules over a fine grid of prices, and the fixed-interval ones) is
compiled without running it, with its predicted speedup (the cost model) and predicted error (the calibrated
errors of its served steps, summed: `search.predicted_error`). A model of the measured quality on the log of
the predicted error,

    quality = intercept + offset[group] + slope * log10(predicted error),

is fitted by least squares on the checks already run, each candidate group (mode, whether the schedule is
a fixed-interval one, and whether it forecasts any served step) with its own offset: at the same predicted
error the modules' plans held 7-16 dB more than the stack's (their error is a sum over many units) and FORA's
schedules 2-6 dB more again; the error alone ranked every candidate with Spearman -0.81 (tiny-pixart) and
-0.78 (tiny-mmdit), within one group -0.84 to -1.0, and the model fitted on one plan's 10 checks ranked them
all with 0.86-0.94 (benchmarks/RESULTS.md).
The intercept, the slope and the offsets are pulled towards priors by pseudo-observations, so that the model
is defined from the first check on: a check moves the intercept and its group's offset most of the way to it,
checks at two or more predicted errors set the slope.

The loop checks the candidate with the largest expected gain: the chance that it holds (normal, around the
model's prediction with its spread) times how much faster it is predicted than what it has to beat (the
fastest held in its group, or the fastest held in any group / CROSS_GROUP). After each check it refits, and
drops the candidates no faster than the fastest one that held in their group (only the fastest held counts),
those predicted more than CROSS_GROUP times slower than the fastest held of any group (the finalists are
timed, and the cost model's cross-mode predictions were 4-20% off: benchmarks/RESULTS.md), the searched ones
with at least the predicted error of a searched one of their group that failed (within a searched group the
predicted error ranked the measured quality with Spearman -0.84 to -1.0 on tiny-pixart and tiny-mmdit; not
the fixed-interval ones: of two with the same speed, the one with more predicted error held where the other
failed), and those predicted FAR x spread or more below the target (quality is not monotone in the predicted
error, so a candidate only a little below stays in play). A group with no check yet has GROUP_SPREAD more spread. It
stops when no candidate is left, or at the budget.

Quality is fitted on the scale the target is checked on: dB of PSNR (the mean, its lower bound or the 5th
percentile, whichever the target tests), and for SSIM -10 log10(1 - SSIM), its "dB".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

from ..cache.schedule_data import Schedule

PRIOR_INTERCEPT = 40.0  # dB at predicted error 1 (zoo models' stack plans, every candidate: 41-50)
PRIOR_INTERCEPT_SSIM = 20.0  # SSIM's "dB" there (15-25; its slope and offsets are PSNR's within 5 dB)
PRIOR_SLOPE = -15.0  # dB per decade of predicted error (zoo models, every candidate: -17 to -28 per group)
PRIOR_SPREAD = 3.0  # dB: the spread assumed before the checks measure it
WEIGHT_INTERCEPT = 0.25  # pseudo-observations of each prior: the intercept's counts only before any check
WEIGHT_SLOPE = 0.5  # ... the slope's as two checks half a decade either side of the data
WEIGHT_OFFSET = 0.25  # ... a group's offset: a quarter of a check at its prior offset
WEIGHT_SPREAD = 2.0  # ... the spread's: two residuals of PRIOR_SPREAD
# the groups' offsets before any check, in dB over the stack's searched plans: the sum of the modules' errors
# counts many units where the stack's is one, so at the same predicted error the modules' plans held 7-16 dB
# more, and the fixed-interval ones 2-6 dB more again (tiny-pixart psnr=30 and 35, tiny-mmdit psnr=30: the
# offsets fitted on every check of the price scan with one slope)
PRIOR_OFFSETS = {"stack": 0.0, "stack fixed": 2.0, "both": 0.0, "sites": 10.0, "sites fixed": 16.0}


def prior_offset(group: str) -> float:
    """A group's prior offset; a forecasting group starts at its reusing group's (the calibrated errors are
    trusted until a check says otherwise)."""
    return PRIOR_OFFSETS.get(group.removesuffix(" forecast"), 0.0)


GROUP_SPREAD = 5.0  # dB: how far a group with no check yet may be from its prior offset
SPREAD_FLOOR = 1.0  # dB: the model is never trusted closer than this
FAR = 2.5  # spreads below the target: predicted to fail, dropped
CROSS_GROUP = 1.3  # a candidate predicted this many times slower than the fastest held cannot win the timing
ERROR_FLOOR = 1e-6  # predicted errors below this count as this (a served step with no measured error)


@dataclass
class Candidate:
    mode: str  # both, stack or sites
    schedule: Schedule
    speedup: float  # predicted by the cost model
    error: float  # predicted end-to-end error (search.predicted_error)
    key: str  # Evaluations.key: identical schedules share their check
    fixed: str | None = None  # the fixed-interval schedules: "one step in N after W full"

    @cached_property
    def group(self) -> str:
        """The mode; "fixed" for a fixed-interval schedule; "forecast" when a served step is forecast."""
        forecast = any(set(row) - {"C", "R"} for row in self.schedule.rows.values())
        return self.mode + (" fixed" if self.fixed else "") + (" forecast" if forecast else "")


@dataclass
class Fit:
    """quality = intercept + offsets[group] + slope * log10(predicted error), spread: its residuals' RMS."""

    intercept: float
    slope: float
    offsets: dict[str, float]
    spread: float
    points: list = field(default_factory=list)  # [group, predicted error, measured quality] fitted on
    prior_intercept: float = PRIOR_INTERCEPT

    def value(self, group: str, error: float) -> float:
        """The predicted quality of a schedule of `group` with this predicted error."""
        offset = self.offsets.get(group, prior_offset(group))
        return self.intercept + offset + self.slope * math.log10(max(error, ERROR_FLOOR))

    def predict(self, c: Candidate) -> float:
        return self.value(c.group, c.error)

    def uncertainty(self, c: Candidate) -> float:
        """The spread of the prediction: the residuals', and GROUP_SPREAD more for a group with no check."""
        if any(g == c.group for g, _, _ in self.points):
            return self.spread
        return math.sqrt(self.spread**2 + GROUP_SPREAD**2)

    def as_meta(self) -> dict:
        rho = held_out_rank_correlation(self.points, self.prior_intercept)
        return {
            "model": "quality = intercept + offset[group] + slope * log10(predicted error)",
            "intercept": round(self.intercept, 4),
            "prior_intercept": self.prior_intercept,
            "slope": round(self.slope, 4),
            "offsets": {g: round(v, 4) for g, v in sorted(self.offsets.items())},
            "spread": round(self.spread, 4),
            "count": len(self.points),
            # Spearman of each check's measured quality and the model's prediction fitted without it
            "held_out_rank_correlation": None if rho is None else round(rho, 4),
            "points": [[g, float(f"{e:.6g}"), round(q, 4)] for g, e, q in self.points],
        }


def prior_intercept(kind: str) -> float:
    """The intercept's prior on the scale a target of this kind is fitted on."""
    return PRIOR_INTERCEPT_SSIM if kind.startswith("ssim") else PRIOR_INTERCEPT


def quality_scale(kind: str, value: float) -> float:
    """A target's or check's value on the scale the model is fitted on: dB (SSIM: -10 log10(1 - SSIM))."""
    if kind.startswith("ssim"):
        return -10 * math.log10(max(1.0 - value, 1e-10))
    return value


def fit_quality(points: list, intercept: float = PRIOR_INTERCEPT) -> Fit:
    """The model fitted on `points` [(group, predicted error, measured quality)]: least squares with the priors
    as pseudo-observations (rows sqrt(w) * (prior - parameter) = 0), solved by its normal equations."""
    groups = sorted({g for g, _, _ in points})
    n_par = 2 + len(groups)  # intercept, slope, then one offset per group
    rows, targets = [], []
    for g, e, q in points:
        row = [1.0, math.log10(max(e, ERROR_FLOOR))] + [1.0 if g == h else 0.0 for h in groups]
        rows.append(row)
        targets.append(q)
    priors = [(0, WEIGHT_INTERCEPT, intercept), (1, WEIGHT_SLOPE, PRIOR_SLOPE)]
    priors += [(2 + i, WEIGHT_OFFSET, prior_offset(g)) for i, g in enumerate(groups)]
    for j, w, value in priors:
        row = [0.0] * n_par
        row[j] = math.sqrt(w)
        rows.append(row)
        targets.append(math.sqrt(w) * value)
    ata = [[sum(r[i] * r[j] for r in rows) for j in range(n_par)] for i in range(n_par)]
    atb = [sum(r[i] * t for r, t in zip(rows, targets)) for i in range(n_par)]
    beta = _solve(ata, atb)
    fitted = Fit(
        beta[0], beta[1], dict(zip(groups, beta[2:])), PRIOR_SPREAD, [list(p) for p in points], intercept
    )
    squares = sum((q - fitted.value(g, e)) ** 2 for g, e, q in points)
    fitted.spread = max(
        SPREAD_FLOOR,
        math.sqrt((WEIGHT_SPREAD * PRIOR_SPREAD**2 + squares) / (WEIGHT_SPREAD + len(points))),
    )
    return fitted


def held_out_rank_correlation(points: list, intercept: float = PRIOR_INTERCEPT) -> float | None:
    """How well the model ranks checks it was not fitted on: Spearman's rank correlation between each check's
    measured quality and the model's prediction for it fitted on the other checks (leave one out); None with
    fewer than three checks or no spread."""
    from scipy.stats import spearmanr

    if len(points) < 3:
        return None
    predicted = [
        fit_quality(points[:i] + points[i + 1 :], intercept).value(g, e) for i, (g, e, _) in enumerate(points)
    ]
    measured = [q for _, _, q in points]
    if len(set(predicted)) < 2 or len(set(measured)) < 2:
        return None
    return float(spearmanr(predicted, measured).statistic)


def _solve(a: list, b: list) -> list:
    """a x = b by Gaussian elimination with partial pivoting (a is symmetric positive definite here)."""
    n = len(b)
    m = [list(row) + [v] for row, v in zip(a, b)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


@dataclass
class Outcome:
    held: list  # [(Candidate, row)] of the checks that held, in the order checked
    fit: Fit
    checks: int  # end-to-end checks asked for (a schedule shared by candidates counts once)
    left: int  # candidates still in play when the budget ran out (0: the search ran out of candidates)
    best_measured: float | None  # the best measured quality of any check (on the fit's scale)


def budgeted_search(
    candidates: list, check, target: float, max_checks: int, say, intercept: float = PRIOR_INTERCEPT
) -> Outcome:
    """Check at most `max_checks` of `candidates` (see the module docstring). `check(candidate)` runs it end to
    end and gives (holds, measured quality on the fit's scale, row); `target` is on that scale too, and
    `intercept` the intercept's prior."""
    results: dict[str, tuple[bool, float, dict]] = {}
    points: list = []
    best: dict[str, float] = {}  # group -> the fastest predicted speedup that held
    failed: dict[str, float] = {}  # searched groups -> the least predicted error of a check that failed
    held: list = []
    fit = fit_quality(points, intercept)

    def in_play(c: Candidate) -> bool:
        fastest = max(best.values(), default=0.0)
        return (
            c.key not in results
            and c.speedup > best.get(c.group, 0.0)
            and c.speedup * CROSS_GROUP >= fastest
            and (c.fixed or c.error < failed.get(c.group, math.inf))
            and fit.predict(c) >= target - FAR * fit.uncertainty(c)
        )

    alive = [c for c in candidates if in_play(c)]
    while alive and len(results) < max_checks:
        floor = max(1.0, max(best.values(), default=0.0) / CROSS_GROUP)

        def gain(c: Candidate, fit: Fit = fit, floor: float = floor) -> float:
            # the chance it holds x how much faster it is than what it must beat
            chance = 0.5 * math.erfc((target - fit.predict(c)) / (fit.uncertainty(c) * math.sqrt(2)))
            return chance * (c.speedup - max(best.get(c.group, 0.0), floor))

        pick = max(alive, key=lambda c: (gain(c), c.speedup))
        guess = fit.predict(pick)
        ok, quality, row = check(pick)
        results[pick.key] = (ok, quality, row)
        for c in candidates:  # every candidate with this schedule (modes can share one) has its answer
            if c.key == pick.key:
                points.append((c.group, c.error, quality))
                if ok:
                    held.append((c, row))
                    best[c.group] = max(best.get(c.group, 0.0), c.speedup)
                elif not c.fixed:
                    failed[c.group] = min(failed.get(c.group, math.inf), c.error)
        fit = fit_quality(points, intercept)
        alive = [c for c in candidates if in_play(c)]
        say(
            f"check {len(results)}/{max_checks}: {pick.group} {pick.fixed or 'searched'}, predicted "
            f"{pick.speedup:.2f}x and {guess:.1f}, measured {quality:.1f}: {'holds' if ok else 'fails'} "
            f"({len(alive)} candidates left)"
        )
    qualities = [q for _, q, _ in results.values()]
    return Outcome(held, fit, len(results), len(alive), max(qualities) if qualities else None)
