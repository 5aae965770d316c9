"""An Open-Sora-style spatial-temporal DiT written in plain PyTorch (no diffusers), its own sampling loop,
and the block layout a user declares to cache it with ditscope. The README's "Any PyTorch DiT" section
walks through this file.

The model is shaped like Open-Sora 1.2's STDiT3: the video's tokens are (frames x patches); depth i is a
spatial block (self-attention among the patches of each frame) followed by a temporal block
(self-attention of each patch over the frames); both blocks also cross-attend to the text and run an MLP,
with adaLN-style modulation from the timestep. Names are deliberately not diffusers': the hidden state is
`x`, the text `y`, the timestep `t`, and attention takes its keys and values through `context=`.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

import ditscope
from ditscope.families import CROSS, IMAGE, MLP, SELF

FRAMES, SIDE, CHANNELS, PATCH = 3, 8, 4, 2
TEXT_LEN, TEXT_DIM = 12, 16


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Self-attention (over patches or over frames), cross-attention to the text, MLP; adaLN-single."""

    def __init__(self, dim: int, heads: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads, TEXT_DIM)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)
        )
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x, y, t_emb):
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            self.scale_shift_table[None] + t_emb.view(b, 6, d)
        ).chunk(6, 1)
        # (B, frames x patches, D) -> one sequence per frame (spatial) or per patch (temporal)
        h = (self.norm1(x) * (1 + scale1) + shift1).view(b, FRAMES, n // FRAMES, d)
        if self.temporal:
            h = h.transpose(1, 2)
        rows, seq = h.shape[0] * h.shape[1], h.shape[2]
        a = self.attn(h.reshape(rows, seq, d)).view(h.shape)
        if self.temporal:
            a = a.transpose(1, 2)
        x = x + gate1 * a.reshape(b, n, d)
        x = x + self.cross_attn(x, y)
        x = x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)
        return x


class STDiT(nn.Module):
    def __init__(self, depth: int = 2, dim: int = 32, heads: int = 2):
        super().__init__()
        self.dim = dim
        self.patch = nn.Linear(CHANNELS * PATCH * PATCH, dim)
        self.pos = nn.Parameter(torch.randn(1, FRAMES * (SIDE // PATCH) ** 2, dim) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.spatial_blocks = nn.ModuleList(Block(dim, heads, temporal=False) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(Block(dim, heads, temporal=True) for _ in range(depth))
        self.final = nn.Linear(dim, CHANNELS * PATCH * PATCH)

    def t_embed(self, t):
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
        args = t.float()[:, None] * freqs[None]
        return self.t_mlp(torch.cat([args.cos(), args.sin()], -1))

    def forward(self, x, t, y):
        """x: latent video (B, C, F, H, W); t: timestep (B,) in 0..1000; y: text states (B, L, TEXT_DIM)."""
        b, c, f, hh, ww = x.shape
        p = PATCH
        tokens = (
            x.view(b, c, f, hh // p, p, ww // p, p).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, -1, c * p * p)
        )
        h = self.patch(tokens) + self.pos
        t_emb = self.t_embed(t)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            h = spatial(h, y, t_emb)
            h = temporal(h, y, t_emb)
        out = self.final(h).view(b, f, hh // p, ww // p, c, p, p)
        return out.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, hh, ww)


# What a user writes to cache it: which lists are the blocks, what their children are, what the arguments
# are called. Everything else (steps, guidance calls, every cache method) is ditscope's.
LAYOUT = ditscope.Blocks(
    lists=("spatial_blocks", "temporal_blocks"),
    parallel=True,
    temporal_lists=("temporal_blocks",),
    args=("hidden", "encoder"),
    returns=("hidden",),
    modules=(
        ditscope.Child("attn", SELF, IMAGE, kv="context"),
        ("cross_attn", CROSS, IMAGE),
        ("mlp", MLP, IMAGE),
    ),
    hidden="x",
    encoder="y",
    timestep="t",
)


def build(seed: int = 0) -> STDiT:
    torch.manual_seed(seed)
    return STDiT().eval()


def inputs(B, step, text_step=None, latent_step=None):
    """Forward kwargs in the convention of tests/tiny.py (a base tensor per entry plus step noise)."""
    from tiny import _perturb, _steps

    ls, ts = _steps(step, latent_step, text_step)
    steps = [ls] * B if isinstance(ls, int) else ls
    return {
        "x": _perturb((B, CHANNELS, FRAMES, SIDE, SIDE), ls, 30),
        "t": torch.tensor([999 - 50 * s for s in steps], dtype=torch.long),
        "y": _perturb((B, TEXT_LEN, TEXT_DIM), ts, 31),
    }


class Sampler:
    """The user's own sampling loop (rectified flow, Euler steps, classifier-free guidance in one batch),
    with just enough of a pipeline's call convention for `ditscope.plan`: `sampler(prompts,
    num_inference_steps=, generator=, output_type="pt").frames` in [0, 1], and `.transformer`."""

    def __init__(self, model: STDiT, guidance_scale: float = 4.0):
        self.transformer, self.guidance_scale = model, guidance_scale

    @staticmethod
    def embed(prompt: str) -> torch.Tensor:
        """A stand-in text encoder: a fixed random embedding per prompt."""
        g = torch.Generator().manual_seed(sum(ord(ch) * 31**i for i, ch in enumerate(prompt)) % 2**31)
        return torch.randn(TEXT_LEN, TEXT_DIM, generator=g)

    @torch.no_grad()
    def __call__(self, prompts, num_inference_steps=8, generator=None, output_type="pt", guidance_scale=None):
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        gens = generator if isinstance(generator, list) else [generator] * len(prompts)
        x = torch.stack([torch.randn(CHANNELS, FRAMES, SIDE, SIDE, generator=g) for g in gens])
        y = torch.stack([self.embed(p) for p in prompts])
        y = torch.cat([torch.zeros_like(y), y])
        for i in range(num_inference_steps):
            t = 1 - i / num_inference_steps
            v_uncond, v_cond = self.transformer(
                torch.cat([x, x]), torch.full((2 * len(x),), t * 1000), y
            ).chunk(2)
            x = x - (v_uncond + scale * (v_cond - v_uncond)) / num_inference_steps
        return SimpleNamespace(
            frames=(x.permute(0, 2, 1, 3, 4)[:, :, :3] / 4 + 0.5).clamp(0, 1)
        )  # (B, F, 3, H, W)
