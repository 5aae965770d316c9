"""Statistics: step-to-step distances, streaming mergeable moments over prompts, bootstrap intervals."""

from .distances import METRICS, metrics_from_sums, reduce_sums
from .intervals import mean_interval
from .running import RunningStats

__all__ = ["METRICS", "RunningStats", "mean_interval", "metrics_from_sums", "reduce_sums"]
