"""ditscope.profile on a real diffusers pipeline: exactness, branches, shards, resume, errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ditscope
from ditscope import DitscopeError, zoo

STEPS = 4


def run(pipe, prompts, call_kwargs, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("guidance_scale", 4.5)
    return ditscope.profile(pipe, prompts, call_kwargs=call_kwargs, **kw)


def transformer_outputs(pipe, fn):
    """Every transformer output while fn() runs, seen by a plain forward hook of the test's own."""
    outs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, o: outs.append(o[0].clone()))
    try:
        fn()
    finally:
        handle.remove()
    return outs


def test_outputs_bit_identical_and_model_restored(default_pipe, prompts, call_kwargs, one_thread):
    pipe = default_pipe
    sdpa = F.scaled_dot_product_attention

    def plain():
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        with torch.inference_mode():
            pipe(
                prompts,
                num_inference_steps=STEPS,
                guidance_scale=4.5,
                generator=gens,
                output_type="latent",
                **call_kwargs,
            )

    before = transformer_outputs(pipe, plain)
    during = transformer_outputs(pipe, lambda: run(pipe, prompts, call_kwargs, batch_size=len(prompts)))
    after = transformer_outputs(pipe, plain)
    assert len(before) == len(during) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(before, during))
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert F.scaled_dot_product_attention is sdpa
    assert "step" not in vars(pipe.scheduler)
    for m in pipe.transformer.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_cfg_branches_are_separated(default_pipe, prompts, call_kwargs):
    """PixArt batches [uncond, cond]: the cond values must be those of the second half, by hand."""
    pipe = default_pipe
    attn = pipe.transformer.transformer_blocks[2].attn1  # deep enough that the text has reached it
    outs = []
    handle = attn.register_forward_hook(lambda m, a, o: outs.append(o.detach().double().clone()))
    try:
        prof = run(pipe, prompts[:1], call_kwargs, targets=("k", "v", "a", "out"))
    finally:
        handle.remove()
    assert prof.options("branch") == ["cond", "uncond"]
    layer = prof.layer_names.index("transformer_blocks.2.attn1")
    cond = prof.keys.index((layer, "out", "image", "cond"))
    uncond = prof.keys.index((layer, "out", "image", "uncond"))
    by_hand_cond = [(outs[t][1] - outs[t - 1][1]).abs().mean().item() for t in range(1, STEPS)]
    by_hand_uncond = [(outs[t][0] - outs[t - 1][0]).abs().mean().item() for t in range(1, STEPS)]
    np.testing.assert_allclose(prof.values[0, cond, :, 0], by_hand_cond, rtol=1e-5)
    np.testing.assert_allclose(prof.values[0, uncond, :, 0], by_hand_uncond, rtol=1e-5)
    assert not np.allclose(by_hand_cond, by_hand_uncond)

    no_cfg = run(pipe, prompts[:1], call_kwargs, guidance_scale=1.0)
    assert no_cfg.options("branch") == ["cond"]


def test_shards_merge_to_the_single_run(default_pipe, call_kwargs, one_thread):
    prompts = zoo.builtin_prompts()[:5]
    whole = run(default_pipe, prompts, call_kwargs)
    a = run(default_pipe, prompts, call_kwargs, shard=(0, 2))
    b = run(default_pipe, prompts, call_kwargs, shard=(1, 2))
    assert a.prompt_index.tolist() == [0, 1, 2] and b.prompt_index.tolist() == [3, 4]  # contiguous shares
    merged = b.merge(a)
    np.testing.assert_array_equal(merged.prompt_index, whole.prompt_index)
    np.testing.assert_array_equal(merged.values, whole.values)
    for field in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(
            getattr(merged.stats, field), getattr(whole.stats, field), rtol=1e-6, atol=1e-12
        )
    np.testing.assert_array_equal(merged.stats.count, whole.stats.count)


class Crash(Exception):
    pass


class CrashAfter:
    """A progress stand-in that raises after n steps, like a kill in the middle of a prompt."""

    def __init__(self, n):
        self.n = n

    def add_task(self, *a, **k):
        return 0

    def advance(self, task):
        self.n -= 1
        if self.n == 0:
            raise Crash


def test_interrupted_run_resumes_to_the_uninterrupted_result(
    default_pipe, prompts, call_kwargs, tmp_path, one_thread
):
    state = tmp_path / "state.partial"
    whole = run(default_pipe, prompts, call_kwargs)
    with pytest.raises(Crash):
        run(default_pipe, prompts, call_kwargs, state_path=state, progress=CrashAfter(STEPS + 2))
    saved = ditscope.Profile.load(state)
    assert saved.prompt_index.tolist() == [0]  # the first prompt was saved, the second was cut off
    resumed = run(default_pipe, prompts, call_kwargs, state_path=state)
    np.testing.assert_array_equal(resumed.values, whole.values)
    np.testing.assert_allclose(resumed.stats.mean, whole.stats.mean, rtol=1e-6)

    with pytest.raises(DitscopeError, match="different arguments.*seed"):
        run(default_pipe, prompts, call_kwargs, state_path=state, seed=1)


def test_nan_in_activations_names_layer_and_step(call_kwargs, prompts):
    pipe = zoo.load(zoo.DEFAULT_MODEL)
    with torch.no_grad():
        pipe.transformer.transformer_blocks[2].attn1.to_k.weight[0, 0] = float("nan")
    with pytest.raises(
        DitscopeError, match=r"NaN or inf in K of layer transformer_blocks\.2\.attn1 at step 0"
    ):
        run(pipe, prompts[:1], call_kwargs)


def test_bad_arguments_are_clear_errors(default_pipe, prompts, call_kwargs):
    with pytest.raises(DitscopeError, match="at least 2"):
        run(default_pipe, prompts, call_kwargs, num_inference_steps=1)
    with pytest.raises(DitscopeError, match="no attention layer found"):
        run(default_pipe, prompts, call_kwargs, attention="NoSuchAttention")
    with pytest.raises(DitscopeError, match="no prompts"):
        run(default_pipe, [], call_kwargs)


def test_storage_dtype_and_offload_keep_numbers_close(default_pipe, prompts, call_kwargs, one_thread):
    ref = run(default_pipe, prompts[:1], call_kwargs)
    off = run(default_pipe, prompts[:1], call_kwargs, offload=True)
    np.testing.assert_array_equal(off.values, ref.values)
    half = run(default_pipe, prompts[:1], call_kwargs, storage_dtype=torch.bfloat16)
    np.testing.assert_allclose(half.values[..., 0], ref.values[..., 0], rtol=0.05, atol=1e-3)


def test_attention_that_bypasses_sdpa_is_a_clear_error(call_kwargs, prompts):
    """A processor (or attention backend) that never calls SDPA cannot be profiled: say so."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe = zoo.load(zoo.DEFAULT_MODEL)
    pipe.transformer.set_attn_processor(AttnProcessor())  # the pre-2.0 processor: baddbmm + softmax
    with pytest.raises(DitscopeError, match=r"transformer_blocks\.0\.attn1 .*bypasses it.*native"):
        run(pipe, prompts[:1], call_kwargs)


def test_one_device_to_host_transfer_per_step(default_pipe, prompts, call_kwargs, monkeypatch):
    calls = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *a, **k):
        calls.append(tuple(self.shape))
        return real_cpu(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    run(default_pipe, prompts[:1], call_kwargs)
    assert len(calls) == STEPS
