"""Peer caches (diffusers hooks, cache-dit) on the zoo pipeline: they really cache, and come off exactly."""

import importlib.util
import sys
import types

import pytest
import torch

from ditscope import zoo
from ditscope.bench.peers import PEER_GRIDS, PEERS, PeerUnavailable, apply_peer, peer_options
from ditscope.errors import DitscopeError

STEPS = 8
PROMPT = ["a large red circle on the left on a grey background"]
DIFFUSERS = [n for n in PEERS if n.startswith("diffusers-")]
CACHEDIT = [n for n in PEERS if n.startswith("cachedit-")]

# settings that surely skip work in STEPS steps (the default grids are tuned for 20)
AGGRESSIVE = {
    "diffusers-pab": PEER_GRIDS["diffusers-pab"][-1],
    "diffusers-fbcache": {"threshold": 0.5},
    "diffusers-fastercache": PEER_GRIDS["diffusers-fastercache"][-1],
    "diffusers-taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2},
    "diffusers-magcache": {"threshold": 0.5, "max_skip_steps": 3, "retention_ratio": 0.1},
    "cachedit-dbcache": {"residual_diff_threshold": 0.5, "max_warmup_steps": 1},
    "cachedit-dbcache-taylorseer": {"residual_diff_threshold": 0.5, "max_warmup_steps": 1},
}

needs_tiny_pixart = pytest.mark.skipif(not zoo.available("tiny-pixart"), reason="tiny-pixart weights are not shipped")


class Counted:
    """tiny-pixart with a counter of the rows its attention and feed-forward layers compute."""

    def __init__(self):
        self.pipe = zoo.load("tiny-pixart")
        self.pipe.set_progress_bar_config(disable=True)
        self.rows = 0
        for block in self.pipe.transformer.transformer_blocks:
            for layer in (block.attn1.to_q, block.attn2.to_q, block.ff):
                layer.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.rows += args[0].shape[0]

    def run(self, seed: int = 0):
        self.rows = 0
        return self.pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=4.5,
                         generator=[torch.Generator().manual_seed(seed)], output_type="pt").images

    def calibrate(self):
        return self.run(seed=1)


@pytest.fixture(scope="module")
def counted():
    return Counted()


@pytest.fixture(scope="module")
def baseline(counted):
    images = counted.run()
    return images, counted.rows


def _residue(pipe) -> dict:
    """What a peer could leave behind: instance attributes and active hooks of every module, class attributes."""
    t = pipe.transformer
    return {
        "attrs": {name: sorted(vars(m)) for name, m in t.named_modules()},
        "order": [name for name, _ in t.named_modules()],
        "hooks": [name for name, m in t.named_modules() if getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks],
        "pipe": sorted(vars(pipe)),
        "class": {k: id(v) for k, v in vars(type(pipe)).items()},
    }


def _check_peer(counted, baseline, name: str):
    base_images, base_rows = baseline
    options = AGGRESSIVE[name]
    before = _residue(counted.pipe)
    remove = apply_peer(name, counted.pipe, options, STEPS, counted.calibrate)
    try:
        cached = counted.run()
        cached_rows = counted.rows
        again = counted.run()
    finally:
        remove()
    remove()  # a second remove() is a no-op
    assert cached_rows < base_rows, f"{name} computed every layer ({cached_rows} rows)"
    assert not torch.equal(cached, base_images)
    assert torch.equal(again, cached), f"{name} carried state from one pipeline call into the next"
    assert torch.equal(counted.run(), base_images), f"{name}: remove() did not restore the uncached output"
    assert counted.rows == base_rows
    assert _residue(counted.pipe) == before


@needs_tiny_pixart
@pytest.mark.filterwarnings("ignore:torch.meshgrid")
@pytest.mark.parametrize("name", DIFFUSERS)
def test_diffusers_peer_caches_and_removes_exactly(counted, baseline, name):
    _check_peer(counted, baseline, name)


@needs_tiny_pixart
@pytest.mark.parametrize("name", CACHEDIT)
def test_cachedit_peer_caches_and_removes_exactly(counted, baseline, name):
    pytest.importorskip("cache_dit")
    _check_peer(counted, baseline, name)


@needs_tiny_pixart
def test_peer_can_be_reapplied(counted, baseline):
    pytest.importorskip("cache_dit")
    for name in ("diffusers-fbcache", "cachedit-dbcache"):
        outputs = []
        for _ in range(2):
            remove = apply_peer(name, counted.pipe, AGGRESSIVE[name], STEPS, counted.calibrate)
            outputs.append(counted.run())
            remove()
        assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(counted.run(), baseline[0])


@needs_tiny_pixart
@pytest.mark.parametrize("name", ["diffusers-fbcache", "cachedit-dbcache", "diffusers-magcache"])
def test_peer_that_fails_to_run_is_peer_unavailable_and_removed(counted, name):
    if name.startswith("cachedit-"):
        pytest.importorskip("cache_dit")
    before = _residue(counted.pipe)

    def broken():  # apply_peer tries the peer once (MagCache also calibrates with it); a failure means it cannot run
        raise RuntimeError("boom")

    with pytest.raises(PeerUnavailable, match="boom"):
        apply_peer(name, counted.pipe, {}, STEPS, broken)
    assert _residue(counted.pipe) == before


@pytest.mark.parametrize("name", list(PEERS))
def test_unknown_option_is_a_ditscope_error(name):
    pipe = types.SimpleNamespace(transformer=torch.nn.Linear(2, 2))
    with pytest.raises(DitscopeError) as e:
        apply_peer(name, pipe, {"no_such_option": 1}, STEPS, lambda: None)
    message = str(e.value)
    assert "no_such_option" in message and "\n" not in message
    assert all(key in message for key in peer_options(name))


@pytest.mark.parametrize(("name", "options"), [
    ("diffusers-fbcache", {"threshold": "high"}),
    ("diffusers-pab", {"spatial_attention_timestep_skip_range": [100]}),
    ("cachedit-dbcache", {"Fn_compute_blocks": 1.5}),
])
def test_badly_typed_option_is_a_ditscope_error(name, options):
    with pytest.raises(DitscopeError, match=next(iter(options))):
        apply_peer(name, types.SimpleNamespace(transformer=torch.nn.Linear(2, 2)), options, STEPS, lambda: None)


def test_unknown_peer_is_a_ditscope_error():
    with pytest.raises(DitscopeError, match="diffusers-fbcache"):
        apply_peer("no-such-peer", types.SimpleNamespace(transformer=torch.nn.Linear(2, 2)), {}, STEPS, lambda: None)


def test_grids_are_small_and_valid():
    assert set(PEER_GRIDS) == set(PEERS)
    for name, grid in PEER_GRIDS.items():
        assert 2 <= len(grid) <= 4
        for options in grid:
            assert set(options) <= set(peer_options(name)), (name, options)


@pytest.mark.parametrize("name", ["diffusers-pab", "diffusers-fbcache", "diffusers-taylorseer", "cachedit-dbcache"])
def test_unsupported_model_is_peer_unavailable(name):
    if name.startswith("cachedit-"):
        pytest.importorskip("cache_dit")
    linear = torch.nn.Linear(2, 2)
    with pytest.raises(PeerUnavailable) as e:
        apply_peer(name, types.SimpleNamespace(transformer=linear, scheduler=None), {}, STEPS, lambda: None)
    assert "Linear" in str(e.value) and "\n" not in str(e.value)
    assert not hasattr(linear, "_cache_config") and "forward" not in vars(linear)


def test_missing_cache_dit_is_peer_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # import cache_dit -> ImportError
    with pytest.raises(PeerUnavailable, match="pip install ditscope\\[peers\\]"):
        apply_peer("cachedit-dbcache", types.SimpleNamespace(transformer=torch.nn.Linear(2, 2)), {}, STEPS, lambda: None)


# ------------------------------------------------------------------------------ the other families
class ModelPipe:
    """A tiny transformer of tests/tiny.py behind a pipeline's shape (`.transformer`, `.scheduler`, a call
    that runs a denoising loop): what the peers adapt to. Random weights: rows measure that a peer runs,
    caches and comes off, not quality."""

    def __init__(self, name: str):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from tiny import FAMILIES as TINY

        build, self.inputs = TINY[name]
        self.transformer, self.scheduler = build(), FlowMatchEulerDiscreteScheduler()

    def __call__(self, *args, **kwargs):
        self.scheduler.set_timesteps(STEPS)
        outs = []
        with torch.no_grad():
            for s, t in enumerate(self.scheduler.timesteps):
                kw = self.inputs(2, s)
                dtype = kw["timestep"].dtype
                kw["timestep"] = (t / 1000 if dtype.is_floating_point else t).expand(2).to(dtype)
                outs.append(self.transformer(**kw, return_dict=False)[0])
        return torch.stack(outs)


# peers that cannot run there, and why (the rows a bench reports with their error); every other peer runs
CANNOT = {
    # FasterCache halves only the batch kwargs it knows (hidden_states, encoder_hidden_states, timestep,
    # masks): HunyuanVideo's pooled_projections / guidance and QwenImage's encoder_hidden_states_mask stay whole
    ("HunyuanVideoTransformer3DModel", "diffusers-fastercache"): "must match the size",
    ("QwenImageTransformer2DModel", "diffusers-fastercache"): "encoder_hidden_states_mask",
    # diffusers' FirstBlockCache subtracts the head block's text stream from the tail block's, which SD3's
    # last block (context_pre_only) does not return (first_block_cache.py line 176, FBCBlockHook.new_forward)
    ("SD3Transformer2DModel", "diffusers-fbcache"): "NoneType",
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", ["MochiTransformer3DModel", "HunyuanVideoTransformer3DModel", "WanTransformer3DModel",
                                  "QwenImageTransformer2DModel", "SD3Transformer2DModel"])
def test_peers_on_the_other_families(name):
    pipe = ModelPipe(name)
    reference = pipe()
    for peer in PEERS:
        if peer.startswith("cachedit-") and importlib.util.find_spec("cache_dit") is None:
            continue
        before = {n: sorted(vars(m)) for n, m in pipe.transformer.named_modules()}
        if (name, peer) in CANNOT:
            with pytest.raises(PeerUnavailable, match=CANNOT[name, peer]) as e:
                apply_peer(peer, pipe, AGGRESSIVE[peer], STEPS, pipe)
            assert "\n" not in str(e.value)
        else:
            remove = apply_peer(peer, pipe, AGGRESSIVE[peer], STEPS, pipe)
            try:
                cached = pipe()
            finally:
                remove()
            assert torch.isfinite(cached).all() and not torch.equal(cached, reference), f"{peer} cached nothing on {name}"
        assert torch.equal(pipe(), reference), f"{peer} on {name}: not restored"
        assert {n: sorted(vars(m)) for n, m in pipe.transformer.named_modules()} == before, peer
