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
    base = dict(model="tiny-pixart", prompts=[s.caption() for s in scenes], seeds=[0], steps=STEPS,
                guidance_scale=4.5, batch_size=2, repeats=1, scenes=scenes)
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


def test_killed_bench_resumes_without_redoing_finished_settings(pipe, tmp_path):
    settings = expand(["fora", "steps"], SETTINGS_GRID, STEPS)
    done = []

    def kill_after_two(setting, row):
        done.append(setting.label)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(pipe, settings, inputs(), tmp_path, progress=kill_after_two)
    first = {json.loads(line)["label"]: json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()}
    assert list(first) == ["none", "fora interval=1"]

    rows = run_bench(pipe, settings, inputs(), tmp_path)
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
    args = ["bench", "tiny-pixart", "--methods", "fora", "--grid", "quick", "--prompts", "2", "--seeds", "1",
            "--steps", str(STEPS), "--repeats", "1", "--batch-size", "2"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "results.csv").exists() and "fora interval=4" in (out / "results.md").read_text()
    bad = runner.invoke(app, ["bench", "tiny-pixart", "--methods", "nocache", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown method" in bad.output
    assert not (tmp_path / "x").exists()
    bad = runner.invoke(app, [*args[:-2], "--repeats", "0", "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and not (tmp_path / "y").exists()


@pytest.mark.parametrize("peer,options", [("diffusers-fbcache", {"threshold": 0.5}),
                                          ("cachedit-dbcache", {"residual_diff_threshold": 0.5, "max_warmup_steps": 1})])
def test_peer_rows_are_measured_and_the_pipeline_restored(pipe, tmp_path, peer, options):
    """A peer that cannot run is a row with a note, not a crash; one that can is measured like ours,
    and the pipeline gives the same images afterwards."""
    def image():
        return pipe([inputs().prompts[0]], num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(0)],
                    output_type="pt").images

    if peer.startswith("cachedit"):
        pytest.importorskip("cache_dit")
    before = image()
    settings = expand([peer], {peer: [options]}, STEPS)
    rows = run_bench(pipe, settings, inputs(), tmp_path)
    row = rows[1]
    assert row["system"] == ("diffusers" if peer.startswith("diffusers") else "cache-dit")
    assert not row.get("skipped"), row.get("note")
    assert row["psnr"] < 100 and row["flops"] < rows[0]["flops"]
    assert torch.equal(image(), before)


@pytest.mark.parametrize("recipe,columns,absent", [
    ("tiny-dit", ("shape", "color", "accuracy", "frechet"), ("size", "motion")),
    ("tiny-latte", ("shape", "color", "motion", "accuracy", "frechet"), ()),
])
def test_bench_scores_class_conditional_and_video_models_against_their_prompts(recipe, columns, absent, tmp_path):
    from ditscope.zoo.train import build

    model = build(recipe)
    model.set_progress_bar_config(disable=True)
    scenes, prompts = evaluator.evaluation_prompts(model, 2, seed=3000)
    assert all(isinstance(p, int) for p in prompts) == (recipe == "tiny-dit")
    settings = expand(["fora"], {"fora": [{"interval": 2}]}, 2)
    rows = run_bench(model, settings, inputs(model=recipe, prompts=prompts, scenes=scenes, steps=2,
                                             class_conditional=model.is_class_conditional),
                     tmp_path, evaluator_net=evaluator.load_evaluator())
    df = write_outputs(rows, tmp_path, "t", prompts)
    for col in columns:
        assert df[col].notna().all(), col
    assert not any(col in df for col in absent)
