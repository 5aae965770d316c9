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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DitscopeError
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

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2,
                                   num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=2,
                                   decoder_start_token_id=0))


RECIPES = ("tiny-pixart", "tiny-dit")


def build(name: str, seed: int = 0):
    """A zoo pipeline with freshly initialised weights."""
    from diffusers import (
        DDIMScheduler,
        DiTTransformer2DModel,
        DPMSolverMultistepScheduler,
        PixArtTransformer2DModel,
    )

    from .pipeline import ShapesPipeline

    torch.manual_seed(seed)
    # v-prediction: with epsilon targets the high-noise steps (which fix colour and layout) carry almost
    # no signal about the image, and a CPU-sized training budget never learns them.
    betas = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    if name == "tiny-pixart":
        tok = text_tokenizer()
        transformer = PixArtTransformer2DModel(
            sample_size=32, num_layers=8, patch_size=2, in_channels=3, out_channels=3, attention_head_dim=32,
            num_attention_heads=4, cross_attention_dim=128, caption_channels=64, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
        )
        # Pixel space with a cosine schedule: alpha_bar at t=999 is 2e-9, so the first x0 estimate amplifies
        # the noise-prediction error ~2e4x; dynamic thresholding (Imagen) keeps x0 in [-1, 1].
        scheduler = DPMSolverMultistepScheduler(**betas, thresholding=True, sample_max_value=1.0)
        return ShapesPipeline(transformer, scheduler, tok, text_encoder(len(tok.get_vocab())))
    if name == "tiny-dit":
        n_classes = len(data.SHAPES) * len(data.COLORS)
        transformer = DiTTransformer2DModel(
            sample_size=32, num_layers=8, patch_size=2, in_channels=3, out_channels=3, attention_head_dim=32,
            num_attention_heads=4, norm_type="ada_norm_zero", num_embeds_ada_norm=n_classes,
            activation_fn="gelu-approximate", attention_bias=True,
        )
        return ShapesPipeline(transformer, DDIMScheduler(**betas, clip_sample=True))
    raise DitscopeError(f"no training recipe for {name!r}; recipes: {', '.join(RECIPES)}")


def training_prompts(name: str, scenes: list[data.Scene], rng: np.random.Generator, drop: float = 0.1):
    """Captions (or class labels) with `drop` of them replaced by the unconditional input."""
    if name == "tiny-dit":
        n_classes = len(data.SHAPES) * len(data.COLORS)
        return [n_classes if rng.random() < drop else data.class_label(s.objects[0]) for s in scenes]
    return ["" if rng.random() < drop else s.caption() for s in scenes]


# ------------------------------------------------------------------------------------- training
def train(name: str, out: Path, steps: int = 100_000, minutes: float | None = None, batch: int = 64,
          lr: float = 5e-4, seed: int = 0, ema_decay: float = 0.999, log=print) -> dict:
    """Train `name`, checkpointing to `out/train_state.pt` every few minutes; resumes from it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    pipe = build(name, seed)
    trainable = [m for m in (pipe.transformer, pipe.text_encoder) if m is not None]
    params = [p for m in trainable for p in m.parameters()]
    ema = [copy.deepcopy(m).requires_grad_(False) for m in trainable]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    ckpt = out / "train_state.pt"
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
    v_pred = pipe.scheduler.config.prediction_type == "v_prediction"
    for m in trainable:
        m.train()
    start, last_ckpt = time.time() - elapsed, time.time()
    max_seconds = minutes * 60 if minutes else float("inf")
    while step < steps and time.time() - start < max_seconds:
        rng = np.random.default_rng([seed, step])
        scenes = [data.sample_scene(rng, max_objects=1 if class_cond else 2) for _ in range(batch)]
        x0 = torch.from_numpy(np.stack([data.render(s) for s in scenes])) * 2 - 1
        prompts = training_prompts(name, scenes, rng)
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        xt = noise_sched.add_noise(x0, noise, t)
        if class_cond:
            cond = {"class_labels": torch.tensor(prompts)}
        else:
            states, mask = pipe.encode_prompt(prompts, "cpu")
            cond = {"encoder_hidden_states": states, "encoder_attention_mask": mask,
                    "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        pred = pipe.predict(xt, t, cond)
        target = noise_sched.get_velocity(x0, noise, t) if v_pred else noise
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        warm = min(1.0, (step + 1) / 500)
        for group in opt.param_groups:
            group["lr"] = lr * warm
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for m, e in zip(trainable, ema):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - decay)
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
    manifest = {"name": name, "seed": seed, "data_seed": seed, "steps": step, "batch": batch, "lr": lr,
                "ema_decay": ema_decay, "minutes": round((time.time() - start) / 60, 1),
                "threads": torch.get_num_threads(), "device": "cpu"}
    pipe.save_pretrained(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log(f"saved {name} to {out} after {step} steps")
    return manifest


def _save_state(path: Path, models, ema, opt, step, elapsed):
    tmp = path.with_suffix(".tmp")
    torch.save({"models": [m.state_dict() for m in models], "ema": [e.state_dict() for e in ema],
                "opt": opt.state_dict(), "step": step, "elapsed": elapsed}, tmp)
    os.replace(tmp, path)
