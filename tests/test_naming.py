"""One naming contract between measuring and caching, so that a plan read off a profile addresses the
sites the engine executes.

- A site's name is its qualified module name under the transformer ("transformer_blocks.3.attn1"), in
  a profile's `layer_names` and in the engine's `Site.name` alike.
- Steps count sampling steps from 0 (the first denoising step) in both. The engine numbers the steps
  it runs 0..T-1; a profile's step s (1..T-1) is the change from step s-1 to step s, so it has no step 0,
  and its timestep for step s is the one the engine runs at step s.
"""

import pytest
import torch

import ditscope
from ditscope import zoo
from ditscope.families import CROSS, SELF, TEMPORAL

STEPS = 4
PROMPT = "a large red circle on the left on a grey background"


@pytest.fixture(scope="module")
def pipe():
    p = zoo.load("tiny-pixart")
    p.set_progress_bar_config(disable=True)
    return p


def test_profile_layers_are_the_engines_attention_sites_and_steps_line_up(pipe):
    profile = ditscope.profile(pipe, [PROMPT], num_inference_steps=STEPS, seed=0, guidance_scale=4.5)
    with ditscope.apply(pipe, ditscope.FORAConfig(interval=1)) as handle:  # computes everything
        pipe(
            PROMPT, num_inference_steps=STEPS, guidance_scale=4.5, generator=torch.Generator().manual_seed(0)
        )
        stats = handle.stats()
    attention_sites = {s.name for s in stats.sites if s.kind in (SELF, CROSS, TEMPORAL)}
    assert set(profile.layer_names) == attention_sites
    assert all(name.startswith("transformer_blocks.") for name in profile.layer_names)

    df = profile.to_pandas()
    assert sorted(df["step"].unique()) == list(range(1, STEPS))
    engine_t = {r["step"]: r["timestep"] for r in stats.records}
    assert sorted(engine_t) == list(range(STEPS))
    for step, t in df.groupby("step")["timestep"].first().items():
        assert t == pytest.approx(engine_t[step]), step


def test_output_only_sites_cover_every_site_the_cache_acts_on(pipe):
    """With outputs="mlp,blocks" a profile names every module site and block the engine caches, and a
    block's recorded change is the change of its residual (output minus input)."""
    from ditscope.cache.layout import layout_of

    profile = ditscope.profile(
        pipe, [PROMPT], num_inference_steps=STEPS, seed=0, guidance_scale=4.5, outputs="mlp,blocks"
    )
    _, blocks, sites, _ = layout_of(pipe.transformer)
    assert {s.name for s in sites} | {b.name for b in blocks} == set(profile.layer_names)
    out = profile.grid("out", "image", profile.default_view()["branch"], "rel_l1")
    rows = [profile.layer_names.index(n) for n in ("transformer_blocks.0", "transformer_blocks.0.ff")]
    assert (out[rows] > 0).all() and (out[rows] < 10).all()

    # the block's residual, by hand, on the cond half of the batch
    block = pipe.transformer.transformer_blocks[0]
    seen = []
    hook = block.register_forward_hook(
        lambda m, args, kwargs, output: seen.append(
            output - kwargs.get("hidden_states", args[0] if args else None)
        ),
        with_kwargs=True,
    )
    try:
        pipe(
            PROMPT, num_inference_steps=STEPS, guidance_scale=4.5, generator=torch.Generator().manual_seed(0)
        )
    finally:
        hook.remove()
    cond = [r[1:] for r in seen]  # PixArt batches (uncond, cond)
    by_hand = [float((b - a).abs().sum() / a.abs().sum()) for a, b in zip(cond, cond[1:])]
    assert out[rows[0]] == pytest.approx(by_hand, rel=1e-4)
