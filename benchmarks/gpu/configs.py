"""The architectures `measure.py` builds: published transformer configs (as in each checkpoint's
`transformer/config.json`), a tiny config of the same class for the CPU test, and the inputs a sampling
loop feeds them (random prompt embeddings of the text encoders' shapes; no text encoder, no VAE).

Order is value order: a run cut off by its time budget has measured the first ones.

Step counts: `steps` is the model's default (paper Table 1, or the pipeline's default where the paper
has none); `cache_steps` is what the GPU run uses for the cache comparison, fewer where a full run
would not fit the ~9-minute window (the CSV and the README say so); `profile_steps` is the length of
the plain-vs-recorded runs (the overhead is per step, so a few steps suffice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Inputs:
    """A fixed batch for one architecture: the starting latent and how to call the model at a step."""

    x0: torch.Tensor
    kwargs: dict  # constant model arguments (prompt embeddings, masks, ids, rotary tables)
    flow: bool = False  # timestep fed as a sigma in [0, 1] (Flux) rather than 0..1000
    long_timestep: bool = False
    channel_dim: int = 1  # where the output's channels are (the prediction may carry extra ones)

    def timestep(self, i: int, steps: int) -> torch.Tensor:
        t = 999 - i * (1000 // max(steps, 1))
        b = self.x0.shape[0]
        if self.flow:
            return torch.full((b,), t / 1000, device=self.x0.device, dtype=self.x0.dtype)
        dtype = torch.long if self.long_timestep else torch.float32
        return torch.full((b,), t, device=self.x0.device, dtype=dtype)

    def update(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A scheduler-like step, so that consecutive steps differ as in sampling."""
        c = h.shape[self.channel_dim]
        return h - 0.05 * out.narrow(self.channel_dim, 0, c)


@dataclass
class Arch:
    name: str
    cls: str  # diffusers class
    full: dict  # published config
    tiny: dict
    paper_layers: (
        int | None
    )  # attention layers in paper Table 1 (self-attention; cross-attention not counted)
    steps: int  # default step count
    cache_steps: int  # steps of the GPU cache comparison
    profile_steps: int
    shape: str  # what the full-size inputs are (for the CSV)
    make_inputs: object = None  # (config, size, device, dtype) -> Inputs
    toca: dict = field(default_factory=dict)  # ToCaConfig overrides (the paper's setting for this model)
    note: str = ""


def _randn(*shape, device, dtype):
    return torch.randn(*shape, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------ inputs
def _pixart(cfg, size, device, dtype):
    s = cfg["sample_size"]
    b = 2  # classifier-free guidance batch: uncond + cond
    tokens = 120 if size == "full" else 12
    extra = {"aspect_ratio": None, "resolution": None}
    if cfg.get("use_additional_conditions"):
        extra = {
            "resolution": torch.tensor([[s * 8.0, s * 8.0]] * b, device=device, dtype=dtype),
            "aspect_ratio": torch.tensor([[1.0]] * b, device=device, dtype=dtype),
        }
    return Inputs(
        _randn(b, cfg["in_channels"], s, s, device=device, dtype=dtype),
        {
            "encoder_hidden_states": _randn(b, tokens, cfg["caption_channels"], device=device, dtype=dtype),
            "added_cond_kwargs": extra,
        },
    )


def _flux(cfg, size, device, dtype):
    side = 64 if size == "full" else 4  # 1024 px: 128x128 latent packed 2x2 -> 64x64 tokens
    tokens = 512 if size == "full" else 12
    b = 1  # FLUX.1-dev is guidance-distilled: one pass per step
    grid = torch.arange(side, dtype=torch.float32)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), grid, grid, indexing="ij"), -1)
    kwargs = {
        "encoder_hidden_states": _randn(b, tokens, cfg["joint_attention_dim"], device=device, dtype=dtype),
        "pooled_projections": _randn(b, cfg["pooled_projection_dim"], device=device, dtype=dtype),
        "img_ids": ids.reshape(-1, 3).to(device=device, dtype=dtype),
        "txt_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
    }
    if cfg.get("guidance_embeds"):
        kwargs["guidance"] = torch.full((b,), 3.5, device=device, dtype=dtype)
    return Inputs(
        _randn(b, side * side, cfg["in_channels"], device=device, dtype=dtype),
        kwargs,
        flow=True,
        channel_dim=2,
    )


def _sd3(cfg, size, device, dtype):
    s = cfg["sample_size"]
    b = 2
    tokens = 333 if size == "full" else 12  # 77 CLIP + 256 T5 tokens
    return Inputs(
        _randn(b, cfg["in_channels"], s, s, device=device, dtype=dtype),
        {
            "encoder_hidden_states": _randn(
                b, tokens, cfg["joint_attention_dim"], device=device, dtype=dtype
            ),
            "pooled_projections": _randn(b, cfg["pooled_projection_dim"], device=device, dtype=dtype),
        },
    )


def _cogvideox(cfg, size, device, dtype):
    b = 2
    frames = (cfg["sample_frames"] - 1) // cfg[
        "temporal_compression_ratio"
    ] + 1  # 49 frames -> 13 latent frames
    h, w = cfg["sample_height"], cfg["sample_width"]
    kwargs = {
        "encoder_hidden_states": _randn(
            b, cfg["max_text_seq_length"], cfg["text_embed_dim"], device=device, dtype=dtype
        )
    }
    if cfg.get("use_rotary_positional_embeddings"):
        kwargs["image_rotary_emb"] = _cogvideox_rotary(cfg, frames, device)
    return Inputs(
        _randn(b, frames, cfg["in_channels"], h, w, device=device, dtype=dtype),
        kwargs,
        long_timestep=True,
        channel_dim=2,
    )


def _cogvideox_rotary(cfg, frames, device):
    """The 3-D RoPE tables CogVideoXPipeline computes (its `_prepare_rotary_positional_embeddings`)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p = cfg["patch_size"]
    gh, gw = cfg["sample_height"] // p, cfg["sample_width"] // p
    crops = get_resize_crop_region_for_grid((gh, gw), cfg["sample_width"] // p, cfg["sample_height"] // p)
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=cfg["attention_head_dim"],
        crops_coords=crops,
        grid_size=(gh, gw),
        temporal_size=frames,
        device=device,
    )
    return cos, sin


def _latte(cfg, size, device, dtype):
    b = 2
    s = cfg["sample_size"]
    tokens = 120 if size == "full" else 12
    return Inputs(
        _randn(b, cfg["in_channels"], cfg["video_length"], s, s, device=device, dtype=dtype),
        {
            "encoder_hidden_states": _randn(b, tokens, cfg["caption_channels"], device=device, dtype=dtype),
            "enable_temporal_attentions": True,
        },
    )


def _mochi(cfg, size, device, dtype):
    b = 2
    frames, h, w = (
        (4, 60, 106) if size == "full" else (3, 8, 8)
    )  # 19 frames of 480x848 -> 4 x 60 x 106 latents
    tokens = cfg["max_sequence_length"]
    mask = torch.zeros(b, tokens, dtype=torch.bool, device=device)
    mask[:, : max(2, tokens // 4)] = True  # a prompt fills a quarter of T5's 256 positions
    return Inputs(
        _randn(b, cfg["in_channels"], frames, h, w, device=device, dtype=dtype),
        {
            "encoder_hidden_states": _randn(b, tokens, cfg["text_embed_dim"], device=device, dtype=dtype),
            "encoder_attention_mask": mask,
        },
    )


def _wan(cfg, size, device, dtype):
    b = 2
    frames, h, w = (21, 60, 104) if size == "full" else (3, 8, 8)  # 81 frames of 480x832
    tokens = 512 if size == "full" else 12
    return Inputs(
        _randn(b, cfg["in_channels"], frames, h, w, device=device, dtype=dtype),
        {"encoder_hidden_states": _randn(b, tokens, cfg["text_dim"], device=device, dtype=dtype)},
    )


# ------------------------------------------------------------------------------------ architectures
_ADA_SINGLE = dict(
    activation_fn="gelu-approximate",
    attention_bias=True,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    num_embeds_ada_norm=1000,
    patch_size=2,
)

ARCHS = [
    Arch(
        "pixart",
        "PixArtTransformer2DModel",
        full=dict(
            _ADA_SINGLE,
            sample_size=128,
            num_layers=28,
            attention_head_dim=72,
            num_attention_heads=16,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=1152,
            caption_channels=4096,
            use_additional_conditions=True,
        ),
        tiny=dict(
            _ADA_SINGLE,
            sample_size=8,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=16,
            caption_channels=32,
            use_additional_conditions=False,
        ),
        paper_layers=28,
        steps=20,
        cache_steps=20,
        profile_steps=10,
        shape="PixArt-XL-2-1024-MS, 1024x1024 (4096 tokens), 120 T5 tokens, CFG batch 2",
        make_inputs=_pixart,
        toca={},
        note="ToCa: the paper's PixArt-alpha setting (ToCaConfig defaults)",
    ),
    Arch(
        "flux",
        "FluxTransformer2DModel",
        full=dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        tiny=dict(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
        paper_layers=57,
        steps=28,
        cache_steps=28,
        profile_steps=5,
        shape="FLUX.1-dev, 1024x1024 (4096 tokens), 512 T5 tokens, guidance 3.5, batch 1",
        make_inputs=_flux,
        toca=dict(schedule="fixed", interval=4, warmup=3),
        note="ToCa: the paper's FLUX setting (first 3 steps full, then every 4th), PixArt's ratios",
    ),
    Arch(
        "sd3",
        "SD3Transformer2DModel",
        full=dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
            qk_norm=None,
            dual_attention_layers=(),
        ),
        tiny=dict(
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
        ),
        paper_layers=24,
        steps=28,
        cache_steps=28,
        profile_steps=5,
        shape="SD3-medium, 1024x1024 (4096 tokens), 333 text tokens, CFG batch 2",
        make_inputs=_sd3,
        toca={},
        note="ToCa: PixArt's setting (the paper has none for SD3)",
    ),
    Arch(
        "latte",
        "LatteTransformer3DModel",
        full=dict(
            _ADA_SINGLE,
            sample_size=64,
            num_layers=28,
            attention_head_dim=72,
            num_attention_heads=16,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=1152,
            caption_channels=4096,
            video_length=16,
        ),
        tiny=dict(
            _ADA_SINGLE,
            sample_size=8,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=16,
            caption_channels=16,
            video_length=3,
        ),
        paper_layers=56,
        steps=50,
        cache_steps=50,
        profile_steps=5,
        shape="Latte-1, 16 frames of 512x512 (16 x 1024 tokens), 120 T5 tokens, CFG batch 2",
        make_inputs=_latte,
        toca={},
        note="ToCa: PixArt's setting",
    ),
    Arch(
        "cogvideox",
        "CogVideoXTransformer3DModel",
        full=dict(
            num_attention_heads=48,
            attention_head_dim=64,
            in_channels=16,
            out_channels=16,
            time_embed_dim=512,
            text_embed_dim=4096,
            num_layers=42,
            sample_width=90,
            sample_height=60,
            sample_frames=49,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=226,
            norm_eps=1e-5,
            spatial_interpolation_scale=1.875,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
        ),
        tiny=dict(
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
            temporal_compression_ratio=4,
            max_text_seq_length=12,
            use_rotary_positional_embeddings=False,
        ),
        paper_layers=30,
        steps=50,
        cache_steps=10,
        profile_steps=3,
        shape="CogVideoX-5B, 49 frames of 480x720 (13 x 1350 tokens), 226 T5 tokens, CFG batch 2",
        make_inputs=_cogvideox,
        toca=dict(score="kv_norm"),
        note="CogVideoX-5B has 42 blocks; the paper's 30 is CogVideoX-2B's count. ToCa: PixArt's ratios, "
        "kv-norm scores (an attention map of 17,776 tokens per layer would cost more than it saves)",
    ),
    Arch(
        "mochi",
        "MochiTransformer3DModel",
        full=dict(
            patch_size=2,
            num_attention_heads=24,
            attention_head_dim=128,
            num_layers=48,
            pooled_projection_dim=1536,
            in_channels=12,
            out_channels=None,
            qk_norm="rms_norm",
            text_embed_dim=4096,
            time_embed_dim=256,
            activation_fn="swiglu",
            max_sequence_length=256,
        ),
        tiny=dict(
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
            max_sequence_length=12,
        ),
        paper_layers=48,
        steps=64,
        cache_steps=8,
        profile_steps=3,
        shape="Mochi-1-preview, 19 frames of 480x848 (4 x 1590 tokens, the pipeline's default length), 256 T5 "
        "positions (64 valid), CFG batch 2",
        make_inputs=_mochi,
        toca=dict(score="kv_norm"),
        note="caching of Mochi is not in this branch yet",
    ),
    Arch(
        "wan",
        "WanTransformer3DModel",
        full=dict(
            patch_size=(1, 2, 2),
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
        ),
        tiny=dict(
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
        ),
        paper_layers=None,
        steps=50,
        cache_steps=5,
        profile_steps=3,
        shape="Wan2.1-T2V-1.3B, 81 frames of 480x832 (21 x 1560 tokens), 512 T5 tokens, CFG batch 2",
        make_inputs=_wan,
        toca=dict(score="kv_norm"),
        note="the 1.3B model (the 14B one would not fit the window); not in the paper; caching not in this branch yet",
    ),
]

BY_NAME = {a.name: a for a in ARCHS}
