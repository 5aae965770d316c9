"""Bench: speed against quality for every cache method, ours and the peers', on the same prompts and seeds.

    ditscope bench tiny-pixart --grid default --prompts 16 --seeds 2 --out runs/bench/tiny-pixart

`grid.py` says what runs (`methods()`: every method, ours and the peers', with its system), `runner.py` runs
it (resumable), `peers/` adapts diffusers', cache-dit's, SmoothCache's and T-GATE's caches, `report.py`
writes the table, the Pareto plot and the image grid.
"""

from .grid import PRESETS, Method, Setting, expand, load_grid, methods
from .report import QUALITY_BARS, best_at_bars, table, write_outputs
from .runner import BenchInputs, run_bench

__all__ = [
    "PRESETS",
    "QUALITY_BARS",
    "BenchInputs",
    "Method",
    "Setting",
    "best_at_bars",
    "expand",
    "load_grid",
    "methods",
    "run_bench",
    "table",
    "write_outputs",
]
