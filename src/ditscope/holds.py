"""A test hook: hold a run at a named point, so that a test stops it there (with a signal) instead of after a
guessed time. Off unless DITSCOPE_HOLD_AT names the point; the run then writes its pid to DITSCOPE_HOLD_FILE
once and waits (up to two minutes) for the signal."""

from __future__ import annotations

import os
import time
from pathlib import Path


def hold(point: str) -> None:
    if os.environ.get("DITSCOPE_HOLD_AT") != point:
        return
    marker = Path(os.environ["DITSCOPE_HOLD_FILE"])
    if marker.exists():  # held once already (the rerun, or a later unit)
        return
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.05)
