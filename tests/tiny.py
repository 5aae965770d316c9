"""Tiny random-init transformers of the ten diffusers DiT families, and their forward inputs.

Each family has a `build_*()` (seeded with `torch.manual_seed(0)`, in eval mode) and an
`inputs_*(B, step, ...)` that returns the forward kwargs for a batch of B at "denoising step" `step`:
fixed base tensors (seeded per family) plus a small step-dependent perturbation of the latent, so a
test can call the model several times as if it were sampling.

`inputs_fn(B, step, text_step=None, latent_step=None)`:
  - `latent_step` (default `step`): which perturbation the latent gets; pass a per-entry list of length
    B to give each batch entry its own step (entries with the same value get identical inputs).
  - `text_step` (default 0, i.e. constant): which perturbation the text/condition gets.

`FAMILIES = {class name: (build_fn, inputs_fn)}`.
"""

from __future__ import annotations

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LatteTransformer3DModel,
    MochiTransformer3DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)

TEXT_LEN = 12
NOISE = 0.05


def _base(shape, seed: int) -> torch.Tensor:
    """A fixed random tensor; entries along dim 0 differ (prompt i is its own sample)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def _perturb(shape, steps, seed: int) -> torch.Tensor:
    """Base + per-entry step-dependent noise; `steps` is one step for all entries or one per entry."""
    B = shape[0]
    if isinstance(steps, int):
        steps = [steps] * B
    x = _base(shape, seed)
    out = []
    for b, s in enumerate(steps):
        g = torch.Generator().manual_seed(1000 * seed + 7 + s)
        noise = torch.randn(shape[1:], generator=g) if s else torch.zeros(shape[1:])
        out.append(x[b] + NOISE * s * noise)
    return torch.stack(out)


def _timestep(B, steps, float_t: bool = False):
    if isinstance(steps, int):
        steps = [steps] * B
    if float_t:
        return torch.tensor([1.0 - 0.1 * s for s in steps])
    return torch.tensor([999 - 50 * s for s in steps], dtype=torch.long)


def _steps(step, latent_step, text_step):
    return (step if latent_step is None else latent_step), (0 if text_step is None else text_step)


# ------------------------------------------------------------------------------------------ DiT
def build_dit():
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=1000,
        activation_fn="gelu-approximate",
        attention_bias=True,
    ).eval()


def inputs_dit(B, step, text_step=None, latent_step=None):
    ls, ts = _steps(step, latent_step, text_step)
    return {
        "hidden_states": _perturb((B, 4, 8, 8), ls, 1),
        "timestep": _timestep(B, ls),
        "class_labels": torch.arange(B, dtype=torch.long) + 3,
    }


# ---------------------------------------------------------------------------------------- PixArt
def build_pixart():
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
        caption_channels=32,
    ).eval()


def inputs_pixart(B, step, text_step=None, latent_step=None):
    ls, ts = _steps(step, latent_step, text_step)
    return {
        "hidden_states": _perturb((B, 4, 8, 8), ls, 2),
        "encoder_hidden_states": _perturb((B, TEXT_LEN, 32), ts, 3),
        "timestep": _timestep(B, ls),
        "added_cond_kwargs": {"aspect_ratio": None, "resolution": None},
    }


# ------------------------------------------------------------------------------------------- SD3
def build_sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(
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
        dual_attention_layers=(),
        qk_norm=None,
    ).eval()


def inputs_sd3(B, step, text_step=None, latent_step=None):
    ls, ts = _steps(step, latent_step, text_step)
    return {
        "hidden_states": _perturb((B, 4, 16, 16), ls, 4),
        "encoder_hidden_states": _perturb((B, TEXT_LEN, 32), ts, 5),
        "pooled_projections": _perturb((B, 32), ts, 6),
        "timestep": _timestep(B, ls),
    }


# ------------------------------------------------------------------------------------------ Flux
def build_flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def inputs_flux(B, step, text_step=None, latent_step=None):
    ls, ts = _steps(step, latent_step, text_step)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), rows.flatten().float(), cols.flatten().float()], dim=1)
    return {
        "hidden_states": _perturb((B, 16, 16), ls, 7),
        "encoder_hidden_states": _perturb((B, TEXT_LEN, 32), ts, 8),
        "pooled_projections": _perturb((B, 32), ts, 9),
        "timestep": _timestep(B, ls, float_t=True),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(TEXT_LEN, 3),
    }


# ------------------------------------------------------------------------------------- CogVideoX
def build_cogvideox():
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=4,
        text_embed_dim=16,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        patch_size_t=None,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=False,
    ).eval()


def inputs_cogvideox(B, step, text_step=None, latent_step=None):
    ls, ts = _steps(step, latent_step, text_step)
    return {
        "hidden_states": _perturb((B, 3, 4, 8, 8), ls, 10),  # frames before channels
        "encoder_hidden_states": _perturb((B, TEXT_LEN, 16), ts, 11),
        "timestep": _timestep(B, ls),
    }


# ----------------------------------------------------------------------------------------- Latte
def build_latte():
    torch.manual_seed(0)
    return LatteTransformer3DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=16,
        video_length=3,
    ).eval()


def inputs_latte(B, step, text_step=None, latent_step=None):
    ls, ts = _steps(step, latent_step, text_step)
    return {
        "hidden_states": _perturb((B, 4, 3, 8, 8), ls, 12),
        "encoder_hidden_states": _perturb((B, TEXT_LEN, 16), ts, 13),
        "timestep": _timestep(B, ls),
        "enable_temporal_attentions": True,
    }


# ----------------------------------------------------------------------------------------- Mochi
def build_mochi():
    torch.manual_seed(0)
    return MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=16,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=TEXT_LEN,
    ).eval()


MOCHI_VALID = (9, 7)  # valid text tokens of entries 0, 1, ... (cycled): Mochi keeps only these per sample


def mochi_mask(B):
    mask = torch.zeros(B, TEXT_LEN, dtype=torch.bool)
    for b in range(B):
        mask[b, : MOCHI_VALID[b % len(MOCHI_VALID)]] = True
    return mask


def inputs_mochi(B, step, text_step=None, latent_step=None):
    ls, ts = _steps(step, latent_step, text_step)
    return {
        "hidden_states": _perturb((B, 4, 3, 8, 8), ls, 14),
        "encoder_hidden_states": _perturb((B, TEXT_LEN, 16), ts, 15),
        "timestep": _timestep(B, ls),
        "encoder_attention_mask": mochi_mask(B),
    }


# ---------------------------------------------------------------------------------- HunyuanVideo
def build_hunyuanvideo():
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
        image_condition_type=None,
    ).eval()


def inputs_hunyuanvideo(B, step, text_step=None, latent_step=None):
    ls, ts = _steps(step, latent_step, text_step)
    return {
        "hidden_states": _perturb((B, 4, 3, 8, 8), ls, 16),
        "timestep": _timestep(B, ls),
        "encoder_hidden_states": _perturb((B, TEXT_LEN, 16), ts, 17),
        "pooled_projections": _perturb((B, 8), ts, 18),
        "encoder_attention_mask": torch.ones(B, TEXT_LEN),
        "guidance": torch.full((B,), 3500.0),
    }


# ------------------------------------------------------------------------------------------- Wan
def build_wan():
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def inputs_wan(B, step, text_step=None, latent_step=None):
    ls, ts = _steps(step, latent_step, text_step)
    return {
        "hidden_states": _perturb((B, 4, 3, 8, 8), ls, 19),
        "encoder_hidden_states": _perturb((B, TEXT_LEN, 16), ts, 20),
        "timestep": _timestep(B, ls),
    }


# ------------------------------------------------------------------------------------- QwenImage
def build_qwenimage():
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()


def inputs_qwenimage(B, step, text_step=None, latent_step=None):
    ls, ts = _steps(step, latent_step, text_step)
    return {
        "hidden_states": _perturb((B, 16, 16), ls, 21),
        "encoder_hidden_states": _perturb((B, TEXT_LEN, 16), ts, 22),
        "encoder_hidden_states_mask": torch.ones(B, TEXT_LEN, dtype=torch.long),
        "timestep": _timestep(B, ls, float_t=True),
        "img_shapes": [(1, 4, 4)] * B,
    }


FAMILIES = {
    "DiTTransformer2DModel": (build_dit, inputs_dit),
    "PixArtTransformer2DModel": (build_pixart, inputs_pixart),
    "SD3Transformer2DModel": (build_sd3, inputs_sd3),
    "FluxTransformer2DModel": (build_flux, inputs_flux),
    "CogVideoXTransformer3DModel": (build_cogvideox, inputs_cogvideox),
    "LatteTransformer3DModel": (build_latte, inputs_latte),
    "MochiTransformer3DModel": (build_mochi, inputs_mochi),
    "HunyuanVideoTransformer3DModel": (build_hunyuanvideo, inputs_hunyuanvideo),
    "WanTransformer3DModel": (build_wan, inputs_wan),
    "QwenImageTransformer2DModel": (build_qwenimage, inputs_qwenimage),
}
