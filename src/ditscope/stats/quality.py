"""Image quality of a cached run against the uncached run of the same prompt and seed."""

from __future__ import annotations

import torch


def as_frames(x: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) or videos (N, F, C, H, W) as a batch of frames in [0, 1]."""
    return x.flatten(0, x.dim() - 4).clamp(0, 1)


def per_sample_psnr_ssim(images: torch.Tensor, reference: torch.Tensor) -> tuple[list[float], list[float]]:
    """PSNR (dB, capped at 100 for identical images) and SSIM of each sample against its reference; a
    video's are the means over its frames."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = as_frames(images), as_frames(reference)
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = torch.nan_to_num(psnr, posinf=100.0).clamp(max=100.0)
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    n = len(images)
    return psnr.view(n, -1).mean(1).tolist(), ssim.view(n, -1).mean(1).tolist()
