"""`ditscope tune`: a knob fitted on measured quality, TeaCache's polynomial, the fitted file, the CLI."""

import json

import pytest
import torch

import ditscope
from ditscope import DitscopeError, zoo
from ditscope.bench.tune import Tuned, fit_teacache, knob_of, tune
from ditscope.cache.registry import Knob
from ditscope.profiling.workload import generate
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
        result = tune(
            pipe,
            "fbcache",
            PROMPTS,
            "psnr=30",
            STEPS,
            batch_size=3,
            assurance="mean",
            iterations=8,
            work_dir=tmp_path / "w",
        )
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
        rerun = tune(
            pipe,
            "fbcache",
            PROMPTS,
            "psnr=30",
            STEPS,
            batch_size=3,
            assurance="mean",
            iterations=8,
            work_dir=tmp_path / "w",
            progress=seen.append,
        )
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
        result = tune(
            pipe, "toca", PROMPTS, "psnr=20", STEPS, batch_size=3, assurance="mean", options={"preset": "dit"}
        )
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
    assert (
        k.at(0) == pytest.approx(0.01) and k.at(1) == pytest.approx(1.0) and k.at(0.5) == pytest.approx(0.1)
    )
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


@pytest.mark.parametrize(
    "body,message",
    [
        ("{", "not a tuned config"),
        (
            json.dumps({"format": "ditscope-tuned", "version": 99, "method": "fora", "options": {}}),
            "version 99",
        ),
        (json.dumps({"format": "ditscope-tuned", "version": 1, "method": "fora"}), "damaged"),
        (json.dumps({"something": 1}), "not a tuned config"),
    ],
)
def test_bad_tuned_files(tmp_path, body, message):
    path = tmp_path / "x.json"
    path.write_text(body)
    with pytest.raises(DitscopeError, match=message):
        Tuned.load(path)


def _cli(*args):
    from typer.testing import CliRunner

    from ditscope.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "plan"], "no knob to tune"),
        (["--method", "nope"], "unknown method"),
        (["--target", "flops=2"], "flops= is for ditscope plan"),
        (["--target", "psnr"], "unknown target"),
        (["--knob", "warmupp"], "has no option 'warmupp'"),
        (["--steps", "1"], "--steps must be at least 2"),
        (["--out", "{tmp}"], "is a folder"),
        (["--cache-opt", "threshold"], "is not key=value"),
        (["--method", "toca", "--cache-opt", "preset=pixartt"], "has no preset 'pixartt'"),
    ],
)
def test_cli_tune_bad_input_is_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    r = _cli("tune", "tiny-pixart", *[a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr
    assert set(tmp_path.iterdir()) == before


def test_cli_tune_writes_a_config_generate_takes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _cli(
        "tune",
        "tiny-pixart",
        "--method",
        "fora",
        "--target",
        "psnr=20",
        "--steps",
        "6",
        "--n-prompts",
        "2",
        "--out",
        "f.json",
    )
    assert r.exit_code == 0, r.output
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the work folder is gone
    # without a terminal each progress message is one whole line, not wrapped at 80 columns
    assert r.stderr and all(line.startswith("tune: ") for line in r.stderr.splitlines()), r.stderr
    fitted = json.loads((tmp_path / "f.json").read_text())
    assert fitted["method"] == "fora" and fitted["meta"]["quality"]["psnr_lo"] >= 20
    assert fitted["meta"]["model_signature"]["class"] == "PixArtTransformer2DModel"  # what it runs on
    generate = ["generate", "tiny-pixart", "--prompt", "a red circle", "--out", "x.png", "--cache", "f.json"]
    r = _cli(*generate, "--steps", "6")
    assert r.exit_code == 0 and r.stdout.startswith("fora:"), r.output
    assert "warning" not in r.stderr
    # without --steps it runs at the 6 steps it was tuned at (the same module counts); at another count it warns
    default = _cli(*generate)
    assert default.exit_code == 0 and "warning" not in default.stderr, default.output
    assert default.stdout.splitlines()[0] == r.stdout.splitlines()[0]
    other = _cli(*generate, "--steps", "4")
    assert other.exit_code == 0 and other.stdout.splitlines()[0] != r.stdout.splitlines()[0], other.output
    assert "warning: fora was tuned at 6 steps and runs at 4" in other.stderr
    (tmp_path / "peer.json").write_text(
        json.dumps(
            {
                "format": "ditscope-tuned",
                "version": 1,
                "method": "diffusers-fbcache",
                "options": {"threshold": 0.1},
            }
        )
    )
    # a fitted list option (TeaCache's polynomial) reaches the config whole
    (tmp_path / "tea.json").write_text(
        json.dumps(
            {
                "format": "ditscope-tuned",
                "version": 1,
                "method": "teacache",
                "options": {"threshold": 0.2, "coefficients": [2.0, -1.0, 0.5]},
            }
        )
    )
    r = _cli(
        "generate",
        "tiny-pixart",
        "--prompt",
        "a red circle",
        "--steps",
        "6",
        "--out",
        "t.png",
        "--cache",
        "tea.json",
    )
    assert r.exit_code == 0 and r.stdout.startswith("teacache:"), r.output
    r = _cli("generate", "tiny-pixart", "--prompt", "a red circle", "--out", "y.png", "--cache", "peer.json")
    assert r.exit_code == 2 and "is a peer" in r.stderr and not (tmp_path / "y.png").exists()


def test_cli_tune_a_peer_that_is_not_installed(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "cache_dit" else real(name, *a)
    )
    monkeypatch.chdir(tmp_path)
    r = _cli("tune", "tiny-pixart", "--method", "cachedit-dbcache")
    assert r.exit_code == 2 and "needs the cache_dit package" in r.stderr and not list(tmp_path.iterdir())


def test_a_bench_setting_that_failed_to_tune_says_where_it_is_recorded(tmp_path):
    from ditscope.bench.grid import Setting
    from ditscope.bench.runner import BenchInputs, tuned

    setting = Setting("ditscope", "fbcache", {"tune": "psnr=60"})
    inputs = BenchInputs(
        "tiny-pixart", ["a red circle"], [0], STEPS, None, 1, 0, calibration=["a blue square"]
    )
    failed = tmp_path / "tuned" / f"{setting.key}.failed"
    failed.parent.mkdir()
    failed.write_text("fbcache cannot reach psnr=60 on these prompts")
    # not searched again (no pipeline is needed), and the message says how to search again
    with pytest.raises(DitscopeError, match="cannot reach psnr=60.*delete it to search again"):
        tuned(None, setting, inputs, tmp_path)


def test_a_tuned_config_runs_on_the_model_it_was_tuned_on_only():
    from tiny import FAMILIES

    from ditscope.bench.tune import _signature

    pixart, sd3 = FAMILIES["PixArtTransformer2DModel"][0](), FAMILIES["SD3Transformer2DModel"][0]()
    tuned = Tuned("fora", {"interval": 3}, {"model": "tiny-pixart", "model_signature": _signature(pixart)})
    assert tuned.config(pixart) == ditscope.FORAConfig(interval=3)
    with pytest.raises(
        DitscopeError,
        match=r"tuned on tiny-pixart \(PixArtTransformer2DModel, config \w+\), not on this "
        r"model \(SD3Transformer2DModel\); tune it for this one with ditscope tune",
    ):
        tuned.config(sd3)
    # a file from before tuned configs carried the signature runs anywhere, unchecked
    assert Tuned("fora", {"interval": 3}).config(sd3) == ditscope.FORAConfig(interval=3)
    with pytest.raises(DitscopeError, match="unknown method 'tocaa'; did you mean toca"):
        Tuned("tocaa", {}).config()
    with pytest.raises(DitscopeError, match="diffusers-fbcache is a peer"):
        Tuned("diffusers-fbcache", {}).config()


def test_cli_generate_refuses_a_config_tuned_on_another_model(tmp_path, monkeypatch):
    from tiny import FAMILIES

    from ditscope.cli import generate as generate_command

    Tuned(
        "fora",
        {"interval": 3},
        {
            "model": "tiny-mmdit",
            "model_signature": {"class": "SD3Transformer2DModel", "config_hash": "0123456789abcdef"},
        },
    ).save(tmp_path / "t.json")
    # the model it is run on: whichever loads, the check needs only its transformer
    monkeypatch.setattr(
        generate_command, "load_model", lambda *a: (FAMILIES["PixArtTransformer2DModel"][0](), None)
    )
    monkeypatch.chdir(tmp_path)
    r = _cli("generate", "tiny-pixart", "--prompt", "a red circle", "--cache", "t.json")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert "tuned on tiny-mmdit (SD3Transformer2DModel, config 0123456789abcdef)" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "fbcach"], "unknown method 'fbcach'; did you mean fbcache?"),
        (
            ["--method", "toca", "--knob", "ratio", "--cache-opt", "interval=abc"],
            "toca option interval expects",
        ),
        (["--method", "toca", "--knob", "ratio", "--cache-opt", "interval=0"], "ToCa needs interval >= 1"),
        (
            ["--method", "fbcache", "--cache-opt", "warmupp=2"],
            "has no option 'warmupp'; did you mean warmup?",
        ),
        (["--method", "fbcache", "--cache-opt", "threshold=0.1"], "is the knob being tuned"),
        (
            ["--method", "diffusers-fbcache", "--cache-opt", "treshold=0.1"],
            "has no option 'treshold'; did you mean threshold?",
        ),
    ],
)
def test_cli_tune_refuses_bad_options_before_the_model_loads(tmp_path, monkeypatch, args, message):
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(zoo, "load_pipeline", no_loading)
    monkeypatch.chdir(tmp_path)
    r = _cli("tune", "tiny-pixart", *args)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.output
    assert list(tmp_path.iterdir()) == []


def test_a_fraction_knob_is_searched_only_where_the_method_accepts_it():
    """ToCa's ratio (default 0.3) was searched up to 3.0 and the run died at ratio 1.19 with the method's error."""
    from ditscope.bench.tune import GRID_POINTS, _accepts

    knob, _ = knob_of("toca", "ratio")
    assert (knob.mild, knob.aggressive) == (pytest.approx(0.03), 1.0)
    assert not _accepts("toca", "ratio", 1.01)
    assert all(_accepts("toca", "ratio", knob.at(i / (GRID_POINTS - 1))) for i in range(GRID_POINTS))
    assert knob_of("fbcache", "threshold")[0].aggressive == 1.0  # the registered knob is unchanged


def test_an_option_knob_is_oriented_by_what_it_does(pipe):
    """ToCa's ratio is the fraction recomputed: the small end is the fast one. `tune --knob ratio
    --target speedup=X` said "its most aggressive setting (ratio=1)" and gave up at the slowest end."""
    from ditscope.bench.tune import _work_done

    def work(ratio):
        return _work_done(pipe, "toca", {"interval": 3}, "ratio", ratio, None, STEPS, PROMPTS[0], None)

    with torch.inference_mode():
        assert work(0.03) < work(0.3) < work(1.0) < 1.0  # executed FLOPs over uncached, counted
        result = tune(
            pipe,
            "toca",
            PROMPTS,
            "psnr=15",
            STEPS,
            batch_size=3,
            assurance="mean",
            options={"interval": 3},
            knob="ratio",
            iterations=4,
        )
    # searched from ratio 1 (mild) towards 0.03 (aggressive): the first value tried is the mild end
    assert result.meta["trace"][0]["ratio"] == 1.0
    assert result.options["ratio"] < 1.0


def test_tune_on_a_declared_layout_model_from_python():
    """`ditscope.tune` takes the declared `layout` that `ditscope.plan` takes (a plain PyTorch DiT driven by the
    user's own sampling loop, tests/opensora_like.py); the fitted config runs there with the same layout."""
    import opensora_like

    sampler = opensora_like.Sampler(opensora_like.build())
    prompts = ["a red circle", "a blue square on the left"]
    result = tune(
        sampler, "fora", prompts, "psnr=20", 6, batch_size=2, assurance="mean", layout=opensora_like.LAYOUT
    )
    assert result.meta["quality"]["psnr"] >= 20 and result.options["interval"] >= 2
    reference = generate(sampler, prompts, 6, batch_size=2)
    with ditscope.apply(
        sampler, result.config(), num_inference_steps=6, layout=opensora_like.LAYOUT
    ) as handle:
        cached = generate(sampler, prompts, 6, batch_size=2)
        assert handle.stats().summary()["reused"] > 0
    assert statistics_mean(per_sample_psnr_ssim(cached, reference)[0]) == pytest.approx(
        result.meta["quality"]["psnr"], abs=1e-3
    )
    with pytest.raises(DitscopeError, match="layout="):
        tune(sampler, "fora", prompts, "psnr=20", 6, batch_size=2)


def statistics_mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize(
    ("method", "knob", "fixed"),
    [
        ("smoothcache", "alpha", {}),
        (
            "tgate",
            "gate_step",
            {"sp_interval": 1},
        ),  # self-attention computed before the gate: 8 steps are few
    ],
)
def test_peer_knobs_of_smoothcache_and_tgate_are_fitted(pipe, monkeypatch, method, knob, fixed):
    """SmoothCache's alpha and T-GATE's gate step are fitted like every knob; SmoothCache calibrates once, on
    the prompts tune fits on (every alpha tried reuses that calibration)."""
    from ditscope.bench.peers import PEERS, smoothcache_peers

    pytest.importorskip(PEERS[method].package)
    calibrated = []
    real = smoothcache_peers.calibration

    def spy(transformer, run, *args):
        def counted():
            images = run()
            calibrated.append(len(images))
            return images

        return real(transformer, counted, *args)

    monkeypatch.setattr(smoothcache_peers, "calibration", spy)
    with torch.inference_mode():
        result = tune(
            pipe,
            method,
            PROMPTS,
            "psnr=30",
            STEPS,
            batch_size=3,
            assurance="mean",
            iterations=6,
            timed=False,
            options=fixed,
        )
    value = result.options[knob]
    trace = {t[knob]: t["psnr"] for t in result.meta["trace"]}
    assert result.meta["knob"] == knob and trace[value] >= 30 and len(trace) >= 2
    assert any(p < 30 for p in trace.values()), "the search never found the boundary"
    assert calibrated == ([len(PROMPTS)] if method == "smoothcache" else [])
