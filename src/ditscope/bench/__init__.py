"""Bench: speed against quality for every cache method, ours and the peers', on the same prompts and seeds.

    ditscope bench tiny-pixart --grid default --prompts 16 --seeds 2 --out runs/bench/tiny-pixart

`grid.py` says what runs, `runner.py` runs it (resumable), `peers/` adapts diffusers' and cache-dit's
caches, `report.py` writes the table, the Pareto plot and the image grid.
"""

from .grid import PRESETS, Setting, expand, load_grid
from .report import QUALITY_BARS, best_at_bars, table, write_outputs
from .runner import BenchInputs, run_bench

__all__ = ["PRESETS", "QUALITY_BARS", "BenchInputs", "Setting", "best_at_bars", "expand", "load_grid", "run_bench",
           "table", "write_outputs"]
