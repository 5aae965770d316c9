"""The command line as a user meets it: defaults, outputs, bad input, kill and resume, torchrun."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from ditscope import Profile, zoo
from ditscope.cli.main import app

runner = CliRunner()
FAST = ["--steps", "3"]


def cli(*args, cwd=None):
    if cwd is not None:
        old = os.getcwd()
        os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        if cwd is not None:
            os.chdir(old)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_profile_with_no_arguments_writes_profile_and_figures(tmp_path):
    result = cli("profile", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / zoo.DEFAULT_MODEL
    prof = Profile.load(out / "profile.ditscope")
    assert prof.n_prompts == 8 and prof.n_steps == 20 and prof.n_layers == 16  # PixArt-shaped: 8 blocks x 2
    assert prof.meta["model"] == zoo.DEFAULT_MODEL and prof.meta["scheduler"] == "DPMSolverMultistepScheduler"
    for name in ("layers", "heatmap_k", "heatmap_v", "heatmap_a", "cov_table"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
        assert (out / "figures" / f"{name}.svg").stat().st_size > 1000
    assert not list(out.glob("*.partial"))
    # a rerun finds the finished profile and computes nothing
    again = cli("profile", cwd=tmp_path)
    assert again.exit_code == 0 and "already complete" in again.stderr


def test_prompt_formats_show_plot_merge(tmp_path):
    txt = write(tmp_path / "p.txt", "a red circle\n\na blue square\na green triangle\n")
    jsonl = write(tmp_path / "p.jsonl", '{"caption": "a red circle"}\n"a blue square"\n{"caption": "a green triangle"}\n')
    csv = write(tmp_path / "p.csv", "id,caption\n1,a red circle\n2,a blue square\n3,a green triangle\n")
    runs = {}
    for path in (txt, jsonl, csv):
        out = tmp_path / path.suffix[1:]
        args = ["profile", "--prompts", path, "--out", out, "--no-plot", *FAST]
        if path.suffix == ".csv":
            args += ["--column", "caption"]
        result = cli(*args)
        assert result.exit_code == 0, result.output
        runs[path.suffix] = Profile.load(out / "profile.ditscope")
    np.testing.assert_array_equal(runs[".txt"].values, runs[".jsonl"].values)
    np.testing.assert_array_equal(runs[".txt"].values, runs[".csv"].values)

    shards = []
    for i in range(2):
        result = cli("profile", "--prompts", txt, "--out", tmp_path / "sh", "--shard", f"{i}/2", *FAST)
        assert result.exit_code == 0, result.output
        shards.append(tmp_path / "sh" / f"profile.shard{i}of2.ditscope")
    merged = tmp_path / "merged.ditscope"
    assert cli("merge", *shards, "-o", merged).exit_code == 0
    np.testing.assert_array_equal(Profile.load(merged).values, runs[".txt"].values)

    shown = cli("show", merged)
    assert shown.exit_code == 0 and "transformer_blocks.0.attn1" in shown.stdout and "coefficient" in shown.stdout
    assert cli("plot", merged, "--out", tmp_path / "figs", "--metric", "cos").exit_code == 0
    assert (tmp_path / "figs" / "layers.svg").exists()


BAD_INPUTS = [
    (["profile", "nope/nope"], "cannot load model 'nope/nope'"),
    (["profile", "no-such-model"], "unknown model 'no-such-model'"),
    (["profile", "--prompts", "{empty}"], "has no prompts"),
    (["profile", "--prompts", "{latin1}"], "not UTF-8"),
    (["profile", "--prompts", "{missing}"], "does not exist"),
    (["profile", "--prompts", "{folder}"], "is a folder"),
    (["profile", "--steps", "1"], "at least 2"),
    (["profile", "--scheduler", "warp-drive"], "unknown scheduler 'warp-drive'"),
    (["profile", "--out", "{file}/sub"], "not writable"),
    (["profile", "--targets", "k,zz"], "--targets"),
    (["profile", "--shard", "3/2"], "--shard"),
    (["profile", "{no_transformer}"], "has no transformer"),
    (["show", "{garbage}"], "corrupt"),
    (["profile", "--prompts", "{number_line}"], "not a prompt"),
    (["profile", "--prompts", "{null_prompt}"], "not a prompt"),
    (["profile", "--device", "tpu9"], "unknown --device 'tpu9'"),
    (["profile", "--scheduler", "ddim:nonexistent_key=3"], "has no option 'nonexistent_key'"),
    (["merge", "{garbage}", "{garbage}", "-o", "{folder}"], "is a folder"),
    (["generate", "tiny-pixart", "--prompt", "x", "--steps", "0", "--out", "{folder}/x.png"], "at least 1"),
    (["eval", "tiny-pixart", "--steps", "0"], "at least 1"),
    (["plan", "tiny-pixart", "--target", "psnr=500"], "unreachable"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9 on a table\n".encode("latin-1"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "garbage.ditscope").write_bytes(b"not a profile at all")
    (tmp_path / "number.jsonl").write_text('"a red circle"\n42\n')
    (tmp_path / "null.jsonl").write_text('{"prompt": null}\n')
    pipe_dir = tmp_path / "pipe"
    pipe_dir.mkdir()
    (pipe_dir / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    names = {"empty": "empty.txt", "latin1": "latin1.txt", "missing": "missing.txt", "folder": "folder",
             "file": "file", "garbage": "garbage.ditscope", "no_transformer": "pipe", "number_line": "number.jsonl",
             "null_prompt": "null.jsonl"}
    args = [a.format(**{k: tmp_path / v for k, v in names.items()}) for a in args]
    if args[0] == "profile" and "--out" not in args:
        args += ["--out", tmp_path / "out"]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created


def test_unreadable_prompts_file(tmp_path, monkeypatch):
    from pathlib import Path

    path = write(tmp_path / "p.txt", "a red circle\n")
    real = Path.read_bytes

    def deny(self):
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    result = cli("profile", "--prompts", path, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "cannot read prompts file" in result.stderr
    assert not (tmp_path / "out").exists()


def _command(out, prompts):
    return [sys.executable, "-m", "ditscope", "profile", "--prompts", str(prompts), "--out", str(out), "--no-plot",
            "--steps", "10"]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    prompts = write(tmp_path / "p.txt", "\n".join(f"a small red circle number {i}" for i in range(8)) + "\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(out, prompts), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "profile.ditscope.partial"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (out / "profile.ditscope").exists(), "the run should die part-way"
    done_before = Profile.load(state).n_prompts
    assert 1 <= done_before < 8

    # resuming with other arguments is refused and keeps the state
    other = subprocess.run(_command(out, prompts) + ["--seed", "7"], env=env, capture_output=True, text=True)
    assert other.returncode == 2 and "different arguments" in other.stderr and state.exists()

    resumed = subprocess.run(_command(out, prompts), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(_command(tmp_path / "straight", prompts), env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    a, b = Profile.load(out / "profile.ditscope"), Profile.load(tmp_path / "straight" / "profile.ditscope")
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_allclose(a.stats.mean, b.stats.mean, rtol=1e-6)
    np.testing.assert_allclose(a.stats.std, b.stats.std, rtol=1e-6, atol=1e-12)
    assert not state.exists()


def test_torchrun_two_processes_equal_one(tmp_path):
    pytest.importorskip("torch.distributed.run")
    prompts = write(tmp_path / "p.txt", "a red circle\na blue square\na green triangle\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = ["profile", "--prompts", str(prompts), "--no-plot", "--steps", "4"]
    dist = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ditscope",
         *args, "--out", str(tmp_path / "dist")], env=env, capture_output=True, text=True, timeout=300,
    )
    assert dist.returncode == 0, dist.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "ditscope", *args, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = Profile.load(tmp_path / "dist" / "profile.ditscope"), Profile.load(tmp_path / "one" / "profile.ditscope")
    assert a.prompt_index.tolist() == [0, 1, 2]
    np.testing.assert_allclose(a.values, b.values, rtol=1e-6)
    np.testing.assert_allclose(a.stats.mean, b.stats.mean, rtol=1e-6)
    np.testing.assert_allclose(a.stats.std, b.stats.std, rtol=1e-6, atol=1e-12)
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["profile.ditscope"]


@pytest.mark.parametrize("argv,names", [
    (["bench", "tiny-pixart", "--prompt-seed", "abc"], "--prompt-seed"),
    (["profile", "--steps", "abc"], "--steps"),
    (["bench", "--no-such-option"], "--no-such-option"),
    (["show"], "path"),
    (["no-such-command"], "no-such-command"),
])
def test_usage_errors_of_the_cli_framework_are_one_line_too(argv, names, capsys, tmp_path, monkeypatch):
    """Not only ditscope's own checks: a mistyped option value is one line and exit 2, not a framed box."""
    from ditscope.cli.main import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and names in err, err
    assert list(tmp_path.iterdir()) == []
