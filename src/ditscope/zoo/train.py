"""Training the zoo's models: reproducible, resumable, CPU-sized.

    ditscope zoo train tiny-pixart --minutes 40        # or --steps N to reproduce a run exactly
    ditscope zoo train evaluator

Data are drawn fresh from the procedural generator at every step, seeded by (seed, step), so a run
resumed from its checkpoint sees the same batches as an uninterrupted one. Weights are averaged with
an EMA; the EMA weights are what ships. The folder written is a diffusers pipeline folder plus
`manifest.json` (config, data seed, steps, time, evaluation).
"""

from __future__ import annotations

import copy
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DitscopeError
from ..files import atomic_path
from . import data
from .builtin import MAX_TEXT_TOKENS, word_tokenizer

ASSETS = Path(__file__).parent / "assets"


# ------------------------------------------------------------------------------------ the models
def text_tokenizer():
    """Word-level tokenizer over the caption grammar, with an end-of-text token after every prompt."""
    from tokenizers.processors import TemplateProcessing

    tok = word_tokenizer(max_length=MAX_TEXT_TOKENS)
    eos = tok.convert_tokens_to_ids("</s>")
    tok._tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return tok


def text_encoder(vocab_size: int, d_model: int = 64):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=16,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
        )
    )


RECIPES = ("tiny-pixart", "tiny-dit", "tiny-mmdit", "tiny-latte")


def build(name: str, seed: int = 0):
    """A zoo pipeline with freshly initialised weights, in eval mode (as `from_pretrained` leaves it)."""
    pipe = _build(name, seed)
    for module in (pipe.transformer, pipe.text_encoder):
        if module is not None:
            module.eval()  # DiT's label embedding drops labels at random in train mode
    return pipe


def _build(name: str, seed: int):
    from diffusers import (
        DDIMScheduler,
        DiTTransformer2DModel,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        LatteTransformer3DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
    )

    from .pipeline import ShapesPipeline

    torch.manual_seed(seed)
    # v-prediction: with epsilon targets the high-noise steps (which fix colour and layout) carry almost
    # no signal about the image, and a CPU-sized training budget never learns them.
    betas = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    if name == "tiny-pixart":
        tok = text_tokenizer()
        transformer = PixArtTransformer2DModel(
            sample_size=32,
            num_layers=8,
            patch_size=2,
            in_channels=3,
            out_channels=3,
            attention_head_dim=32,
            num_attention_heads=4,
            cross_attention_dim=128,
            caption_channels=64,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            use_additional_conditions=False,
        )
        # Pixel space with a cosine schedule: alpha_bar at t=999 is 2e-9, so the first x0 estimate amplifies
        # the noise-prediction error ~2e4x; dynamic thresholding (Imagen) keeps x0 in [-1, 1].
        scheduler = DPMSolverMultistepScheduler(**betas, thresholding=True, sample_max_value=1.0)
        return ShapesPipeline(transformer, scheduler, tok, text_encoder(len(tok.get_vocab())))
    if name == "tiny-dit":
        n_classes = len(data.SHAPES) * len(data.COLORS)
        transformer = DiTTransformer2DModel(
            sample_size=32,
            num_layers=8,
            patch_size=2,
            in_channels=3,
            out_channels=3,
            attention_head_dim=32,
            num_attention_heads=4,
            norm_type="ada_norm_zero",
            num_embeds_ada_norm=n_classes,
            activation_fn="gelu-approximate",
            attention_bias=True,
        )
        return ShapesPipeline(transformer, DDIMScheduler(**betas, clip_sample=True))
    if name == "tiny-mmdit":
        tok = text_tokenizer()
        # SD3's joint attention (text and image tokens in one sequence), qk RMS-norm as in SD3.5, trained
        # with rectified flow and sampled with the flow-matching Euler scheduler as SD3 and FLUX are.
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=3,
            out_channels=3,
            num_layers=8,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=128,
            pooled_projection_dim=64,
            pos_embed_max_size=16,
            qk_norm="rms_norm",
            dual_attention_layers=(),
        )
        return ShapesPipeline(
            transformer,
            FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
            tok,
            text_encoder(len(tok.get_vocab())),
        )
    if name == "tiny-latte":
        tok = text_tokenizer()
        # Latte: PixArt's blocks, alternating spatial (per frame) and temporal (per token position) ones.
        # tiny-pixart's width, so that training can start from its weights (see `warm_start`).
        transformer = LatteTransformer3DModel(
            sample_size=32,
            num_layers=8,
            patch_size=2,
            in_channels=3,
            out_channels=3,
            attention_head_dim=32,
            num_attention_heads=4,
            cross_attention_dim=128,
            caption_channels=64,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            video_length=data.VIDEO_FRAMES,
        )
        scheduler = DPMSolverMultistepScheduler(**betas, thresholding=True, sample_max_value=1.0)
        return ShapesPipeline(transformer, scheduler, tok, text_encoder(len(tok.get_vocab())))
    raise DitscopeError(f"no training recipe for {name!r}; recipes: {', '.join(RECIPES)}")


# Latte initialises from a pretrained image DiT and learns only what video adds; tiny-latte does the same
# from the shipped tiny-pixart. From scratch, 90 CPU minutes see ~11k captioned videos (tiny-pixart saw
# ~120k captioned images); an attempt from scratch learned backgrounds but no objects.
WARM_START = {"tiny-latte": "tiny-pixart"}


def warm_start(pipe, source: str) -> None:
    """Load the image model `source` (a zoo name or a pipeline folder) into `pipe`: text encoder and every
    spatial weight; temporal blocks, if `pipe` has them, start as the identity (zero output projections),
    so step 0 draws each frame as `source` would draw an image."""
    from . import load_pipeline

    src = load_pipeline(source)  # the zoo's loader: quiet, and a clear error when `source` has no weights
    cannot = f"cannot warm-start {type(pipe.transformer).__name__} from {source}"
    if (src.text_encoder is None) != (pipe.text_encoder is None):
        raise DitscopeError(f"{cannot}: one has a text encoder and the other has not")
    try:
        if pipe.text_encoder is not None:
            pipe.text_encoder.load_state_dict(src.text_encoder.state_dict())
        missing, unexpected = pipe.transformer.load_state_dict(src.transformer.state_dict(), strict=False)
    except RuntimeError as e:  # torch's size-mismatch report: a different architecture
        raise DitscopeError(
            f"{cannot}: the weights do not fit ({str(e).splitlines()[-1].strip()[:160]})"
        ) from None
    if unexpected or any(not k.startswith("temporal_transformer_blocks.") for k in missing):
        raise DitscopeError(f"{cannot}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for block in getattr(pipe.transformer, "temporal_transformer_blocks", []):
            for layer in (block.attn1.to_out[0], block.ff.net[-1]):
                layer.weight.zero_()
                layer.bias.zero_()


def training_batch(name: str, batch: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[data.Scene]]:
    """Clean samples in [-1, 1]: (B, 3, 32, 32) images, or (B, 3, F, 32, 32) videos for tiny-latte."""
    if name == "tiny-latte":
        scenes = [data.sample_video_scene(rng) for _ in range(batch)]
        x0 = np.stack([data.render_video(s, data.VIDEO_FRAMES) for s in scenes]).transpose(0, 2, 1, 3, 4)
    else:
        scenes = [data.sample_scene(rng, max_objects=1 if name == "tiny-dit" else 2) for _ in range(batch)]
        x0 = np.stack([data.render(s) for s in scenes])
    return torch.from_numpy(np.ascontiguousarray(x0)) * 2 - 1, scenes


def training_prompts(name: str, scenes: list[data.Scene], rng: np.random.Generator, drop: float = 0.1):
    """Captions (or class labels) with `drop` of them replaced by the unconditional input."""
    if name == "tiny-dit":
        n_classes = len(data.SHAPES) * len(data.COLORS)
        return [n_classes if rng.random() < drop else data.class_label(s.objects[0]) for s in scenes]
    return ["" if rng.random() < drop else s.caption() for s in scenes]


# ------------------------------------------------------------------------------------- training
@contextmanager
def _every_core():
    """Torch on all the cores this process may use (taskset-aware), and back to its count after: the count
    leaked into the caller's later runs, and a float64 sum over a tensor depends on it in its last digits."""
    before = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@_every_core()
def train(
    name: str,
    out: Path,
    steps: int = 100_000,
    minutes: float | None = None,
    batch: int = 64,
    lr: float = 5e-4,
    seed: int = 0,
    ema_decay: float = 0.999,
    lr_decay: float = 0.0,
    init: str | None = None,
    log=print,
) -> dict:
    """Train `name`, checkpointing to `out/train_state.pt` every few minutes; resumes from it.

    The learning rate warms up over 500 steps; with `lr_decay` > 0 it then falls linearly to zero over
    the last `lr_decay` fraction of `steps` (a fixed-step schedule, so `--steps N` still reproduces a run).
    `init` (a zoo name or pipeline folder) starts from those weights; tiny-latte defaults to tiny-pixart."""
    if not 0.0 <= lr_decay < 1.0:
        raise DitscopeError(
            f"lr_decay must be in [0, 1), got {lr_decay}: the fraction of steps over which lr falls to 0"
        )
    out = Path(out)
    pipe = build(name, seed)
    ckpt = out / "train_state.pt"
    init = init or WARM_START.get(name)
    if init and not ckpt.exists():  # a resumed run takes its weights from the checkpoint
        warm_start(pipe, init)  # before anything is written: a bad --init leaves no folder behind
    out.mkdir(parents=True, exist_ok=True)
    trainable = [m for m in (pipe.transformer, pipe.text_encoder) if m is not None]
    params = [p for m in trainable for p in m.parameters()]
    ema = [copy.deepcopy(m).requires_grad_(False) for m in trainable]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    step, elapsed = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        for m, sd in zip(trainable, state["models"]):
            m.load_state_dict(sd)
        for m, sd in zip(ema, state["ema"]):
            m.load_state_dict(sd)
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
        log(f"resumed {name} at step {step} ({elapsed / 60:.1f} min trained)")
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    class_cond = pipe.is_class_conditional
    flow = "FlowMatch" in type(pipe.scheduler).__name__
    v_pred = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    for m in trainable:
        m.train()
    start, last_ckpt = time.time() - elapsed, time.time()
    max_seconds = minutes * 60 if minutes else float("inf")
    while step < steps and time.time() - start < max_seconds:
        rng = np.random.default_rng([seed, step])
        x0, scenes = training_batch(name, batch, rng)
        prompts = training_prompts(name, scenes, rng)
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        torch.manual_seed(
            int(rng.integers(2**31))
        )  # in-model randomness (DiT's label dropout) is per step too
        noise = torch.randn(x0.shape, generator=g)
        if flow:  # rectified flow: x_t = (1 - s) x0 + s noise, the model predicts the velocity noise - x0
            sigma = torch.rand(batch, generator=g)
            s = sigma.view(-1, *[1] * (x0.dim() - 1))
            xt, t, target = (1 - s) * x0 + s * noise, sigma * 1000, noise - x0
        else:
            t = torch.randint(0, 1000, (batch,), generator=g)
            xt = noise_sched.add_noise(x0, noise, t)
            target = noise_sched.get_velocity(x0, noise, t) if v_pred else noise
        if class_cond:
            cond = {"class_labels": torch.tensor(prompts)}
        else:
            cond = pipe._conditioning(prompts, "", False, "cpu")
        pred = pipe.predict(xt, t, cond)
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        factor = min(1.0, (step + 1) / 500)
        if lr_decay:
            factor *= min(1.0, (steps - step) / (lr_decay * steps))
        for group in opt.param_groups:
            group["lr"] = lr * factor
        opt.step()
        with torch.no_grad():
            ema_now = min(ema_decay, (1 + step) / (10 + step))
            for m, e in zip(trainable, ema):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - ema_now)
        step += 1
        if step % 50 == 0:
            log(f"{name} step {step} loss {loss.item():.4f} {(time.time() - start) / 60:.1f} min")
        if time.time() - last_ckpt > 120:
            _save_state(ckpt, trainable, ema, opt, step, time.time() - start)
            last_ckpt = time.time()
    _save_state(ckpt, trainable, ema, opt, step, time.time() - start)
    for m, e in zip(trainable, ema):
        m.load_state_dict(e.state_dict())
        m.eval()
    manifest = {
        "name": name,
        "seed": seed,
        "data_seed": seed,
        "steps": step,
        "batch": batch,
        "lr": lr,
        "ema_decay": ema_decay,
        "lr_decay": lr_decay,
        "minutes": round((time.time() - start) / 60, 1),
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "init": init or "random",
    }
    pipe.save_pretrained(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log(f"saved {name} to {out} after {step} steps")
    return manifest


def _save_state(path: Path, models, ema, opt, step, elapsed):
    with atomic_path(path) as tmp:
        torch.save(
            {
                "models": [m.state_dict() for m in models],
                "ema": [e.state_dict() for e in ema],
                "opt": opt.state_dict(),
                "step": step,
                "elapsed": elapsed,
            },
            tmp,
        )
