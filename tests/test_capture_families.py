"""Capture works on all ten diffusers DiT families, and on any module that calls SDPA.

Everything the tests expect is derived here from the diffusers source (which modules are attention
layers, which are cross/joint attention, the token order of joint sequences), independently of
`ditscope.families`; raw tensors are spied on with the test's own hooks and SDPA wrapper.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import FAMILIES, MOCHI_VALID, TEXT_LEN

import ditscope
from ditscope import DitscopeError

ALL_TARGETS = ("q", "k", "v", "a", "out")
STEPS = 3
B = 2
IMAGE, TEXT = "image", "text"


# ------------------------------------------------------------------ what the diffusers source says
def expected_layer_count(name: str, cfg) -> int:
    n = cfg.num_layers
    if name == "DiTTransformer2DModel":  # BasicTransformerBlock without cross_attention_dim: attn1 only
        return n
    if name in ("PixArtTransformer2DModel", "WanTransformer3DModel"):  # attn1 self + attn2 cross per block
        return 2 * n
    if name == "SD3Transformer2DModel":  # a joint `attn` per block, + `attn2` in dual_attention_layers
        return n + len(cfg.dual_attention_layers)
    if name in ("FluxTransformer2DModel", "HunyuanVideoTransformer3DModel"):
        # double-stream + single-stream blocks, one `attn` each; HunyuanVideo's token refiner
        # (context_embedder, num_refiner_layers) is not a trunk layer
        return n + cfg.num_single_layers
    if name == "LatteTransformer3DModel":
        # spatial blocks: attn1 + attn2 (cross); temporal blocks are built with cross_attention_dim=None
        return 2 * n + n
    # CogVideoX, Mochi (called once per sample), QwenImage: one joint attention per block
    assert name in ("CogVideoXTransformer3DModel", "MochiTransformer3DModel", "QwenImageTransformer2DModel")
    return n


# (cross-attention layer regex, joint-attention layer regex, stream that comes first in the joint sequence)
LAYOUT = {
    "DiTTransformer2DModel": (None, None, None),
    "PixArtTransformer2DModel": (r"\.attn2$", None, None),
    "SD3Transformer2DModel": (None, r"\.attn$", IMAGE),  # JointAttnProcessor2_0: cat([image, text])
    "FluxTransformer2DModel": (
        None,
        r"\.attn$",
        TEXT,
    ),  # FluxAttnProcessor: cat([text, image]); single: joined
    "CogVideoXTransformer3DModel": (None, r"\.attn1$", TEXT),  # cat([encoder, hidden])
    "LatteTransformer3DModel": (r"\.attn2$", None, None),
    "MochiTransformer3DModel": (None, r"\.attn1$", IMAGE),  # per sample: cat([image, valid text])
    "HunyuanVideoTransformer3DModel": (None, r"\.attn$", IMAGE),  # cat([image, text]), single blocks too
    "WanTransformer3DModel": (r"\.attn2$", None, None),
    "QwenImageTransformer2DModel": (None, r"\.attn$", TEXT),  # cat([txt, img])
}
FAMILY_NAMES = list(FAMILIES)


def kind_of(family: str, layer: str) -> str:
    cross, joint, _ = LAYOUT[family]
    if cross and re.search(cross, layer):
        return "cross"
    if joint and re.search(joint, layer):
        return "joint"
    return "self"


def expected_streams(family: str, layer: str, target: str) -> set[str]:
    kind = kind_of(family, layer)
    if kind == "joint":
        return {IMAGE, TEXT}
    if kind == "cross" and target in ("k", "v"):
        return {TEXT}
    return {IMAGE}


def text_tokens(family: str, sample: int) -> int:
    """Text tokens in a joint sequence: Mochi keeps only each sample's valid (unmasked) tokens."""
    return MOCHI_VALID[sample % len(MOCHI_VALID)] if family == "MochiTransformer3DModel" else TEXT_LEN


def split(family: str, layer: str, target: str, seq: int, sample: int):
    """[(stream, start, end)] of one entry's token axis, from the test's own layout table."""
    kind = kind_of(family, layer)
    if kind == "cross":
        return [(TEXT if target in ("k", "v") else IMAGE, 0, seq)]
    if kind == "self":
        return [(IMAGE, 0, seq)]
    t = text_tokens(family, sample)
    assert 0 < t < seq
    if LAYOUT[family][2] == TEXT:
        return [(TEXT, 0, t), (IMAGE, t, seq)]
    return [(IMAGE, 0, seq - t), (TEXT, seq - t, seq)]


# ------------------------------------------------------------------------------------ helpers
def build(name):
    build_fn, inputs_fn = FAMILIES[name]
    return build_fn(), inputs_fn


def run_steps(model, step_inputs):
    outs = []
    with torch.inference_mode():
        for kw in step_inputs:
            outs.append(model(**kw, return_dict=False)[0].clone())
    return outs


def frozen(kw: dict, kw0: dict, keys=("timestep", "pooled_projections", "guidance")) -> dict:
    """`kw` with the conditioning that modulates every token (timestep, pooled text, guidance) of `kw0`."""
    kw = dict(kw)
    for k in keys:
        if k in kw0:
            kw[k] = kw0[k]
    return kw


class Spy:
    """The test's own capture: its hooks say which attention module runs; its SDPA wrapper (entered after the
    recorder, so it wraps the recorder's wrapper) keeps q, k, v and the attention output; a forward hook
    keeps the module output. `steps[t][layer] = {"calls": [{q,k,v,a}], "out": output}`."""

    def __init__(self, model, select=lambda name, module: hasattr(module, "processor")):
        self.model = model
        self.select = select
        self.current = None
        self.steps: list[dict] = []

    def _pre(self, name):
        def hook(module, args):
            self.current = name
            self.steps[-1][name] = {"calls": [], "out": None}

        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.current = None
            parts = output if isinstance(output, tuple) else (output,)
            self.steps[-1][name]["out"] = [p.detach().clone() for p in parts if torch.is_tensor(p)]

        return hook

    @contextlib.contextmanager
    def __call__(self):
        handles = [self.model.register_forward_pre_hook(lambda m, a: self.steps.append({}))]
        for name, m in self.model.named_modules():
            if name and self.select(name, m):
                handles.append(m.register_forward_pre_hook(self._pre(name)))
                handles.append(m.register_forward_hook(self._post(name)))
        inner = F.scaled_dot_product_attention

        def wrapper(query, key, value, *args, **kwargs):  # diffusers' native backend passes these by name
            out = inner(query, key, value, *args, **kwargs)
            if self.current is not None:
                tensors = {"q": query, "k": key, "v": value, "a": out}
                self.steps[-1][self.current]["calls"].append(
                    {t: x.detach().clone() for t, x in tensors.items()}
                )
            return out

        F.scaled_dot_product_attention = wrapper
        try:
            yield self
        finally:
            F.scaled_dot_product_attention = inner
            for h in handles:
                h.remove()


def hand_metrics(cur: np.ndarray, prev: np.ndarray) -> np.ndarray:
    d = np.abs(cur - prev)
    cos = 1.0 - (cur * prev).sum() / np.sqrt((cur * cur).sum() * (prev * prev).sum())
    return np.array([d.mean(), d.sum() / np.abs(prev).sum(), cos])


def stream_elements(family, layer, target, record, n_samples):
    """{(stream, sample): flat float64 elements} of one layer's tensors of one step, split by the test's table."""
    parts: dict[tuple[str, int], list[np.ndarray]] = {}
    if target == "out":
        outs = record["out"]
        if len(outs) == 2:  # joint attention modules return (image, text)
            streams = [(IMAGE, outs[0]), (TEXT, outs[1])]
        else:  # one tensor; Flux's single-stream blocks return the joined sequence
            (x,) = outs
            streams = [(s, x[:, a:b]) for s, a, b in split(family, layer, "a", x.shape[1], 0)]
        for stream, x in streams:
            k = x.shape[0] // n_samples
            for s in range(n_samples):
                parts.setdefault((stream, s), []).append(x[s * k : (s + 1) * k].double().numpy().ravel())
        return {key: np.concatenate(v) for key, v in parts.items()}
    calls = record["calls"]
    n_entries = sum(c[target].shape[0] for c in calls)
    k = n_entries // n_samples  # entries per model sample, batch-major (Latte: B x frames or B x patches)
    assert n_entries == k * n_samples
    entry = 0
    for c in calls:
        x = c[target]  # (N, H, S, D)
        for e in range(x.shape[0]):
            sample = entry // k
            for stream, a, b in split(family, layer, target, x.shape[2], sample):
                parts.setdefault((stream, sample), []).append(x[e, :, a:b].double().numpy().ravel())
            entry += 1
    return {key: np.concatenate(v) for key, v in parts.items()}


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only add overhead, and spin against any other process on 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_capture_family(name):
    model, inputs = build(name)
    check_capture(name, model, inputs)


def test_capture_sd35_dual_attention():
    """SD3.5 blocks listed in dual_attention_layers add a second, image-only self-attention `attn2`."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()
    names = check_capture("SD3Transformer2DModel", model, FAMILIES["SD3Transformer2DModel"][1])
    assert names == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]


def check_capture(name, model, inputs) -> list[str]:
    step_inputs = [inputs(B, s, text_step=s) for s in range(STEPS)]
    reference = run_steps(model, step_inputs)

    sdpa = F.scaled_dot_product_attention
    spy = Spy(model)
    with ditscope.record(model, targets=ALL_TARGETS) as rec, spy():
        recorded = run_steps(model, step_inputs)
    sample = rec.next_sample()

    # recording changes nothing, and leaves SDPA as it was
    assert F.scaled_dot_product_attention is sdpa
    assert len(reference) == len(recorded) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(reference, recorded, strict=True))

    # layer count from the config; every trunk attention module is there, in execution order
    names = rec.layer_names
    assert len(names) == expected_layer_count(name, model.config), names
    assert len(set(names)) == len(names)
    assert not any("context_embedder" in n or "refiner" in n for n in names)
    trunk = [n for n in spy.steps[0] if not n.startswith("context_embedder")]
    assert names == trunk

    # several SDPA calls in one layer (Mochi: one per sample) are still one layer
    calls = {len(rec_["calls"]) for rec_ in spy.steps[0].values()}
    assert calls == ({B} if name == "MochiTransformer3DModel" else {1})

    # streams per layer and target
    assert sample.n_prompts == B
    for i, layer in enumerate(names):
        for target in ALL_TARGETS:
            got = {k[2] for k in sample.values if k[0] == i and k[1] == target}
            assert got == expected_streams(name, layer, target), (layer, target, got)
    assert {k[3] for k in sample.values} == {"cond"}
    assert {k[0] for k in sample.values} == set(range(len(names)))

    for key, v in sample.values.items():
        assert v.shape == (B, STEPS - 1, 3), key
        assert np.all(np.isfinite(v)), key
        assert np.all(v >= 0), (key, v)
        # every stream of every layer sees its inputs change (latent, text, timestep)
        assert np.all(v[..., 0] > 0), key
    return names


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_matches_hand_computation(name):
    """Recorder values == float64 metrics of the raw tensors, split by the test's own token layout."""
    model, inputs = build(name)
    spy = Spy(model)
    with ditscope.record(model, targets=ALL_TARGETS) as rec, spy():
        run_steps(model, [inputs(B, s, text_step=s) for s in range(STEPS)])
    sample = rec.next_sample()

    expected = {}
    for i, layer in enumerate(rec.layer_names):
        for target in ALL_TARGETS:
            per_step = [stream_elements(name, layer, target, spy.steps[t][layer], B) for t in range(STEPS)]
            for stream, s in per_step[0]:
                vals = [
                    hand_metrics(per_step[t][(stream, s)], per_step[t - 1][(stream, s)])
                    for t in range(1, STEPS)
                ]
                expected.setdefault((i, target, stream, "cond"), np.zeros((B, STEPS - 1, 3)))[s] = np.stack(
                    vals
                )
    assert set(expected) == set(sample.values)
    for key, want in expected.items():
        np.testing.assert_allclose(sample.values[key], want, rtol=1e-4, atol=0, err_msg=str(key))


@pytest.mark.parametrize("vary", [IMAGE, TEXT])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_stream_split(name, vary):
    """Vary one stream's input, keep the other stream and the timestep fixed.

    Exactly zero must come out where a tensor depends only on the fixed stream: the text K/V of every
    cross-attention layer and Q/K/V of the fixed stream in the first joint layer (before it, nothing mixes
    image and text). Everything else must be > 0. A wrong token order, or one token too many or too few
    in a stream, moves changing tokens into the fixed stream or fixed tokens out of it.
    """
    if vary == TEXT and name == "DiTTransformer2DModel":
        pytest.skip("DiT has no text stream")
    model, inputs = build(name)
    kw0 = inputs(B, 0)
    if vary == IMAGE:
        step_inputs = [frozen(inputs(B, s, text_step=0, latent_step=s), kw0) for s in range(STEPS)]
    else:
        step_inputs = [frozen(inputs(B, s, text_step=s, latent_step=0), kw0) for s in range(STEPS)]
    with ditscope.record(model, targets=ALL_TARGETS) as rec:
        run_steps(model, step_inputs)
    sample = rec.next_sample()
    layers = rec.layer_names
    first = 0  # block 0's first attention: the only joint layer whose inputs have not yet mixed the streams
    assert re.search(r"(^|\.)0\.attn1?$", layers[first]), layers
    fixed = TEXT if vary == IMAGE else IMAGE

    def must_be_zero(layer_i, target, stream):
        if stream != fixed:
            return False
        layer = layers[layer_i]
        kind = kind_of(name, layer)
        if vary == IMAGE:  # text is fixed
            if kind == "cross":
                return target in ("k", "v")
            return kind == "joint" and layer_i == first and target in ("q", "k", "v")
        # image is fixed
        if name == "MochiTransformer3DModel":
            return False  # Mochi's timestep embedding pools the caption: every image token sees the text
        if kind == "joint":
            return layer_i == first and target in ("q", "k", "v")
        # self/cross families: everything before the first cross-attention, and that layer's query
        first_cross = next(i for i, n in enumerate(layers) if kind_of(name, n) == "cross")
        return layer_i < first_cross or (layer_i == first_cross and target == "q")

    zeros = 0
    for key, v in sample.values.items():
        if must_be_zero(*key[:3]):
            zeros += 1
            assert np.all(v == 0), (key, v)
        else:
            assert np.all(v > 0), (key, v)
    if name != "DiTTransformer2DModel" and not (vary == TEXT and name == "MochiTransformer3DModel"):
        assert zeros > 0


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_cfg_branches_never_mix(name):
    """Batch [uncond, cond]: uncond's inputs never change, cond's do; uncond distances are exactly 0."""
    model, inputs = build(name)
    step_inputs = [inputs(2, s, text_step=[0, s], latent_step=[0, s]) for s in range(STEPS)]
    with ditscope.record(model, targets=ALL_TARGETS, batched_branches=("uncond", "cond")) as rec:
        run_steps(model, step_inputs)
    sample = rec.next_sample()
    assert sample.n_prompts == 1
    branches = {k[3] for k in sample.values}
    assert branches == {"uncond", "cond"}
    for key, v in sample.values.items():
        assert v.shape == (1, STEPS - 1, 3)
        if key[3] == "uncond":
            assert np.all(v == 0), (key, v)
        else:
            assert np.all(v > 0), (key, v)
            assert (key[0], key[1], key[2], "uncond") in sample.values


def shorter_text(name: str, kw: dict, n: int) -> dict:
    """The same inputs with only the first n text tokens (a negative prompt of another length)."""
    if name in ("DiTTransformer2DModel", "CogVideoXTransformer3DModel"):
        return kw  # class labels; CogVideoX's positional embedding is sized for max_text_seq_length
    kw = dict(kw)
    for key in ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_mask", "txt_ids"):
        if key in kw:
            kw[key] = kw[key][:n] if key == "txt_ids" else kw[key][:, :n]
    if name == "MochiTransformer3DModel":
        kw["encoder_attention_mask"] = torch.ones_like(kw["encoder_attention_mask"])
    return kw


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_cfg_separate_passes_never_mix(name):
    """One model call per branch and step (step_on="external"): cond changes, uncond (a negative prompt of
    another length, where the model allows it) never does; uncond distances are exactly 0."""
    model, inputs = build(name)
    uncond = shorter_text(name, inputs(1, 0), 5)
    with ditscope.record(
        model, targets=ALL_TARGETS, step_on="external", separate_branches=("cond", "uncond")
    ) as rec:
        for s in range(STEPS):
            run_steps(model, [inputs(1, s, text_step=s), uncond])
            rec.end_step()
    sample = rec.next_sample()
    assert len(rec.layer_names) == expected_layer_count(name, model.config)
    assert {k[3] for k in sample.values} == {"uncond", "cond"}
    for key, v in sample.values.items():
        assert v.shape == (1, STEPS - 1, 3)
        if key[3] == "uncond":
            assert np.all(v == 0), (key, v)
        else:
            assert np.all(v > 0), (key, v)
            assert (key[0], key[1], key[2], "uncond") in sample.values


# ------------------------------------------------------------------------------- the generic path
class MyAttention(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(b, s, d))


class MyBlock(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.attn = MyAttention(dim, heads=2)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim)
        )

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class MyDiT(torch.nn.Module):
    def __init__(self, dim: int = 16, depth: int = 3):
        super().__init__()
        self.blocks = torch.nn.ModuleList(MyBlock(dim) for _ in range(depth))

    def forward(self, hidden_states, timestep=None):
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


@pytest.mark.parametrize(
    "attention", ["MyAttention", "blocks.*.attn", ["blocks.0.attn", r"blocks\.[12]\.attn"]]
)
def test_generic_module(attention):
    torch.manual_seed(0)
    model = MyDiT().eval()
    base = torch.randn(3, 10, 16)
    xs = [base + 0.1 * s * torch.randn(3, 10, 16) for s in range(STEPS)]
    with torch.inference_mode():
        reference = [model(x) for x in xs]
    spy = Spy(model, select=lambda name, module: isinstance(module, MyAttention))
    with (
        ditscope.record(model, attention=attention, targets=ALL_TARGETS) as rec,
        spy(),
        torch.inference_mode(),
    ):
        outs = [model(x, timestep=torch.tensor([float(s)])) for s, x in enumerate(xs)]
    sample = rec.next_sample()
    assert all(torch.equal(a, b) for a, b in zip(reference, outs, strict=True))
    assert rec.layer_names == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert {(k[2], k[3]) for k in sample.values} == {(IMAGE, "cond")}
    assert len(sample.values) == 3 * len(ALL_TARGETS)
    for i, layer in enumerate(rec.layer_names):
        for target in ALL_TARGETS:
            got = sample.values[(i, target, IMAGE, "cond")]
            assert got.shape == (3, STEPS - 1, 3)
            for t in range(1, STEPS):
                cur, prev = spy.steps[t][layer], spy.steps[t - 1][layer]
                for s in range(3):
                    if target == "out":
                        c, p = cur["out"][0][s], prev["out"][0][s]
                    else:
                        c, p = cur["calls"][0][target][s], prev["calls"][0][target][s]
                    want = hand_metrics(c.double().numpy().ravel(), p.double().numpy().ravel())
                    np.testing.assert_allclose(got[s, t - 1], want, rtol=1e-4, atol=0)


def test_no_attention_module_found():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 4))
    with pytest.raises(DitscopeError, match="no attention layer"):
        ditscope.record(model)
    with pytest.raises(DitscopeError, match="no attention layer"):
        ditscope.record(MyDiT(), attention="NotAnAttention")
    with pytest.raises(DitscopeError, match="no attention layer"):
        ditscope.record(MyDiT())  # no module has a .processor: the user must name the attention modules
