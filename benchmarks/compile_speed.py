"""Caching on a compiled transformer: cached + compiled against compiled, and what dynamo made of it.

The mid-size random PixArt-alpha-shaped transformer of cache_speed.py (or its Flux), a 20-step loop on a CFG
batch of 2, run eager, compiled whole (`torch.compile(net)`) and compiled per block (each block's
`.compile()`, diffusers' regional compilation), each uncached and under each method at its default. Per row:
the first loop's seconds (compilation included), the median of `--repeats` loops after it, the speedup against
the same compilation uncached, the FLOPs speedup (counted on the eager model), dynamo's graph breaks and
graphs over the whole run, and the largest difference to the eager model under the same method.

    python benchmarks/compile_speed.py                               # CPU (inductor), FORA, FBCache, TeaCache, plan
    python benchmarks/compile_speed.py --methods fora,toca --backend eager --steps 10
    python benchmarks/compile_speed.py --device cuda --size full     # the GPU rows (benchmarks/gpu/run.sh)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from cache_speed import build, run_loop  # noqa: E402  (the same model, inputs and loop)


def compiled(net, how: str, backend: str):
    """A fresh copy of `net`, compiled `how` (eager: not at all)."""
    net = copy.deepcopy(net)
    if how == "whole":
        return torch.compile(net, backend=backend)
    if how == "regional":
        for block in net.transformer_blocks if hasattr(net, "transformer_blocks") else []:
            block.compile(backend=backend)
        for block in getattr(net, "single_transformer_blocks", []):
            block.compile(backend=backend)
    return net


def config_of(name: str, net, steps: int):
    import ditscope
    from ditscope.cache import CONFIGS
    from ditscope.cache.schedule import schedule_of

    if name == "plan":  # a static schedule: FORA's, as a plan (what `ditscope plan` writes is the same kind)
        return ditscope.PlanConfig(schedule_of(net, ditscope.FORAConfig(), steps))
    return CONFIGS[name]()


def main():
    from torch._dynamo.utils import counters

    import ditscope

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("pixart", "flux"), default="pixart")
    ap.add_argument("--size", choices=("tiny", "mid", "full"), default="mid", help="tiny: pixart only")
    ap.add_argument("--methods", default="fora,fbcache,teacache,plan")
    ap.add_argument("--modes", default="eager,whole,regional")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    net, x, step = build(args.model, args.size, args.device, dtype)
    methods = ["none", *[m.strip() for m in args.methods.split(",") if m.strip()]]
    rows, eager_out, flops = [], {}, {}
    with torch.inference_mode():
        for name in methods[1:]:  # executed FLOPs on the eager model, one counted run each
            with (
                torch.inference_mode(False),
                torch.no_grad(),
                ditscope.apply(
                    net, config_of(name, net, args.steps), num_inference_steps=args.steps, count_flops=True
                ) as handle,
            ):
                run_loop(net, x, step, args.steps, args.device)
            flops[name] = 1 / handle.stats().flops_ratio
        for how in [m.strip() for m in args.modes.split(",") if m.strip()]:
            base = None
            for name in methods:
                torch._dynamo.reset()
                counters.clear()
                model = compiled(net, how, args.backend)
                handle = (
                    None
                    if name == "none"
                    else ditscope.apply(
                        model, config_of(name, net, args.steps), num_inference_steps=args.steps
                    )
                )
                started = time.perf_counter()
                out = run_loop(model, x, step, args.steps, args.device)
                first = time.perf_counter() - started
                times = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    out = run_loop(model, x, step, args.steps, args.device)
                    times.append(time.perf_counter() - started)
                if handle is not None:
                    handle.remove()
                seconds = statistics.median(times)
                base = seconds if name == "none" else base
                if how == "eager":
                    eager_out[name] = out
                diff = (
                    float((out.float() - eager_out[name].float()).abs().max())
                    if name in eager_out
                    else float("nan")
                )
                rows.append(
                    (
                        how,
                        name,
                        first,
                        seconds,
                        base / seconds,
                        flops.get(name, 1.0),
                        sum(counters["graph_break"].values()),
                        counters["stats"].get("unique_graphs", 0),
                        diff,
                    )
                )
                print(
                    f"{how:8s} {name:9s} first {first:.1f}s, median {seconds:.2f}s",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"model={args.model} size={args.size} device={args.device} backend={args.backend} steps={args.steps} "
        f"repeats={args.repeats} threads={torch.get_num_threads()}"
    )
    print(
        "| compiled | method | first loop s | median s | speedup (same compilation) | FLOPs speedup | graph breaks "
        "| graphs | max diff to eager |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for how, name, first, seconds, speedup, fl, breaks, graphs, diff in rows:
        print(
            f"| {how} | {name} | {first:.1f} | {seconds:.2f} | {speedup:.2f}x | {fl:.2f}x | {breaks} | {graphs} | "
            f"{diff:.1e} |"
        )


if __name__ == "__main__":
    main()
