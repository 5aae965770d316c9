"""The command line as a user meets it: defaults, outputs, bad input, kill and resume, torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    for name in ("layers_l1", "heatmap_k_l1", "heatmap_v_l1", "heatmap_a_l1", "cov_table_l1"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
        assert (out / "figures" / f"{name}.svg").stat().st_size > 1000
    assert not list(out.glob("*.partial"))
    # a rerun finds the finished profile and computes nothing, and its figures are up to date: none is drawn
    figures = sorted(f for f in (out / "figures").iterdir() if not f.name.startswith("."))  # not the stamp
    drawn = {f: f.stat().st_mtime_ns for f in figures}
    again = cli("profile", cwd=tmp_path)
    assert again.exit_code == 0 and "already complete" in again.stderr and "wrote" not in again.stdout
    assert f"wrote runs/{zoo.DEFAULT_MODEL}/profile.ditscope" in result.stdout
    assert (
        f"the {len(figures)} figure files in runs/{zoo.DEFAULT_MODEL}/figures are up to date" in again.stdout
    )
    assert {f: f.stat().st_mtime_ns for f in figures} == drawn
    # a figure removed, and they are drawn again
    from ditscope.cli.main import draw_figures

    calls = []

    class Recorded(Profile):
        def plot(self, folder):
            calls.append(folder)
            return figures

    figures[0].unlink()
    draw_figures(Recorded.load(out / "profile.ditscope"), out / "profile.ditscope")
    assert calls == [out / "figures"]


def test_prompt_formats_show_plot_merge(tmp_path, one_thread):
    txt = write(tmp_path / "p.txt", "a red circle\n\na blue square\na green triangle\n")
    jsonl = write(
        tmp_path / "p.jsonl",
        '{"caption": "a red circle"}\n"a blue square"\n{"caption": "a green triangle"}\n',
    )
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
    assert (
        shown.exit_code == 0
        and "transformer_blocks.0.attn1" in shown.stdout
        and "coefficient" in shown.stdout
    )
    assert cli("plot", merged, "--out", tmp_path / "figs", "--metric", "cos").exit_code == 0
    assert (tmp_path / "figs" / "layers_cos.svg").exists() and (
        tmp_path / "figs" / "cov_table_cos.csv"
    ).exists()


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


# Beyond the cases above: every command, over files, numbers, folders, model folders, profile and plan files.
MORE_BAD_INPUTS = [
    # profile: numbers and scheduler settings the scheduler cannot sample
    (["profile", "--scheduler", "ddim", "--steps", "2000"], "at or beyond the 1000 timesteps"),
    (["profile", "--steps", "100000"], "at or beyond the 1000 timesteps"),
    (["profile", "--steps", "1000"], "use fewer than 1000 steps"),
    (["profile", "--steps", "-1"], "at least 2"),
    (
        ["profile", "--scheduler", "ddim:timestep_spacing=trailingg", "--steps", "3"],
        "trailingg is not supported",
    ),
    (["profile", "--scheduler", "ddim:beta_schedule=foo", "--steps", "3"], "foo is not implemented"),
    (["profile", "--scheduler", "ddim:novalue"], "not key=value"),
    (["profile", "--batch-size", "0"], "--batch-size"),
    (["profile", "--dtype", "float8"], "unknown --dtype 'float8'"),
    (["profile", "--shard", "x"], "--shard must look like i/n"),
    (["profile", "--shard", "3/4", "--prompts", "{two}"], "shard 3 has no prompts"),
    (["profile", "--targets", ""], "--targets"),
    (["profile", "--prompts", "{csv}", "--column", "nope"], "nope"),
    (["profile", "--steps", "3", "--out", "{stale}"], "delete"),
    (["profile", "--steps", "3", "--out", "{other_state}"], "was made with different arguments"),
    (
        ["profile", "--steps", "3", "--out", "{other_final}"],
        "holds a finished profile of different arguments",
    ),
    # damaged model folders (the zoo's own pipeline class)
    (["profile", "{bad_index}"], "model_index.json"),
    (["profile", "{truncated}"], "damaged or incomplete"),
    (["profile", "{folder}"], "no model_index.json"),
    # show, merge, plot: profile and plan files that are damaged, of the wrong type, or folders
    (["show", "{folder}"], "is a folder"),
    (["show", "{plans}"], "is a folder; pass"),
    (["show", "{flipped}"], "does not match its checksum"),
    (["show", "{badtypes}"], "malformed field 'keys'"),
    (["show", "{missing}.ditscope"], "does not exist"),
    (["show", "{damaged_plan}"], "does not match its checksum"),
    (["show", "{garbage_plan}"], "not JSON"),
    (["show", "{meta_plan}"], "must be objects"),
    (["show", "{missing}.plan.json"], "does not exist"),
    (["merge", "{profile}", "-o", "{folder}/m.ditscope"], "at least two"),
    (["merge", "{profile}", "{flipped}", "-o", "{folder}/m.ditscope"], "checksum"),
    (["merge", "{profile}", "{profile}", "-o", "{folder}/m.ditscope"], "is in both"),
    (["merge", "{profile}", "{folder}", "-o", "{folder}/m.ditscope"], "is a folder"),
    (["plot", "{flipped}"], "checksum"),
    (["plot", "{badtypes}"], "corrupt"),
    (["plot", "{profile}", "--metric", "foo"], "unknown metric 'foo'"),
    (["plot", "{profile}", "--out", "{file}"], "not a folder"),
    # generate
    (["generate", "tiny-pixart", "--prompt", "x", "--out", "{folder}/x.txt"], "use an image file name"),
    (["generate", "tiny-pixart", "--prompt", "x", "--steps", "-1", "--out", "{folder}/x.png"], "at least 1"),
    (
        ["generate", "tiny-pixart", "--prompt", "x", "--steps", "5000", "--out", "{folder}/x.png"],
        "at or beyond",
    ),
    (["generate", "tiny-pixart", "--prompt", "x", "--out", "{file}/x.png"], "not a folder"),
    (["generate", "tiny-pixart", "--prompt", "x", "--upscale", "0", "--out", "{folder}/x.png"], "--upscale"),
    (["generate", "tiny-pixart", "--prompt", "x", "--cache", "nope", "--out", "{folder}/x.png"], "nope"),
    (
        [
            "generate",
            "tiny-pixart",
            "--prompt",
            "x",
            "--cache",
            "plan",
            "--cache-opt",
            "path={damaged_plan}",
            "--out",
            "{folder}/x.png",
        ],
        "does not match its checksum",
    ),
    (["generate", "{truncated}", "--prompt", "x", "--out", "{folder}/x.png"], "damaged or incomplete"),
    # eval
    (["eval", "tiny-pixart", "--n", "1"], "--n must be at least 2"),
    (["eval", "tiny-pixart", "--objects", "3"], "--objects"),
    (["eval", "tiny-pixart", "--json", "{file}/r.json"], "choose another --json"),
    (["eval", "tiny-pixart", "--state-dir", "{file}"], "choose another --state-dir"),
    (["eval", "tiny-pixart", "--steps", "-1"], "at least 1"),
    (["eval", "tiny-pixart", "--steps", "5000"], "at or beyond"),
    (["eval", "{bad_index}"], "model_index.json"),
    (["eval", "tiny-pixart", "--json", "{file}/r.json"], "not a folder"),
    # bench
    (["bench", "tiny-pixart", "--prompts", "0"], "at least 1"),
    (["bench", "tiny-pixart", "--steps", "1"], "at least 2"),
    (["bench", "tiny-pixart", "--steps", "5000", "--methods", "fora"], "at or beyond"),
    (["bench", "tiny-pixart", "--methods", "nope"], "nope"),
    (["bench", "tiny-pixart", "--grid", "{missing}.json"], "nor a file"),
    (["bench", "tiny-pixart", "--prompt-file", "{empty}"], "has no prompts"),
    (["bench", "tiny-pixart", "--prompt-file", "{two}", "--prompts", "5"], "holds 2 prompts"),
    (["bench", "tiny-pixart", "--calibration-seed", "3000"], "must differ"),
    (["bench", "{truncated}"], "damaged or incomplete"),
    (["bench", "tiny-pixart", "--out", "{file}"], "not a folder"),
    # plan
    (["plan", "tiny-pixart", "--granularity", "nope"], "--granularity"),
    (["plan", "tiny-pixart", "--modes", "stack,blocks"], "--modes takes a comma list"),
    (["plan", "tiny-pixart", "--iterations", "2"], "--iterations must be at least 3"),
    (["plan", "tiny-pixart", "--max-checks", "0"], "--max-checks must be at least 1"),
    (["plan", "tiny-pixart", "--max-checks", "-3"], "--max-checks must be at least 1"),
    (["plan", "tiny-pixart", "--target", "lpips=3"], "lpips"),
    (["plan", "tiny-pixart", "--out", "{folder}"], "is a folder"),
    (["plan", "tiny-pixart", "--steps", "5000", "--out", "{folder}/p.plan.json"], "at or beyond"),
    (["plan", "tiny-pixart", "--n-prompts", "0"], "at least 1"),
    (["plan", "tiny-pixart", "--prompts", "{empty}", "--out", "{folder}/p.plan.json"], "has no prompts"),
    (["plan", "{bad_index}", "--out", "{folder}/p.plan.json"], "model_index.json"),
    (["plan", "tiny-pixart", "--target", "psnr=30", "--speedup", "2"], "both say what to plan for"),
    # issue 38's own table: every class refused before any work, one line, nothing written
    (["plan", "tiny-pixart", "--target", "psnr=nan"], "unreachable"),
    (["plan", "tiny-pixart", "--target", "psnr=-3"], "unreachable"),
    (["plan", "tiny-pixart", "--target", "speedup=0.5"], "unreachable"),
    (["plan", "tiny-pixart", "--target", "ssim=1.5"], "unreachable"),
    (["plan", "tiny-pixart", "--target", "psnr"], "unknown target"),
    (["plan", "tiny-pixart", "--target", "psnr=abc"], "is not a number"),
    (["plan", "tiny-pixart", "--batch-size", "0"], "at least 1"),
    (["plan", "tiny-pixart", "--steps", "1"], "at least 2"),
    (["plan", "tiny-pixart", "--modes", ","], "--modes takes a comma list"),
    (["plan", "tiny-pixart", "--granularity", ""], "--granularity"),
    (["plan", "tiny-pixart", "--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
    (["tune", "tiny-pixart", "--method", "nope"], "unknown method 'nope'"),
    (["tune", "tiny-pixart", "--method", "fora", "--knob", "nope"], "has no option 'nope'"),
    (["tune", "tiny-pixart", "--method", "fora", "--target", "flops=2"], "flops= is for ditscope plan"),
    (["tune", "tiny-pixart", "--method", "fora", "--target", "psnr=nan"], "unreachable"),
    (["tune", "tiny-pixart", "--method", "plan"], "no knob to tune"),
    (["tune", "tiny-pixart", "--method", "toca", "--cache-opt", "ratio=nan"], "ratio expects a float"),
    (
        ["tune", "tiny-pixart", "--method", "toca", "--cache-opt", "ratio=NaN"],
        "ToCaConfig.ratio must be a finite",
    ),
    (["tune", "tiny-pixart", "--method", "toca", "--cache-opt", "warmup=-1"], "must be a finite number >= 0"),
    (
        ["tune", "tiny-pixart", "--method", "toca", "--knob", "ratio", "--cache-opt", "interval=2.5"],
        "expects a int",
    ),
    (
        ["tune", "tiny-pixart", "--method", "fora", "--guidance-scale", "-2"],
        "--guidance-scale must be a finite",
    ),
    (["bench", "tiny-pixart", "--methods", ","], "names no method"),
    (["bench", "tiny-pixart", "--grid", "{emptygrid}"], "names no method"),
    (["bench", "tiny-pixart", "--grid", "{emptylist}"], "has no settings"),
    (["bench", "tiny-pixart", "--grid", "{emptyvalues}"], "empty list of values"),
    (["bench", "tiny-pixart", "--grid", "{badvalue}"], "interval"),
    (["bench", "tiny-pixart", "--grid", "{nanvalue}"], "threshold"),
    (["bench", "tiny-pixart", "--grid", "{reversed}"], "spatial_range"),
    (["study", "steps", "--steps", "10,10,20"], "names a value twice"),
    (["study", "steps", "--steps", "10,,20"], "comma-separated integers"),
    (["study", "scheduler", "--schedulers", "dpm,ddim:beta_schedule=bogus"], "bogus is not implemented"),
    (
        [
            "generate",
            "tiny-pixart",
            "--prompt",
            "a",
            "--out",
            "{folder}/x.png",
            "--cache",
            "plan",
            "--cache-opt",
            "path={norows}",
        ],
        "at least one row",
    ),
    (
        [
            "generate",
            "tiny-pixart",
            "--prompt",
            "a",
            "--out",
            "{folder}/x.png",
            "--cache",
            "plan",
            "--cache-opt",
            "path={emptyrow}",
        ],
        "non-empty string",
    ),
    (
        [
            "generate",
            "tiny-pixart",
            "--prompt",
            "a",
            "--out",
            "{folder}/x.png",
            "--cache",
            "plan",
            "--cache-opt",
            "path={profile}",
        ],
        "is not a plan file",
    ),
    (
        [
            "generate",
            "tiny-pixart",
            "--prompt",
            "a",
            "--out",
            "{folder}/x.png",
            "--cache",
            "plan",
            "--cache-opt",
            "path={plan}",
            "--cache-opt",
            "tolerance=-1",
        ],
        "tolerance must be a finite number",
    ),
    (
        [
            "generate",
            "tiny-pixart",
            "--prompt",
            "a",
            "--out",
            "{folder}/x.png",
            "--cache",
            "fbcache",
            "--cache-opt",
            "threshold=-0.1",
        ],
        "FBCacheConfig.threshold must be a finite number >= 0",
    ),
    (
        [
            "generate",
            "tiny-pixart",
            "--prompt",
            "a",
            "--out",
            "{folder}/x.png",
            "--cache",
            "pab",
            "--cache-opt",
            "cross_range=[900,100]",
        ],
        "cross_range must be (low, high)",
    ),
    (
        [
            "generate",
            "tiny-pixart",
            "--prompt",
            "a",
            "--out",
            "{folder}/x.png",
            "--cache",
            "taylorseer",
            "--cache-opt",
            "order=-1",
        ],
        "order",
    ),
    (["show", "{norows}"], "at least one row"),
    (["plan", "tiny-pixart", "--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["plan", "tiny-pixart", "--guidance-scale", "-1"], "--guidance-scale must be a finite number"),
    (["plan", "tiny-pixart", "--target", ""], "unknown target ''"),
    (["plan", "tiny-pixart", "--prompt-seed", "-1"], "--prompt-seed must be 0 or more"),
    (["tune", "tiny-pixart", "--prompt-seed", "-3"], "--prompt-seed must be 0 or more"),
    (["plan", "tiny-pixart", "--prompts", "{two}", "--n-prompts", "5"], "--n-prompts 5 but"),
    (["tune", "tiny-pixart", "--prompts", "{two}", "--n-prompts", "3"], "--n-prompts 3 but"),
    (
        ["plan", "tiny-pixart", "--prompts", "{two}", "--prompt-seed", "123"],
        "--prompt-seed draws zoo prompts",
    ),
    (["tune", "tiny-pixart", "--prompts", "{two}", "--prompt-seed", "5"], "--prompt-seed draws zoo prompts"),
    (
        ["bench", "tiny-pixart", "--prompt-file", "{two}", "--prompt-seed", "5"],
        "--prompt-seed draws zoo prompts",
    ),
    (
        ["bench", "tiny-pixart", "--steps", "4", "--guidance-scale", "nan"],
        "--guidance-scale must be a finite number",
    ),
    (
        ["bench", "tiny-pixart", "--steps", "4", "--grid", "{steps100}"],
        "fewer than the bench's 4 steps, not 100",
    ),
    (
        ["generate", "tiny-pixart", "--prompt", "x", "--guidance-scale", "nan"],
        "--guidance-scale must be a finite",
    ),
    (
        [
            "generate",
            "tiny-pixart",
            "--prompt",
            "x",
            "--cache",
            "fora",
            "--cache-opt",
            "interval=3",
            "--cache-opt",
            "interval=4",
        ],
        "--cache-opt interval is given more than once",
    ),
    (["study", "scheduler", "tiny-pixart", "--schedulers", "dpm,dpm"], "names dpm more than once"),
    (["study", "models", "tiny-pixart", "tiny-pixart"], "names tiny-pixart more than once"),
    (
        ["tune", "tiny-pixart", "--method", "fora", "--guidance-scale", "inf"],
        "--guidance-scale must be a finite",
    ),
    # study: input checked before any profile is computed
    (["study", "prompts", "--prompts", "{one}"], "needs at least 2"),
    (["study", "prompts", "--bootstrap", "5"], "--bootstrap"),
    (["study", "prompts", "{truncated}", "--prompts", "{two}"], "damaged or incomplete"),
    (["study", "models", "tiny-pixart", "no-such-model"], "unknown model 'no-such-model'"),
    (["study", "models", "tiny-pixart", "nope/nope"], "cannot load model 'nope/nope'"),
    (["study", "models", "tiny-pixart"], "at least 2 models"),
    (["study", "steps", "--steps", "10"], "at least two step counts"),
    (["study", "steps", "--steps", "a,b"], "comma-separated integers"),
    (["study", "scheduler", "--schedulers", "ddim"], "at least two schedulers"),
    (["study", "scheduler", "--schedulers", "ddim,warp"], "unknown scheduler 'warp'"),
    (["study", "scheduler", "--steps", "1"], "at least 2"),
    # zoo
    (["zoo", "prompts", "--out", "{folder}"], "is a folder"),
    (["zoo", "prompts", "--out", "{folder}/p.txt", "--n", "0"], "--n must be at least 1"),
    (["zoo", "train", "nope"], "no training recipe"),
    (["zoo", "grid", "tiny-pixart", "--out", "{file}/g.png"], "not a folder"),
]


def _bad_input_files(tmp_path):
    """The files the bad-input cases name as {placeholders}."""
    import json

    from ditscope.cache.schedule_data import Schedule
    from ditscope.capture.recorder import Sample

    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9 on a table\n".encode("latin-1"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "steps100.json").write_text('{"steps": [100]}')
    (tmp_path / "garbage.ditscope").write_bytes(b"not a profile at all")
    (tmp_path / "number.jsonl").write_text('"a red circle"\n42\n')
    (tmp_path / "null.jsonl").write_text('{"prompt": null}\n')
    (tmp_path / "one.txt").write_text("a red circle\n")
    (tmp_path / "two.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "p.csv").write_text("id,caption\n1,a red circle\n")
    pipe_dir = tmp_path / "pipe"
    pipe_dir.mkdir()
    (pipe_dir / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    # a profile, one with a flipped data byte, one whose header field has the wrong type (checksum made to fit)
    keys = [(0, "k", "image", "cond"), (1, "a", "image", "cond")]
    rng = np.random.default_rng(0)
    sample = Sample({k: rng.random((1, 2, 3)).astype(np.float32) for k in keys}, [999.0, 500.0, 1.0], 1)
    good = Profile.from_sample(sample, ["b.0.attn1", "b.1.attn1"], [0], {"model": "m"}).save(
        tmp_path / "p.ditscope"
    )
    data = bytearray(good.read_bytes())
    data[-8] ^= 0x10
    (tmp_path / "flipped.ditscope").write_bytes(bytes(data))
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from ditscope.profiling.artifact import checksum

    with safe_open(str(good), "np") as f:
        header = dict(f.metadata(), keys='"k"')
    tensors = load_file(str(good))
    save_file(
        tensors,
        str(tmp_path / "badtypes.ditscope"),
        metadata=dict(header, checksum=checksum(tensors, header)),
    )
    # output folders holding a damaged saved state, the state of another run, a finished profile of another run
    for name, file, content in (
        ("stale", "profile.ditscope.partial", b"cut sho"),
        ("other_state", "profile.ditscope.partial", good.read_bytes()),
        ("other_final", "profile.ditscope", good.read_bytes()),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_bytes(content)
    # plans: good, damaged (an action changed), not JSON, a meta of the wrong type, a folder of plans
    plan = Schedule({"stack": "CCRCR"}, {"target": "psnr=30"}).save(tmp_path / "good.plan.json")
    (tmp_path / "damaged.plan.json").write_text(plan.read_text().replace('"CCRCR"', '"CRRRR"'))
    (tmp_path / "garbage.plan.json").write_text('{"format": "ditscope-plan", "rows"')
    (tmp_path / "meta.plan.json").write_text(
        json.dumps(
            {"format": "ditscope-plan", "format_version": 1, "rows": {"stack": "CR"}, "meta": {"model": "x"}}
        )
    )
    (tmp_path / "plans").mkdir()
    Schedule({"stack": "CCRCR"}).save(tmp_path / "plans" / "a.plan.json")
    for name, rows in (("norows", {}), ("emptyrow", {"stack": ""})):  # hand-written: Schedule refuses both
        (tmp_path / f"{name}.plan.json").write_text(
            json.dumps({"format": "ditscope-plan", "format_version": 1, "rows": rows, "meta": {}})
        )
    for name, grid in (
        ("emptygrid", {}),
        ("emptylist", {"fora": []}),
        ("emptyvalues", {"toca": {"ratio": []}}),
        ("badvalue", {"fora": [{"interval": 0}]}),
        ("nanvalue", {"fbcache": [{"threshold": "nan"}]}),
        ("reversed", {"pab": [{"spatial_range": [800, 100]}]}),
    ):
        (tmp_path / f"{name}.json").write_text(json.dumps(grid))
    # the zoo's pipeline folder, damaged: model_index.json cut short; weights cut short
    assets = zoo.ASSETS / "tiny-pixart"
    for name in ("bad_index", "truncated"):
        folder = tmp_path / name
        (folder / "transformer").mkdir(parents=True)
        for part in ("scheduler", "text_encoder", "tokenizer"):
            (folder / part).symlink_to(assets / part)
        (folder / "transformer" / "config.json").write_bytes(
            (assets / "transformer" / "config.json").read_bytes()
        )
        index = (assets / "model_index.json").read_text()
        (folder / "model_index.json").write_text(index[: len(index) // 2] if name == "bad_index" else index)
    weights = assets / "transformer" / "diffusion_pytorch_model.safetensors"
    (tmp_path / "bad_index" / "transformer" / weights.name).symlink_to(weights)
    with open(weights, "rb") as f:
        (tmp_path / "truncated" / "transformer" / weights.name).write_bytes(f.read(65536))
    names = {
        "empty": "empty.txt",
        "latin1": "latin1.txt",
        "missing": "missing.txt",
        "folder": "folder",
        "file": "file",
        "garbage": "garbage.ditscope",
        "no_transformer": "pipe",
        "number_line": "number.jsonl",
        "null_prompt": "null.jsonl",
        "one": "one.txt",
        "two": "two.txt",
        "csv": "p.csv",
        "profile": "p.ditscope",
        "flipped": "flipped.ditscope",
        "badtypes": "badtypes.ditscope",
        "plan": "good.plan.json",
        "damaged_plan": "damaged.plan.json",
        "garbage_plan": "garbage.plan.json",
        "meta_plan": "meta.plan.json",
        "plans": "plans",
        "bad_index": "bad_index",
        "truncated": "truncated",
        "stale": "stale",
        "other_state": "other_state",
        "other_final": "other_final",
        "norows": "norows.plan.json",
        "emptyrow": "emptyrow.plan.json",
        "emptygrid": "emptygrid.json",
        "emptylist": "emptylist.json",
        "emptyvalues": "emptyvalues.json",
        "badvalue": "badvalue.json",
        "nanvalue": "nanvalue.json",
        "reversed": "reversed.json",
        "steps100": "steps100.json",
    }
    return {k: tmp_path / v for k, v in names.items()}


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "args,message", BAD_INPUTS + MORE_BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS + MORE_BAD_INPUTS]
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, args, message):
    files = _bad_input_files(tmp_path)
    args = [a.format(**files) for a in args]
    if args[0] == "profile" and "--out" not in args:
        args += ["--out", tmp_path / "out"]
    before = _tree(tmp_path)
    result = cli(*args, cwd=tmp_path)  # in the test's folder: default outputs (runs/, plans/) land there
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line
    assert "Traceback" not in result.output
    assert _tree(tmp_path) == before  # nothing created


def test_an_error_after_the_progress_bar_started_is_one_line(tmp_path, monkeypatch):
    """The bar is removed before the error is printed (a frozen bar and the error would be two lines)."""
    from ditscope.errors import DitscopeError
    from ditscope.profiling import runner as profiling_runner

    def fail(*args, **kwargs):
        raise DitscopeError("NaN or inf in K of layer x at step 1")

    monkeypatch.setattr(profiling_runner.Profile, "from_sample", fail)
    prompts = write(tmp_path / "p.txt", "a red circle\n")
    result = cli("profile", "--prompts", prompts, "--out", tmp_path / "out", "--steps", "3")
    assert result.exit_code == 2 and result.stderr == "error: NaN or inf in K of layer x at step 1\n", (
        result.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


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


# eight prompts: the run is held after the first is saved (ditscope.holds) and signalled there (the CI failures
# this was first meant for were an ignored SIGINT: see the launcher below)
SIGNAL_PROMPTS = [
    f"a {size} {colour} circle on a grey background"
    for size in ("small", "large")
    for colour in ("red", "blue", "green", "yellow")
]


def _command(out, prompts):
    return ["profile", "--prompts", str(prompts), "--out", str(out), "--no-plot", "--steps", "8"]


def _main(argv, capsys):
    """`ditscope ARGV` in this process, as the console script runs it: (exit code, stderr)."""
    from ditscope.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The profile of SIGNAL_PROMPTS by one run, single-threaded."""
    import torch

    root = tmp_path_factory.mktemp("uninterrupted")
    prompts = write(root / "p.txt", "\n".join(SIGNAL_PROMPTS) + "\n")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli(*_command(root / "out", prompts)).exit_code == 0
    finally:
        torch.set_num_threads(before)
    return Profile.load(root / "out" / "profile.ditscope")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_run_stopped_by_a_signal_resumes_to_the_uninterrupted_result(
    tmp_path, sig, capsys, one_thread, uninterrupted
):
    """Stopped after its first saved prompt (a separate process, one thread), rerun here with one thread:
    the profile is bit-identical to an uninterrupted one. Ctrl-C says what was kept and how to resume."""
    prompts = write(tmp_path / "p.txt", "\n".join(SIGNAL_PROMPTS) + "\n")
    n = len(SIGNAL_PROMPTS)
    from ditscope.holds import held_env

    hold = held_env(tmp_path, "profile state saved")  # held right after its first saved prompt: a known point
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **hold)
    out = tmp_path / "killed"
    # a shell that starts a job in the background (`bash .ci/run &`, nohup) makes it ignore SIGINT, and a
    # Python started with SIGINT ignored keeps ignoring it: give the child Ctrl-C's handler, as a terminal would
    launcher = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from ditscope.cli.main import main; main()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, *_command(out, prompts)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = out / "profile.ditscope.partial"
    deadline = time.time() + 240
    while not Path(hold["DITSCOPE_HOLD_FILE"]).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    err = proc.communicate()[1]
    assert state.exists() and not (out / "profile.ditscope").exists(), (
        f"the run should die part-way (exit {proc.returncode}): {err[-1500:]}"
    )
    done_before = Profile.load(state).n_prompts
    assert 1 <= done_before < n
    if sig in (signal.SIGINT, signal.SIGTERM):  # SIGTERM takes Ctrl-C's path, with its own exit code
        assert proc.returncode == (130 if sig == signal.SIGINT else 143)
        assert err.strip().splitlines()[-1] == (
            f"interrupted: {done_before} of {n} prompts are saved in {state}; "
            "run the same command again to resume"
        ), err

    # resuming with other arguments is refused and keeps the state
    code, err = _main(_command(out, prompts) + ["--seed", "7"], capsys)
    assert code == 2 and "different arguments" in err and state.exists()

    code, err = _main(_command(out, prompts), capsys)
    assert code == 0 and f"resuming {state}: {done_before} of {n} prompts already profiled" in err, err
    a, b = Profile.load(out / "profile.ditscope"), uninterrupted
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
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "ditscope",
            *args,
            "--out",
            str(tmp_path / "dist"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dist.returncode == 0, dist.stderr[-2000:]
    single = subprocess.run(
        [sys.executable, "-m", "ditscope", *args, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = (
        Profile.load(tmp_path / "dist" / "profile.ditscope"),
        Profile.load(tmp_path / "one" / "profile.ditscope"),
    )
    assert a.prompt_index.tolist() == [0, 1, 2]
    np.testing.assert_allclose(a.values, b.values, rtol=1e-6)
    np.testing.assert_allclose(a.stats.mean, b.stats.mean, rtol=1e-6)
    np.testing.assert_allclose(a.stats.std, b.stats.std, rtol=1e-6, atol=1e-12)
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["profile.ditscope"]


@pytest.mark.parametrize(
    "argv,names",
    [
        (["bench", "tiny-pixart", "--prompt-seed", "abc"], "--prompt-seed"),
        (["profile", "--steps", "abc"], "--steps"),
        (["bench", "--no-such-option"], "--no-such-option"),
        (["show"], "path"),
        (["no-such-command"], "no-such-command"),
    ],
)
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


# ------------------------------------------------------------------------------------ the first hour
def test_version_and_help_without_value_placeholders_on_flags():
    import ditscope

    result = cli("--version")
    assert result.exit_code == 0 and result.stdout == f"ditscope {ditscope.__version__}\n"
    shown = cli("generate", "--help").stdout
    assert "--cache-stats" in shown and "<int>" in shown  # options that take a value still say which
    assert "<bool>" not in shown


def _commands(group, path=()):
    """Every command of the CLI, as the words that name it: ("plan",), ("study", "steps"), ..."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name)


def test_every_option_help_is_shown_whole():
    """Each option's and argument's help text appears in full in its command's `--help`, read with the table's
    borders and line breaks taken out: rich took "[default: ...]" for markup and dropped it, so the defaults
    written that way were never shown."""
    import typer

    from ditscope.cli.main import app

    def words(text):
        return " ".join(text.replace("│", " ").split())

    root = typer.main.get_command(app)
    commands = list(_commands(root))
    assert ("plan",) in commands and ("study", "steps") in commands
    for path in commands:
        command = root
        for name in path:
            command = command.commands[name]
        shown = words(cli(*path, "--help").stdout)
        for param in command.params:
            if getattr(param, "help", None):
                assert words(param.help) in shown, (path, param.help)


def _no_loading(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--cache", "tocca"], "unknown cache method 'tocca'; did you mean toca?"),
        (
            ["--cache", "toca", "--cache-opt", "intervall=3"],
            "has no option 'intervall'; did you mean interval? (options: ratio, interval,",
        ),
        (["--cache", "fora", "--cache-opt", "interval=abc"], "fora option interval expects"),
        (["--cache", "toca", "--cache-opt", "ratio=2"], "0 <= ratio <= 1"),
        (["--cache", "plan", "--cache-opt", "path=missing.plan.json"], "missing.plan.json does not exist"),
        (["--out", "x.mp4"], "--out x.mp4: use an image file name"),
        (
            ["--cache", "p.plan.json"],
            "p.plan.json is a plan, not a tuned config: run it with --cache plan --cache-opt path=p.plan.json",
        ),
        (["--cache", "unknown.json"], "the tuned config names an unknown method 'tocaa'; did you mean toca?"),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, list) else None,
)
def test_generate_refuses_bad_input_before_the_model_loads(tmp_path, monkeypatch, args, message):
    import json

    from ditscope import Schedule
    from ditscope.cli import generate as generate_command

    monkeypatch.setattr(generate_command, "load_model", _no_loading)
    Schedule({"stack": "CCR"}).save(tmp_path / "p.plan.json")
    (tmp_path / "unknown.json").write_text(
        json.dumps({"format": "ditscope-tuned", "version": 1, "method": "tocaa", "options": {}})
    )
    before = _tree(tmp_path)
    result = cli("generate", "tiny-pixart", "--prompt", "x", *args, cwd=tmp_path)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, (
        result.output
    )
    assert _tree(tmp_path) == before


def test_generate_writes_a_default_file_and_says_what_ditscope_warned(tmp_path):
    """No --out: MODEL.png. A plan made for 8 steps under another scheduler, run at 4: both warnings reach stderr."""
    from ditscope import Schedule

    Schedule({"stack": "CCRCRCRR"}, meta={"scheduler": "OtherScheduler"}).save(tmp_path / "p.plan.json")
    result = cli(
        "generate",
        "tiny-pixart",
        "--prompt",
        "a red circle",
        "--steps",
        "4",
        "--cache",
        "plan",
        "--cache-opt",
        "path=p.plan.json",
        cwd=tmp_path,
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny-pixart.png").is_file() and "wrote tiny-pixart.png" in result.stdout
    lines = result.stderr.splitlines()
    assert any(line.startswith("warning: plan made for 8 steps resampled to 4") for line in lines), lines
    assert any(line.startswith("warning: plan made under OtherScheduler runs under") for line in lines), lines
    assert all(line.startswith("warning: ") for line in lines), lines  # other libraries' warnings stay out


def test_generate_names_a_video_by_the_model_as_a_gif(tmp_path):
    result = cli("generate", "tiny-latte", "--prompt", "a red circle", "--steps", "2", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-latte.gif"]


def test_progress_without_a_terminal_is_a_plain_line_every_interval(capsys, monkeypatch):
    from rich.progress import Progress

    from ditscope.runtime import PlainProgress, PlainStatus, progress_bar, progress_status

    now = [0.0]
    with PlainProgress("checks", interval=10, clock=lambda: now[0]) as bar:
        task = bar.add_task("plan", total=40)
        for _ in range(3):
            now[0] += 7
            bar.advance(task)
    assert capsys.readouterr().err.splitlines() == [
        "plan: 2/40 checks, 0:14 elapsed, ETA 4:26",  # 10 s after the start, at the next call
        "plan: 3/40 checks, 0:21 elapsed, ETA 4:19",  # the final state
    ]
    with PlainStatus("planning", interval=10, clock=lambda: now[0]) as status:
        status.update("planning: calibration")
        now[0] += 3600
        status.update("planning: both: price 10^-1.00")
    assert capsys.readouterr().err == "planning: both: price 10^-1.00, 1:00:00 elapsed\n" * 2
    with pytest.raises(KeyError), PlainProgress("steps", clock=lambda: now[0]) as bar:
        bar.add_task("profiling", total=4)
        raise KeyError  # an error is the last line: no final state after it
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # stderr is a log file: plain lines
    assert isinstance(progress_bar("steps"), PlainProgress) and isinstance(progress_status("x"), PlainStatus)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # a terminal: rich's bar, as before
    assert isinstance(progress_bar("steps"), Progress) and not isinstance(progress_status("x"), PlainStatus)


# each handled signal once (the handling is the CLI's, shared by every command: the profile's test above takes
# all three), and the kill, which no handler sees, on both
@pytest.mark.parametrize(
    "sig, command",
    [
        (signal.SIGINT, "plan"),
        (signal.SIGTERM, "tune"),
        (signal.SIGKILL, "plan"),
        (signal.SIGKILL, "tune"),
    ],
    ids=lambda v: getattr(v, "name", v),
)
def test_plan_and_tune_stopped_after_their_first_saved_evaluation_resume_to_the_same_file(
    tmp_path, sig, command, capsys, one_thread
):
    """Held by the test hook right after the first end-to-end evaluation is saved (a known point, not a guessed
    time), then signalled: Ctrl-C and SIGTERM say what was kept; the rerun says it resumes and writes what
    an uninterrupted run writes."""
    out = tmp_path / "p.json"
    args = (
        ["plan", "tiny-pixart", "--target", "psnr=20", "--cost", "flops"]
        if command == "plan"
        else ["tune", "tiny-pixart", "--method", "fora", "--target", "psnr=20"]
    )
    args += ["--steps", "4", "--n-prompts", "2", "--out", str(out)]
    marker = tmp_path / "held"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        DITSCOPE_HOLD_AT="evaluation saved",
        DITSCOPE_HOLD_FILE=str(marker),
    )
    launcher = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from ditscope.cli.main import main; main()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    work = tmp_path / ".p.json.work"
    assert not out.exists() and len((work / "evaluations.jsonl").read_text().splitlines()) == 1
    if sig != signal.SIGKILL:
        assert proc.returncode == (130 if sig == signal.SIGINT else 143)
        assert (
            err.strip().splitlines()[-1].startswith("interrupted: ")
            and "1 end-to-end evaluation kept in" in err
        )

    code, err = _main(args, capsys)
    assert code == 0 and f"resuming from {work}: " in err and "1 end-to-end evaluation" in err, err
    resumed = json.loads(out.read_text())
    code, _ = _main([*args[:-1], str(tmp_path / "fresh.json")], capsys)
    fresh = json.loads((tmp_path / "fresh.json").read_text())
    if command == "plan":
        assert resumed["rows"] == fresh["rows"]
    else:
        assert resumed["options"] == fresh["options"]
    assert not work.exists()


def test_show_on_a_plan_it_cannot_write_beside_shows_it_without_a_figure(tmp_path, monkeypatch):
    from ditscope.cache.schedule_data import Schedule
    from ditscope.planning import show

    plan = Schedule({"stack": "CCRCR"}).save(tmp_path / "a.plan.json")

    def refuse(plan, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(show, "heatmap", refuse)  # what a read-only folder does (root can write anywhere)
    result = cli("show", plan)
    assert result.exit_code == 0 and "(no figure: cannot write" in result.stdout and "stack" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.plan.json"]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            [
                "plan",
                "tiny-pixart",
                "--target",
                "speedup=50",
                "--steps",
                "4",
                "--n-prompts",
                "1",
                "--iterations",
                "3",
                "--cost",
                "flops",
                "--modes",
                "stack",
                "--out",
                "sub/deeper/o.plan.json",
            ],
            "no plan reaches speedup=50",
        ),
        (
            [
                "tune",
                "tiny-pixart",
                "--method",
                "fora",
                "--target",
                "psnr=90",
                "--steps",
                "4",
                "--n-prompts",
                "1",
                "--out",
                "sub/deeper/t.json",
            ],
            "cannot reach psnr=90",
        ),
    ],
    ids=["plan", "tune"],
)
def test_a_target_found_out_of_reach_leaves_no_folder_it_made(tmp_path, args, message):
    """Refused after the search ran (its progress lines before the error): the work folder and the output's
    folders the run made are gone."""
    result = cli(*args, cwd=tmp_path)
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, result.stderr
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
