"""Speed of each cache method against no cache: wall clock (median of repeats) and executed FLOPs.

A 20-step denoising loop (classifier-free-guidance batch of 2, PixArt-alpha's DPM-Solver step count)
of a random-init PixArt-alpha-shaped transformer, once without a cache and once under each method at
its default (paper) setting. Methods are timed in rounds (none, toca, fora, ..., none, toca, ...) so
that machine noise spreads evenly over them; FLOPs come from a separate counted run per method
(torch.utils.flop_counter slows the run it counts).

    python benchmarks/cache_speed.py                                 # CPU, mid-size, every method
    python benchmarks/cache_speed.py --methods toca --repeats 7
    python benchmarks/cache_speed.py --size full --device cuda       # PixArt-alpha XL size on a GPU
    python benchmarks/cache_speed.py --model flux --size full --device cuda
    python benchmarks/cache_speed.py --model wan --methods toca,fora --threads 1   # also mochi
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from profile_overhead import SIZES  # noqa: E402  (the same PixArt-alpha shapes as the profiling benchmark)

FLUX_SIZES = {
    "mid": dict(
        num_layers=4,
        num_single_layers=8,
        attention_head_dim=64,
        num_attention_heads=8,
        joint_attention_dim=512,
        pooled_projection_dim=256,
        axes_dims_rope=(16, 24, 24),
        in_channels=64,
    ),
    "full": dict(
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        axes_dims_rope=(16, 56, 56),
        in_channels=64,
    ),
}


def build(model: str, size: str, device: str, dtype: torch.dtype):
    """The transformer and a function that runs one denoising step of it on a fixed CFG batch."""
    torch.manual_seed(0)
    if model == "pixart":
        from diffusers import PixArtTransformer2DModel

        cfg = SIZES[size]
        net = PixArtTransformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            use_additional_conditions=False,
            **cfg,
        )
        side = cfg["sample_size"]
        x = torch.randn(2, 4, side, side)
        text = torch.randn(2, 120, cfg["caption_channels"])
        extra = {"aspect_ratio": None, "resolution": None}

        def step(net, h, t):
            out = net(h, encoder_hidden_states=text.to(h), timestep=t, added_cond_kwargs=extra).sample
            return h - 0.05 * out[:, :4]
    else:
        from diffusers import FluxTransformer2DModel

        cfg = FLUX_SIZES[size]
        net = FluxTransformer2DModel(patch_size=1, guidance_embeds=False, **cfg)
        side = 32 if size == "mid" else 64  # 1024 or 4096 image tokens (a 512 / 1024 px image)
        x = torch.randn(2, side * side, cfg["in_channels"])
        text = torch.randn(2, 128 if size == "mid" else 512, cfg["joint_attention_dim"])
        pooled = torch.randn(2, cfg["pooled_projection_dim"])
        img_ids = torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(side), torch.arange(side), indexing="ij"), -1
        )
        img_ids = img_ids.reshape(-1, 3).float()
        txt_ids = torch.zeros(text.shape[1], 3)

        def step(net, h, t):
            out = net(
                h,
                encoder_hidden_states=text.to(h),
                pooled_projections=pooled.to(h),
                timestep=t / 1000,
                img_ids=img_ids.to(h.device),
                txt_ids=txt_ids.to(h.device),
            ).sample
            return h - 0.05 * out

    net = net.to(device=device, dtype=dtype).eval()
    return net, x.to(device=device, dtype=dtype), step


# mid-size random video models: 3 latent frames of 32 x 32 (768 image tokens after 2 x 2 patches), 64 text tokens
VIDEO_SIZES = {
    "wan": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=64,
        in_channels=16,
        out_channels=16,
        text_dim=256,
        freq_dim=256,
        ffn_dim=1024,
        num_layers=6,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    ),
    "mochi": dict(
        patch_size=2,
        num_attention_heads=4,
        attention_head_dim=64,
        num_layers=6,
        pooled_projection_dim=128,
        in_channels=12,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=256,
        time_embed_dim=64,
        activation_fn="swiglu",
        max_sequence_length=64,
    ),
}


def build_video(model: str, device: str, dtype: torch.dtype):
    """A mid-size random Wan or Mochi transformer (FLOPs and speed only: random weights) and its step."""
    torch.manual_seed(0)
    cfg = VIDEO_SIZES[model]
    if model == "wan":
        from diffusers import WanTransformer3DModel

        net, channels = WanTransformer3DModel(**cfg), cfg["in_channels"]
        extra = {}
    else:
        from diffusers import MochiTransformer3DModel

        net, channels = MochiTransformer3DModel(**cfg), cfg["in_channels"]
        extra = {"encoder_attention_mask": torch.ones(2, 64, dtype=torch.bool, device=device)}
    x = torch.randn(2, channels, 3, 32, 32)
    text = torch.randn(2, 64, cfg.get("text_dim", cfg.get("text_embed_dim")))

    def step(net, h, t):
        out = net(h, encoder_hidden_states=text.to(h), timestep=t, **extra).sample
        return h - 0.05 * out

    net = net.to(device=device, dtype=dtype).eval()
    return net, x.to(device=device, dtype=dtype), step


def run_loop(net, x, step, steps: int, device: str) -> torch.Tensor:
    h = x
    for i in range(steps):
        t = torch.full((x.shape[0],), 999 - i * (1000 // steps), device=device)
        h = step(net, h, t)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return h


def main():
    import ditscope
    from ditscope.cache import CONFIGS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        choices=("pixart", "flux", "wan", "mochi"),
        default="pixart",
        help="wan, mochi: mid-size random video models (--size is ignored)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--size", choices=("mid", "full"), default="mid")
    ap.add_argument("--methods", default=",".join(CONFIGS), help="comma-separated; default: every method")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in CONFIGS]
    if unknown:
        sys.exit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model in VIDEO_SIZES:
        net, x, step = build_video(args.model, args.device, dtype)
    else:
        net, x, step = build(args.model, args.size, args.device, dtype)
    with torch.inference_mode():
        ref = run_loop(net, x, step, 2, args.device)  # warm-up
        flops = {}
        for name in methods:  # executed FLOPs, one counted run each
            # under no_grad, as the Wan / Mochi rows in benchmarks/README.md were counted (torch's own FlopCounterMode
            # failed under inference_mode on Mochi; ditscope's counter now copes, tests/test_cache.py)
            with (
                torch.inference_mode(False),
                torch.no_grad(),
                ditscope.apply(
                    net, CONFIGS[name](), num_inference_steps=args.steps, count_flops=True
                ) as handle,
            ):
                run_loop(net, x, step, args.steps, args.device)
                flops[name] = handle.stats().flops_ratio
            print(f"{name:10s} executed FLOPs = {flops[name]:.3f} of full", file=sys.stderr)

        ref = run_loop(net, x, step, args.steps, args.device)
        times: dict[str, list[float]] = {m: [] for m in ["none", *methods]}
        errors = {}
        for rep in range(args.repeats):
            for name in times:
                handle = (
                    None
                    if name == "none"
                    else ditscope.apply(net, CONFIGS[name](), num_inference_steps=args.steps)
                )
                start = time.perf_counter()
                out = run_loop(net, x, step, args.steps, args.device)
                times[name].append(time.perf_counter() - start)
                if handle is not None:
                    handle.remove()
                    # error of the whole denoising update, not of the latent (which is mostly the starting noise)
                    errors[name] = (
                        (out.float() - ref.float()).norm() / (ref.float() - x.float()).norm()
                    ).item()
                print(f"repeat {rep + 1}/{args.repeats} {name:10s} {times[name][-1]:.2f}s", file=sys.stderr)

    base = statistics.median(times["none"])
    print(
        f"model={args.model} size={args.size} device={args.device} dtype={str(dtype).removeprefix('torch.')} "
        f"steps={args.steps} repeats={args.repeats} threads={torch.get_num_threads()}"
    )
    print(
        "| method | median s | wall-clock speedup | FLOPs speedup | wall / FLOPs | rel. error of the update |"
    )
    print("|---|---|---|---|---|---|")
    print(f"| none | {base:.2f} | 1.00x | 1.00x | - | 0 |")
    for name in methods:
        med = statistics.median(times[name])
        wall, fl = base / med, 1 / flops[name]
        print(f"| {name} | {med:.2f} | {wall:.2f}x | {fl:.2f}x | {wall / fl:.2f} | {errors[name]:.3f} |")


if __name__ == "__main__":
    main()
