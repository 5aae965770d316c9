"""Oracle tests: every quality number the bench, `tune` and the planner report, recomputed from the raw images.

The expected values come from the plain code at the top of this file (loops, explicit windows, np.pad), written
apart from ditscope's: no ditscope helper computes an expected number here (ditscope is used only to run what is
under test, and for the zoo's label tables). Shapes are chosen so that no two axes have the same size, so a
swapped or misread axis cannot go unnoticed: images (8 samples, 3 channels, 12 x 10), videos (6 samples, 5
frames, 3 channels, 13 x 11), evaluator images (10 samples, 3 channels, 32 x 36; videos 10 x 8 frames).

What the bench reports (bench/runner.py `run_setting`, bench/report.py `table` / `_intervals`):
- psnr, ssim: the mean over samples (prompt x seed) of each sample's value against the uncached sample of the
  same prompt and seed; a video's value is the mean over its frames; PSNR per frame is 10 log10(1 / mse) on
  images clamped to [0, 1], capped at 100 dB (identical frames included) before the mean over frames;
- psnr_lo/hi, ssim_lo/hi: scipy's 95% percentile bootstrap of that mean (2000 resamples, rng seed 0);
- psnr_p5: np.percentile(per-sample PSNR, 5), numpy's default (linear) definition; psnr_p5_lo (plans and tuned
  configs): the largest order statistic k whose binomial tail P(at least k of n below the 5th percentile) is
  at least 0.95, the smallest value when none is;
- accuracy: the mean over the scored attributes of each attribute's accuracy (per object for shape / colour /
  size / position, per sample for background / motion); accuracy_drop = 100 (uncached - cached); its
  interval is the bootstrap of the paired per-sample drops of each sample's part in the accuracy (an attribute
  read per object: its objects read right over the mean objects per sample), whose mean is accuracy_drop;
- all: share of samples with every attribute right; all_drop = mean of the per-sample paired drops (points).
"""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

# ==================================================================================== the oracles
CAP = 100.0


def o_psnr_frame(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of one (C, H, W) frame against another, both clamped to [0, 1]; capped at 100."""
    a = np.clip(np.asarray(a, np.float64), 0.0, 1.0)
    b = np.clip(np.asarray(b, np.float64), 0.0, 1.0)
    total = 0.0
    for c in range(a.shape[0]):
        for y in range(a.shape[1]):
            for x in range(a.shape[2]):
                total += (a[c, y, x] - b[c, y, x]) ** 2
    mse = total / a.size
    if mse == 0.0:
        return CAP
    return min(CAP, 10.0 * math.log10(1.0 / mse))


def o_gaussian_window() -> np.ndarray:
    """torchmetrics' default SSIM window: 11 taps (int(3.5 sigma + 0.5) * 2 + 1), sigma 1.5, outer product."""
    taps = [math.exp(-0.5 * ((i - 5) / 1.5) ** 2) for i in range(11)]
    s = sum(taps)
    taps = [t / s for t in taps]
    w = np.zeros((11, 11))
    for i in range(11):
        for j in range(11):
            w[i, j] = taps[i] * taps[j]
    return w


def o_ssim_frame(a: np.ndarray, b: np.ndarray) -> float:
    """Gaussian-window SSIM of one (C, H, W) frame (data range 1, k1 0.01, k2 0.03) as torchmetrics computes it:
    each channel reflect-padded by 5 (np.pad 'reflect': the edge pixel is not repeated), filtered with the
    window at every pixel, variances clamped at 0, the SSIM map averaged over channels and every pixel."""
    a = np.clip(np.asarray(a, np.float64), 0.0, 1.0)
    b = np.clip(np.asarray(b, np.float64), 0.0, 1.0)
    w = o_gaussian_window()
    c1, c2 = 0.01**2, 0.03**2
    _, h, wd = a.shape
    maps = []
    for c in range(a.shape[0]):
        pa, pb = np.pad(a[c], 5, mode="reflect"), np.pad(b[c], 5, mode="reflect")

        def filt(img):
            out = np.zeros((h, wd))
            for dy in range(11):
                for dx in range(11):
                    out += w[dy, dx] * img[dy : dy + h, dx : dx + wd]
            return out

        mu_a, mu_b = filt(pa), filt(pb)
        var_a = np.maximum(filt(pa * pa) - mu_a**2, 0.0)
        var_b = np.maximum(filt(pb * pb) - mu_b**2, 0.0)
        cov = filt(pa * pb) - mu_a * mu_b
        maps.append(
            ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        )
    return float(np.mean(np.stack(maps)))


def o_per_sample(metric, images, reference) -> list[float]:
    """Per sample: the metric of an image, or the mean over a video's frames of the metric of each frame."""
    images, reference = np.asarray(images), np.asarray(reference)
    out = []
    for i in range(images.shape[0]):
        if images.ndim == 4:
            out.append(metric(images[i], reference[i]))
        else:
            frames = [metric(images[i, f], reference[i, f]) for f in range(images.shape[1])]
            out.append(sum(frames) / len(frames))
    return out


def o_mean(values) -> float:
    return sum(values) / len(values)


def o_percentile(values, q: float) -> float:
    """numpy's default ('linear', Hyndman-Fan 7) percentile: interpolate at position (n - 1) q / 100."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def o_quantile_lower_bound(values, q: float = 0.05, level: float = 0.95) -> float:
    """The k-th smallest value for the largest k with sum over j >= k of C(n, j) q^j (1 - q)^(n - j) >= level."""
    v, n, best = sorted(values), len(values), 0
    for k in range(1, n + 1):
        if sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(k, n + 1)) >= level:
            best = k
    return v[best - 1] if best else v[0]


def o_bootstrap_replica(values, level=0.95, n_resamples=2000, seed=0) -> tuple[float, float]:
    """The percentile bootstrap with the draws scipy 1.17 makes (Generator(seed).integers(0, n, (B, n)): one row
    of indices per resample), its statistic computed with a plain loop, the endpoints by linear interpolation at
    (B - 1) alpha: the implementation's interval to rounding, if it is the 95% percentile interval of the mean.
    Constant values: the degenerate [v, v]."""
    x = [float(v) for v in values]
    if all(v == x[0] for v in x):
        return x[0], x[0]
    idx = np.random.default_rng(seed).integers(0, len(x), (n_resamples, len(x)))
    means = []
    for r in range(n_resamples):
        s = 0.0
        for j in range(len(x)):
            s += x[idx[r, j]]
        means.append(s / len(x))
    alpha = (1 - level) / 2
    return o_percentile(means, 100 * alpha), o_percentile(means, 100 * (1 - alpha))


def o_bootstrap_own(values, level=0.95, n_resamples=4000, seed=12345) -> tuple[float, float]:
    """An independent percentile bootstrap (own generator, own draws, plain loops)."""
    x = [float(v) for v in values]
    if all(v == x[0] for v in x):
        return x[0], x[0]
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_resamples):
        picks = rng.integers(0, len(x), len(x))
        means.append(sum(x[int(k)] for k in picks) / len(x))
    alpha = (1 - level) / 2
    return o_percentile(means, 100 * alpha), o_percentile(means, 100 * (1 - alpha))


def check_interval(values, lo, hi, lattice: float = 0.0, what: str = ""):
    """`lo`, `hi` against the replica (to 1e-9) and against an independent bootstrap: with 2000 (theirs) and
    4000 (ours) resamples an endpoint of a percentile bootstrap has a Monte Carlo s.d. of about 0.015 and 0.011
    of the interval's width (normal approximation: sqrt(p (1 - p) / B) / density at the 2.5% point), so 0.1 of
    the width is over 5 s.d. of their difference. Values on a lattice (accuracy drops of 0/1 hits) move an
    endpoint by one lattice step (`lattice`) at a time: that much is allowed too."""
    r_lo, r_hi = o_bootstrap_replica(values)
    assert lo == pytest.approx(r_lo, abs=1e-9, rel=1e-9), f"{what} low: {lo} vs replica {r_lo}"
    assert hi == pytest.approx(r_hi, abs=1e-9, rel=1e-9), f"{what} high: {hi} vs replica {r_hi}"
    own_lo, own_hi = o_bootstrap_own(values)
    tol = max(0.1 * (own_hi - own_lo), lattice) + 1e-12
    assert abs(lo - own_lo) <= tol, f"{what} low: {lo} vs independent bootstrap {own_lo} (tolerance {tol})"
    assert abs(hi - own_hi) <= tol, f"{what} high: {hi} vs independent bootstrap {own_hi} (tolerance {tol})"


# ------------------------------------------------------------------------------ attribute hits
def o_softmax(v):
    m = max(v)
    e = [math.exp(t - m) for t in v]
    return [t / sum(e) for t in e]


def o_argmax(v) -> int:
    best = 0
    for i in range(1, len(v)):
        if v[i] > v[best]:
            best = i
    return best


def o_motion(frames: np.ndarray) -> str:
    """The direction the object moves, from the first to the last frame of one (F, C, H, W) video: per frame the
    background is the median (per channel) of the border pixels, a pixel's weight is its summed absolute
    distance to it where above 0.3, the object is at the weighted centroid."""
    cents = []
    for f in (frames[0], frames[-1]):
        c_, h, w = f.shape
        bg = []
        for c in range(c_):
            border = list(f[c, 0, :]) + list(f[c, h - 1, :]) + list(f[c, :, 0]) + list(f[c, :, w - 1])
            bg.append(float(np.median(border)))
        total = sy = sx = 0.0
        for y in range(h):
            for x in range(w):
                d = sum(abs(float(f[c, y, x]) - bg[c]) for c in range(c_))
                if d > 0.3:
                    total += d
                    sy += d * y
                    sx += d * x
        total += 1e-8
        cents.append((sy / total, sx / total))
    dy, dx = cents[1][0] - cents[0][0], cents[1][1] - cents[0][1]
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def o_hits(net, images: torch.Tensor, scenes, class_conditional: bool) -> dict:
    """What the evaluator reads, from the network's raw logits with plain loops: the pooled accuracy of each
    attribute (per object asked for, or per sample), and per sample its part in the accuracy (an attribute read
    per object: its objects read right over the mean objects per sample, so that the mean over samples is the
    pooled accuracy) and whether everything was right."""
    from ditscope.zoo import data

    video = images.dim() == 5
    frames = images[:, images.shape[1] // 2] if video else images
    with torch.no_grad():
        heads = {k: v.double().numpy() for k, v in net.heads(frames.float().clamp(0, 1)).items()}
    shapes, colors, sizes, bgs = (
        list(data.SHAPES),
        list(data.COLORS),
        list(data.SIZES),
        list(data.BACKGROUNDS),
    )
    pooled: dict[str, list] = {}
    per_sample: dict[str, list] = {}
    mean_objects = o_mean([len(s.objects) for s in scenes])
    for i, scene in enumerate(scenes):
        if class_conditional:
            obj = scene.objects[0]
            present = [1 - o_softmax(list(heads["shape"][i, cell]))[0] for cell in range(9)]
            cell = o_argmax(present)
            shape_ok = o_argmax(list(heads["shape"][i, cell, 1:])) == shapes.index(obj.shape)
            color_ok = o_argmax(list(heads["color"][i, cell])) == colors.index(obj.color)
            sample = {"shape": float(shape_ok), "color": float(color_ok), "all": float(shape_ok and color_ok)}
            for k, v in sample.items():
                pooled.setdefault(k, []).append(v)
                per_sample.setdefault(k, []).append(v)
            continue
        pred_shape = [o_argmax(list(heads["shape"][i, cell])) for cell in range(9)]
        obj_hits = {k: [] for k in ("shape", "color", "size", "position")}
        everything = True
        for o in scene.objects:
            there = pred_shape[o.cell] != 0
            checks = {
                "position": there,
                "shape": pred_shape[o.cell] == 1 + shapes.index(o.shape),
                "color": there and o_argmax(list(heads["color"][i, o.cell])) == colors.index(o.color),
                "size": there and o_argmax(list(heads["size"][i, o.cell])) == sizes.index(o.size),
            }
            for k, v in checks.items():
                obj_hits[k].append(float(v))
                pooled.setdefault(k, []).append(float(v))
            everything = everything and all(checks.values())
        n_pred = sum(1 for s in pred_shape if s != 0)
        bg_ok = o_argmax(list(heads["background"][i])) == bgs.index(scene.background)
        everything = everything and n_pred == len(scene.objects) and bg_ok
        for (
            k,
            v,
        ) in obj_hits.items():  # the sample's part in the pooled accuracy: its hits over the mean objects
            per_sample.setdefault(k, []).append(sum(v) / mean_objects)
        sample = {"background": float(bg_ok)}
        if video:
            moving = o_motion(images[i].double().numpy()) == scene.direction
            sample["motion"] = float(moving)
            everything = everything and moving
        sample["all"] = float(everything)
        for k, v in sample.items():
            pooled.setdefault(k, []).append(v)
            per_sample.setdefault(k, []).append(v)
    order = ("shape", "color", "size", "position", "background", "motion")
    scored = [k for k in order if k in pooled]
    accuracy = {k: o_mean(pooled[k]) for k in pooled}
    sample_accuracy = [o_mean([per_sample[k][i] for k in scored]) for i in range(len(scenes))]
    assert o_mean(sample_accuracy) == pytest.approx(o_mean([accuracy[k] for k in scored]), abs=1e-12)
    return {
        "attributes": accuracy,
        "accuracy": o_mean([accuracy[k] for k in scored]),
        "sample_accuracy": sample_accuracy,
        "sample_all": per_sample["all"],
        "scored": scored,
    }


# ============================================================================ driving the bench
class FakePipe:
    """A pipeline whose images are given: sample (seed, prompt j) of a run with `steps` steps is
    outputs[steps][seed * n_prompts + j] (the bench's order: seeds, then prompts). The bench seeds generator j of
    a call with seed * 100_003 + j, which is how the sample is found. A small matmul per call gives it FLOPs."""

    def __init__(self, outputs: dict[int, torch.Tensor], n_prompts: int):
        self.outputs, self.n_prompts = outputs, n_prompts
        self.calls = 0

    def __call__(self, prompts, num_inference_steps, generator, output_type="pt", guidance_scale=None):
        assert len(prompts) == len(generator) and output_type == "pt"
        rows = []
        for g in generator:
            seed, j = divmod(g.initial_seed(), 100_003)
            assert j < self.n_prompts
            rows.append(seed * self.n_prompts + j)
        torch.ones(num_inference_steps, 8) @ torch.ones(8, 8)
        self.calls += 1
        batch = self.outputs[num_inference_steps][rows].clone()
        return SimpleNamespace(frames=batch) if batch.dim() == 5 else SimpleNamespace(images=batch)


def run_fake_bench(
    tmp_path,
    outputs: dict,
    n_prompts: int,
    seeds: int,
    steps_settings: list[int],
    base_steps: int,
    scenes=None,
    net=None,
    class_conditional=False,
):
    """The bench's own code path (run_bench, then write_outputs: results.jsonl, results.csv, results.md) on
    a FakePipe; returns the table and results.csv read back, indexed by label."""
    from ditscope.bench import BenchInputs, expand, run_bench, write_outputs

    prompts = [f"prompt {j}" for j in range(n_prompts)]
    settings = expand(["steps"], {"steps": steps_settings}, base_steps)
    inputs = BenchInputs(
        model="fake",
        prompts=prompts,
        seeds=list(range(seeds)),
        steps=base_steps,
        guidance_scale=None,
        batch_size=3,
        repeats=0,
        scenes=scenes,
        class_conditional=class_conditional,
    )
    pipe = FakePipe(outputs, n_prompts)
    rows = run_bench(pipe, settings, inputs, tmp_path, evaluator_net=net, log=lambda *a: None)
    df = write_outputs(rows, tmp_path, "oracle", prompts)
    csv = pd.read_csv(tmp_path / "results.csv").set_index("label")
    return df.set_index("label"), csv, settings


def image_batches(rng, shape) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Reference and two cached batches of `shape` (samples first), some values outside [0, 1]. Cached at 3
    steps: sample 0 identical (100 dB), sample 1 off by 1e-6 (over 100 dB: capped), the rest noise of growing
    size; at 2 steps: contrast lowered and noise, so SSIM falls too."""
    ref = rng.uniform(-0.1, 1.1, shape).astype(np.float32)
    n = shape[0]
    a = ref.copy()
    a[1] = a[1] + np.float32(1e-6)
    for i in range(2, n):
        a[i] = ref[i] + rng.normal(0, 0.01 * (i + 1) ** 1.5, shape[1:]).astype(np.float32)
    b = (0.7 * ref + 0.15 + rng.normal(0, 0.05, shape)).astype(np.float32)
    return torch.from_numpy(ref), {3: torch.from_numpy(a), 2: torch.from_numpy(b)}


def expected_quality(images: torch.Tensor, reference: torch.Tensor) -> dict:
    psnr = o_per_sample(o_psnr_frame, images.numpy(), reference.numpy())
    ssim = o_per_sample(o_ssim_frame, images.numpy(), reference.numpy())
    return {
        "psnr_samples": psnr,
        "ssim_samples": ssim,
        "psnr": o_mean(psnr),
        "ssim": o_mean(ssim),
        "psnr_p5": o_percentile(psnr, 5),
    }


# ================================================================================= 1. the bench rows
@pytest.mark.parametrize("case", ["images", "videos"])
def test_bench_psnr_ssim_p5_and_intervals_match_the_oracle(case, tmp_path):
    """Images (8 samples = 4 prompts x 2 seeds, 3 x 12 x 10) and videos (6 = 3 x 2, 5 frames, 3 x 13 x 11)
    through run_bench and write_outputs: every quality column of results.csv (and the jsonl's per-sample
    values) against the oracle, the uncached row included."""
    rng = np.random.default_rng(7 if case == "images" else 8)
    n_prompts, seeds = (4, 2) if case == "images" else (3, 2)
    shape = (8, 3, 12, 10) if case == "images" else (6, 5, 3, 13, 11)
    ref, cached = image_batches(rng, shape)
    if (
        case == "videos"
    ):  # video 2: one frame identical (100 dB), the others noisy: the cap comes before the mean
        cached[3][2, 1] = ref[2, 1]
    base_steps = 5
    outputs = {base_steps: ref, **cached}
    df, csv, settings = run_fake_bench(tmp_path, outputs, n_prompts, seeds, [3, 2], base_steps)
    assert list(csv.index) == ["none", "3 steps", "2 steps"]
    jsonl = {
        json.loads(line)["label"]: json.loads(line)
        for line in (tmp_path / "results.jsonl").read_text().splitlines()
    }
    from safetensors.torch import load_file

    for label, images in (("none", ref), ("3 steps", cached[3]), ("2 steps", cached[2])):
        row = csv.loc[label]
        saved = load_file(str(tmp_path / "images" / f"{row['key']}.safetensors"))["images"]
        assert torch.equal(saved, images)  # the images scored are the ones given, in the bench's order
        want = expected_quality(images, ref)
        got = jsonl[label]["per_sample"]
        assert got["psnr"] == pytest.approx(want["psnr_samples"], abs=1e-4), label
        assert got["ssim"] == pytest.approx(want["ssim_samples"], abs=1e-4), label
        assert row["n_images"] == shape[0]
        assert row["psnr"] == pytest.approx(want["psnr"], abs=1e-4), label
        assert row["ssim"] == pytest.approx(want["ssim"], abs=1e-4), label
        assert row["psnr_p5"] == pytest.approx(want["psnr_p5"], abs=1e-4), label
        # the intervals: of the per-sample values the bench stored (those match the oracle above)
        check_interval(got["psnr"], row["psnr_lo"], row["psnr_hi"], what=f"{label} psnr")
        check_interval(got["ssim"], row["ssim_lo"], row["ssim_hi"], what=f"{label} ssim")
        # and of the oracle's own per-sample values, to the oracle's precision
        own_lo, own_hi = o_bootstrap_replica(want["psnr_samples"])
        assert (row["psnr_lo"], row["psnr_hi"]) == pytest.approx((own_lo, own_hi), abs=1e-4)
        own_lo, own_hi = o_bootstrap_replica(want["ssim_samples"])
        assert (row["ssim_lo"], row["ssim_hi"]) == pytest.approx((own_lo, own_hi), abs=1e-4)
        # what results.md shows for the row
        md_row = next(r for r in (tmp_path / "results.md").read_text().splitlines() if f"| {label} |" in r)
        lo, hi = o_bootstrap_replica(want["psnr_samples"])
        assert f"| {want['psnr']:.1f} [{lo:.1f}, {hi:.1f}] | {want['psnr_p5']:.1f} |" in md_row, md_row
        lo, hi = o_bootstrap_replica(want["ssim_samples"])
        assert f"| {want['ssim']:.3f} [{lo:.3f}, {hi:.3f}] |" in md_row, md_row
    # the cases the data was built for
    a = jsonl["3 steps"]["per_sample"]["psnr"]
    assert a[1] == CAP and (case == "videos" or a[0] == CAP)
    assert csv.loc["none", "psnr"] == CAP and csv.loc["none", "psnr_lo"] == csv.loc["none", "psnr_hi"] == CAP
    assert csv.loc["none", "ssim"] == pytest.approx(1.0, abs=1e-6)
    if case == "videos":
        frames = [o_psnr_frame(cached[3][2, f].numpy(), ref[2, f].numpy()) for f in range(5)]
        assert frames[1] == CAP and a[2] == pytest.approx(sum(frames) / 5, abs=1e-4) and a[2] < CAP - 10


def test_ssim_oracle_matches_torchmetrics_on_its_own():
    """The SSIM oracle itself, on one frame whose height and width differ (and a constant one), against
    torchmetrics' functional SSIM: what the brief pins the bench's SSIM to."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    rng = np.random.default_rng(3)
    a = rng.uniform(0, 1, (1, 3, 17, 14)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    b[0, 1, :4, :] = 0.5  # a flat patch
    want = o_ssim_frame(b[0], a[0])
    got = float(ssim(torch.from_numpy(b), torch.from_numpy(a), data_range=1.0))
    assert got == pytest.approx(want, abs=1e-5)


def _synthetic_scenes(kind: str, n: int):
    from ditscope.zoo import evaluator

    if kind == "video":
        return evaluator.evaluation_scenes(n, seed=3000, video=True)
    return evaluator.evaluation_scenes(n, seed=3000, max_objects=2 if kind == "multi-object" else 1)


def _render(kind: str, scene, rng, noise: float) -> np.ndarray:
    """A sample of `scene`, 32 x 36 (edge-padded: height and width differ), with noise."""
    from ditscope.zoo import data

    x = data.render_video(scene) if kind == "video" else data.render(scene)
    pad = [(0, 0)] * (x.ndim - 1) + [(2, 2)]
    x = np.pad(x, pad, mode="edge")
    return (x + rng.normal(0, noise, x.shape)).astype(np.float32)


@pytest.mark.parametrize("kind", ["multi-object", "class-conditional", "video"])
def test_bench_accuracy_drops_and_their_intervals_match_the_oracle(kind, tmp_path):
    """Attribute accuracy through the bench with the zoo evaluator: 5 prompts x 2 seeds = 10 samples of
    3 x 32 x 36 (videos: 8 frames). The uncached samples are renders of their scenes; the cached ones keep some,
    and for others show another prompt's scene (or, for videos, play backwards): accuracy, its drop, the share
    that lost "all right" and both intervals against the oracle's reading of the raw logits."""
    from ditscope.zoo import evaluator

    rng = np.random.default_rng(11)
    n_prompts, seeds = 5, 2
    scenes = _synthetic_scenes(kind, n_prompts)
    bench_scenes = scenes * seeds  # the bench's order: seeds, then prompts
    ref = torch.from_numpy(np.stack([_render(kind, s, rng, 0.02) for s in bench_scenes]))
    cached = ref.clone()
    for i in (1, 4, 6, 9):  # another prompt's scene in place of these samples' own
        cached[i] = torch.from_numpy(_render(kind, bench_scenes[(i + 2) % len(bench_scenes)], rng, 0.02))
    if kind == "video":
        cached[2] = ref[2].flip(0)  # the same object, moving the other way
    cached[7] = ref[7] + torch.from_numpy(rng.normal(0, 0.3, ref[7].shape).astype(np.float32))
    net = evaluator.load_evaluator()
    df, csv, _ = run_fake_bench(
        tmp_path,
        {4: ref, 2: cached},
        n_prompts,
        seeds,
        [2],
        4,
        scenes=scenes,
        net=net,
        class_conditional=kind == "class-conditional",
    )
    base = o_hits(net, ref, bench_scenes, kind == "class-conditional")
    mine = o_hits(net, cached, bench_scenes, kind == "class-conditional")
    jsonl = {
        json.loads(line)["label"]: json.loads(line)
        for line in (tmp_path / "results.jsonl").read_text().splitlines()
    }
    for label, hits in (("none", base), ("2 steps", mine)):
        row = csv.loc[label]
        for k, v in hits["attributes"].items():
            assert row[k] == pytest.approx(v, abs=1e-12), f"{label} {k}"
        assert row["accuracy"] == pytest.approx(hits["accuracy"], abs=1e-12), label
        assert jsonl[label]["per_sample"]["accuracy"] == pytest.approx(hits["sample_accuracy"], abs=1e-12)
        assert jsonl[label]["per_sample"]["all"] == pytest.approx(hits["sample_all"], abs=1e-12)
    assert [k for k in ("shape", "color", "size", "position", "background", "motion") if k in csv] == base[
        "scored"
    ]
    row = csv.loc["2 steps"]
    assert row["accuracy_drop"] == pytest.approx(100 * (base["accuracy"] - mine["accuracy"]), abs=1e-9)
    acc_drops = [100 * (b - m) for b, m in zip(base["sample_accuracy"], mine["sample_accuracy"])]
    all_drops = [100 * (b - m) for b, m in zip(base["sample_all"], mine["sample_all"])]
    assert row["all_drop"] == pytest.approx(o_mean(all_drops), abs=1e-9)
    assert row["all_drop"] == pytest.approx(100 * (csv.loc["none", "all"] - row["all"]), abs=1e-9)
    n = len(bench_scenes)  # one hit changes a mean drop by at most 100 / (samples x attributes) points
    check_interval(
        acc_drops,
        row["accuracy_drop_lo"],
        row["accuracy_drop_hi"],
        lattice=100 / (n * len(base["scored"])),
        what="accuracy drop",
    )
    check_interval(all_drops, row["all_drop_lo"], row["all_drop_hi"], lattice=100 / n, what="all drop")
    assert any(d != 0 for d in acc_drops) and any(d != 0 for d in all_drops), (
        "the data should change some hits"
    )
    # the uncached row against itself: no drop, a degenerate interval
    assert csv.loc["none", "accuracy_drop"] == 0 and csv.loc["none", "all_drop"] == 0
    assert csv.loc["none", "accuracy_drop_lo"] == csv.loc["none", "accuracy_drop_hi"] == 0
    # the point estimate is the mean of the paired per-sample drops the interval is of
    assert row["accuracy_drop"] == pytest.approx(o_mean(acc_drops), abs=1e-9), (
        f"accuracy_drop {row['accuracy_drop']:.4f} (pooled over objects) is not the mean of the per-sample drops "
        f"{o_mean(acc_drops):.4f} that its interval [{row['accuracy_drop_lo']:.4f}, {row['accuracy_drop_hi']:.4f}] is of"
    )


# ============================================================================ 2. the bench end to end
BENCH_STEPS = 4


@pytest.fixture(scope="module")
def pixart():
    from ditscope import zoo

    p = zoo.load("tiny-pixart")
    p.set_progress_bar_config(disable=True)
    return p


def _uncached(pipe, prompts, seed, steps, guidance_scale=None):
    """Each prompt's uncached image, generator j seeded seed * 100_003 + j: one call for all prompts."""
    gens = [torch.Generator().manual_seed(seed * 100_003 + j) for j in range(len(prompts))]
    kwargs = {"guidance_scale": guidance_scale} if guidance_scale is not None else {}
    with torch.inference_mode():
        return pipe(
            list(prompts), num_inference_steps=steps, generator=gens, output_type="pt", **kwargs
        ).images.float()


def test_cli_bench_results_csv_matches_the_oracle_on_its_saved_images(pixart, tmp_path, one_thread):
    """`ditscope bench tiny-pixart` (fora, 3 prompts x 2 seeds = 6 samples, 4 steps, not timed): results.csv's
    PSNR, SSIM, p5, intervals and accuracy columns recomputed from the images it saved, and its uncached images
    are the uncached images of the same prompt and seed, generated here."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from ditscope.cli.main import app
    from ditscope.zoo import evaluator

    out = tmp_path / "b"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "tiny-pixart",
            "--methods",
            "fora",
            "--grid",
            "quick",
            "--prompts",
            "3",
            "--seeds",
            "2",
            "--steps",
            str(BENCH_STEPS),
            "--repeats",
            "0",
            "--batch-size",
            "3",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "bench.json").read_text())
    csv = pd.read_csv(out / "results.csv")
    images = {
        r["label"]: load_file(str(out / "images" / f"{r['key']}.safetensors"))["images"]
        for _, r in csv.iterrows()
    }
    assert list(images) == ["none", "fora interval=3", "fora interval=4"]
    ref = images["none"]
    assert tuple(ref.shape) == (6, 3, 32, 32)
    # the reference: sample s * 3 + j is prompt j under seed s, uncached
    mine = torch.cat(
        [_uncached(pixart, meta["prompts"], s, BENCH_STEPS, meta["guidance_scale"]) for s in (0, 1)]
    )
    assert torch.allclose(ref, mine, atol=1e-5), float((ref - mine).abs().max())
    scenes = evaluator.evaluation_scenes(3, seed=meta["prompt_seed"])
    assert [s.caption() for s in scenes] == meta["prompts"]
    net = evaluator.load_evaluator()
    base_hits = o_hits(net, ref, scenes * 2, False)
    for _, row in csv.iterrows():
        want = expected_quality(images[row["label"]], ref)
        assert row["psnr"] == pytest.approx(want["psnr"], abs=1e-4), row["label"]
        assert row["ssim"] == pytest.approx(want["ssim"], abs=1e-4), row["label"]
        assert row["psnr_p5"] == pytest.approx(want["psnr_p5"], abs=1e-4), row["label"]
        for col, key in (("psnr", "psnr_samples"), ("ssim", "ssim_samples")):
            lo, hi = o_bootstrap_replica(want[key])
            assert (row[f"{col}_lo"], row[f"{col}_hi"]) == pytest.approx((lo, hi), abs=1e-4), (
                row["label"],
                col,
            )
        hits = o_hits(net, images[row["label"]], scenes * 2, False)
        assert row["accuracy"] == pytest.approx(hits["accuracy"], abs=1e-12)
        assert row["all"] == pytest.approx(o_mean(hits["sample_all"]), abs=1e-12)
        assert row["accuracy_drop"] == pytest.approx(
            100 * (base_hits["accuracy"] - hits["accuracy"]), abs=1e-9
        )
        drops = [100 * (b - m) for b, m in zip(base_hits["sample_all"], hits["sample_all"])]
        assert row["all_drop"] == pytest.approx(o_mean(drops), abs=1e-9)
    assert csv.set_index("label").loc["fora interval=4", "psnr"] < CAP


# ===================================================================== 3. tune's and the planner's numbers
CAL_STEPS = 6
CAL_PROMPTS = [
    "a red circle",
    "a blue square on the left",
    "a small green triangle",
    "a large blue circle at the top",
]  # 4 prompts, 3 channels, 32 x 32: N apart from C, H and W


def _capture(monkeypatch):
    """Records, per evaluation key, the images and reference that Evaluations.measure scores (tune and the planner
    both score through it). Timings are not under test here: every timed run is skipped and takes 1 s."""
    from ditscope.planning import planner

    monkeypatch.setattr(planner, "median_seconds", lambda fn, repeats=3, warmup=True: 1.0)

    seen: dict[str, tuple] = {}
    current: list[str] = []
    measure, score = planner.Evaluations.measure, planner.per_sample_psnr_ssim

    def measuring(self, key, applied, timed=False):
        current.append(key)
        try:
            return measure(self, key, applied, timed)
        finally:
            current.pop()

    def scoring(images, reference):
        seen[current[-1]] = (images.clone(), reference.clone())
        return score(images, reference)

    monkeypatch.setattr(planner.Evaluations, "measure", measuring)
    monkeypatch.setattr(planner, "per_sample_psnr_ssim", scoring)
    return seen


def expected_calibration(images, reference) -> dict:
    psnr = o_per_sample(o_psnr_frame, images.numpy(), reference.numpy())
    ssim = o_per_sample(o_ssim_frame, images.numpy(), reference.numpy())
    return {
        "psnr": o_mean(psnr),
        "psnr_lo": o_bootstrap_replica(psnr)[0],
        "psnr_min": min(psnr),
        "psnr_p5": o_percentile(psnr, 5),
        "psnr_p5_lo": o_quantile_lower_bound(psnr),
        "ssim": o_mean(ssim),
        "ssim_lo": o_bootstrap_replica(ssim)[0],
    }


def check_rounded(recorded: dict, want: dict, what: str):
    """Values the file keeps rounded to 4 decimals: within the rounding and the oracle's precision."""
    assert set(recorded) == set(want), what
    for k, v in want.items():
        assert abs(recorded[k] - v) <= 5e-5 + 1e-4, f"{what} {k}: recorded {recorded[k]}, oracle {v}"


def test_tune_calibration_quality_matches_the_oracle(pixart, monkeypatch, one_thread):
    """tune (fora's interval, psnr=20 on the lower bound): meta["quality"] of the fitted value, every trace entry
    and every progress line's numbers, recomputed from the images it compared; its reference is the uncached
    images of the calibration prompts."""
    from ditscope.bench.tune import tune

    seen = _capture(monkeypatch)
    lines: list[str] = []
    with torch.inference_mode():
        result = tune(pixart, "fora", CAL_PROMPTS, "psnr=20", CAL_STEPS, batch_size=4, progress=lines.append)
    reference = next(iter(seen.values()))[1]
    assert torch.allclose(reference, _uncached(pixart, CAL_PROMPTS, 0, CAL_STEPS), atol=1e-5)
    expected = {}
    for key, (images, ref) in seen.items():
        assert torch.equal(ref, reference)
        assert tuple(images.shape) == (4, 3, 32, 32)
        expected[key] = expected_calibration(images, ref)
    final = json.dumps(["fora", result.options], sort_keys=True)
    check_rounded(result.meta["quality"], expected[final], "tuned quality")
    assert result.meta["quality"]["psnr_lo"] >= 20
    for entry in result.meta["trace"]:
        key = json.dumps(["fora", {"interval": entry["interval"]}], sort_keys=True)
        check_rounded({k: v for k, v in entry.items() if k != "interval"}, expected[key], f"trace {entry}")
    pattern = re.compile(
        r"fora interval=(\d+): PSNR ([\d.]+) dB \(lower ([\d.]+), worst images ([\d.]+)\), SSIM ([\d.]+)"
    )
    printed = [pattern.search(line) for line in lines]
    printed = [m for m in printed if m]
    assert printed
    for m in printed:
        want = expected[json.dumps(["fora", {"interval": int(m[1])}], sort_keys=True)]
        assert (
            abs(float(m[2]) - want["psnr"]) <= 0.005 + 1e-4
            and abs(float(m[3]) - want["psnr_lo"]) <= 0.005 + 1e-4
            and abs(float(m[4]) - want["psnr_p5"]) <= 0.005 + 1e-4
        )
        assert abs(float(m[5]) - want["ssim"]) <= 0.0005 + 1e-4


def test_plan_quality_and_finalists_match_the_oracle(pixart, monkeypatch, one_thread):
    """ditscope.plan (psnr=20; the stack and the sites modes, two finalists; FLOPs cost model, so that no timing
    decides): meta["quality"] and each finalist's PSNR in the plan file, and the PSNR each mode's line prints,
    recomputed from the images the planner compared; its reference is the uncached images."""
    import ditscope
    from ditscope.planning import planner

    seen = _capture(monkeypatch)
    finalists: list = []
    choose = planner._choose

    def choosing(candidates, *args, **kwargs):
        finalists.extend(candidates)
        return choose(candidates, *args, **kwargs)

    monkeypatch.setattr(planner, "_choose", choosing)
    lines: list[str] = []
    with torch.inference_mode():
        plan = ditscope.plan(
            pixart,
            CAL_PROMPTS,
            "psnr=20",
            CAL_STEPS,
            batch_size=4,
            max_checks=6,
            cost="flops",
            modes=("stack", "sites"),
            progress=lines.append,
        )
    reference = next(iter(seen.values()))[1]
    assert torch.allclose(reference, _uncached(pixart, CAL_PROMPTS, 0, CAL_STEPS), atol=1e-5)
    assert all(torch.equal(r, reference) for _, r in seen.values())
    key = planner.Evaluations.key(plan)
    want = expected_calibration(*seen[key])
    check_rounded(plan.meta["quality"], want, "plan quality")
    assert plan.meta["quality"]["psnr_lo"] >= 20
    recorded = plan.meta["finalists"]
    assert len(recorded) == len(finalists)
    for entry, (mode, schedule, _) in zip(recorded, finalists):
        assert entry["mode"] == mode
        f_want = expected_calibration(*seen[planner.Evaluations.key(schedule)])
        assert abs(entry["psnr"] - f_want["psnr"]) <= 5e-5 + 1e-4, (entry, f_want)
        assert entry["kept"] == (planner.Evaluations.key(schedule) == key)
    # the per-mode lines it prints: "MODE: X.XXx predicted, PSNR YY.Y dB"
    for mode, schedule, _ in finalists:
        f_want = expected_calibration(*seen[planner.Evaluations.key(schedule)])
        assert any(
            line.startswith(f"{mode}: ") and f"PSNR {f_want['psnr']:.1f} dB" in line for line in lines
        ), mode
