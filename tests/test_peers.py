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
DIFFUSERS = [n for n, p in PEERS.items() if p.system == "diffusers"]
CACHEDIT = [n for n, p in PEERS.items() if p.system == "cache-dit"]

# settings that surely skip work in STEPS steps (the default grids are tuned for 20)
AGGRESSIVE = {
    "diffusers-pab": PEER_GRIDS["diffusers-pab"][-1],
    "diffusers-fbcache": {"threshold": 0.5},
    "diffusers-fastercache": PEER_GRIDS["diffusers-fastercache"][-1],
    "diffusers-taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2},
    "diffusers-magcache": {"threshold": 0.5, "max_skip_steps": 3, "retention_ratio": 0.1},
    "cachedit-dbcache": {"residual_diff_threshold": 0.5, "max_warmup_steps": 1},
    "cachedit-dbcache-taylorseer": {"residual_diff_threshold": 0.5, "max_warmup_steps": 1},
    "smoothcache": {"alpha": 0.3},
    "tgate": {"gate_step": 4, "warm_up": 1, "sp_interval": 2},
}

needs_tiny_pixart = pytest.mark.skipif(
    not zoo.available("tiny-pixart"), reason="tiny-pixart weights are not shipped"
)


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
        return self.pipe(
            PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=4.5,
            generator=[torch.Generator().manual_seed(seed)],
            output_type="pt",
        ).images

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
        "hooks": [
            name
            for name, m in t.named_modules()
            if getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks
        ],
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
@pytest.mark.parametrize(
    "name", ["diffusers-fbcache", "cachedit-dbcache", "diffusers-magcache", "smoothcache", "tgate"]
)
def test_peer_that_fails_to_run_is_peer_unavailable_and_removed(counted, name):
    pytest.importorskip(PEERS[name].package)
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


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("diffusers-fbcache", {"threshold": "high"}),
        ("diffusers-pab", {"spatial_attention_timestep_skip_range": [100]}),
        ("cachedit-dbcache", {"Fn_compute_blocks": 1.5}),
    ],
)
def test_badly_typed_option_is_a_ditscope_error(name, options):
    with pytest.raises(DitscopeError, match=next(iter(options))):
        apply_peer(
            name, types.SimpleNamespace(transformer=torch.nn.Linear(2, 2)), options, STEPS, lambda: None
        )


def test_unknown_peer_is_a_ditscope_error():
    with pytest.raises(DitscopeError, match="diffusers-fbcache"):
        apply_peer(
            "no-such-peer", types.SimpleNamespace(transformer=torch.nn.Linear(2, 2)), {}, STEPS, lambda: None
        )


def test_grids_are_small_and_valid():
    assert set(PEER_GRIDS) == set(PEERS)
    for name, grid in PEER_GRIDS.items():
        assert 2 <= len(grid) <= 4
        for options in grid:
            assert set(options) <= set(peer_options(name)), (name, options)


@pytest.mark.parametrize(
    "name",
    [
        "diffusers-pab",
        "diffusers-fbcache",
        "diffusers-taylorseer",
        "cachedit-dbcache",
        "smoothcache",
        "tgate",
    ],
)
def test_unsupported_model_is_peer_unavailable(name):
    pytest.importorskip(PEERS[name].package)
    linear = torch.nn.Linear(2, 2)
    with pytest.raises(PeerUnavailable) as e:
        apply_peer(name, types.SimpleNamespace(transformer=linear, scheduler=None), {}, STEPS, lambda: None)
    assert "Linear" in str(e.value) and "\n" not in str(e.value)
    assert not hasattr(linear, "_cache_config") and "forward" not in vars(linear)


def test_missing_cache_dit_is_peer_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # import cache_dit -> ImportError
    with pytest.raises(PeerUnavailable, match="pip install ditscope\\[peers\\]"):
        apply_peer(
            "cachedit-dbcache",
            types.SimpleNamespace(transformer=torch.nn.Linear(2, 2)),
            {},
            STEPS,
            lambda: None,
        )


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
# SmoothCache runs on BasicTransformerBlock models, T-GATE on AttnProcessor2_0 attention: none of these
NOT_ON_OTHER_FAMILIES = {"smoothcache": "BasicTransformerBlocks", "tgate": "T-GATE"}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "name",
    [
        "MochiTransformer3DModel",
        "HunyuanVideoTransformer3DModel",
        "WanTransformer3DModel",
        "QwenImageTransformer2DModel",
        "SD3Transformer2DModel",
    ],
)
def test_peers_on_the_other_families(name):
    pipe = ModelPipe(name)
    reference = pipe()
    for peer in PEERS:
        if importlib.util.find_spec(PEERS[peer].package) is None:
            continue
        before = {n: sorted(vars(m)) for n, m in pipe.transformer.named_modules()}
        cannot = CANNOT.get((name, peer)) or NOT_ON_OTHER_FAMILIES.get(peer)
        if cannot:
            with pytest.raises(PeerUnavailable, match=cannot) as e:
                apply_peer(peer, pipe, AGGRESSIVE[peer], STEPS, pipe)
            assert "\n" not in str(e.value)
        else:
            remove = apply_peer(peer, pipe, AGGRESSIVE[peer], STEPS, pipe)
            try:
                cached = pipe()
            finally:
                remove()
            assert torch.isfinite(cached).all() and not torch.equal(cached, reference), (
                f"{peer} cached nothing on {name}"
            )
        assert torch.equal(pipe(), reference), f"{peer} on {name}: not restored"
        assert {n: sorted(vars(m)) for n, m in pipe.transformer.named_modules()} == before, peer


# ------------------------------------------------------------------------------ SmoothCache and T-GATE
@needs_tiny_pixart
@pytest.mark.parametrize("name", ["smoothcache", "tgate"])
def test_smoothcache_and_tgate_cache_and_remove_exactly(counted, baseline, name):
    pytest.importorskip(PEERS[name].package)
    _check_peer(counted, baseline, name)


@needs_tiny_pixart
@pytest.mark.parametrize("name", ["smoothcache", "tgate"])
def test_smoothcache_and_tgate_stay_close_to_uncached(counted, baseline, name):
    """Cached, yet close: a mild setting keeps the image near the uncached one."""
    from ditscope.stats.quality import per_sample_psnr_ssim

    pytest.importorskip(PEERS[name].package)
    mild = {"smoothcache": {"alpha": 0.2}, "tgate": {"gate_step": STEPS - 2}}[name]
    remove = apply_peer(name, counted.pipe, mild, STEPS, counted.calibrate)
    try:
        cached = counted.run()
    finally:
        remove()
    psnr = per_sample_psnr_ssim(cached, baseline[0])[0][0]
    assert not torch.equal(cached, baseline[0])
    assert 24 < psnr < 100, psnr


@needs_tiny_pixart
def test_smoothcache_calibrates_on_the_calibration_run_it_is_given(counted, baseline):
    """`calibrate` (the bench's calibration prompts) is what the schedule is fitted on, not `run_once`; the
    errors are remembered for that calibration run, so a second alpha does not calibrate again."""
    pytest.importorskip("SmoothCache")
    from ditscope.bench.peers.smoothcache_peers import calibration, schedule_from_errors

    calls = []

    def calibrate():
        calls.append("calibrate")
        return counted.pipe(
            ["a small green triangle at the top on a black background"] * 2,
            num_inference_steps=STEPS,
            guidance_scale=4.5,
            generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
            output_type="pt",
        )

    calibrate.key = "test-calibration"
    errors = calibration(counted.pipe.transformer, calibrate, STEPS, ["attn1", "attn2", "ff"], 3)
    calls.clear()
    for alpha in (0.2, 0.4):
        remove = apply_peer(
            "smoothcache", counted.pipe, {"alpha": alpha}, STEPS, counted.calibrate, calibrate
        )
        try:
            assert remove.schedule == {k: schedule_from_errors(e, alpha) for k, e in errors.items()}
        finally:
            remove()
    assert calls == ["calibrate"]
    assert torch.equal(counted.run(), baseline[0])


def _greedy(errors, alpha):
    """The paper's greedy rule, written out independently: from each computed step, reuse as long as the
    lookahead allows while the error between the computed step and the last reusing one is at most alpha."""
    steps, lookahead = len(errors), len(errors[0])
    computed, i = [0], 0
    while i < steps - 1:
        k = max(
            [k for k in range(1, lookahead + 1) if i + k < steps and errors[i + k][k - 1] <= alpha], default=0
        )
        i = i + k + 1
        if i < steps:
            computed.append(i)
    return [1 if (t in computed or t in (0, steps - 1)) else 0 for t in range(steps)]


def test_smoothcache_schedule_follows_the_greedy_rule():
    from ditscope.bench.peers.smoothcache_peers import schedule_from_errors

    # errors[t][k-1]: step t against step t-k (None where t < k); 7 steps, lookahead 2
    errors = [[None, None], [0.5, None], [0.1, 0.3], [0.05, 0.12], [0.04, 0.08], [0.06, 0.09], [0.2, 0.25]]
    assert schedule_from_errors(errors, 0.0) == [1] * 7
    assert schedule_from_errors(errors, 0.1) == [1, 1, 0, 1, 0, 0, 1]  # 1 -> 2 (0.1); 3 -> 4, 5 (0.09)
    assert schedule_from_errors(errors, 1.0) == [1, 0, 0, 1, 0, 0, 1]
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        table = [
            [None if t < k else v for k, v in enumerate(row, start=1)]
            for t, row in enumerate(torch.rand(9, 3, generator=generator).tolist())
        ]
        filled = [[1e9 if v is None else v for v in row] for row in table]
        for alpha in (0.1, 0.3, 0.6):
            assert schedule_from_errors(table, alpha) == _greedy(filled, alpha)


@needs_tiny_pixart
def test_smoothcache_calibration_matches_a_plain_loop(counted):
    """The calibration's relative L1 per component type x step x lag, recomputed from the raw outputs: 8 blocks,
    3 component types, 6 steps, lookahead 4, 5 pipeline calls of a batch of 2 (no two axes of one size)."""
    pytest.importorskip("SmoothCache")
    from ditscope.bench.peers.smoothcache_peers import calibration

    pipe, steps, lookahead, calls = counted.pipe, 6, 4, 5
    blocks = pipe.transformer.transformer_blocks
    kinds = ("attn1", "attn2", "ff")
    assert len({len(blocks), len(kinds), steps, lookahead, calls, 2}) == 6
    raw = {}  # (call, step, block, kind) -> output

    def record(b, kind):
        def hook(module, args, output):
            n = sum(1 for key in raw if key[2:] == (b, kind))
            raw[(n // steps, n % steps, b, kind)] = output.detach().clone()

        return hook

    def run():
        for c in range(calls):
            pipe(
                ["a large red circle on the left on a grey background"],
                num_inference_steps=steps,
                guidance_scale=4.5,
                generator=[torch.Generator().manual_seed(40 + c)],
                output_type="pt",
            )

    handles = [
        getattr(block, kind).register_forward_hook(record(b, kind))
        for b, block in enumerate(blocks)
        for kind in kinds
    ]
    try:
        errors = calibration(pipe.transformer, run, steps, list(kinds), lookahead)
    finally:
        for h in handles:
            h.remove()
    assert len(raw) == calls * steps * len(blocks) * len(kinds)
    assert set(errors) == {f"transformer_blocks.{kind}" for kind in kinds}
    for kind in kinds:
        table = errors[f"transformer_blocks.{kind}"]
        assert len(table) == steps and all(len(row) == lookahead for row in table)
        for t in range(steps):
            for k in range(1, lookahead + 1):
                if t < k:
                    assert table[t][k - 1] is None
                    continue
                total = 0.0
                for c in range(calls):
                    for b in range(len(blocks)):
                        y, earlier = raw[(c, t, b, kind)].double(), raw[(c, t - k, b, kind)].double()
                        total += float((y - earlier).abs().sum()) / float(y.abs().sum())
                assert table[t][k - 1] == pytest.approx(total / (calls * len(blocks)), rel=1e-9)


@pytest.mark.parametrize(
    ("model", "name", "why"),
    [
        ("tiny-mmdit", "smoothcache", "BasicTransformerBlocks"),
        ("tiny-mmdit", "tgate", "JointAttnProcessor2_0"),
        ("tiny-dit", "tgate", "cross-attention"),
    ],
)
def test_smoothcache_and_tgate_on_zoo_models_they_cannot_run(model, name, why):
    pytest.importorskip(PEERS[name].package)
    if not zoo.available(model):
        pytest.skip(f"{model} weights are not shipped")
    pipe = zoo.load(model)
    before = {n: sorted(vars(m)) for n, m in pipe.transformer.named_modules()}
    with pytest.raises(PeerUnavailable, match=why) as e:
        apply_peer(name, pipe, {}, STEPS, lambda: None)
    assert "\n" not in str(e.value) and type(pipe.transformer).__name__ in str(e.value)
    assert {n: sorted(vars(m)) for n, m in pipe.transformer.named_modules()} == before


@pytest.mark.parametrize(
    ("name", "modules"), [("smoothcache", ("SmoothCache",)), ("tgate", ("tgate", "tgate.tgate_utils"))]
)
def test_missing_smoothcache_or_tgate_is_peer_unavailable(monkeypatch, name, modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(PeerUnavailable, match="pip install ditscope\\[peers\\]"):
        apply_peer(name, types.SimpleNamespace(transformer=torch.nn.Linear(2, 2)), {}, STEPS, lambda: None)


def test_every_peer_names_its_system_and_package():
    """The bench's one view of the methods: a peer's system is what its adapter registered, not its name."""
    from ditscope.bench.grid import methods, system_of

    view = methods()
    for name, peer in PEERS.items():
        assert view[name].peer and view[name].system == peer.system == system_of(name)
        assert peer.package
    assert view["smoothcache"].system == "smoothcache" and view["tgate"].system == "t-gate"
    assert view["fora"].system == "ditscope" and not view["fora"].peer and view["steps"].system == "baseline"


@needs_tiny_pixart
def test_cli_bench_runs_smoothcache_and_tgate(tmp_path, monkeypatch):
    """`ditscope bench --methods smoothcache,tgate` through the CLI: each a row of its own system, calibrated on
    the calibration prompts (as many as the zoo row says, when not told), in the compact grid."""
    import dataclasses
    import json

    from typer.testing import CliRunner

    from ditscope.bench.grid import load_grid
    from ditscope.cli.main import app

    pytest.importorskip("SmoothCache")
    pytest.importorskip("tgate")
    monkeypatch.setitem(
        zoo.ZOO, "tiny-pixart", dataclasses.replace(zoo.ZOO["tiny-pixart"], calibration_prompts=2)
    )
    compact = load_grid("compact")
    assert compact["smoothcache"] == [PEER_GRIDS["smoothcache"][0], PEER_GRIDS["smoothcache"][-1]]
    assert compact["tgate"] == [PEER_GRIDS["tgate"][0], PEER_GRIDS["tgate"][-1]]
    out = tmp_path / "b"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "tiny-pixart",
            "--methods",
            "smoothcache,tgate",
            "--grid",
            "compact",
            "--prompts",
            "2",
            "--seeds",
            "1",
            "--steps",
            str(STEPS),
            "--repeats",
            "0",
            "--batch-size",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    ran = {(r["method"], r["system"]) for r in rows if not r.get("skipped")}
    assert ran == {("none", "baseline"), ("smoothcache", "smoothcache"), ("tgate", "t-gate")}, rows
    assert len([r for r in rows if r["method"] != "none"]) == 4
    for method in (
        "smoothcache",
        "tgate",
    ):  # the grid is set for 20 steps: at STEPS its aggressive end caches
        assert min(r["psnr"] for r in rows if r["method"] == method) < 100, method
    # SmoothCache calibrated on the zoo row's count of prompts, as plan and tune draw
    assert len(json.loads((out / "bench.json").read_text())["calibration"]) == 2


@pytest.mark.parametrize(
    ("model", "name", "options", "guidance"),
    [
        ("tiny-dit", "smoothcache", {"alpha": 1.0}, None),
        ("tiny-latte", "smoothcache", {"alpha": 1.0}, None),
        ("tiny-latte", "tgate", {"gate_step": 2, "warm_up": 1, "sp_interval": 2}, None),
        (
            "tiny-pixart",
            "tgate",
            {"gate_step": 2, "warm_up": 1, "sp_interval": 2},
            1.0,
        ),  # no guidance: batch kept whole
    ],
)
def test_smoothcache_and_tgate_on_the_other_zoo_models(model, name, options, guidance):
    """SmoothCache on DiT and Latte (its temporal blocks have no cross-attention), T-GATE on Latte and without
    guidance: cached output differs, finite, and removal restores the uncached output bit for bit."""
    pytest.importorskip(PEERS[name].package)
    if not zoo.available(model):
        pytest.skip(f"{model} weights are not shipped")
    from ditscope.profiling.workload import samples

    pipe, steps = zoo.load(model), 4
    pipe.set_progress_bar_config(disable=True)
    prompt = ["red circle"] if pipe.is_class_conditional else PROMPT
    extra = {} if guidance is None else {"guidance_scale": guidance}

    def run(seed=0):
        return samples(
            pipe(
                prompt,
                num_inference_steps=steps,
                generator=[torch.Generator().manual_seed(seed)],
                output_type="pt",
                **extra,
            )
        )

    reference = run()
    before = _residue(pipe)
    remove = apply_peer(name, pipe, options, steps, lambda: run(1))
    try:
        cached = run()
    finally:
        remove()
    assert torch.isfinite(cached).all() and not torch.equal(cached, reference)
    assert torch.equal(run(), reference) and _residue(pipe) == before
