"""`ditscope generate --compare`: one cached generation held against the uncached one of the same seed.

The uncached run goes first, after a short warm-up pass (two steps, uncached) so that neither timed run pays
for first-call allocations; then the cached run. Both images are compared as they are saved (8 bits per
channel, before any enlargement), so the PSNR printed is the PSNR of the two files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..profiling.workload import timed
from ..stats.quality import per_sample_psnr_ssim


def as_tensor(image) -> torch.Tensor:
    """A PIL image as a (1, C, H, W) batch, or a list of PIL frames (a video) as (1, F, C, H, W), in [0, 1]."""
    import numpy as np

    frames = image if isinstance(image, list) else [image]
    x = torch.stack(
        [
            torch.from_numpy(np.asarray(f.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
            for f in frames
        ]
    )
    return x.unsqueeze(0) if isinstance(image, list) else x


@dataclass
class Comparison:
    """A cached run against the uncached run of the same prompt and seed."""

    method: str
    seconds: float
    uncached_seconds: float
    psnr: float
    ssim: float

    @property
    def speedup(self) -> float:
        return self.uncached_seconds / self.seconds

    def line(self) -> str:
        return (
            f"{self.method}: {self.seconds:.2f} s against {self.uncached_seconds:.2f} s uncached "
            f"({self.speedup:.2f}x), PSNR {self.psnr:.1f} dB, SSIM {self.ssim:.3f} against the uncached image"
        )


def compare(method: str, image, seconds: float, reference, uncached_seconds: float) -> Comparison:
    """PSNR (capped at 100 dB for identical images) and SSIM of `image` against `reference` (PIL images, or
    lists of frames: a video's values are the means over its frames), with both runs' times."""
    psnr, ssim = per_sample_psnr_ssim(as_tensor(image), as_tensor(reference))
    return Comparison(method, seconds, uncached_seconds, psnr[0], ssim[0])


def uncached_run(run, steps: int):
    """(image, seconds) of `run(steps)` on the uncached pipeline, after a two-step warm-up pass."""
    run(min(2, steps))
    return timed(lambda: run(steps))
