"""The predictors a served unit is made of (cache/predictors.py), against their formulas written out, and a
plan's fitted forecast served at a module as its weights say."""

import pytest
import torch
from tiny import FAMILIES as TINY  # noqa: F401  (the tiny models' registry, imported for its side effects)

import ditscope
from ditscope import Schedule, zoo
from ditscope.cache.predictors import FITTED, LINEAR, REUSE, Taylor


def values():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(3, 5, 4, generator=g, dtype=torch.float64) for _ in range(4)]


def test_taylor_series_from_finite_differences_written_out():
    """Order 2 at uneven computes 1, 4, 6 served at step 9: d1 at each compute is the difference quotient of
    the last two, d2 that of d1; the forecast is y + k d1 + k^2 / 2 d2 with k = 3."""
    y1, y2, y3, _ = values()
    history = [(1, y3), (4, y2), (6, y1)]
    d1_now, d1_before = (y1 - y2) / 2, (y2 - y3) / 3
    d2 = (d1_now - d1_before) / 2
    expected = y1 + 3 * d1_now + 9 / 2 * d2
    assert torch.allclose(Taylor(2)(history, 9), expected, rtol=0, atol=1e-12)
    assert torch.allclose(LINEAR(history, 9), y1 + 3 * d1_now, rtol=0, atol=1e-12)
    assert REUSE(history, 9) is y1 and torch.equal(Taylor(0)(history, 9), y1)
    # fewer computes than the order reads: the highest order they allow
    assert torch.allclose(Taylor(3)(history[1:], 9), y1 + 3 * d1_now, rtol=0, atol=1e-12)
    assert Taylor(2)(history[2:], 9) is y1


def test_the_fitted_forecast_and_its_special_cases():
    """The Taylor terms scaled by the weights: at computes 1, 4, 6 served at step 9 (k = 3), y + w1 k d1 +
    w2 k^2 / 2 d2 with d1, d2 written out as in the Taylor test."""
    y1, y2, y3, _ = values()
    history = [(1, y3), (4, y2), (6, y1)]
    d1 = (y1 - y2) / 2
    d2 = (d1 - (y2 - y3) / 3) / 2
    expected = y1 + 0.7 * 3 * d1 - 0.2 * 9 / 2 * d2
    assert torch.allclose(FITTED(history, 9, (0.7, -0.2)), expected, rtol=0, atol=1e-12)
    assert torch.allclose(FITTED(history, 9, (0.0, 0.0)), y1, rtol=0, atol=1e-12)  # reuse
    assert torch.allclose(FITTED(history, 9, (1.0, 0.0)), LINEAR(history, 9), rtol=0, atol=1e-12)
    assert torch.allclose(FITTED(history, 9, (1.0, 1.0)), Taylor(2)(history, 9), rtol=0, atol=1e-12)
    assert torch.allclose(FITTED(history, 9, None), Taylor(2)(history, 9), rtol=0, atol=1e-12)
    # two computes: the first weight on the linear term
    assert torch.allclose(FITTED(history[1:], 9, (0.5, 9.0)), y1 + 0.5 * 3 * d1, rtol=0, atol=1e-12)
    pair = FITTED([(1, (y3, None)), (4, (y2, None)), (6, (y1, None))], 9, (0.7, -0.2))  # a module's tuple
    assert pair[1] is None and torch.allclose(pair[0], expected, rtol=0, atol=1e-12)


def test_a_plan_serves_a_module_by_its_fitted_weights():
    """A plan whose module computes steps 0-3 and takes the fitted forecast at step 4 with weights (0.6, -0.3):
    what the module hands on at step 4 (the engine serves it through the module's call, so a forward hook
    sees it) is y3 + 0.6 (y3 - y2) - 0.3 / 2 (y3 - 2 y2 + y1) of its outputs at steps 1-3 in the uncached
    run (one step ahead of computes one step apart)."""
    pipe = zoo.load("tiny-pixart")
    pipe.set_progress_bar_config(disable=True)
    site, steps = "transformer_blocks.1.attn1", 6
    module = pipe.transformer.transformer_blocks[1].attn1
    seen = []

    def run():
        seen.clear()
        pipe(
            ["a red circle"],
            num_inference_steps=steps,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        )
        return list(seen)

    hook = module.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    try:
        with torch.inference_mode():
            plain = run()
            plan = Schedule({site: "CCCCLC"}, {"weights": {site: {"4": [0.6, -0.3]}}})
            with ditscope.apply(pipe, ditscope.PlanConfig(plan)) as handle:
                cached = run()
    finally:
        hook.remove()
    assert len(plain) == len(cached) == steps
    for t in range(4):
        assert torch.equal(cached[t], plain[t])
    expected = plain[3] + 0.6 * (plain[3] - plain[2]) - 0.3 / 2 * (plain[3] - 2 * plain[2] + plain[1])
    assert torch.allclose(cached[4], expected, rtol=0, atol=1e-5) and not torch.allclose(cached[4], plain[4])
    assert handle.stats().summary()["predicted"] == 1  # one module at one step


@pytest.mark.parametrize("weights", [{"x": {"4": [1.0]}}, {"x": {"4": [1.0, float("nan")]}}, {"x": [1, 2]}])
def test_damaged_fitted_weights_are_refused(weights):
    from ditscope.cache.plan import PlanMethod

    with pytest.raises(ditscope.DitscopeError, match="fitted weights for x are not pairs"):
        PlanMethod(ditscope.PlanConfig(Schedule({"stack": "CC"}, {"weights": weights}))).check()
