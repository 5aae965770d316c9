"""Streaming statistics over prompts that merge exactly across shards.

Each cell of an array (one per (key, step, metric)) keeps count, mean, M2, min and max. Updating
with a batch and merging two partial results both use Chan et al.'s pairwise formula, so a run split
into shards and merged gives the same numbers as one run, up to float64 rounding.
Standard deviation is the population one (ddof=0), as numpy's default and the paper's CoV use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIELDS = ("count", "mean", "m2", "min", "max")


@dataclass
class RunningStats:
    count: np.ndarray  # int64
    mean: np.ndarray  # float64
    m2: np.ndarray  # float64, sum of squared deviations from the mean
    min: np.ndarray
    max: np.ndarray

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> RunningStats:
        return cls(
            count=np.zeros(shape, np.int64),
            mean=np.zeros(shape, np.float64),
            m2=np.zeros(shape, np.float64),
            min=np.full(shape, np.inf),
            max=np.full(shape, -np.inf),
        )

    @classmethod
    def of(cls, values: np.ndarray) -> RunningStats:
        """Statistics of a batch: `values` has the sample axis first."""
        v = np.asarray(values, np.float64)
        mean = v.mean(axis=0)
        return cls(
            count=np.full(v.shape[1:], v.shape[0], np.int64),
            mean=mean,
            m2=((v - mean) ** 2).sum(axis=0),
            min=v.min(axis=0),
            max=v.max(axis=0),
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return self.mean.shape

    def merge(self, other: RunningStats) -> RunningStats:
        """Combine two disjoint sets of samples (Chan's parallel update)."""
        if self.shape != other.shape:
            raise ValueError(f"cannot merge statistics of shapes {self.shape} and {other.shape}")
        n_a, n_b = self.count.astype(np.float64), other.count.astype(np.float64)
        n = n_a + n_b
        safe_n = np.where(n > 0, n, 1.0)
        delta = other.mean - self.mean
        mean = self.mean + delta * (n_b / safe_n)
        m2 = self.m2 + other.m2 + delta**2 * (n_a * n_b / safe_n)
        return RunningStats(
            count=self.count + other.count,
            mean=np.where(n > 0, mean, 0.0),
            m2=np.where(n > 0, m2, 0.0),
            min=np.minimum(self.min, other.min),
            max=np.maximum(self.max, other.max),
        )

    def update(self, values: np.ndarray) -> RunningStats:
        return self.merge(RunningStats.of(values))

    @property
    def std(self) -> np.ndarray:
        n = np.where(self.count > 0, self.count, 1)
        return np.sqrt(np.maximum(self.m2, 0.0) / n)

    @property
    def cov(self) -> np.ndarray:
        """Coefficient of variation std/mean; NaN where the mean is 0 (a tensor that never changes has no
        variation to speak of, and averages of CoV skip it instead of counting it as perfectly stable)."""
        mean = self.mean
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(mean != 0, self.std / np.abs(mean), np.nan)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in FIELDS}
