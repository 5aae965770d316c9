"""Statistics: step-to-step distances and streaming, mergeable moments over prompts."""

from .distances import METRICS, metrics_from_sums, reduce_sums
from .running import RunningStats

__all__ = ["METRICS", "RunningStats", "metrics_from_sums", "reduce_sums"]
