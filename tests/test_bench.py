"""The bench harness on tiny-pixart with few prompts and steps: what it runs, what it writes, resume, errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from ditscope import zoo
from ditscope.bench import BenchInputs, expand, load_grid, run_bench, write_outputs
from ditscope.cli.main import app
from ditscope.errors import DitscopeError
from ditscope.zoo import evaluator

STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    p = zoo.load("tiny-pixart")
    p.set_progress_bar_config(disable=True)
    return p


def inputs(**overrides):
    scenes = evaluator.evaluation_scenes(2, seed=3000)
    base = dict(
        model="tiny-pixart",
        prompts=[s.caption() for s in scenes],
        seeds=[0],
        steps=STEPS,
        guidance_scale=4.5,
        batch_size=2,
        repeats=1,
        scenes=scenes,
    )
    return BenchInputs(**{**base, **overrides})


SETTINGS_GRID = {"fora": [{"interval": 1}, {"interval": 4}], "steps": [2]}


def test_bench_rows_metrics_and_outputs(pipe, tmp_path):
    settings = expand(["fora", "steps"], SETTINGS_GRID, STEPS)
    assert [s.label for s in settings] == ["none", "fora interval=1", "fora interval=4", "2 steps"]
    net = evaluator.load_evaluator()
    rows = run_bench(pipe, settings, inputs(), tmp_path, evaluator_net=net)
    df = write_outputs(rows, tmp_path, "t", inputs().prompts)
    by = df.set_index("label")
    # the uncached run is its own reference; FORA recomputing every step is the same computation
    assert by.loc["none", "psnr"] == 100.0 and by.loc["none", "ssim"] == pytest.approx(1.0)
    assert by.loc["fora interval=1", "psnr"] == 100.0
    assert by.loc["fora interval=1", "flops_speedup"] == pytest.approx(1.0, rel=1e-6)
    # caching and fewer steps execute fewer FLOPs and change the image
    assert by.loc["fora interval=4", "flops_speedup"] > 2.0
    assert by.loc["2 steps", "flops_speedup"] == pytest.approx(2.0, rel=0.05)
    assert by.loc["fora interval=4", "psnr"] < 100.0
    for col in ("seconds", "speedup", "accuracy", "frechet", "shape", "color"):
        assert df[col].notna().all(), col
    assert 0.0 <= by.loc["none", "accuracy"] <= 1.0
    for name in ("results.csv", "results.md", "pareto.png", "pareto.svg", "grid.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "Best wall-clock speedup" in (tmp_path / "results.md").read_text()
    # every quality mean comes with the samples behind it and their 95% interval
    cached = by.loc["fora interval=4"]
    assert len(cached["per_sample"]["psnr"]) == cached["n_images"] == 2
    assert cached["psnr_lo"] <= cached["psnr"] <= cached["psnr_hi"] and cached["psnr_p5"] <= cached["psnr"]
    assert by.loc["fora interval=1", "all_drop"] == 0 and by.loc["fora interval=1", "accuracy_drop_hi"] == 0
    md = (tmp_path / "results.md").read_text()
    assert "undecided: 2 < 64 samples" in md and "| - |" not in md  # 2 images decide no bar
    assert "per_sample" not in (tmp_path / "results.csv").read_text().splitlines()[0]


def _row(label, per_sample, seconds, method="fora"):
    acc = sum(per_sample["accuracy"]) / len(per_sample["accuracy"])
    return {
        "key": label,
        "system": "baseline" if method == "none" else "ditscope",
        "method": method,
        "label": label,
        "seconds": seconds,
        "flops": seconds,
        "n_images": len(per_sample["psnr"]),
        "psnr": sum(per_sample["psnr"]) / len(per_sample["psnr"]),
        "accuracy": acc,
        "all": sum(per_sample["all"]) / len(per_sample["all"]),
        "per_sample": per_sample,
    }


@pytest.mark.parametrize("n", [16, 64])
def test_paired_drops_intervals_and_bars_decided_only_on_enough_samples(n):
    """A setting that breaks one sample in 16 loses 6.25 points of 'all right', paired per sample; the
    near-lossless bar is decided only on >= 64 samples."""
    from ditscope.bench.report import best_at_bars, table

    ok = [1.0] * n
    broken = [0.0 if i % 16 == 3 else 1.0 for i in range(n)]
    rows = [
        _row(
            "none", {"psnr": [100.0] * n, "ssim": [1.0] * n, "accuracy": ok, "all": ok}, 10.0, method="none"
        ),
        _row(
            "fora interval=2",
            {"psnr": [40.0 + (i % 4) for i in range(n)], "ssim": [0.9] * n, "accuracy": ok, "all": ok},
            5.0,
        ),
        _row(
            "fora interval=4", {"psnr": [35.0] * n, "ssim": [0.8] * n, "accuracy": broken, "all": broken}, 2.5
        ),
        _row(
            "toca ratio=0.9",
            {"psnr": [20.0] * n, "ssim": [0.5] * n, "accuracy": broken, "all": broken},
            2.0,
            method="toca",
        ),
    ]
    df = table(rows).set_index("label")
    assert df.loc["fora interval=4", "all_drop"] == pytest.approx(100 / 16)
    assert df.loc["fora interval=4", "all_drop_lo"] <= 100 / 16 <= df.loc["fora interval=4", "all_drop_hi"]
    assert df.loc["fora interval=2", "all_drop"] == 0 and df.loc["fora interval=2", "psnr_p5"] == 40.0
    assert df.loc["fora interval=2", "psnr_lo"] < 41.5 < df.loc["fora interval=2", "psnr_hi"]
    best = best_at_bars(table(rows)).iloc[0]
    # interval 4 drops 6.25 points: it misses near-lossless, interval 2 (2x) is the best there
    assert best["near-lossless"].startswith("2.00x (fora interval=2")
    assert ("undecided" in best["near-lossless"]) == (n < 64)
    # a method none of whose settings meets a bar: "-", and on too few samples that is undecided too
    worst = best_at_bars(table(rows)).set_index("method").loc["toca"]
    assert worst["near-lossless"] == ("- undecided: 16 < 64 samples" if n < 64 else "-")


def test_killed_bench_resumes_without_redoing_finished_settings(pipe, tmp_path):
    settings = expand(["fora", "steps"], SETTINGS_GRID, STEPS)
    done = []

    def kill_after_two(setting, row):
        done.append(setting.label)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(pipe, settings, inputs(), tmp_path, progress=kill_after_two)
    first = {
        json.loads(line)["label"]: json.loads(line)
        for line in (tmp_path / "results.jsonl").read_text().splitlines()
    }
    assert list(first) == ["none", "fora interval=1"]

    said = []
    rows = run_bench(pipe, settings, inputs(), tmp_path, log=said.append)
    assert f"resuming {tmp_path}: 2 of {len(settings)} settings already measured" in said
    assert [r["label"] for r in rows] == [s.label for s in settings]
    # finished settings were kept, not rerun: their timings are the first run's
    assert rows[1]["seconds_all"] == first["fora interval=1"]["seconds_all"]
    # and the quality of the resumed part matches an uninterrupted run
    fresh = run_bench(pipe, settings, inputs(), tmp_path / "fresh")
    for a, b in zip(rows, fresh):
        assert a["psnr"] == pytest.approx(b["psnr"]) and a["flops"] == b["flops"]


def test_resuming_with_other_arguments_is_refused(pipe, tmp_path):
    settings = expand(["steps"], {"steps": [2]}, STEPS)
    run_bench(pipe, settings, inputs(), tmp_path)
    with pytest.raises(DitscopeError, match="other seeds"):
        run_bench(pipe, settings, inputs(seeds=[0, 1]), tmp_path)


def test_grids_and_bad_methods(tmp_path):
    grid_file = tmp_path / "g.json"
    grid_file.write_text(json.dumps({"toca": {"ratio": [0.2, 0.3], "interval": [3, 4]}, "steps": [5]}))
    grid = load_grid(str(grid_file))
    assert len(grid["toca"]) == 4 and {"ratio": 0.3, "interval": 4} in grid["toca"]
    labels = [s.label for s in expand(None, grid, 20)]
    assert labels[0] == "none" and "5 steps" in labels and len(labels) == 6
    assert set(load_grid("default")) >= {"toca", "fora", "fbcache", "teacache"}
    with pytest.raises(DitscopeError, match="neither a preset"):
        load_grid("no-such-grid")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DitscopeError, match="cannot parse"):
        load_grid(str(tmp_path / "bad.json"))
    with pytest.raises(DitscopeError, match="unknown method"):
        expand(["magic"], {}, 20)
    with pytest.raises(DitscopeError, match="no option 'speed'"):
        expand(["toca"], {"toca": [{"speed": 2}]}, 20)


def test_cli_bench_and_its_errors(tmp_path):
    runner = CliRunner()
    out = tmp_path / "b"
    args = [
        "bench",
        "tiny-pixart",
        "--methods",
        "fora",
        "--grid",
        "quick",
        "--prompts",
        "2",
        "--seeds",
        "1",
        "--steps",
        str(STEPS),
        "--repeats",
        "1",
        "--batch-size",
        "2",
    ]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "results.csv").exists() and "fora interval=4" in (out / "results.md").read_text()
    bad = runner.invoke(app, ["bench", "tiny-pixart", "--methods", "nocache", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown method" in bad.output
    assert not (tmp_path / "x").exists()
    bad = runner.invoke(app, [*args[:-2], "--seeds", "0", "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and not (tmp_path / "y").exists()


def test_prompt_seed_draws_other_prompts_and_is_recorded(tmp_path):
    """Calibrate on one prompt seed, score on another: the seed picks the prompts and the results say which."""
    runner = CliRunner()
    args = [
        "bench",
        "tiny-pixart",
        "--methods",
        "steps",
        "--grid",
        "quick",
        "--prompts",
        "2",
        "--seeds",
        "1",
        "--steps",
        str(STEPS),
        "--repeats",
        "1",
    ]
    for seed in (3000, 3001):
        result = runner.invoke(app, [*args, "--prompt-seed", str(seed), "--out", str(tmp_path / str(seed))])
        assert result.exit_code == 0, result.output
        meta = json.loads((tmp_path / str(seed) / "bench.json").read_text())
        assert meta["prompt_seed"] == seed
        assert f"prompt seed {seed}" in (tmp_path / str(seed) / "results.md").read_text()
    a, b = (json.loads((tmp_path / s / "bench.json").read_text())["prompts"] for s in ("3000", "3001"))
    assert a != b
    # the default seed is 3000: the prompts every earlier bench used
    pipe = zoo.load("tiny-pixart")
    assert a == evaluator.evaluation_prompts(pipe, 2, seed=3000)[1]
    # a shifted test set: the same seed, up to two objects per image, recorded in the prompts and the table;
    # not timed (--repeats 0): the speed reported is executed FLOPs, and no table says it is wall clock
    result = runner.invoke(
        app, [*args, "--max-objects", "2", "--repeats", "0", "--out", str(tmp_path / "two")]
    )
    assert result.exit_code == 0, result.output
    assert (
        json.loads((tmp_path / "two" / "bench.json").read_text())["prompts"]
        == evaluator.evaluation_prompts(pipe, 2, seed=3000, max_objects=2)[1]
    )
    md = (tmp_path / "two" / "results.md").read_text()
    assert "prompt seed 3000, up to 2 objects" in md
    assert "Not timed (--repeats 0)" in md and "Best FLOPs speedup" in md and "wall-clock" not in md
    rows = [json.loads(line) for line in (tmp_path / "two" / "results.jsonl").read_text().splitlines()]
    assert all(r["seconds"] is None and r["seconds_all"] == [] for r in rows)
    header = (tmp_path / "two" / "results.csv").read_text().splitlines()[0].split(",")
    assert "flops_speedup" in header and "speedup" not in header


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--prompt-seed", "abc"], "--prompt-seed"),
        (["--prompt-seed", "-1"], "--prompt-seed must be 0 or more"),
        (["--prompt-file", "{file}", "--prompts", "5"], "holds 2 prompts"),
        (["--max-objects", "0"], "--max-objects must be 1 to 4"),
        (["--repeats", "-1"], "--repeats must be 0"),
        (["--prompt-file", "{file}", "--max-objects", "2"], "does not apply to --prompt-file"),
    ],
)
def test_bad_prompt_seed_or_too_few_prompts_in_a_file_stop_before_anything_is_written(
    tmp_path, extra, message
):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("a red circle\na blue square\n")
    extra = [str(prompt_file) if e == "{file}" else e for e in extra]
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["bench", "tiny-pixart", "--methods", "steps", "--out", str(out), *extra]
    )
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "peer,options",
    [
        ("diffusers-fbcache", {"threshold": 0.5}),
        ("cachedit-dbcache", {"residual_diff_threshold": 0.5, "max_warmup_steps": 1}),
    ],
)
def test_peer_rows_are_measured_and_the_pipeline_restored(pipe, tmp_path, peer, options):
    """A peer that cannot run is a row with a note, not a crash; one that can is measured like ours,
    and the pipeline gives the same images afterwards."""

    def image():
        return pipe(
            [inputs().prompts[0]],
            num_inference_steps=STEPS,
            generator=[torch.Generator().manual_seed(0)],
            output_type="pt",
        ).images

    from ditscope.bench.peers import PEERS

    pytest.importorskip(PEERS[peer].package)
    before = image()
    settings = expand([peer], {peer: [options]}, STEPS)
    rows = run_bench(pipe, settings, inputs(), tmp_path)
    row = rows[1]
    assert row["system"] == PEERS[peer].system
    assert not row.get("skipped"), row.get("note")
    assert row["psnr"] < 100 and row["flops"] < rows[0]["flops"]
    assert torch.equal(image(), before)


@pytest.mark.parametrize(
    "recipe,columns,absent",
    [
        ("tiny-dit", ("shape", "color", "accuracy", "frechet"), ("size", "motion")),
        ("tiny-latte", ("shape", "color", "motion", "accuracy", "frechet"), ()),
    ],
)
def test_bench_scores_class_conditional_and_video_models_against_their_prompts(
    recipe, columns, absent, tmp_path
):
    from ditscope.zoo.train import build

    model = build(recipe)
    model.set_progress_bar_config(disable=True)
    scenes, prompts = evaluator.evaluation_prompts(model, 2, seed=3000)
    assert all(isinstance(p, int) for p in prompts) == (recipe == "tiny-dit")
    settings = expand(["fora"], {"fora": [{"interval": 2}]}, 2)
    rows = run_bench(
        model,
        settings,
        inputs(
            model=recipe,
            prompts=prompts,
            scenes=scenes,
            steps=2,
            class_conditional=model.is_class_conditional,
        ),
        tmp_path,
        evaluator_net=evaluator.load_evaluator(),
    )
    df = write_outputs(rows, tmp_path, "t", prompts)
    for col in columns:
        assert df[col].notna().all(), col
    assert not any(col in df for col in absent)


SIGNAL_BENCH = [
    "bench",
    "tiny-pixart",
    "--methods",
    "fora",
    "--prompts",
    "2",
    "--steps",
    "4",
    "--repeats",
    "1",
    "--batch-size",
    "2",
]


@pytest.fixture(scope="module")
def signal_grid_and_straight_rows(tmp_path_factory):
    """The grid of the signal tests and the rows of its uninterrupted bench (one run for both signals)."""
    folder = tmp_path_factory.mktemp("signal-bench")
    grid = folder / "grid.json"
    grid.write_text(json.dumps({"fora": [{"interval": 2}, {"interval": 4}]}))
    result = CliRunner().invoke(app, [*SIGNAL_BENCH, "--grid", str(grid), "--out", str(folder / "straight")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (folder / "straight" / "results.jsonl").read_text().splitlines()]
    return grid, {r["label"]: r for r in rows}


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_bench_process_stopped_by_a_signal_resumes_to_the_same_rows(
    tmp_path, sig, signal_grid_and_straight_rows
):
    """A bench in its own process, stopped once its first setting is saved, rerun: the same rows as an
    uninterrupted bench (timings aside), the finished ones kept rather than measured again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    grid, straight = signal_grid_and_straight_rows
    args = [*SIGNAL_BENCH, "--grid", str(grid)]
    from ditscope.holds import held_env

    hold = held_env(tmp_path, "bench row saved", after=2)  # held right after its second saved setting
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **hold)
    out = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditscope", *args, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results = out / "results.jsonl"
    deadline = time.time() + 240
    while (
        time.time() < deadline
        and proc.poll() is None
        and not (tmp_path / hold["DITSCOPE_HOLD_FILE"]).exists()
    ):
        time.sleep(0.02)
    proc.send_signal(getattr(signal, sig))
    proc.wait()
    saved = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(saved) == 2, "the bench should die part-way"  # of three settings: baseline, fora x2
    rerun = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert rerun.exit_code == 0, rerun.output
    resumed = {r["label"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert list(resumed) == list(straight)
    for label, row in straight.items():
        assert resumed[label]["flops"] == row["flops"] and resumed[label]["psnr"] == pytest.approx(
            row["psnr"], abs=1e-3
        )
    assert resumed[saved[1]["label"]]["seconds_all"] == saved[1]["seconds_all"]  # kept, not measured again


def test_plan_settings_that_differ_only_in_how_the_plan_runs_share_one_plan():
    """Every PlanConfig run option (adaptive, signal, tolerance, ...) is kept out of the plan's making: a
    grid with `signal` once passed it to the planner and stopped the bench."""
    from ditscope.bench.grid import Setting
    from ditscope.bench.runner import plan_setting

    static = Setting("ditscope", "plan", {"target": "psnr=35"})
    for run in (
        {"adaptive": True},
        {"adaptive": True, "signal": "output"},
        {"adaptive": True, "signal": "input", "tolerance": 1.25, "per_sample": False},
        {"strict": True},
    ):
        assert plan_setting(Setting("ditscope", "plan", {"target": "psnr=35", **run})).key == static.key
    assert plan_setting(Setting("ditscope", "plan", {"target": "psnr=30"})).key != static.key


def test_a_plan_setting_that_cannot_run_is_a_row_saying_why_and_the_bench_goes_on(pipe, tmp_path):
    """A plan kept from before plans carried the output signal's table, run adaptively with it: a skipped row
    with the reason, and the settings after it still run (it once stopped a bench part-way)."""
    from ditscope import Schedule
    from ditscope.bench.runner import plan_setting

    settings = expand(
        None, {"plan": [{"target": "psnr=30", "adaptive": True, "signal": "output"}], "steps": [2]}, STEPS
    )
    (tmp_path / "plans").mkdir()
    Schedule({"stack": "CCRC"}).save(tmp_path / "plans" / f"{plan_setting(settings[1]).key}.plan.json")
    with torch.inference_mode():
        rows = run_bench(pipe, settings, inputs(calibration=["a red circle"]), tmp_path, log=lambda *a: None)
    assert [r["label"] for r in rows] == [s.label for s in settings]
    assert rows[1]["skipped"] and "no calibrated signal for signal='output'" in rows[1]["note"]
    assert rows[2]["psnr"] > 0  # the fewer-steps row after it ran


def test_the_printed_summary_fits_100_columns_and_says_lpips_once():
    from ditscope.bench.report import markdown, summary, table

    n, lpips = 4, "LPIPS skipped: torchvision is not installed"
    samples = {"psnr": [100.0] * n, "ssim": [1.0] * n, "accuracy": [1.0] * n, "all": [1.0] * n}
    long = (
        "cachedit-dbcache-taylorseer Fn_compute_blocks=1 residual_diff_threshold=0.12 max_warmup_steps=4 "
        "taylorseer_order=2"
    )
    rows = [
        _row("none", samples, 10.0, method="none"),
        _row("fora interval=2", {**samples, "psnr": [35.0] * n}, 5.0),
        _row(long, {**samples, "psnr": [31.0, 32.0, 33.0, 34.0]}, 4.0, method="cachedit-dbcache-taylorseer"),
    ]
    for r in rows:
        r["note"] = lpips
    rows[2]["note"] += "; fitted threshold=0.12"
    df = table(rows)
    text = summary(df, "tiny-pixart: 2 prompts x 2 seeds, 4 steps")
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, text
    assert text.count("LPIPS skipped") == 1 and lines[-1] == f"{lpips} (every setting).", text
    for column in ("speedup", "PSNR [95%]", "p5 PSNR", "SSIM", "acc. drop"):
        assert column in text, column
    assert "2.50x" in text and "residual_diff_threshold=0.12" in text and "fitted threshold=0.12" in text
    assert markdown(df, "t").count("LPIPS skipped") == 3  # results.md keeps every row's note


def test_cli_bench_refuses_a_misspelt_method_or_peer_option_before_the_model_loads(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(zoo, "load_pipeline", no_loading)
    (tmp_path / "grid.json").write_text(
        json.dumps({"diffusers-fbcache": [{"treshold": 0.1}], "toca": [{"ratio": 2}]})
    )
    for args, message in (
        (
            ["--methods", "diffusers-fbcach"],
            "unknown method 'diffusers-fbcach'; did you mean diffusers-fbcache?",
        ),
        (["--methods", "toca", "--grid", str(tmp_path / "grid.json")], "0 <= ratio <= 1"),
        (["--grid", str(tmp_path / "grid.json")], "unknown option for diffusers-fbcache: treshold"),
    ):
        result = CliRunner().invoke(app, ["bench", "tiny-pixart", *args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, (
            result.output
        )
        assert not (tmp_path / "out").exists()


def test_a_tune_setting_that_fails_before_its_search_started_is_recorded_not_a_traceback(tmp_path):
    """The search can fail before it made OUT/tuned/ (here: a step count it refuses); the bench records the
    failure there, so that the row says why and a rerun does not search again."""
    from ditscope.bench.grid import Setting
    from ditscope.bench.runner import tuned

    inputs = BenchInputs(
        model="m",
        prompts=["a"],
        seeds=[0],
        steps=1,
        guidance_scale=None,
        batch_size=1,
        repeats=0,
        calibration=["b"],
    )
    setting = Setting("ditscope", "fora", {"tune": "psnr=30"})
    with pytest.raises(DitscopeError, match="num_inference_steps >= 2"):
        tuned(None, setting, inputs, tmp_path)
    failed = tmp_path / "tuned" / f"{setting.key}.failed"
    assert "num_inference_steps >= 2" in failed.read_text()
    with pytest.raises(DitscopeError, match="recorded in"):
        tuned(None, setting, inputs, tmp_path)


def test_a_bench_of_a_plan_file_given_by_path_fits_nothing_and_says_no_calibration(tmp_path):
    """A plan file run by path was made elsewhere: the bench draws no calibration prompts for it and its
    title does not claim that plans were fitted on them."""
    from ditscope import Schedule

    plan_file = tmp_path / "p.plan.json"
    Schedule({"stack": "C" * (STEPS - 1) + "R"}).save(plan_file)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"plan": [{"path": str(plan_file)}]}))
    args = [
        "bench",
        "tiny-pixart",
        "--grid",
        str(grid),
        "--prompts",
        "2",
        "--seeds",
        "1",
        "--steps",
        str(STEPS),
    ]
    result = CliRunner().invoke(
        app, [*args, "--repeats", "0", "--batch-size", "2", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    title = (tmp_path / "o" / "results.md").read_text().splitlines()[0]
    assert (
        title.startswith("## tiny-pixart: 2 prompts")
        and "fitted on" not in title
        and "calibration" not in title
    )


def test_a_bench_folder_of_other_inputs_is_refused_naming_what_differs_either_way(tmp_path):
    """The refusal names every input that differs, those the new bench lacks as well as those it changes."""
    from ditscope.bench.runner import _start

    assert _start(tmp_path, inputs(calibration=["a red circle"], calibration_seed=7000)) is None
    message = _start(tmp_path, inputs())  # no calibration prompts this time
    assert (
        message
        == f"{tmp_path} holds a bench with other calibration, calibration_seed; use another --out or the same arguments"
    )
    assert (
        _start(tmp_path, inputs(steps=STEPS + 1, calibration=["a red circle"], calibration_seed=7000)).count(
            "steps"
        )
        == 1
    )
    # what no argument sets is named for what it is
    other_weights = {"weights": "0", "scheduler": "DPMSolverMultistepScheduler 0"}
    assert "other identity (weights, dtype or scheduler);" in _start(
        tmp_path, inputs(calibration=["a red circle"], calibration_seed=7000, identity=other_weights)
    )
