"""A test hook: hold a run at a named point, so that a test stops it there (with a signal) instead of after a
guessed time. Off unless DITSCOPE_HOLD_AT names the point; at its DITSCOPE_HOLD_AFTER-th pass (default the
first) the run writes its pid to DITSCOPE_HOLD_FILE and waits (up to two minutes) for the signal."""

from __future__ import annotations

import os
import time
from pathlib import Path

_passes: dict[str, int] = {}


def hold(point: str) -> None:
    if os.environ.get("DITSCOPE_HOLD_AT") != point:
        return
    _passes[point] = _passes.get(point, 0) + 1
    marker = Path(os.environ["DITSCOPE_HOLD_FILE"])
    if _passes[point] != int(os.environ.get("DITSCOPE_HOLD_AFTER", "1")) or marker.exists():
        return  # not yet, or held once already (a rerun)
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.05)


def held_env(tmp_dir, point: str, after: int = 1) -> dict:
    """The environment that holds a child process at `point` (tests): marker file in `tmp_dir`."""
    return {
        "DITSCOPE_HOLD_AT": point,
        "DITSCOPE_HOLD_AFTER": str(after),
        "DITSCOPE_HOLD_FILE": str(Path(tmp_dir) / f"held-{point.replace(' ', '-')}"),
    }
