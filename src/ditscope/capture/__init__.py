"""Capture: see which attention layer runs and what it computes, for any model that calls SDPA."""

from .recorder import DEFAULT_TARGETS, TARGETS, Recorder, Sample, find_attention_modules

__all__ = ["DEFAULT_TARGETS", "TARGETS", "Recorder", "Sample", "find_attention_modules"]
