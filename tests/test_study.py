"""The studies: their numbers on constructed inputs, and each command end to end on tiny-pixart."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from ditscope import Profile
from ditscope.cli.main import app
from ditscope.study import analysis

runner = CliRunner()


def test_change_point_finds_a_step():
    curve = np.r_[np.zeros(30), np.ones(34)]
    assert analysis.change_point(curve) == pytest.approx(30 / 63, abs=0.02)
    assert analysis.change_point(np.r_[np.ones(10), np.zeros(54)]) == pytest.approx(10 / 63, abs=0.02)


def test_pearson_ignores_missing_layers():
    a = np.array([[1.0, 2.0, 3.0], [np.nan, np.nan, np.nan]])
    assert analysis.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert analysis.pearson(a, -a) == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    prompts = root / "p.txt"
    prompts.write_text(
        "a large red circle on the left on a grey background\n"
        "a small blue square at the top on a black background\n"
        "a large green triangle on the right on a white background\n"
    )
    out = root / "out"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical profiles: what test_an_interrupted_study_... compares with
    # the prompts study on more prompts than tiny-pixart has attention layers (16): the case that crashed
    many = root / "many.txt"
    assert (
        runner.invoke(app, ["zoo", "prompts", "--n", "18", "--seed", "11", "--out", str(many)]).exit_code == 0
    )
    for args in (
        ["steps", "tiny-pixart", "--steps", "4,8"],
        ["scheduler", "tiny-pixart", "--schedulers", "dpm,ddim", "--steps", "6"],
        ["prompts", "tiny-pixart", "--steps", "5", "--bootstrap", "200", "--prompts", str(many)],
        ["models", "tiny-pixart", "random-pixart"],
    ):
        result = runner.invoke(
            app,
            [
                "study",
                *args,
                *([] if "--prompts" in args else ["--prompts", str(prompts)]),
                "--out",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
    torch.set_num_threads(threads)
    return out


def test_steps_study_result_and_reuse(study_dir):
    result = json.loads((study_dir / "steps" / "tiny-pixart" / "result.json").read_text())
    assert result["variants"] == ["4", "8"] and -1 <= result["r"] <= 1
    assert {p["target"] for p in result["pairs"]} == {"k", "v", "a"}
    assert all(0 <= x <= 1 for cps in result["change_points"].values() for x in cps.values())
    # a rerun reuses the saved profiles: they are not rewritten
    files = sorted((study_dir / "profiles" / "tiny-pixart").glob("steps-*/profile.ditscope"))
    before = [f.stat().st_mtime_ns for f in files]
    again = runner.invoke(
        app,
        [
            "study",
            "steps",
            "tiny-pixart",
            "--steps",
            "4,8",
            "--prompts",
            str(study_dir.parent / "p.txt"),
            "--out",
            str(study_dir),
        ],
    )
    assert again.exit_code == 0, again.output
    assert [f.stat().st_mtime_ns for f in files] == before
    # the report says which model and scheduler it measured
    html = (study_dir / "steps" / "tiny-pixart" / "report.html").read_text()
    assert (
        "model tiny-pixart; 4: 4 steps, DPMSolverMultistepScheduler; 8: 8 steps, DPMSolverMultistepScheduler"
        in html
    )
    assert "model None" not in html


def test_identical_profiles_correlate_perfectly(study_dir):
    prof = Profile.load(next((study_dir / "profiles" / "tiny-pixart").glob("steps-8-*/profile.ditscope")))
    cmp = analysis.compare({"a": prof, "b": prof})
    assert cmp["r"] == pytest.approx(1.0)


def test_prompts_study_cov_matches_hand_computation(study_dir):
    result = json.loads((study_dir / "prompts" / "result.json").read_text())
    assert result["n_prompts"] == 18
    prof = Profile.load(next((study_dir / "profiles" / "tiny-pixart").glob("default-*/profile.ditscope")))
    assert prof.n_prompts == 18 > prof.n_layers
    # hand: image-stream A of the cond branch, l1, per (layer, step) std/mean over the prompts, then the mean
    m = prof.metrics.index("l1")
    cells = []
    for i, (_layer, t, s, b) in enumerate(prof.keys):
        if (t, s, b) != ("a", "image", "cond"):
            continue
        for step in range(prof.n_steps - 1):
            xs = np.array([float(prof.values[p, i, step, m]) for p in range(prof.n_prompts)])
            cells.append(xs.std() / xs.mean())
    got = result["cov"]["a"]
    assert got["cov"] == pytest.approx(np.mean(cells), rel=1e-6)
    assert got["lo"] < got["hi"]


def test_models_study_sets_within_model_r_beside_cross_model(study_dir):
    result = json.loads((study_dir / "models" / "result.json").read_text())
    assert np.asarray(result["matrix"]).shape == (2, 2)
    tiny = next(r for r in result["within"] if r["model"] == "tiny-pixart")
    assert np.isfinite(tiny["within r (steps)"]) and np.isfinite(tiny["within r (scheduler)"])
    assert "Across models" in result["verdict"] and "within models" in result["verdict"]


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium is not installed (.ci/run installs it)"
)
@pytest.mark.parametrize("report", ["steps/tiny-pixart", "scheduler/tiny-pixart", "prompts", "models"])
def test_report_renders_in_headless_chromium(study_dir, report, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1100,1400",
            f"--screenshot={shot}",
            (study_dir / report / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10  # not a blank page
    # the embedded figures rendered: many distinct colours, not just text on white
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 50


def test_bad_study_input(tmp_path):
    bad = runner.invoke(app, ["study", "steps", "tiny-pixart", "--steps", "10", "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "at least two" in bad.output
    bad = runner.invoke(
        app, ["study", "scheduler", "tiny-pixart", "--schedulers", "dpm,nosuch", "--out", str(tmp_path / "o")]
    )
    assert bad.exit_code == 2 and "unknown scheduler" in bad.output
    bad = runner.invoke(app, ["study", "models", "tiny-pixart", "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "at least 2" in bad.output
    assert not (tmp_path / "o").exists()


def test_zoo_prompts_writes_generator_captions(tmp_path):
    out = tmp_path / "p.txt"
    assert runner.invoke(app, ["zoo", "prompts", "--n", "5", "--out", str(out)]).exit_code == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 5 and all(line.startswith("a ") and "background" in line for line in lines)
    again = tmp_path / "q.txt"
    runner.invoke(app, ["zoo", "prompts", "--n", "5", "--out", str(again)])
    assert again.read_text() == out.read_text()


def test_an_interrupted_study_resumes_to_the_uninterrupted_result(
    study_dir, tmp_path, monkeypatch, capsys, one_thread
):
    """Ctrl-C right after the study's first saved prompt: exit 130, the state is kept, and the rerun's
    result (every number of result.json) is the uninterrupted study's (study_dir's, single-threaded)."""
    from ditscope.cli.main import main
    from ditscope.profiling import artifact

    def study(out):
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "study",
                    "steps",
                    "tiny-pixart",
                    "--steps",
                    "4,8",
                    "--prompts",
                    str(study_dir.parent / "p.txt"),
                    "--out",
                    str(out),
                ]
            )
        return exit_info.value.code, capsys.readouterr().err

    real_save, saved = artifact.Profile.save, []

    def save_then_ctrl_c(self, path):
        real_save(self, path)
        saved.append(path)
        if len(saved) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(artifact.Profile, "save", save_then_ctrl_c)
    code, err = study(tmp_path / "out")
    assert (
        code == 130
        and "interrupted: 1 of 3 prompts are saved in" in err
        and "run the same command again" in err
    )
    assert str(saved[0]).endswith(".partial") and saved[0].exists()
    code, err = study(tmp_path / "out")
    assert code == 0 and "resuming" in err and "1 of 3 prompts already profiled" in err
    assert not saved[0].exists()
    resumed = json.loads((tmp_path / "out" / "steps" / "tiny-pixart" / "result.json").read_text())
    assert resumed == json.loads((study_dir / "steps" / "tiny-pixart" / "result.json").read_text())


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_study_process_stopped_by_a_signal_resumes_to_the_uninterrupted_result(
    study_dir, tmp_path, sig, capsys, one_thread
):
    """The study in its own process, stopped once its first profile state is saved: the rerun's result.json is
    the uninterrupted study's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from ditscope.cli.main import main

    args = [
        "study",
        "steps",
        "tiny-pixart",
        "--steps",
        "4,8",
        "--prompts",
        str(study_dir.parent / "p.txt"),
        "--out",
        str(tmp_path / "out"),
    ]
    from ditscope.holds import held_env

    hold = held_env(tmp_path, "profile state saved")  # held right after the first saved batch of a profile
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **hold)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditscope", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while (
        time.time() < deadline
        and proc.poll() is None
        and not (tmp_path / hold["DITSCOPE_HOLD_FILE"]).exists()
    ):
        time.sleep(0.02)
    proc.send_signal(getattr(signal, sig))
    proc.wait()
    assert proc.returncode != 0 and not (tmp_path / "out" / "steps" / "tiny-pixart" / "result.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0, capsys.readouterr().err
    resumed = json.loads((tmp_path / "out" / "steps" / "tiny-pixart" / "result.json").read_text())
    assert resumed == json.loads((study_dir / "steps" / "tiny-pixart" / "result.json").read_text())
