"""Step-to-step distances from sufficient statistics.

The device reduces each captured tensor X_t (with X_{t-1} kept from the previous step) to four sums
per batch entry and token stream, in float32:

    absdiff = sum|X_t - X_{t-1}|      abscur = sum|X_t|      sqdiff = sum (X_t - X_{t-1})^2      sq = sum X_t^2

The host turns them into the three metrics, using the previous step's `abscur` and `sq`:

    l1     = absdiff / numel                               (the paper's mean |X_t - X_{t-1}|)
    rel_l1 = absdiff / sum|X_{t-1}|
    cos    = 1 - <X_t, X_{t-1}> / (|X_t| |X_{t-1}|)       (cosine distance of the flattened tensors)

Cosine distance is computed as (|X_t - X_{t-1}|^2 - (|X_t| - |X_{t-1}|)^2) / (2 |X_t| |X_{t-1}|), which
is the same quantity without the cancellation of `1 - dot/norm` in float32 when the two steps are
nearly identical, which is exactly the redundant case this tool exists to measure.

Sums (not means) are what the device returns, so several attention calls of one layer (Mochi calls
attention once per sample) and several batch entries of one sample (Latte's temporal attention runs
over B x patches) simply add up.
"""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("l1", "rel_l1", "cos")
N_SUMS = 4  # absdiff, abscur, sqdiff, sq


def reduce_sums(
    x: torch.Tensor, prev: torch.Tensor | None, segments: list[tuple[int, int]], scratch: dict | None = None
) -> torch.Tensor:
    """Four sums per (entry, segment) of `x` shaped (N, H, S, D); segments are [start, end) on S.

    Returns a float32 tensor (4, N, len(segments)) on x's device. Without `prev` (the first step)
    absdiff and sqdiff are zero. This runs for every tensor of every layer at every step, so it is
    written for speed (measured in benchmarks/README.md): it is memory-bound, so it makes few passes
    over the data, in memory order. Reductions run over whole trailing dims, flattened to one row per
    entry when each entry is one dense block, permuted views included (no strided partial reductions).
    The work buffers (and the recorder's kept tensors) take x's memory layout, so elementwise ops read
    and write in order. Squares go through `vector_norm` of order 2 (no temporary); |.| through `abs`
    into a reused float32 buffer from `scratch` and a plain sum (`vector_norm` of order 1 is ~10x slower
    on CPU); the difference is written into the same buffer, `prev`'s dtype promoted on the fly; the
    float32 copy of a lower-precision `x` is a second reused buffer, not an allocation per call.
    """
    x = x.detach()
    if x.dtype != torch.float32:
        x = _buffer(scratch, x, "x").copy_(x)
    whole = len(segments) == 1 and segments[0] == (0, x.shape[2])

    flat = _flat_strides(x) if whole else None  # the work buffer shares x's strides (empty_like)

    def split(t):
        if whole:
            return [t.as_strided(*flat) if flat is not None and t.stride() == x.stride() else t]
        return [t[:, :, a:b] for a, b in segments]

    def dims(t):
        return tuple(range(1, t.dim()))

    norm = torch.linalg.vector_norm
    buf = _buffer(scratch, x, "work")
    sq = [norm(p, 2, dims(p)) for p in split(x)]
    abscur = [p.sum(dims(p)) for p in split(torch.abs(x, out=buf))]
    if prev is None:
        absdiff = sqdiff = [_zeros(scratch, x)] * len(abscur)
    else:
        if prev.device != x.device:  # kept on the CPU (offload)
            prev = prev.to(x.device, non_blocking=True)
        parts = split(torch.sub(x, prev, out=buf))
        sqdiff = [norm(p, 2, dims(p)) for p in parts]
        absdiff = [p.abs_().sum(dims(p)) for p in parts]  # in place, after the squares: segments are disjoint
    out = torch.stack([torch.stack(row, dim=-1) for row in (absdiff, abscur, sqdiff, sq)])  # (4, N, segments)
    out[2:].square_()  # norms of order 2 -> sums of squares
    return out


def _flat_strides(t: torch.Tensor):
    """(size, stride) of a (N, M) view of `t` whose rows are each entry's elements in memory order, when
    every entry is one dense block (contiguous, or a permuted layout such as the (B, H, S, D) view of a
    (B, S, H, D) tensor); else None. Sums over a row do not depend on the order of its elements."""
    n = t.shape[0]
    if n == 0 or t.numel() == 0:
        return None
    m = t.numel() // n
    expected = 1
    for stride, size in sorted((t.stride(d), t.shape[d]) for d in range(1, t.dim()) if t.shape[d] != 1):
        if stride != expected:
            return None
        expected *= size
    return (n, m), (t.stride(0) if n > 1 else m, 1)


def _buffer(scratch: dict | None, x: torch.Tensor, role: str) -> torch.Tensor:
    """A float32 work buffer in x's memory layout (elementwise ops between tensors of one layout run
    through memory in order; a permuted view copied into a contiguous buffer would be read strided)."""
    if scratch is None:
        return torch.empty_like(x, dtype=torch.float32)
    key = (role, tuple(x.shape), x.stride(), x.device)
    if key not in scratch:
        scratch[key] = torch.empty_like(x, dtype=torch.float32)
    return scratch[key]


def _zeros(scratch: dict | None, x: torch.Tensor) -> torch.Tensor:
    if scratch is None:
        return torch.zeros(x.shape[0], device=x.device)
    key = ("zeros", x.shape[0], x.device)
    if key not in scratch:
        scratch[key] = torch.zeros(x.shape[0], device=x.device)
    return scratch[key]


def metrics_from_sums(
    sums: np.ndarray, prev_abs: np.ndarray, prev_sq: np.ndarray, numel: np.ndarray
) -> np.ndarray:
    """(absdiff, _, sqdiff, sq) of step t plus step t-1's sum|X| and sum X^2 -> (..., 3) metrics.

    0/0 is defined as 0 (two all-zero tensors are identical); a zero denominator with a nonzero
    numerator gives relative distance inf and cosine distance 1.
    """
    absdiff, sqdiff, sq = sums[0], sums[2], sums[3]
    with np.errstate(divide="ignore", invalid="ignore"):
        l1 = absdiff / numel
        rel = np.where(prev_abs > 0, absdiff / prev_abs, np.where(absdiff > 0, np.inf, 0.0))
        norm_cur, norm_prev = np.sqrt(sq), np.sqrt(prev_sq)
        cos = np.clip((sqdiff - (norm_cur - norm_prev) ** 2) / (2 * norm_cur * norm_prev), 0.0, 2.0)
        cos = np.where(norm_cur * norm_prev > 0, cos, np.where((sq > 0) | (prev_sq > 0), 1.0, 0.0))
    return np.stack([l1, rel, cos], axis=-1)
