"""A new cache method is one file: it registers itself, and `apply`, `--cache`, the CLI's help and the
bench's presets pick it up. Shown with a method defined here, in the test suite, not in the package."""

from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

import ditscope
from ditscope import zoo
from ditscope.bench import expand, load_grid, run_bench
from ditscope.bench.runner import BenchInputs
from ditscope.cache import CONFIGS, REGISTRY, config_from_options, register
from ditscope.cache.context import COMPUTE, REUSE
from ditscope.cache.method import CacheMethod
from ditscope.cache.registry import unregister
from ditscope.families import MLP

STEPS = 4


@dataclass
class ReuseMLPConfig:
    """Reuse every MLP's output from the previous step on odd steps (a deliberately simple policy)."""

    every: int = 2


class ReuseMLPMethod(CacheMethod):
    uses_modules = True

    def module(self, ctx, site, run, args, kwargs):
        kept = ctx.state.setdefault("mlp", {})
        if site.kind != MLP or ctx.step % self.config.every == 0 or site.index not in kept:
            kept[site.index] = run(*args, **kwargs)
            ctx.count(COMPUTE, 0, 0)
            return kept[site.index]
        ctx.count(REUSE, 0, 0)
        return kept[site.index]


@pytest.fixture
def registered():
    register(
        "reuse-mlp",
        ReuseMLPConfig,
        ReuseMLPMethod,
        "MLP outputs reused on odd steps",
        grid=[{"every": 2}, {"every": 3}],
        exact={"every": 1},
        aggressive={"every": 2},
    )
    yield
    unregister("reuse-mlp")


@pytest.fixture(scope="module")
def pipe():
    p = zoo.load("tiny-pixart")
    p.set_progress_bar_config(disable=True)
    return p


def test_every_method_registers_its_test_settings():
    for entry in REGISTRY.values():
        assert entry.exact is not None and entry.aggressive is not None, (
            f"{entry.name}: register exact= and aggressive="
        )


def test_a_registered_method_gets_the_invariant_tests_from_its_registration(registered):
    from test_cache import STEPS as CACHE_STEPS
    from test_cache import check_caches, check_exact, run_steps
    from tiny import FAMILIES as TINY

    build, inputs = TINY["PixArtTransformer2DModel"][:2]
    model = build()
    reference = run_steps(model, inputs, steps=CACHE_STEPS)
    check_caches("reuse-mlp", model, inputs, reference)
    check_exact("reuse-mlp", model, inputs, reference)


def test_a_registered_method_runs_everywhere_a_built_in_one_does(registered, pipe, tmp_path):
    assert "reuse-mlp" in CONFIGS and CONFIGS["reuse-mlp"] is ReuseMLPConfig
    assert config_from_options("reuse-mlp", ["every=3"]) == ReuseMLPConfig(every=3)
    assert load_grid("default")["reuse-mlp"] == [{"every": 2}, {"every": 3}]
    assert load_grid("compact")["reuse-mlp"] == [{"every": 2}, {"every": 3}]

    prompt = "a large red circle on the left on a grey background"

    def image(**kw):
        return pipe(
            prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt"
        ).images

    before = image()
    with ditscope.apply(pipe, ReuseMLPConfig(every=1)):  # every step is a compute step
        assert torch.equal(image(), before)
    with ditscope.apply(pipe, ReuseMLPConfig()) as handle:
        cached = image()
        stats = handle.stats().to_pandas()
    assert not torch.equal(cached, before) and stats["reused"].sum() > 0
    assert torch.equal(image(), before)  # removed: the model is as before

    rows = run_bench(
        pipe,
        expand(["reuse-mlp"], load_grid("default"), STEPS),
        BenchInputs(
            model="tiny-pixart",
            prompts=[prompt],
            seeds=[0],
            steps=STEPS,
            guidance_scale=4.5,
            batch_size=1,
            repeats=1,
        ),
        tmp_path,
    )
    assert [r["label"] for r in rows] == ["none", "reuse-mlp every=2", "reuse-mlp every=3"]
    assert rows[1]["psnr"] < 100 and rows[1]["flops"] < rows[0]["flops"]


def test_the_cli_lists_registered_methods(registered):
    from ditscope.cli.main import app

    result = CliRunner().invoke(app, ["generate", "--help"])
    assert all(name in " ".join(result.output.split()) for name in ("toca", "teacache"))
    # the help text is made when the CLI module is imported: methods are listed from the registry then
    assert list(REGISTRY)[:8] == [
        "toca",
        "duca",
        "fora",
        "pab",
        "taylorseer",
        "delta-dit",
        "fbcache",
        "teacache",
    ]


def test_a_name_cannot_be_taken_twice(registered):
    from ditscope.errors import DitscopeError

    with pytest.raises(DitscopeError, match="already taken"):
        register("reuse-mlp", ditscope.FORAConfig, ReuseMLPMethod, "clash")
    with pytest.raises(DitscopeError, match="not a cache config"):
        ditscope.apply(zoo.load("tiny-pixart"), ReuseMLPConfig)  # the class, not an instance
