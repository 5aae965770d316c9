"""Overhead of profiling: wall time and peak memory of a profiled denoising loop against the same loop
without ditscope, on a random-init PixArt-alpha-shaped transformer.

Each measurement runs in a fresh child process (so peak RSS is that run's own), plain and profiled
runs alternate, and we report medians over repeats and their ratio.

    python benchmarks/profile_overhead.py                      # CPU, mid-size (12 layers, hidden 512, 1024 tokens)
    python benchmarks/profile_overhead.py --size full --device cuda   # PixArt-alpha XL size (28 layers, 1152)
    python benchmarks/profile_overhead.py --self-time            # the recorder's own seconds per step (cProfile)

`--self-time` is the regression check that neighbours on a shared machine disturb least: one profiled
run under cProfile, reporting the seconds spent in the recorder itself (its hooks, the SDPA wrapper
minus the attention it wraps, the reductions, the copy into the kept tensors, the end-of-step
transfer) per step and as a fraction of the model's own time in the same run, plus the top tensor ops
inside the recorder. Compare it between commits (git worktree add /tmp/old COMMIT; run its copy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SIZES = {
    # a 2-block toy for what does not need size (dynamo's graph breaks and recompiles: compile_speed.py --size tiny)
    "tiny": dict(
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        sample_size=16,
        caption_channels=32,
        cross_attention_dim=32,
    ),
    # ~PixArt-alpha shape, scaled to run on a 2-core CPU: 12 blocks, hidden 512, 32x32 patches = 1024 tokens
    "mid": dict(
        num_layers=12,
        attention_head_dim=64,
        num_attention_heads=8,
        sample_size=64,
        caption_channels=512,
        cross_attention_dim=512,
    ),
    # PixArt-alpha XL/2 1024px: 28 blocks, hidden 1152, 64x64 patches = 4096 tokens, T5-XXL captions
    "full": dict(
        num_layers=28,
        attention_head_dim=72,
        num_attention_heads=16,
        sample_size=128,
        caption_channels=4096,
        cross_attention_dim=1152,
    ),
}


def child(size: str, mode: str, steps: int, device: str, dtype: str) -> dict:
    import torch
    from diffusers import PixArtTransformer2DModel

    import ditscope

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    cfg = SIZES[size]
    model = (
        PixArtTransformer2DModel(
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
        .to(device=device, dtype=dt)
        .eval()
    )
    latent = cfg["sample_size"]
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dt)  # CFG batch: uncond + cond
    text = torch.randn(2, 120, cfg["caption_channels"], device=device, dtype=dt)
    extra = {"aspect_ratio": None, "resolution": None}

    def loop(n):
        h = x
        for i in range(n):
            t = torch.full((2,), 999 - i * (1000 // n), device=device)
            out = model(h, encoder_hidden_states=text, timestep=t, added_cond_kwargs=extra).sample
            h = h - 0.05 * out[:, :4]  # a scheduler-like update so steps differ
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        loop(2)  # warm-up (allocator, kernels)
        if mode == "self-time":
            return _self_time(model, loop, steps)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kept = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        if mode == "profiled":
            with ditscope.record(model, batched_branches=("uncond", "cond")) as rec:
                loop(steps)
                kept = sum(t.numel() * t.element_size() for t in rec._prev.values())
                rec.next_sample()
        else:
            loop(steps)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
    result = {"mode": mode, "seconds": seconds, "cpu_seconds": cpu_seconds, "kept_bytes": kept}
    if device.startswith("cuda"):
        result["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base_mem
    else:
        result["peak_extra_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    return result


def _self_time(model, loop, steps: int) -> dict:
    """One profiled loop under cProfile: the recorder's own seconds (everything ditscope does while
    recording, not the attention it wraps) and the tensor ops that make them."""
    import cProfile
    import pstats

    import ditscope

    prof = cProfile.Profile()
    with ditscope.record(model, batched_branches=("uncond", "cond")) as rec:
        prof.enable()
        loop(steps)
        prof.disable()
        rec.next_sample()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, callers)

    def cum(pred):
        return sum(v[3] for k, v in stats.items() if pred(k))

    def in_recorder(k, names):
        return k[0].endswith("capture/recorder.py") and k[2] in names

    total = cum(lambda k: k[2] == "loop")
    wrapped = sum(
        v[4].get(next((c for c in v[4] if in_recorder(c, ("_sdpa",))), None), (0, 0, 0, 0))[3]
        for k, v in stats.items()
        if k[2] == "<built-in method torch._C._nn.scaled_dot_product_attention>"
    )
    own = cum(lambda k: in_recorder(k, ("_sdpa", "hook", "_model_pre", "_model_post"))) - wrapped
    # the tensor ops called from inside the recorder's functions, by total time
    ops: dict[str, float] = {}
    for k, v in stats.items():
        if k[0] != "~" or "scaled_dot_product_attention" in k[2]:  # the wrapped attention is the model's
            continue
        for caller, c in v[4].items():
            if caller[0].endswith(("capture/recorder.py", "stats/distances.py")):
                ops[k[2]] = ops.get(k[2], 0.0) + c[3]
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
    return {
        "loop_seconds": total,
        "recorder_seconds": own,
        "steps": steps,
        "top_ops": [(name, round(t, 4)) for name, t in top],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="mid")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument(
        "--self-time",
        action="store_true",
        help="the recorder's own time per step from one cProfile'd run (see above)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.child:
        print(json.dumps(child(args.size, args.child, args.steps, args.device, dtype)))
        return
    if args.self_time:
        r = child(args.size, "self-time", args.steps, args.device, dtype)
        model_s = r["loop_seconds"] - r["recorder_seconds"]
        print(f"size={args.size} device={args.device} dtype={dtype} steps={args.steps} threads={_threads()}")
        print(
            f"recorder's own time: {r['recorder_seconds']:.3f}s = {r['recorder_seconds'] / args.steps * 1e3:.1f} ms "
            f"per step, {r['recorder_seconds'] / model_s:.3f} of the model's {model_s:.2f}s "
            f"(predicted time ratio {r['loop_seconds'] / model_s:.3f}; cProfile slows Python, not tensor ops)"
        )
        names = [
            (n.removeprefix("<built-in method ").removeprefix("<method ").removesuffix(">"), t)
            for n, t in r["top_ops"]
        ]
        print("tensor ops inside the recorder (s): " + ", ".join(f"{n} {t:.3f}" for n, t in names))
        return

    def run_child(mode, env=None):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--size",
            args.size,
            "--steps",
            str(args.steps),
            "--device",
            args.device,
            "--dtype",
            dtype,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])

    runs = {"plain": [], "profiled": []}
    for rep in range(args.repeats):
        for mode in ("plain", "profiled"):
            runs[mode].append(run_child(mode))
            print(
                f"repeat {rep + 1}/{args.repeats} {mode:8s} {runs[mode][-1]['seconds']:.2f}s "
                f"(CPU {runs[mode][-1]['cpu_seconds']:.2f}s)",
                file=sys.stderr,
            )
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    cpu = {m: statistics.median(r["cpu_seconds"] for r in rs) for m, rs in runs.items()}
    if args.device.startswith("cuda"):
        mem = {m: statistics.median(r["peak_extra_bytes"] for r in rs) for m, rs in runs.items()}
    else:
        # Peak RSS also counts heap that glibc keeps after free; return big blocks to the OS so that
        # it tracks live tensors. Separate runs, so the timings above use the default allocator.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
        mem = {m: run_child(m, env)["peak_extra_bytes"] for m in ("plain", "profiled")}
    kept = runs["profiled"][0]["kept_bytes"]
    print(f"size={args.size} device={args.device} dtype={dtype} steps={args.steps} repeats={args.repeats}")
    print(
        f"median seconds: plain {med['plain']:.3f}, profiled {med['profiled']:.3f}, ratio {med['profiled'] / med['plain']:.3f}"
    )
    # process CPU time: on a shared machine, time spent waiting for a core is not counted (with one
    # thread per process it is the run's own work); the wall-clock ratio above is the bar's figure
    print(
        f"median CPU seconds: plain {cpu['plain']:.3f}, profiled {cpu['profiled']:.3f}, "
        f"ratio {cpu['profiled'] / cpu['plain']:.3f} (threads per process: {_threads()})"
    )
    print(
        f"peak memory growth: plain {mem['plain'] / 2**20:.1f} MiB, profiled {mem['profiled'] / 2**20:.1f} MiB, "
        f"extra {(mem['profiled'] - mem['plain']) / 2**20:.1f} MiB; one step's kept tensors {kept / 2**20:.1f} MiB"
    )


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
