"""An evaluation in its own process, stopped by SIGTERM or SIGKILL after its first saved batch, resumes to the
result of an uninterrupted one (profile, bench and study have theirs in test_cli, test_bench, test_study)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ditscope.cli.main import app

ARGS = ["eval", "tiny-pixart", "--n", "40", "--steps", "2"]  # two batches (32 + 8): a state after the first


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_an_eval_process_stopped_by_a_signal_resumes_to_the_same_result(tmp_path, sig, one_thread):
    from ditscope.holds import held_env

    hold = held_env(tmp_path, "eval state saved")  # held right after its first batch is saved: a known point
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **hold)
    state_dir = tmp_path / "state"
    stopped = [*ARGS, "--state-dir", str(state_dir), "--json", str(tmp_path / "resumed.json")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditscope", *stopped],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not Path(hold["DITSCOPE_HOLD_FILE"]).exists():
        time.sleep(0.02)
    proc.send_signal(getattr(signal, sig))
    proc.wait()
    assert any(state_dir.glob("*.pt")) and not (tmp_path / "resumed.json").exists(), "it should die part-way"
    runner = CliRunner()
    result = runner.invoke(app, stopped)
    assert result.exit_code == 0 and "resuming the evaluation" in result.stderr, result.output
    assert not state_dir.exists()  # the finished evaluation leaves no state
    straight = [*ARGS, "--state-dir", str(tmp_path / "s2"), "--json", str(tmp_path / "straight.json")]
    assert runner.invoke(app, straight).exit_code == 0
    assert json.loads((tmp_path / "resumed.json").read_text()) == json.loads(
        (tmp_path / "straight.json").read_text()
    )
