"""`ditscope tune`: a knob fitted on measured quality, TeaCache's polynomial, the fitted file, the CLI."""

import json

import pytest
import torch

import ditscope
from ditscope import DitscopeError, zoo
from ditscope.bench.tune import Tuned, fit_teacache, knob_of, tune
from ditscope.cache.registry import Knob
from ditscope.planning.calibrate import generate
from ditscope.stats.quality import per_sample_psnr_ssim

STEPS = 8
PROMPTS = ["a red circle", "a blue square on the left", "a small green triangle"]


@pytest.fixture(scope="module")
def pipe():
    p = zoo.load("tiny-pixart")
    p.set_progress_bar_config(disable=True)
    return p


def _psnr_with(pipe, config, reference):
    with torch.inference_mode(), ditscope.apply(pipe, config):
        images = generate(pipe, PROMPTS, STEPS, batch_size=3)
    return per_sample_psnr_ssim(images, reference)[0]


def test_tuned_threshold_is_the_most_aggressive_that_holds(pipe, tmp_path):
    with torch.inference_mode():
        reference = generate(pipe, PROMPTS, STEPS, batch_size=3)
        result = tune(pipe, "fbcache", PROMPTS, "psnr=30", STEPS, batch_size=3, assurance="mean", iterations=8,
                      work_dir=tmp_path / "w")
    value = result.options["threshold"]
    assert result.method == "fbcache" and result.meta["knob"] == "threshold"
    # the fitted setting holds on the calibration prompts, measured again from scratch
    psnr = _psnr_with(pipe, result.config(), reference)
    assert sum(psnr) / len(psnr) >= 30
    # and it is the boundary: every evaluated setting more aggressive than the chosen one missed the target
    trace = result.meta["trace"]
    assert all(t["psnr"] < 30 for t in trace if t["threshold"] > value * (1 + 1e-9))
    assert any(t["threshold"] > value for t in trace), "the search never looked past the fitted value"
    # saved and loaded, the same config; generate --cache takes the file
    result.save(tmp_path / "t.json")
    again = Tuned.load(tmp_path / "t.json")
    assert again.options == result.options and again.config() == result.config()
    damaged = (tmp_path / "t.json").read_text().replace('"threshold": 0.', '"threshold": 1.', 1)
    (tmp_path / "d.json").write_text(damaged)
    with pytest.raises(DitscopeError, match="does not match its checksum"):
        Tuned.load(tmp_path / "d.json")
    # resumable: a rerun with the same work folder evaluates nothing new
    with torch.inference_mode():
        rerun = tune(pipe, "fbcache", PROMPTS, "psnr=30", STEPS, batch_size=3, assurance="mean", iterations=8,
                     work_dir=tmp_path / "w", progress=seen.append)
    assert rerun.options == result.options
    assert "reference: resumed from the work folder" in seen


seen: list = []


def test_integer_knob_and_unreachable_target(pipe):
    with torch.inference_mode():
        result = tune(pipe, "fora", PROMPTS, "psnr=25", STEPS, batch_size=3, assurance="mean")
        assert isinstance(result.options["interval"], int) and result.options["interval"] >= 2
        trace = {t["interval"]: t["psnr"] for t in result.meta["trace"]}
        assert trace[result.options["interval"]] >= 25
        assert all(p < 25 for i, p in trace.items() if i > result.options["interval"])
        with pytest.raises(DitscopeError, match="cannot reach psnr=99.*mildest setting"):
            tune(pipe, "fora", PROMPTS, "psnr=99", STEPS, batch_size=3)


def test_teacache_polynomial_fits_the_measured_changes(pipe):
    with torch.inference_mode():
        fit = fit_teacache(pipe, PROMPTS, STEPS, batch_size=3, degree=2)
    # per model row (3 prompts x 2 guidance branches) and step pair
    assert fit["points"] == 3 * 2 * (STEPS - 1)
    assert len(fit["coefficients"]) == 3 and 0.0 <= fit["r2"] <= 1.0
    assert fit["x_range"][0] > 0


def test_a_preset_supplies_the_fixed_options(pipe):
    # ToCa's DiT preset: the knob's range and the options held fixed are the preset's, not the default config's
    knob, defaults = knob_of("toca", "ratio", preset="dit")
    assert defaults["preset"] == "dit" and defaults["ratio"] == 0.07 and defaults["interval"] == 4
    assert knob.mild == pytest.approx(0.007) and knob.aggressive == pytest.approx(0.7)
    with torch.inference_mode():
        result = tune(pipe, "toca", PROMPTS, "psnr=20", STEPS, batch_size=3, assurance="mean",
                      options={"preset": "dit"})
    assert result.options["preset"] == "dit"
    assert result.config() == ditscope.ToCaConfig.dit(interval=result.options["interval"])
    with pytest.raises(DitscopeError, match="has no preset 'pixartt'"):
        knob_of("toca", preset="pixartt")
    with pytest.raises(DitscopeError, match="has no presets"):
        knob_of("diffusers-fbcache", preset="dit")


def test_knobs_and_bad_requests():
    assert knob_of("fbcache")[0].name == "threshold"
    assert knob_of("diffusers-magcache")[0].name == "threshold"
    assert knob_of("toca", "interval")[0].integer
    k = Knob("t", 0.01, 1.0, log=True)
    assert k.at(0) == pytest.approx(0.01) and k.at(1) == pytest.approx(1.0) and k.at(0.5) == pytest.approx(0.1)
    assert Knob("n", 2, 5, integer=True).values() == [2, 3, 4, 5]
    with pytest.raises(DitscopeError, match="no knob to tune; fit it with ditscope plan"):
        knob_of("plan")
    with pytest.raises(DitscopeError, match="unknown method"):
        knob_of("nocache")
    with pytest.raises(DitscopeError, match="not a number"):
        knob_of("toca", "schedule")
    with pytest.raises(DitscopeError, match="is the knob being tuned"):
        tune(None, "fbcache", PROMPTS, "psnr=30", STEPS, options={"threshold": 0.1})
    with pytest.raises(DitscopeError, match="flops= is for ditscope plan"):
        tune(None, "fbcache", PROMPTS, "flops=2", STEPS)


@pytest.mark.parametrize("body,message", [
    ("{", "not a tuned config"),
    (json.dumps({"format": "ditscope-tuned", "version": 99, "method": "fora", "options": {}}), "version 99"),
    (json.dumps({"format": "ditscope-tuned", "version": 1, "method": "fora"}), "damaged"),
    (json.dumps({"something": 1}), "not a tuned config"),
])
def test_bad_tuned_files(tmp_path, body, message):
    path = tmp_path / "x.json"
    path.write_text(body)
    with pytest.raises(DitscopeError, match=message):
        Tuned.load(path)


def _cli(*args):
    from typer.testing import CliRunner

    from ditscope.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("args,message", [
    (["--method", "plan"], "no knob to tune"),
    (["--method", "nope"], "unknown method"),
    (["--target", "flops=2"], "flops= is for ditscope plan"),
    (["--target", "psnr"], "unknown target"),
    (["--knob", "warmupp"], "has no option 'warmupp'"),
    (["--steps", "1"], "--steps must be at least 2"),
    (["--out", "{tmp}"], "is a folder"),
    (["--cache-opt", "threshold"], "is not key=value"),
    (["--method", "toca", "--cache-opt", "preset=pixartt"], "has no preset 'pixartt'"),
])
def test_cli_tune_bad_input_is_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    r = _cli("tune", "tiny-pixart", *[a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr
    assert set(tmp_path.iterdir()) == before


def test_cli_tune_writes_a_config_generate_takes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _cli("tune", "tiny-pixart", "--method", "fora", "--target", "psnr=20", "--steps", "6", "--n-prompts", "2",
             "--out", "f.json")
    assert r.exit_code == 0, r.output
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the work folder is gone
    fitted = json.loads((tmp_path / "f.json").read_text())
    assert fitted["method"] == "fora" and fitted["meta"]["quality"]["psnr_lo"] >= 20
    r = _cli("generate", "tiny-pixart", "--prompt", "a red circle", "--steps", "6", "--out", "x.png", "--cache", "f.json")
    assert r.exit_code == 0 and r.stdout.startswith("fora:"), r.output
    (tmp_path / "peer.json").write_text(json.dumps({"format": "ditscope-tuned", "version": 1,
                                                    "method": "diffusers-fbcache", "options": {"threshold": 0.1}}))
    # a fitted list option (TeaCache's polynomial) reaches the config whole
    (tmp_path / "tea.json").write_text(json.dumps({"format": "ditscope-tuned", "version": 1, "method": "teacache",
                                                   "options": {"threshold": 0.2, "coefficients": [2.0, -1.0, 0.5]}}))
    r = _cli("generate", "tiny-pixart", "--prompt", "a red circle", "--steps", "6", "--out", "t.png", "--cache", "tea.json")
    assert r.exit_code == 0 and r.stdout.startswith("teacache:"), r.output
    r = _cli("generate", "tiny-pixart", "--prompt", "a red circle", "--out", "y.png", "--cache", "peer.json")
    assert r.exit_code == 2 and "is a peer" in r.stderr and not (tmp_path / "y.png").exists()


def test_cli_tune_a_peer_that_is_not_installed(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cache_dit" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    r = _cli("tune", "tiny-pixart", "--method", "cachedit-dbcache")
    assert r.exit_code == 2 and "needs the cache_dit package" in r.stderr and not list(tmp_path.iterdir())


def test_a_bench_setting_that_failed_to_tune_says_where_it_is_recorded(tmp_path):
    from ditscope.bench.grid import Setting
    from ditscope.bench.runner import BenchInputs, tuned

    setting = Setting("ditscope", "fbcache", {"tune": "psnr=60"})
    inputs = BenchInputs("tiny-pixart", ["a red circle"], [0], STEPS, None, 1, 0, calibration=["a blue square"])
    failed = tmp_path / "tuned" / f"{setting.key}.failed"
    failed.parent.mkdir()
    failed.write_text("fbcache cannot reach psnr=60 on these prompts")
    # not searched again (no pipeline is needed), and the message says how to search again
    with pytest.raises(DitscopeError, match="cannot reach psnr=60.*delete it to search again"):
        tuned(None, setting, inputs, tmp_path)
