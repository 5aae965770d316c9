"""Token scores for token-wise caching (ToCa, DuCa): which tokens a partial step recomputes.

All scores are (rows, tokens), larger = recompute first, and cheap in memory: the self-attention
influence is accumulated over chunks of queries, so no N x N map is ever held for a whole layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24  # attention-map elements per chunk (64 MB in float32)


def _logits(q: torch.Tensor, k: torch.Tensor, mask, scale: float) -> torch.Tensor:
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    return logits


def self_attention_influence(q, k, mask, scale: float, normalize: bool = True) -> torch.Tensor:
    """s1: L2-normalised column sums of the head-mean attention map, (B, S_k) (`normalize=False`: the sums)."""
    b, h, s_q, _ = q.shape
    total = torch.zeros(b, k.shape[2], device=q.device, dtype=torch.float32)
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * k.shape[2]))
    for i in range(0, s_q, chunk):
        m = mask if mask is None or mask.shape[-2] == 1 else mask[..., i : i + chunk, :]
        p = _logits(q[:, :, i : i + chunk], k, m, scale).softmax(-1)
        total += p.sum(2).mean(1)
    return F.normalize(total, dim=-1) if normalize else total


def cross_attention_entropy(q, k, mask, scale: float, normalize: bool = True) -> torch.Tensor:
    """s2: normalize(1 + H_i), H_i the entropy over text tokens of image token i's head-mean map, (B, S_q)
    (`normalize=False`: 1 + H_i)."""
    b, h, s_q, _ = q.shape
    out = torch.empty(b, s_q, device=q.device, dtype=torch.float32)
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * k.shape[2]))
    for i in range(0, s_q, chunk):
        m = mask if mask is None or mask.shape[-2] == 1 else mask[..., i : i + chunk, :]
        c = _logits(q[:, :, i : i + chunk], k, m, scale).softmax(-1).mean(1)
        out[:, i : i + chunk] = -(c * torch.log(c + 1e-7)).sum(-1)
    return F.normalize(1 + out, dim=-1) if normalize else 1 + out


def value_norm(v: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """kv-norm: the norm of each token's value vector over all heads, (B, S). Needs no attention map.
    (`normalize=False`: the squared norms, which add over heads held by different ranks.)"""
    squares = v.float().pow(2).sum((1, 3))
    return F.normalize(squares.sqrt(), dim=-1) if normalize else squares


def random_score(rows: int, tokens: int, seed: int, device) -> torch.Tensor:
    """The same random order for every row, so a batch item's choice never depends on its neighbours."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(tokens, generator=g).to(device).expand(rows, tokens)


def spatial_uniformity(score: torch.Tensor, grid: int, bonus: float) -> torch.Tensor:
    """s4: in each grid x grid block of a square token grid, multiply the top token's score by (1 + bonus)."""
    rows, n = score.shape
    side = math.isqrt(n)
    if bonus == 0 or grid <= 1 or side * side != n or side % grid:
        return score
    cells = side // grid
    s = (
        score.reshape(rows, cells, grid, cells, grid)
        .permute(0, 1, 3, 2, 4)
        .reshape(rows, cells * cells, grid * grid)
    )
    boost = torch.ones_like(s).scatter_(-1, s.argmax(-1, keepdim=True), 1 + bonus)
    s = (s * boost).reshape(rows, cells, cells, grid, grid).permute(0, 1, 3, 2, 4)
    return s.reshape(rows, n)
