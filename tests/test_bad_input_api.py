"""Bad input through the Python API: one DitscopeError naming the problem, before any model call, and the
model left as it was (no wrapper stays behind)."""

import math

import pytest
from tiny import FAMILIES as TINY

import ditscope
from ditscope import DitscopeError, Schedule
from ditscope.planning.planner import Target

NAN, INF = math.nan, math.inf

CONFIGS = [
    (lambda: ditscope.ToCaConfig(interval="3"), "ToCaConfig.interval must be an integer"),
    (lambda: ditscope.ToCaConfig(interval=2.5), "ToCaConfig.interval must be an integer"),
    (lambda: ditscope.ToCaConfig(interval=True), "ToCaConfig.interval must be an integer"),
    (lambda: ditscope.ToCaConfig(ratio=NAN), "ToCaConfig.ratio must be a finite number"),
    (lambda: ditscope.ToCaConfig(ratio=-0.1), "ToCaConfig.ratio must be a finite number"),
    (lambda: ditscope.ToCaConfig(ratio=1.5), "0 <= ratio <= 1"),
    (lambda: ditscope.ToCaConfig(interval=0), "interval >= 1"),
    (lambda: ditscope.ToCaConfig(step_weight=INF), "ToCaConfig.step_weight must be a finite"),
    (lambda: ditscope.ToCaConfig(warmup=-1), "ToCaConfig.warmup must be a finite"),
    (lambda: ditscope.DuCaConfig(interval=0), "interval >= 1"),
    (lambda: ditscope.FORAConfig(interval=0), "interval"),
    (lambda: ditscope.FORAConfig(interval="x"), "FORAConfig.interval must be an integer"),
    (lambda: ditscope.FBCacheConfig(threshold=NAN), "FBCacheConfig.threshold must be a finite"),
    (lambda: ditscope.FBCacheConfig(threshold=-1.0), "FBCacheConfig.threshold must be a finite"),
    (lambda: ditscope.FBCacheConfig(threshold="0.1"), "FBCacheConfig.threshold must be a number"),
    (lambda: ditscope.FBCacheConfig(per_sample="yes"), "FBCacheConfig.per_sample is a flag"),
    (lambda: ditscope.TeaCacheConfig(threshold=NAN), "TeaCacheConfig.threshold must be a finite"),
    (lambda: ditscope.TeaCacheConfig(threshold=INF), "TeaCacheConfig.threshold must be a finite"),
    (lambda: ditscope.PABConfig(spatial_range=(800, 100)), "spatial_range must be (low, high)"),
    (lambda: ditscope.PABConfig(cross_range=(0, 2000)), "cross_range must be (low, high)"),
    (lambda: ditscope.PABConfig(temporal_range=(100,)), "temporal_range must be (low, high)"),
    (lambda: ditscope.PABConfig(spatial_interval=0), "PAB intervals must be >= 1"),
    (lambda: ditscope.TaylorSeerConfig(interval=0), "interval"),
    (lambda: ditscope.TaylorSeerConfig(order=-1), "TaylorSeerConfig.order must be a finite"),
    (lambda: ditscope.DeltaDiTConfig(interval=-2), "DeltaDiTConfig.interval must be a finite"),
    (lambda: ditscope.PlanConfig(Schedule({"stack": "CR"}), tolerance=-1.0), "tolerance must be a finite"),
    (lambda: ditscope.PlanConfig(Schedule({"stack": "CR"}), tolerance=NAN), "tolerance must be a finite"),
    (lambda: ditscope.PlanConfig(Schedule({"stack": "CR"}), tolerance=INF), "tolerance must be a finite"),
    (
        lambda: ditscope.PlanConfig(Schedule({"stack": "CR"}), tolerance=0.5),
        "tolerance applies to an adaptive plan",
    ),
    (
        lambda: ditscope.PlanConfig(Schedule({"stack": "CR"}), signal="input"),
        "signal applies to an adaptive plan",
    ),
    (
        lambda: ditscope.PlanConfig(
            Schedule({"stack": "CR"}, meta={"stack_change": [[None, NAN]]}), adaptive=True
        ),
        "holds a value that is not a finite number",
    ),
    (
        lambda: ditscope.PlanConfig(
            Schedule({"stack": "CR"}, meta={"stack_change": [[None, 0.1]], "signal": [[None, NAN]]}),
            adaptive=True,
        ),
        "calibrated signal holds a value that is not a finite number",
    ),
    (lambda: ditscope.ToCaConfig(module_factors={"bogus": 1.0}), "module_factors has no entry 'bogus'"),
    (
        lambda: ditscope.ToCaConfig(module_factors={"self": 0, "cross": 0.6, "mlp": NAN, "temporal": 0}),
        r"module_factors\['mlp'\] must be a finite number",
    ),
    (
        lambda: ditscope.ToCaConfig(module_factors={"self": -1.0}),
        r"module_factors\['self'\] must be a finite",
    ),
    (lambda: ditscope.TeaCacheConfig(coefficients=(NAN, 1.0)), "coefficients must hold finite numbers"),
]


@pytest.mark.parametrize("make,message", CONFIGS, ids=[m for _, m in CONFIGS])
def test_a_bad_config_is_refused_before_the_model_runs(make, message):
    build, _ = TINY["PixArtTransformer2DModel"]
    model = build()
    before = dict(vars(model))
    with pytest.raises(DitscopeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ditscope.apply(model, make(), num_inference_steps=4)
    assert dict(vars(model)) == before and getattr(model, "_ditscope_cache", None) is None


OTHER = [
    (lambda m: Schedule({}), "at least one row"),
    (lambda m: Schedule({"stack": ""}), "non-empty string"),
    (lambda m: Schedule({"stack": "RC"}), "must compute at step 0"),
    (lambda m: Schedule({"stack": "CX"}), "unknown actions"),
    (lambda m: Schedule({"stack": "CC", "transformer_blocks.0.ff": "C"}), "one action per step"),
    (lambda m: Schedule({"stack": 3}), "non-empty string"),
    (
        lambda m: ditscope.apply(m, ditscope.FORAConfig(), num_inference_steps=-3),
        "num_inference_steps must be",
    ),
    (
        lambda m: ditscope.apply(m, ditscope.FORAConfig(), num_inference_steps=0),
        "num_inference_steps must be",
    ),
    (
        lambda m: ditscope.apply(m, ditscope.FORAConfig(), num_inference_steps=2.5),
        "num_inference_steps must be",
    ),
    (lambda m: ditscope.apply(object(), ditscope.FORAConfig()), "cannot cache object"),
    (lambda m: ditscope.apply(m, ditscope.FORAConfig), "is not a cache config"),
    (lambda m: ditscope.apply(m, {"interval": 3}), "is not a cache config"),
    (lambda m: Target.parse("psnr=nan"), "unreachable"),
    (lambda m: Target.parse("speedup=inf"), "unreachable"),
    (lambda m: Target.parse("lpips=0.1"), "unknown target"),
    (lambda m: Target.parse("psnr_p5=120"), "unreachable"),
    (lambda m: ditscope.Plan.load(None), "loaded from a file path"),
    (lambda m: ditscope.plan(None, "a red circle", "psnr=25", 6), "a list of calibration prompts, not str"),
    (lambda m: ditscope.plan(None, ["a red circle"], "psnr=25", 6, batch_size=0), "batch_size >= 1"),
    (lambda m: ditscope.tune(None, "fora", "a red circle", "psnr=25", 6), "a list of calibration prompts"),
    (lambda m: ditscope.tune(None, "fora", ["a red circle"], "psnr=25", 6, batch_size=0), "batch_size >= 1"),
]


@pytest.mark.parametrize("call,message", OTHER, ids=[m for _, m in OTHER])
def test_other_bad_api_input_is_one_error(call, message):
    model = TINY["PixArtTransformer2DModel"][0]()
    with pytest.raises(DitscopeError, match=message):
        call(model)
    assert getattr(model, "_ditscope_cache", None) is None


def test_the_planning_helpers_refuse_a_nan_guidance():
    from ditscope.profiling.workload import generate

    with pytest.raises(DitscopeError, match="guidance_scale must be a finite number >= 0"):
        generate(None, ["a red circle"], 4, guidance_scale=NAN)
