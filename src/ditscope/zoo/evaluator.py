"""The zoo's evaluator: what GenEval and FID are for real models, for the shapes domain.

`AttributeNet` is a small CNN trained on generator data. It reads, for each cell of the 3 x 3 grid,
whether an object is there and its shape, colour and size, plus the background colour. Its pooled
features serve as the embedding of a Fréchet distance (torchmetrics' FID with a custom extractor).

Metrics of generated images against their prompts:
- attribute accuracy: for each object a prompt asks for, is the predicted shape / colour / size at
  its cell right, and is something there at all (position); plus the background; and `all`, the
  share of images where every object is right and nothing extra appears (GenEval's strict score);
- Fréchet distance between generated images and real renders of the same prompts;
- PSNR and SSIM (torchmetrics) between two generations of one seed, e.g. cached against uncached.
For video: the classifier reads the middle frame, and motion is the direction in which the
object's centroid (pixels away from the background colour) travels from the first to the last frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data

N_SHAPES, N_COLORS, N_SIZES, N_BG = len(data.SHAPES), len(data.COLORS), len(data.SIZES), len(data.BACKGROUNDS)
IGNORE = -100


class AttributeNet(nn.Module):
    """(B, 3, 32, 32) images in [0, 1] -> per-cell logits and a pooled feature vector."""

    num_features = 64

    def __init__(self, width: int = 16):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.GELU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.GELU(),
            )

        self.body = nn.Sequential(
            block(3, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, self.num_features),
        )
        self.cell_head = nn.Conv2d(self.num_features, (N_SHAPES + 1) + N_COLORS + N_SIZES, 1)
        self.bg_head = nn.Linear(self.num_features, N_BG)

    def heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.body(x)
        cells = self.cell_head(F.adaptive_avg_pool2d(fmap, 3)).flatten(2).transpose(1, 2)  # (B, 9, K)
        feats = fmap.mean((2, 3))
        s, c = N_SHAPES + 1, N_COLORS
        return {
            "shape": cells[..., :s],
            "color": cells[..., s : s + c],
            "size": cells[..., s + c :],
            "background": self.bg_head(feats),
            "features": feats,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features only: what torchmetrics' FID calls with images in [0, 1]."""
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return self.heads(x)["features"]


def targets(scenes: list[data.Scene]) -> dict[str, torch.Tensor]:
    """Per-cell labels: shape 0 = empty, else 1 + shape index; colour and size ignored where empty."""
    n = len(scenes)
    shape = torch.zeros(n, 9, dtype=torch.long)
    color = torch.full((n, 9), IGNORE, dtype=torch.long)
    size = torch.full((n, 9), IGNORE, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            shape[i, o.cell] = 1 + data.SHAPES.index(o.shape)
            color[i, o.cell] = list(data.COLORS).index(o.color)
            size[i, o.cell] = list(data.SIZES).index(o.size)
    background = torch.tensor([list(data.BACKGROUNDS).index(s.background) for s in scenes])
    return {"shape": shape, "color": color, "size": size, "background": background}


def train_evaluator(steps: int = 1500, batch: int = 64, seed: int = 0, log=print) -> AttributeNet:
    """Train on fresh generator data each step (no epoch over a fixed set: nothing to overfit)."""
    torch.manual_seed(seed)
    net = AttributeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        scenes = [data.sample_scene(rng) for _ in range(batch)]
        x = torch.from_numpy(np.stack([data.render(s) for s in scenes]))
        x = (x + 0.02 * torch.randn_like(x)).clamp(0, 1)  # generated images are never perfectly clean
        y = targets(scenes)
        out = net.heads(x)
        loss = sum(
            F.cross_entropy(out[k].reshape(-1, out[k].shape[-1]), y[k].reshape(-1), ignore_index=IGNORE)
            for k in ("shape", "color", "size", "background")
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"evaluator step {step}/{steps} loss {loss.item():.4f}")
    return net.eval()


@torch.no_grad()
def predict(net: AttributeNet, images: torch.Tensor, batch: int = 256) -> dict[str, np.ndarray]:
    outs = []
    for i in range(0, len(images), batch):
        h = net.heads(images[i : i + batch].float().clamp(0, 1))
        outs.append({k: (v.argmax(-1) if k != "features" else v).numpy() for k, v in h.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def attribute_hits(
    net: AttributeNet, images: torch.Tensor, scenes: list[data.Scene]
) -> dict[str, np.ndarray]:
    """Hits of each attribute per object asked for (shape, colour, size, position), and per image
    (background; `all`: every object right, nothing extra, background right)."""
    pred = predict(net, images)
    hits = {k: [] for k in ("shape", "color", "size", "position", "background", "all")}
    for i, scene in enumerate(scenes):
        ok = True
        for o in scene.objects:
            there = pred["shape"][i, o.cell] != 0
            checks = {
                "position": there,
                "shape": pred["shape"][i, o.cell] == 1 + data.SHAPES.index(o.shape),
                "color": there and pred["color"][i, o.cell] == list(data.COLORS).index(o.color),
                "size": there and pred["size"][i, o.cell] == list(data.SIZES).index(o.size),
            }
            for k, v in checks.items():
                hits[k].append(bool(v))
            ok &= all(checks.values())
        extra = int((pred["shape"][i] != 0).sum()) - len(scene.objects)
        bg_ok = bool(pred["background"][i] == list(data.BACKGROUNDS).index(scene.background))
        hits["background"].append(bg_ok)
        hits["all"].append(bool(ok and extra == 0 and bg_ok))
    return {k: np.asarray(v, dtype=float) for k, v in hits.items()}


def attribute_accuracy(net: AttributeNet, images: torch.Tensor, scenes: list[data.Scene]) -> dict[str, float]:
    """Accuracy of images (B, 3, H, W) in [0, 1] against the scenes their prompts describe."""
    return {k: float(v.mean()) for k, v in attribute_hits(net, images, scenes).items()}


def middle_frame(videos: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, H, W) -> (B, 3, H, W): the frame where the object is nearest its scene cell (the centre)."""
    return videos[:, videos.shape[1] // 2]


def video_accuracy(net: AttributeNet, videos: torch.Tensor, scenes: list[data.Scene]) -> dict[str, float]:
    """Videos (B, F, 3, H, W) in [0, 1]: attributes read on the middle frame, plus the direction of motion."""
    return {k: float(v.mean()) for k, v in _video_hits(net, videos, scenes).items()}


def _video_hits(net: AttributeNet, videos: torch.Tensor, scenes: list[data.Scene]) -> dict[str, np.ndarray]:
    hits = attribute_hits(net, middle_frame(videos), scenes)
    hits["motion"] = np.array(
        [motion_direction(v.float().numpy()) == s.direction for v, s in zip(videos, scenes)], float
    )
    hits["all"] = hits["all"] * hits["motion"]
    return hits


def score(
    net: AttributeNet, images: torch.Tensor, scenes: list[data.Scene], class_conditional: bool = False
) -> dict:
    """The accuracy that fits the model: per class (tiny-dit), per video (tiny-latte), per attribute (text)."""
    if class_conditional:
        return class_accuracy(net, images, scenes)
    if images.dim() == 5:
        return video_accuracy(net, images, scenes)
    return attribute_accuracy(net, images, scenes)


def sample_hits(
    net: AttributeNet, images: torch.Tensor, scenes: list[data.Scene], class_conditional: bool = False
) -> dict[str, np.ndarray]:
    """Per sample (image or video), each attribute's share of its objects read right, and `all` (0 or 1):
    the unit of a paired comparison (a cached image against the uncached one of the same prompt and
    seed). With one object per prompt their means are `score`'s numbers."""
    if class_conditional:
        return _class_hits(net, images, scenes)
    hits = _video_hits(net, images, scenes) if images.dim() == 5 else attribute_hits(net, images, scenes)
    bounds = np.cumsum([len(s.objects) for s in scenes])[:-1]
    per_object = ("shape", "color", "size", "position")
    return {
        k: (np.array([h.mean() for h in np.split(v, bounds)]) if k in per_object else v)
        for k, v in hits.items()
    }


def frechet_to_real(net: AttributeNet, generated: torch.Tensor, scenes: list[data.Scene]) -> float:
    """Fréchet distance between generated images (middle frames of videos) and real renders of the scenes."""
    if generated.dim() == 5:
        generated = middle_frame(generated)
        real = np.stack([data.render_video(s)[data.VIDEO_FRAMES // 2] for s in scenes])
    else:
        real = np.stack([data.render(s, generated.shape[-1]) for s in scenes])
    return frechet_distance(net, generated, torch.from_numpy(real))


def motion_direction(frames: np.ndarray) -> str:
    """Direction a video's object travels: (F, 3, H, W) in [0, 1]."""
    centroids = []
    for f in (frames[0], frames[-1]):
        bg = np.median(np.concatenate([f[:, 0, :], f[:, -1, :], f[:, :, 0], f[:, :, -1]], axis=1), axis=1)
        weight = np.abs(f - bg[:, None, None]).sum(0)
        weight = np.where(weight > 0.3, weight, 0)
        total = weight.sum() + 1e-8
        ys, xs = np.mgrid[0 : f.shape[1], 0 : f.shape[2]]
        centroids.append(((weight * ys).sum() / total, (weight * xs).sum() / total))
    dy, dx = centroids[1][0] - centroids[0][0], centroids[1][1] - centroids[0][1]
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def frechet_distance(net: AttributeNet, generated: torch.Tensor, real: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    # every image is here: under torchrun torchmetrics would otherwise gather every rank's copy of them too
    fid = FrechetInceptionDistance(
        feature=net, normalize=True, reset_real_features=True, sync_on_compute=False
    )
    fid.update(real.float().clamp(0, 1), real=True)
    fid.update(generated.float().clamp(0, 1), real=False)
    return float(fid.compute())


def psnr_ssim(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB) and SSIM between two image batches in [0, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = a.float().clamp(0, 1), b.float().clamp(0, 1)
    return (
        float(peak_signal_noise_ratio(a, b, data_range=1.0)),
        float(structural_similarity_index_measure(a, b, data_range=1.0)),
    )


WEIGHTS = Path(__file__).parent / "assets" / "evaluator" / "attribute_net.safetensors"


def load_evaluator(path: Path = WEIGHTS) -> AttributeNet:
    from safetensors.torch import load_file

    from ..errors import DitscopeError

    if not path.is_file():
        raise DitscopeError(
            f"evaluator weights {path} are missing; train them with `ditscope zoo train evaluator`"
        )
    net = AttributeNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def evaluation_scenes(n: int, seed: int, max_objects: int = 1, video: bool = False) -> list[data.Scene]:
    """Prompts for evaluation, drawn with a seed the training never uses (training: 0, 1, ...)."""
    rng = np.random.default_rng([seed, 10_007])
    if video:
        return [data.sample_video_scene(rng) for _ in range(n)]
    return [data.sample_scene(rng, max_objects) for _ in range(n)]


def is_video(pipe) -> bool:
    return len(pipe.sample_shape(1)) == 5


def evaluation_prompts(pipe, n: int, seed: int, max_objects: int = 1) -> tuple[list[data.Scene], list]:
    """Scenes and what the pipeline is prompted with: captions, or class labels for tiny-dit."""
    scenes = evaluation_scenes(n, seed, max_objects, video=is_video(pipe))
    if pipe.is_class_conditional:
        return scenes, [data.class_label(s.objects[0]) for s in scenes]
    return scenes, [s.caption() for s in scenes]


def held_out_sets(pipe, n: int, seed: int = 3000) -> dict[str, list]:
    """Test prompts for what was fitted on one-object calibration prompts: a set like them, and for text models
    a shifted one (up to two objects per image) that the calibration never saw the like of."""
    sets = {"like calibration (1 object)": evaluation_prompts(pipe, n, seed)[1]}
    if not pipe.is_class_conditional:
        sets["shifted (2 objects)"] = evaluation_prompts(pipe, n, seed, max_objects=2)[1]
    return sets


def class_accuracy(net: AttributeNet, images: torch.Tensor, scenes: list[data.Scene]) -> dict[str, float]:
    """For class-conditional models (class = shape x colour, anywhere): the most confident object cell."""
    return {k: float(v.mean()) for k, v in _class_hits(net, images, scenes).items()}


def _class_hits(net: AttributeNet, images: torch.Tensor, scenes: list[data.Scene]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        h = net.heads(images.float().clamp(0, 1))
    present = 1 - h["shape"].softmax(-1)[..., 0]  # (B, 9) probability that a cell holds an object
    cell = present.argmax(-1)
    idx = torch.arange(len(scenes))
    shape = h["shape"][idx, cell, 1:].argmax(-1).numpy()
    color = h["color"][idx, cell].argmax(-1).numpy()
    want_shape = np.array([data.SHAPES.index(s.objects[0].shape) for s in scenes])
    want_color = np.array([list(data.COLORS).index(s.objects[0].color) for s in scenes])
    shape_ok, color_ok = shape == want_shape, color == want_color
    return {
        "shape": shape_ok.astype(float),
        "color": color_ok.astype(float),
        "all": (shape_ok & color_ok).astype(float),
    }


CHANCE = {
    "shape": 1 / N_SHAPES,
    "color": 1 / N_COLORS,
    "size": 1 / N_SIZES,
    "position": None,
    "background": 1 / N_BG,
    "motion": 1 / len(data.DIRECTIONS),
}
