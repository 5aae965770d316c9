"""FLOP counting: the model's executed FLOPs per call (`count_flops=True`) and a method's scoring FLOPs
apart from them, with torch.utils.flop_counter."""

from __future__ import annotations


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: ditscope reads only the total, and the tracker's
    hooks fail under torch.inference_mode() when a module input requires grad (Mochi's rope gets a Parameter)."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flop_counter():
    """A `torch.utils.flop_counter.FlopCounterMode` that counts the total only (works under inference_mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _GlobalOnly()
    return counter


class ScoreCounter:
    def __init__(self, record):
        self.record, self.mode = record, flop_counter()

    def __enter__(self):
        self.mode.__enter__()

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.record["score_flops"] += self.mode.get_total_flops()
