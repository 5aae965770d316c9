"""The cache engine: every method on every covered family, and the invariants a user relies on."""

import opensora_like
import pytest
import torch
from tiny import FAMILIES as TINY
from torch.utils.flop_counter import FlopCounterMode

import ditscope
from ditscope import DitscopeError
from ditscope.cache import CONFIGS, REGISTRY, config_from_options
from ditscope.families import CROSS, MLP, SELF, TEMPORAL

DECLARED = (
    "STDiT-declared-layout"  # tests/opensora_like.py: a plain PyTorch DiT and the layout a user declares
)
CASES = {
    **{name: (*TINY[name], None) for name in TINY},
    DECLARED: (opensora_like.build, opensora_like.inputs, opensora_like.LAYOUT),
}  # name -> (build, inputs, layout)
COVERED = list(CASES)
STEPS = 8


def config_for(method: str, model, which: str):
    """A registered method's config under its registered `exact` or `aggressive` setting, for this model."""
    return REGISTRY[method].test_config(which, model, STEPS, layout_for(model))


def layout_for(model):
    """The declared layout of the plain PyTorch model (None: the family table's)."""
    return opensora_like.LAYOUT if isinstance(model, opensora_like.STDiT) else None


def tensor_of(out):
    """A model's output tensor (diffusers: a tuple or an output object; the plain model: a tensor)."""
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


def run_steps(model, inputs, batch=2, steps=STEPS):
    with torch.no_grad():
        return [tensor_of(model(**inputs(batch, s))) for s in range(steps)]


def cache(model, config, **kwargs):
    return ditscope.apply(model, config, num_inference_steps=STEPS, layout=layout_for(model), **kwargs)


@pytest.fixture(scope="module", params=COVERED)
def family(request):
    build, inputs, _ = CASES[request.param]
    model = build()
    return model, inputs, run_steps(model, inputs)


def check_caches(method, model, inputs, reference):
    """The invariants of a method's registered `aggressive` setting: it runs, caches something, changes the
    output, and computes the first step (test_registry.py runs them on a method registered in a test)."""
    with cache(model, config_for(method, model, "aggressive")) as handle:
        outs = run_steps(model, inputs)
        summary = handle.stats().summary()
    assert all(o.shape == r.shape and torch.isfinite(o).all() for o, r in zip(outs, reference))
    saved = summary["reused"] + summary["partial"] + summary["predicted"] + summary["blocks_reused"]
    assert saved > 0, f"{method} cached nothing: {summary}"
    assert any(not torch.equal(o, r) for o, r in zip(outs, reference))  # caching changed what ran
    assert torch.equal(outs[0], reference[0])  # the first step is always computed


def check_exact(method, model, inputs, reference):
    """Under its registered `exact` setting a method's output is bit-identical to no cache."""
    with cache(model, config_for(method, model, "exact")):
        outs = run_steps(model, inputs)
    for step, (o, r) in enumerate(zip(outs, reference)):
        assert torch.equal(o, r), f"{method} step {step} differs by {(o - r).abs().max():.3g}"


@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_method_runs_and_caches_on_every_family(family, method):
    check_caches(method, *family)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_compute_everything_is_bit_identical(family, method):
    check_exact(method, *family)


@pytest.mark.parametrize(
    "name",
    [
        "DiTTransformer2DModel",
        "PixArtTransformer2DModel",
        "LatteTransformer3DModel",
        "WanTransformer3DModel",
        DECLARED,
    ],
)
def test_toca_recomputing_every_token_is_bit_identical(name):
    """Partial steps that select all tokens take the full path, scores and all."""
    build, inputs, _ = CASES[name]
    model = build()
    reference = run_steps(model, inputs)
    every = {SELF: 1.0, CROSS: 1.0, MLP: 1.0, TEMPORAL: 1.0}
    config = ditscope.ToCaConfig(ratio=1.0, step_weight=0, layer_weight=0, module_factors=every)
    with cache(model, config) as handle:
        outs = run_steps(model, inputs)
        assert handle.stats().summary()["reused"] == 0
    assert all(torch.equal(o, r) for o, r in zip(outs, reference))


def test_remove_restores_the_model_exactly(family):
    model, inputs, reference = family
    before = {name: dict(vars(m)) for name, m in model.named_modules()}
    handle = cache(model, ditscope.ToCaConfig())
    run_steps(model, inputs)
    handle.remove()
    after = {name: dict(vars(m)) for name, m in model.named_modules()}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
    assert all(torch.equal(o, r) for o, r in zip(run_steps(model, inputs), reference))


def test_partial_self_attention_is_exact_subsetting():
    """What the token-wise path relies on: attn1(X[S], enc=X) == attn1(X)[S] on BasicTransformerBlock."""
    build, inputs = TINY["PixArtTransformer2DModel"]
    attn = build().transformer_blocks[0].attn1
    x = torch.randn(2, 16, attn.to_q.in_features)
    idx = torch.tensor([1, 5, 6, 11])
    with torch.no_grad():
        assert torch.allclose(attn(x[:, idx], encoder_hidden_states=x), attn(x)[:, idx], atol=1e-6)


def hidden_key(kwargs: dict) -> str:
    return "hidden_states" if "hidden_states" in kwargs else "x"


@pytest.mark.parametrize("name", COVERED)
def test_separate_guidance_calls_keep_separate_caches(name):
    """A pipeline calling the model once per branch: the cond outputs must not depend on the uncond calls."""
    build, inputs, _ = CASES[name]
    model = build()

    def drive(with_uncond):
        outs = []
        with (
            cache(
                model,
                ditscope.ToCaConfig(
                    ratio=0.5, module_factors={SELF: 1.0, CROSS: 1.0, MLP: 1.0, TEMPORAL: 1.0}
                ),
            ),
            torch.no_grad(),
        ):
            for s in range(STEPS):
                cond = inputs(1, s)
                outs.append(tensor_of(model(**cond)))
                if with_uncond:  # another input at the same timestep: the second call of the step
                    key = hidden_key(cond)
                    tensor_of(model(**dict(cond, **{key: cond[key] + 0.5})))
        return outs

    alone, paired = drive(False), drive(True)
    assert all(torch.equal(a, b) for a, b in zip(alone, paired))


@pytest.mark.parametrize("name", COVERED)
@pytest.mark.parametrize(
    "config",
    [ditscope.ToCaConfig(score="random"), ditscope.FBCacheConfig(threshold=0.3)],
    ids=["toca-random", "fbcache"],
)
def test_batch_equals_each_alone_on_every_family(name, config):
    """Entry 0 of a batch of two equals entry 0 run alone (within float noise: matmul blocking differs)."""
    build, inputs, _ = CASES[name]
    model = build()

    def first(kwargs):  # entry 0 of a batch of two (torch.randn draws small tensors differently per shape)
        return {
            k: v[:1] if (torch.is_tensor(v) or isinstance(v, list)) and len(v) == 2 else v
            for k, v in kwargs.items()
        }

    with cache(model, config):
        both = run_steps(model, inputs, batch=2)
        alone = run_steps(model, lambda B, s: first(inputs(2, s)))
    for b, a in zip(both, alone):
        assert torch.allclose(b[:1], a, atol=1e-5), (b[:1] - a).abs().max()


def run_half_batch(model, inputs):
    """Row 1 of every call computes every block, row 0 reuses them from step 1 on (a test-only policy);
    returns the outputs and the stats."""
    from ditscope.cache.actions import run_block
    from ditscope.cache.engine import CacheHandle
    from ditscope.cache.method import CacheMethod

    class HalfBatch(CacheMethod):
        uses_blocks = True

        def block(self, ctx, bsite, run, args, kwargs):
            return run_block(ctx, bsite, run, args, kwargs, torch.tensor([True, False]) if ctx.step else None)

    handle = CacheHandle(
        model, HalfBatch(None), num_inference_steps=STEPS, count_flops=True, layout=layout_for(model)
    )
    try:
        return run_steps(model, inputs), handle.stats()
    finally:
        handle.remove()


@pytest.mark.parametrize("name", COVERED)
def test_rows_that_compute_run_the_blocks_on_their_own(name):
    """Per-sample decisions in a batch: when row 0 reuses every block and row 1 computes, the blocks run on row 1
    alone (about half the FLOPs of the step), and row 1 is what the uncached model gives it, on every family."""
    build, inputs, _ = CASES[name]
    model = build()
    reference = run_steps(model, inputs)
    mixed, stats = run_half_batch(model, inputs)
    for r, m in zip(reference, mixed):
        assert torch.allclose(m[1:], r[1:], atol=1e-5), (m[1:] - r[1:]).abs().max()
    assert not stats.notes  # no block fell back to running on the whole batch
    flops = [r["flops"] for r in stats.records]
    assert max(flops[1:]) < 0.75 * flops[0]


def test_a_block_that_cannot_run_on_some_rows_runs_on_all_and_says_so():
    model = opensora_like.build()
    block = model.spatial_blocks[0]
    plain = block.forward

    def whole_batch_only(x, y, t):
        if x.shape[0] != 2:
            raise RuntimeError("this block needs the whole batch")
        return plain(x, y, t)

    block.forward = whole_batch_only
    reference = run_steps(model, opensora_like.inputs)
    mixed, stats = run_half_batch(model, opensora_like.inputs)
    for r, m in zip(reference, mixed):
        assert torch.allclose(m[1:], r[1:], atol=1e-5)
    assert (
        list(stats.notes) == ["spatial_blocks.0"]
        and "needs the whole batch" in stats.notes["spatial_blocks.0"]
    )
    assert block.forward is whole_batch_only  # remove() gives the user's own forward back


@pytest.mark.parametrize("name", ["WanTransformer3DModel", "MochiTransformer3DModel"])
def test_toca_says_where_a_token_subset_cannot_run(name):
    """Wan's self-attention (rotary embeddings inside) and Mochi's joint attention are computed whole when a
    partial step asks for a subset of them; stats() counts and names them, never silently."""
    build, inputs, _ = CASES[name]
    model = build()
    reference = run_steps(model, inputs)
    config = ditscope.ToCaConfig(
        ratio=0.5,
        step_weight=0,
        layer_weight=0,
        module_factors={SELF: 1.0, CROSS: 0.0, MLP: 0.0, TEMPORAL: 0.0},
    )
    with cache(model, config) as handle:
        outs = run_steps(model, inputs)
        stats = handle.stats()
    summary = stats.summary()
    assert summary["whole"] > 0 and summary["partial"] == 0
    child = "attn1"
    why = "rotary" if name.startswith("Wan") else "joint attention"
    assert any(unit.endswith(child) and why in text for unit, text in stats.notes.items()), stats.notes
    assert "ran whole" in str(stats) and why in str(stats)
    # the whole self-attention is exact; only the other modules' reuse changes the output
    assert torch.equal(outs[0], reference[0])


def test_partial_self_attention_is_exact_subsetting_on_the_declared_model():
    """ToCa's token subset on the declared model: attn(X[S], context=X) == attn(X)[S] (the `kv` keyword)."""
    attn = opensora_like.build().spatial_blocks[0].attn
    x = torch.randn(2, 16, attn.q.in_features)
    idx = torch.tensor([1, 5, 6, 11])
    with torch.no_grad():
        assert torch.allclose(attn(x[:, idx], context=x), attn(x)[:, idx], atol=1e-6)


def test_new_generation_starts_from_scratch():
    """Rerunning the same steps gives the same outputs: nothing carries over between generations."""
    build, inputs = TINY["DiTTransformer2DModel"]
    model = build()
    with ditscope.apply(model, ditscope.FORAConfig(), num_inference_steps=STEPS):
        first, second = run_steps(model, inputs), run_steps(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("name", COVERED)
def test_flops_are_counted_on_every_family(name):
    build, inputs, _ = CASES[name]
    model = build()
    with cache(model, ditscope.FORAConfig(interval=2), count_flops=True) as handle:
        with torch.no_grad(), FlopCounterMode(display=False) as outer:
            run_steps(model, inputs)
        stats = handle.stats()
    assert stats.flops == outer.get_total_flops() > 0  # what really ran
    assert 0 < stats.flops_ratio < 1


def test_flops_are_the_executed_ones():
    build, inputs = TINY["PixArtTransformer2DModel"]
    model = build()
    with torch.no_grad(), FlopCounterMode(display=False) as outer:
        run_steps(model, inputs)
    full = outer.get_total_flops()
    with ditscope.apply(
        model, ditscope.FORAConfig(interval=2), num_inference_steps=STEPS, count_flops=True
    ) as h:
        run_steps(model, inputs)
        stats = h.stats()
    assert stats.full_flops * STEPS == full
    assert 0.4 < stats.flops_ratio < 0.8  # half the steps reuse every block module
    with ditscope.apply(model, ditscope.ToCaConfig(), num_inference_steps=STEPS, count_flops=True) as h:
        with torch.no_grad(), FlopCounterMode(display=False) as outer:
            run_steps(model, inputs)
        stats = h.stats()
    assert stats.flops == outer.get_total_flops()  # scoring included: what really ran
    assert stats.flops_ratio < 1


# ------------------------------------------------------------------------------------- pipelines
@pytest.fixture(scope="module")
def pipe():
    from ditscope.zoo import train

    p = train.build("tiny-pixart")
    p.set_progress_bar_config(disable=True)
    return p


def generate(pipe, prompts, seeds=None, steps=10):
    """One generator per prompt, so that prompt i draws the same noise in any batch."""
    seeds = seeds if seeds is not None else range(len(prompts))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        prompts, num_inference_steps=steps, guidance_scale=4.5, generator=generators, output_type="pt"
    ).images


PROMPTS = [
    "a small red circle at the top left on a grey background",
    "a large blue square in the center on a white background",
    "a small green triangle at the bottom right on a black background",
]


@pytest.mark.parametrize("method", ["toca", "fora", "fbcache", "teacache"])
def test_pipeline_same_seed_same_image_and_no_leak_between_batch_items(pipe, method):
    config = REGISTRY[method].test_config("aggressive") if method == "fbcache" else CONFIGS[method]()
    with ditscope.apply(pipe, config):
        a, b = generate(pipe, PROMPTS[:2]), generate(pipe, PROMPTS[:2])
        other = generate(pipe, [PROMPTS[0], PROMPTS[2]])
    assert torch.equal(a, b)  # nothing carries over between calls
    assert torch.equal(a[0], other[0])  # item 0 does not see what item 1 is


@pytest.mark.parametrize(
    "config",
    [
        ditscope.ToCaConfig(score="random"),
        ditscope.FORAConfig(),
        ditscope.FBCacheConfig(threshold=0.3),
        ditscope.TeaCacheConfig(),
    ],
    ids=["toca-random", "fora", "fbcache", "teacache"],
)
def test_pipeline_batch_of_two_equals_each_alone(pipe, config):
    """Up to float noise: batch size changes matmul blocking (1e-6 without any cache). Token scores from
    attention maps can rank near-tied tokens differently under that noise, hence the random score here;
    the test above shows no batch item influences another under every score."""
    with ditscope.apply(pipe, config):
        both = generate(pipe, PROMPTS[:2])
        alone = [generate(pipe, [p], seeds=[i])[0] for i, p in enumerate(PROMPTS[:2])]
    for i in range(2):
        assert torch.allclose(both[i], alone[i], atol=1e-5), (both[i] - alone[i]).abs().max()


def test_pipeline_under_inference_mode(pipe):
    prompts = PROMPTS[2:]
    with ditscope.apply(pipe, ditscope.ToCaConfig()):
        plain = generate(pipe, prompts)
        with torch.inference_mode():
            inference = generate(pipe, prompts)
    assert torch.equal(plain, inference)


def test_pipeline_remove_restores_scheduler_and_output(pipe):
    prompts = PROMPTS[:1]
    reference = generate(pipe, prompts, steps=6)
    handle = ditscope.apply(pipe, ditscope.ToCaConfig())
    assert not torch.equal(generate(pipe, prompts, steps=6), reference)
    handle.remove()
    assert "set_timesteps" not in vars(pipe.scheduler)
    assert torch.equal(generate(pipe, prompts, steps=6), reference)


# ------------------------------------------------------------------------------------ bad input
def test_unsupported_model_is_a_clear_error():
    with pytest.raises(DitscopeError, match="not supported yet: STDiT.*layout="):
        ditscope.apply(opensora_like.build(), ditscope.ToCaConfig())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lists": ("nope_blocks",)}, "no block list 'nope_blocks'"),
        ({"lists": ("final",)}, "not a ModuleList"),
        ({"modules": (("atn", SELF, "image"),)}, "no block of STDiT has a child module 'atn'"),
        ({"modules": (("attn", "spatial", "image"),)}, "kind 'spatial'"),
        ({"modules": (("attn",),)}, "is not \\(name, kind, stream\\)"),
        ({"returns": ("out",)}, "roles 'hidden' and 'encoder'"),
        ({"timestep": "timestep"}, "STDiT.forward has no argument 'timestep'"),
    ],
)
def test_bad_declared_layouts_are_one_line_errors(change, message):
    import dataclasses

    def make():
        return dataclasses.replace(opensora_like.LAYOUT, **change)

    with pytest.raises(DitscopeError, match=message) as err:
        ditscope.apply(opensora_like.build(), ditscope.FORAConfig(), num_inference_steps=4, layout=make())
    assert "\n" not in str(err.value)
    with pytest.raises(DitscopeError, match="must be a ditscope.Blocks"):
        ditscope.apply(opensora_like.build(), ditscope.FORAConfig(), layout={"lists": ["spatial_blocks"]})


def test_family_variants_by_class_hierarchy_or_prefix():
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    from ditscope.families import GENERIC, family_of

    class MyWan(WanTransformer3DModel):
        pass

    assert family_of(TINY["WanTransformer3DModel"][0]()).name == "wan"
    assert family_of(MyWan.__new__(MyWan)).name == "wan"  # a subclass
    for name, family in [
        ("WanVACETransformer3DModel", "wan"),
        ("HunyuanVideoFramepackTransformer3DModel", "hunyuanvideo"),
        ("Flux2Transformer2DModel", None),
        ("HunyuanVideo15Transformer3DModel", None),
    ]:
        variant = type(name, (torch.nn.Module,), {})()
        assert (family_of(variant).name if family else family_of(variant)) == (family or GENERIC), name
    assert family_of(FluxTransformer2DModel.__new__(FluxTransformer2DModel)).name == "flux"


def test_wan22_two_transformers_are_both_cached_on_one_step_axis():
    """Wan 2.2 pipelines carry `transformer` (high noise, early steps) and `transformer_2` (late steps)."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    build, inputs = TINY["WanTransformer3DModel"]
    high, low = build(), build()
    with torch.no_grad():
        for p in low.parameters():
            p.mul_(0.9)  # another expert
    pipe = SimpleNamespace(transformer=high, transformer_2=low, scheduler=FlowMatchEulerDiscreteScheduler())

    def sample():
        pipe.scheduler.set_timesteps(STEPS)
        outs = []
        with torch.no_grad():
            for s, t in enumerate(pipe.scheduler.timesteps):
                model = high if s < STEPS // 2 else low
                outs.append(tensor_of(model(**dict(inputs(2, s), timestep=t.expand(2)))))
        return outs

    reference = sample()
    with ditscope.apply(pipe, ditscope.FORAConfig(interval=1)):
        assert all(torch.equal(a, b) for a, b in zip(sample(), reference))
    handle = ditscope.apply(pipe, ditscope.FORAConfig(interval=2))
    outs = sample()
    stats = handle.stats()
    steps = {}
    for r in stats.records:
        steps.setdefault(r.get("model", "transformer"), []).append(r["step"])
    assert steps == {"transformer": [0, 1, 2, 3], "transformer_2": [4, 5, 6, 7]}
    assert any(s.name.startswith("transformer_2.blocks.0") for s in stats.sites)
    assert stats.summary()["reused"] > 0 and not torch.equal(outs[-1], reference[-1])
    handle.remove()
    assert (
        "forward" not in vars(high)
        and "forward" not in vars(low)
        and "set_timesteps" not in vars(pipe.scheduler)
    )
    assert all(torch.equal(a, b) for a, b in zip(sample(), reference))
    # a plan names the second transformer's units with its prefix
    rows = {"transformer_2.stack": "CRCRCRCR", "blocks.0.ffn": "CCRCCRCC"}
    with ditscope.apply(pipe, ditscope.PlanConfig(ditscope.Schedule(rows))) as handle:
        sample()
        assert handle.stats().summary()["blocks_reused"] > 0


def test_applying_twice_and_bad_configs():
    build, inputs = TINY["DiTTransformer2DModel"]
    model = build()
    handle = ditscope.apply(model, ditscope.FORAConfig(), num_inference_steps=4)
    with pytest.raises(DitscopeError, match="already applied"):
        ditscope.apply(model, ditscope.FORAConfig())
    handle.remove()
    with pytest.raises(DitscopeError, match="unknown ToCa score"):
        ditscope.apply(model, ditscope.ToCaConfig(score="magic"))
    with pytest.raises(DitscopeError, match="not a cache config"):
        ditscope.apply(model, object())
    with (
        ditscope.apply(model, ditscope.FORAConfig()),
        pytest.raises(DitscopeError, match="num_inference_steps"),
    ):
        with torch.no_grad():
            model(**inputs(1, 0))
    assert "forward" not in vars(model)


def test_config_from_cli_options():
    assert config_from_options("toca", ["interval=4", "ratio=0.5"]) == ditscope.ToCaConfig(
        interval=4, ratio=0.5
    )
    assert config_from_options("toca", ["preset=dit"]) == ditscope.ToCaConfig.dit()
    assert config_from_options("teacache", ["coefficients=[2,0]"]).coefficients == (2, 0)
    for bad, match in [
        (["interval=x"], "expects a int"),
        (["bogus=1"], "no option 'bogus'"),
        (["ratio"], "key=value"),
    ]:
        with pytest.raises(DitscopeError, match=match):
            config_from_options("toca", bad)
    with pytest.raises(DitscopeError, match="unknown cache method"):
        config_from_options("nocache")


@pytest.mark.parametrize("name", ["fbcache", "teacache"])
def test_batch_level_decision_skips_all_rows_together(name, monkeypatch):
    """per_sample=False decides once per step for the whole batch (diffusers' behaviour): every row
    reuses or every row computes, never a mix. (On the trained model, per-sample decisions at this
    threshold do mix rows on about half the steps.)"""
    from ditscope import zoo
    from ditscope.cache import actions

    pipe = zoo.load("tiny-pixart")
    pipe.set_progress_bar_config(disable=True)
    masks = []
    original = actions.run_block

    def spy(ctx, bsite, run, args, kwargs, reuse_rows):
        if reuse_rows is not None:
            masks.append(reuse_rows.clone())
        return original(ctx, bsite, run, args, kwargs, reuse_rows)

    module = __import__(f"ditscope.cache.{name}", fromlist=["run_block"])
    monkeypatch.setattr(module, "run_block", spy)
    config = CONFIGS[name](threshold=0.3, per_sample=False)
    with ditscope.apply(pipe, config):
        generate(pipe, PROMPTS[:2])
    assert masks, "no step was decided"
    assert all(bool((m == m[0]).all()) for m in masks)
    assert config_from_options(name, ["per_sample=false"]).per_sample is False


def test_out_of_range_options_are_refused_not_clamped():
    build, _ = TINY["PixArtTransformer2DModel"]
    with pytest.raises(DitscopeError, match="ratio <= 1"):
        ditscope.apply(build(), ditscope.ToCaConfig(ratio=2.0), num_inference_steps=4)


def test_readme_family_table_agrees_with_families_py():
    """The README's table of cached families is families.py's: class, family, block lists, modules."""
    from pathlib import Path

    from ditscope.families import FAMILIES, JOINT, TEMPORAL

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    header = (
        "| family | transformer class | block lists | cached modules (name kind stream) | run whole by ToCa |"
    )
    assert header in readme
    lines = readme[readme.index(header) :].splitlines()[2:]
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        family, cls, lists, modules, whole = [c.strip() for c in line.strip("|").split("|")]
        rows[cls.strip("`")] = (
            family,
            [x.strip(" `") for x in lists.split(",")],
            [tuple(m.strip().replace("`", "").split()) for m in modules.split(",")],
            [] if whole == "-" else [w.strip(" `") for w in whole.split(",")],
        )
    expected = {}
    for cls, f in FAMILIES.items():
        assert f.blocks is not None, f"{cls} has no block layout"
        whole = [
            m.name
            for m in f.blocks.modules
            if (m.kind in (SELF, TEMPORAL) and m.stream == JOINT) or not m.tokenwise
        ]
        expected[cls] = (
            f.name,
            list(f.blocks.lists),
            [(m.name, m.kind, m.stream) for m in f.blocks.modules],
            whole,
        )
    assert rows == expected


def test_toca_scores_mochi_tokens_from_its_per_sample_attention():
    """Mochi runs joint attention once per sample (each with its own text length): ToCa stacks the samples'
    image-token scores instead of dropping them."""
    from ditscope.cache import toca

    build, inputs, _ = CASES["MochiTransformer3DModel"]
    model = build()
    seen = []
    original = toca.ToCaMethod.token_scores

    def spy(self, ctx, site, rows, n, device):
        out = original(self, ctx, site, rows, n, device)
        if site.name.endswith(".ff"):
            age = self.config.freq_weight * ctx.state["age"][site.index] / self.config.interval
            seen.append(bool((out - age).abs().sum() > 0))  # more than the age term: attention scores arrived
        return out

    toca.ToCaMethod.token_scores = spy
    try:
        with cache(model, ditscope.ToCaConfig(uniform_bonus=0)):
            run_steps(model, inputs)
    finally:
        toca.ToCaMethod.token_scores = original
    assert seen and all(seen)


def test_flops_are_counted_under_inference_mode_on_mochi():
    """torch's FlopCounterMode module tracker fails under inference_mode when a module input requires grad
    (Mochi's rope gets a Parameter); ditscope's counter counts the total without it."""
    build, inputs, _ = CASES["MochiTransformer3DModel"]
    model = build()
    counted = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), cache(model, ditscope.FORAConfig(interval=2), count_flops=True) as handle:
            for s in range(STEPS):
                model(**inputs(2, s))
            counted.append(handle.stats().flops)
    assert counted[0] == counted[1] > 0


def test_toca_says_when_no_attention_score_came():
    """ToCa reads its score from torch's SDPA; an attention processor that computes the map itself (as diffusers'
    non-native backends do in their own kernels) gives none, and stats() says the tokens went by age alone."""
    from diffusers.models.attention_processor import AttnProcessor

    name = next(n for n in CASES if "PixArt" in n)
    build, inputs, _ = CASES[name]
    model = build()
    config = ditscope.ToCaConfig(ratio=0.5)
    with cache(model, config) as handle:
        run_steps(model, inputs)
        assert not any("no attention score" in text for text in handle.stats().notes.values())
    model.set_attn_processor(AttnProcessor())  # softmax(QK^T)V in plain torch: no SDPA call
    with cache(model, config) as handle:
        run_steps(model, inputs)
        notes = handle.stats().notes
    assert notes and all("no attention score came" in text for text in notes.values()), notes
