"""Measure ditscope on the seed architectures at their published size, one after another, most valuable
first, under a time budget; each architecture appends its rows to a CSV as soon as it is done.

Per architecture (random weights, built on the device from `configs.py`; no hub, no text encoder):

- layers: how many attention layers `ditscope.record` captures (all, and self-attention ones, which is
  what the paper's Table 1 counts) against the paper's figure;
- profiling overhead: a plain sampling loop against the same loop under `ditscope.record`, alternated,
  at the paper's resolution / frame count: time ratio, extra peak device memory, one step's kept tensors;
- caches: wall clock and executed FLOPs of ToCa (the paper's setting), FORA and a plan against no
  cache, over `cache_steps` steps (the model's default where it fits the window);
- compiled (the architectures of `--compile-archs`): each block compiled (regional compilation), no cache
  and FORA, each timed after a run that compiles: the speedup over compiled-uncached, the compile time and
  the largest difference to FORA's eager output. The plan is a
  `Schedule` run by `PlanConfig`, made from this run's own profile (each block's modules reused at the
  steps where its attention output changed least; see `profile_schedule`): `ditscope.plan`'s search
  needs a pipeline, calibration prompts and a quality target, which random weights cannot give.

    python benchmarks/gpu/measure.py --size full --device cuda --out $OUT          # the GPU run
    python benchmarks/gpu/measure.py --size tiny --device cpu --out /tmp/x          # the test
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import ARCHS, BY_NAME, Arch  # noqa: E402

FIELDS = ["arch", "size", "device", "dtype", "measure", "value", "unit", "steps", "note"]


class Run:
    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.dtype = getattr(
            torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
        )
        self.cuda = self.device.startswith("cuda")
        self.start = time.perf_counter()
        self.deadline = self.start + args.budget_s
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.csv = self.out / "results.csv"
        if not self.csv.exists():
            with open(self.csv, "w", newline="") as f:
                csv.DictWriter(f, FIELDS).writeheader()

    # ----------------------------------------------------------------------------------- helpers
    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str):
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def write(self, rows: list[dict]):
        with open(self.csv, "a", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            for r in rows:
                w.writerow({k: r.get(k, "") for k in FIELDS})
            f.flush()
            os.fsync(f.fileno())


def build(arch: Arch, run: Run):
    """The transformer at `run.args.size`, random weights, built directly on the device (parameters are
    created and initialised there, then cast): no host-side initialisation of billions of weights. Not the
    meta device: diffusers computes positional tables in __init__, which `to_empty` would leave unset."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    cls = getattr(diffusers, arch.cls)
    cfg = dict(arch.full if run.args.size == "full" else arch.tiny)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device(run.device):
            model = cls(**cfg)
        model = model.to(device=run.device, dtype=run.dtype).eval().requires_grad_(False)
        # as from_pretrained does: the modules a model declares precision-sensitive stay in float32
        keep = getattr(model, "_keep_in_fp32_modules", None) or []
        for name, module in model.named_modules():
            if any(k in name.split(".") for k in keep):
                module.float()
    # diffusers keeps the config with defaults filled in; the input builders read it
    full_cfg = dict(model.config)
    inputs = arch.make_inputs(full_cfg, run.args.size, run.device, run.dtype)
    return model, inputs


def sample(model, inputs, steps: int, run: Run) -> torch.Tensor:
    """A hand-written sampling loop: one model call per step on a fixed batch."""
    h = inputs.x0
    for i in range(steps):
        out = model(h, timestep=inputs.timestep(i, steps), **inputs.kwargs, return_dict=False)[0]
        h = inputs.update(h, out)
    run.sync()
    return h


def timed(fn, run: Run) -> tuple[float, int]:
    """(seconds, peak device bytes above the memory in use at the start; 0 on CPU)."""
    run.sync()
    base = 0
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    fn()
    run.sync()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() - base if run.cuda else 0
    return seconds, peak


# --------------------------------------------------------------------------------------- measures
def measure_profiling(arch: Arch, model, inputs, run: Run, rows: list, steps: int) -> object:
    """Plain vs recorded loops, alternated; the layer counts; returns the recorder's sample."""
    import ditscope
    from ditscope.families import IMAGE, TEXT

    branches = ("uncond", "cond") if inputs.x0.shape[0] == 2 else ("cond",)
    repeats = run.args.repeats
    plain, recorded, kept, sample_ = [], [], 0, None
    layer_names = []
    for rep in range(repeats):
        plain.append(timed(lambda: sample(model, inputs, steps, run), run))
        rec = ditscope.record(model, batched_branches=branches)
        with rec:
            recorded.append(timed(lambda: sample(model, inputs, steps, run), run))
            kept = sum(t.numel() * t.element_size() for t in rec._prev.values())
            sample_ = rec.next_sample()
            layer_names = list(rec.layer_names)
        run.say(f"{arch.name}: plain {plain[-1][0]:.3f}s, recorded {recorded[-1][0]:.3f}s ({steps} steps)")
        if rep + 1 < repeats and run.left() < 4 * (plain[-1][0] + recorded[-1][0]):
            break
    t_plain = statistics.median(s for s, _ in plain)
    t_rec = statistics.median(s for s, _ in recorded)
    extra = statistics.median(m for _, m in recorded) - statistics.median(m for _, m in plain)
    n = len(plain)
    rows += [
        dict(measure="plain_seconds", value=f"{t_plain:.4f}", unit="s", steps=steps, note=f"median of {n}"),
        dict(measure="recorded_seconds", value=f"{t_rec:.4f}", unit="s", steps=steps, note=f"median of {n}"),
        dict(
            measure="profiling_time_ratio",
            value=f"{t_rec / t_plain:.4f}",
            unit="x",
            steps=steps,
            note="ditscope.record on / off; bar on a GPU: <= 1.03",
        ),
        dict(
            measure="kept_bytes_one_step",
            value=kept,
            unit="B",
            steps=steps,
            note="previous step's K, V, A kept by the recorder",
        ),
    ]
    if run.cuda:
        rows += [
            dict(
                measure="profiling_extra_peak_bytes",
                value=extra,
                unit="B",
                steps=steps,
                note="peak device memory of the recorded loop minus the plain loop's",
            ),
            dict(
                measure="profiling_extra_over_kept",
                value=f"{extra / max(kept, 1):.4f}",
                unit="x",
                steps=steps,
                note="bar: <= 1.10 (one step's kept tensors + 10%)",
            ),
        ]
    # layers: cross-attention ones have K/V on text tokens only and A on image tokens only
    streams: dict[tuple[int, str], set] = {}
    for layer, target, stream, _branch in sample_.values:
        streams.setdefault((layer, target), set()).add(stream)
    cross = [
        i
        for i in range(len(layer_names))
        if streams.get((i, "k")) == {TEXT} and streams.get((i, "a")) == {IMAGE}
    ]
    self_layers = len(layer_names) - len(cross)
    expected = arch.paper_layers if run.args.size == "full" else None
    verdict = (
        ""
        if expected is None
        else ("matches the paper" if self_layers == expected else f"paper Table 1 says {expected}")
    )
    rows += [
        dict(
            measure="attention_layers_captured",
            value=len(layer_names),
            unit="layers",
            steps=steps,
            note=f"{len(cross)} of them cross-attention",
        ),
        dict(
            measure="self_attention_layers_captured",
            value=self_layers,
            unit="layers",
            steps=steps,
            note=verdict,
        ),
        dict(
            measure="paper_attention_layers",
            value=arch.paper_layers if arch.paper_layers else "",
            unit="layers",
            note="paper Table 1" if arch.paper_layers else "not in the paper",
        ),
    ]
    run.say(
        f"{arch.name}: {len(layer_names)} attention layers captured ({self_layers} self-attention; "
        f"paper {arch.paper_layers}); ratio {t_rec / t_plain:.3f}; kept {kept / 2**20:.1f} MiB"
        + (f", extra peak {extra / 2**20:.1f} MiB" if run.cuda else "")
    )
    sample_.layer_names = layer_names
    return sample_


def profile_schedule(model, sample_, steps: int):
    """A plan from this run's profile: for each block, the step-to-step relative L1 of its attention
    outputs (mean over its layers, streams and branches); the cells (block, step) in the lower half of
    all cells reuse every module of the block, the others compute; never more than 2 reuses in a row."""
    import numpy as np

    from ditscope.cache import Schedule
    from ditscope.cache.layout import layout_of

    _, blocks, _, _ = layout_of(model)
    names = sample_.layer_names
    prof_steps = next(iter(sample_.values.values())).shape[1] + 1
    change = np.full((len(blocks), prof_steps), np.nan)
    for b, block in enumerate(blocks):
        layers = [i for i, n in enumerate(names) if n.startswith(block.name + ".")]
        vals = [
            v[:, :, 1].mean(0)
            for (layer, target, _, _), v in sample_.values.items()
            if target == "a" and layer in layers
        ]
        if vals:
            change[b, 1:] = np.mean(vals, axis=0)
    # resample the profile's steps onto the run's steps (the redundancy pattern is stable across counts)
    src = [min(prof_steps - 1, round(s * (prof_steps - 1) / max(1, steps - 1))) for s in range(steps)]
    change = change[:, src]
    threshold = np.nanmedian(change[:, 1:]) if steps > 1 else 0.0
    rows = {}
    for b, block in enumerate(blocks):
        row, run_length = ["C"], 0
        for s in range(1, steps):
            reuse = (
                not np.isnan(change[b, s]) and change[b, s] <= threshold and run_length < 2 and s < steps - 1
            )
            row.append("R" if reuse else "C")
            run_length = run_length + 1 if reuse else 0
        for site in block.sites:
            rows[site.name] = "".join(row)
    return Schedule(rows, {"made_by": "benchmarks/gpu/measure.py profile_schedule"})


def measure_caches(arch: Arch, model, inputs, run: Run, rows: list, steps: int, sample_):
    import ditscope

    methods = {
        "toca": lambda: ditscope.ToCaConfig(**arch.toca),
        "fora": lambda: ditscope.FORAConfig(),
        "plan": lambda: ditscope.PlanConfig(profile_schedule(model, sample_, steps)),
    }
    base, _ = timed(lambda: sample(model, inputs, steps, run), run)
    rows.append(
        dict(
            measure="none_seconds",
            value=f"{base:.4f}",
            unit="s",
            steps=steps,
            note=f"no cache; model default {arch.steps} steps"
            + ("" if steps == arch.steps else f", run with {steps} to fit the window"),
        )
    )
    run.say(f"{arch.name}: no cache {base:.3f}s ({steps} steps)")
    for name, make in methods.items():
        if run.left() < 3 * base:
            rows.append(dict(measure=f"{name}_error", value="skipped", steps=steps, note="time budget"))
            run.say(f"{arch.name}: {name} skipped (time budget)")
            continue
        try:
            config = make()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with ditscope.apply(model, config, num_inference_steps=steps, count_flops=True) as handle:
                    sample(model, inputs, steps, run)  # counted run (also the warm-up)
                    stats = handle.stats()
                with ditscope.apply(model, config, num_inference_steps=steps):
                    seconds, _ = timed(lambda: sample(model, inputs, steps, run), run)
            flops_speedup = 1 / stats.flops_ratio if stats.flops_ratio else float("nan")
            wall = base / seconds
            rows += [
                dict(measure=f"{name}_seconds", value=f"{seconds:.4f}", unit="s", steps=steps),
                dict(measure=f"{name}_wall_speedup", value=f"{wall:.4f}", unit="x", steps=steps),
                dict(
                    measure=f"{name}_flops_speedup",
                    value=f"{flops_speedup:.4f}",
                    unit="x",
                    steps=steps,
                    note="executed FLOPs (torch.utils.flop_counter), scoring included",
                ),
                dict(
                    measure=f"{name}_wall_over_flops",
                    value=f"{wall / flops_speedup:.4f}",
                    unit="x",
                    steps=steps,
                    note="bar for ToCa on PixArt: >= 0.9" if name == "toca" else "",
                ),
            ]
            run.say(f"{arch.name}: {name} {seconds:.3f}s, wall {wall:.2f}x, FLOPs {flops_speedup:.2f}x")
        except Exception as e:  # noqa: BLE001  (a method that fails on one model must not stop the run)
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            rows.append(dict(measure=f"{name}_error", value="error", steps=steps, note=msg))
            run.say(f"{arch.name}: {name} failed: {msg}")
            if run.cuda:
                torch.cuda.empty_cache()


def measure_compiled(arch: Arch, model, inputs, run: Run, rows: list, steps: int):
    """Regional compilation: every block of the model's block lists compiled; no cache and FORA."""
    import ditscope

    blocks = [b for child in model.children() if isinstance(child, torch.nn.ModuleList) for b in child]
    with ditscope.apply(model, ditscope.FORAConfig(), num_inference_steps=steps):
        eager = sample(model, inputs, steps, run)
    for block in blocks:
        block.compile(backend=run.args.compile_backend)
    try:
        first, _ = timed(lambda: sample(model, inputs, steps, run), run)  # compiles
        base, _ = timed(lambda: sample(model, inputs, steps, run), run)
        with ditscope.apply(model, ditscope.FORAConfig(), num_inference_steps=steps):
            sample(model, inputs, steps, run)  # the cached path's graphs
            seconds, _ = timed(lambda: sample(model, inputs, steps, run), run)
            out = sample(model, inputs, steps, run)
        diff = float((out.float() - eager.float()).abs().max())
        rows += [
            dict(
                measure="compiled_compile_seconds",
                value=f"{first - base:.2f}",
                unit="s",
                steps=steps,
                note=f"{len(blocks)} blocks, backend {run.args.compile_backend}: first run minus a compiled run",
            ),
            dict(measure="compiled_none_seconds", value=f"{base:.4f}", unit="s", steps=steps),
            dict(measure="compiled_fora_seconds", value=f"{seconds:.4f}", unit="s", steps=steps),
            dict(
                measure="compiled_fora_wall_speedup",
                value=f"{base / seconds:.4f}",
                unit="x",
                steps=steps,
                note="over compiled, uncached",
            ),
            dict(
                measure="compiled_fora_max_diff", value=f"{diff:.3g}", steps=steps, note="against FORA eager"
            ),
        ]
        run.say(
            f"{arch.name}: compiled {base:.3f}s, compiled FORA {seconds:.3f}s ({base / seconds:.2f}x), "
            f"max difference to eager FORA {diff:.2g}"
        )
    finally:
        for block in blocks:
            block._compiled_call_impl = None  # eager again


def measure_arch(arch: Arch, run: Run) -> list[dict]:
    rows: list[dict] = []
    full = run.args.size == "full"
    t = time.perf_counter()
    model, inputs = build(arch, run)
    run.sync()
    params = sum(p.numel() for p in model.parameters())
    rows.append(
        dict(
            measure="build_seconds",
            value=f"{time.perf_counter() - t:.3f}",
            unit="s",
            note=f"{params / 1e9:.3f} B parameters; {arch.shape if full else 'tiny config'}",
        )
    )
    run.say(f"{arch.name}: built {params / 1e9:.3f} B parameters in {time.perf_counter() - t:.1f}s")
    prof_steps = arch.profile_steps if full else run.args.tiny_steps
    cache_steps = (run.args.cache_steps or arch.cache_steps) if full else run.args.tiny_steps
    with torch.inference_mode():
        warm, _ = timed(lambda: sample(model, inputs, 1, run), run)  # kernels, allocator
        rows.append(dict(measure="warmup_step_seconds", value=f"{warm:.4f}", unit="s", steps=1))
        sample_ = None
        try:
            sample_ = measure_profiling(arch, model, inputs, run, rows, prof_steps)
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            rows.append(dict(measure="profiling_error", value="error", note=msg))
            run.say(f"{arch.name}: profiling failed: {msg}")
            traceback.print_exc()
        if run.args.no_cache:
            pass
        elif run.left() <= 0:
            rows.append(dict(measure="caches_error", value="skipped", note="time budget"))
        elif sample_ is None:
            rows.append(dict(measure="caches_error", value="skipped", note="no profile for the plan"))
        else:
            measure_caches(arch, model, inputs, run, rows, cache_steps, sample_)
        if arch.name in run.args.compile_archs.split(",") and not run.args.no_cache:
            if run.left() <= 0:
                rows.append(dict(measure="compiled_error", value="skipped", note="time budget"))
            else:
                try:
                    measure_compiled(arch, model, inputs, run, rows, cache_steps)
                except Exception as e:  # noqa: BLE001  (a compiler failure must not stop the run)
                    msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
                    rows.append(dict(measure="compiled_error", value="error", note=msg))
                    run.say(f"{arch.name}: compiled failed: {msg}")
    model = inputs = sample_ = None  # free the device memory before the next architecture
    if run.cuda:
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    ap.add_argument("--archs", default=",".join(a.name for a in ARCHS), help="comma-separated, in order")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=510.0,
        help="no new architecture starts after this many seconds (default 510: a 9-minute run)",
    )
    ap.add_argument("--repeats", type=int, default=2, help="plain / recorded alternations for the overhead")
    ap.add_argument("--cache-steps", type=int, default=None, help="override every architecture's cache steps")
    ap.add_argument("--tiny-steps", type=int, default=4, help="steps of every loop with --size tiny")
    ap.add_argument("--no-cache", action="store_true", help="profiling and layer counts only")
    ap.add_argument(
        "--compile-archs", default="pixart", help="architectures also measured compiled per block"
    )
    ap.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (eager: dynamo only)"
    )
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.archs.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown architecture(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    run = Run(args)
    import diffusers

    import ditscope

    gpu = torch.cuda.get_device_name() if run.cuda else "cpu"
    run.say(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, ditscope {ditscope.__version__}, "
        f"{gpu}, {run.dtype}, size {args.size}, budget {args.budget_s:.0f}s, out {run.csv}"
    )
    base = dict(size=args.size, device=gpu, dtype=str(run.dtype).removeprefix("torch."))
    for name in names:
        arch = BY_NAME[name]
        if run.left() <= 0:
            run.write(
                [
                    dict(
                        base,
                        arch=name,
                        measure="skipped",
                        value="time budget",
                        note=f"{run.elapsed():.0f}s elapsed of {args.budget_s:.0f}s",
                    )
                ]
            )
            run.say(f"{name}: skipped (time budget)")
            continue
        t = time.perf_counter()
        try:
            rows = measure_arch(arch, run)
        except Exception as e:  # noqa: BLE001  (an architecture that fails must not stop the others)
            traceback.print_exc()
            rows = [
                dict(measure="error", value="error", note=f"{type(e).__name__}: {e}".replace("\n", " ")[:300])
            ]
            if run.cuda:
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - t
        rows.append(dict(measure="arch_seconds", value=f"{seconds:.2f}", unit="s", note=arch.note))
        run.write([dict(base, arch=name, **r) for r in rows])
        run.say(f"{name}: done in {seconds:.1f}s; rows written to {run.csv}")
    run.say(f"finished in {run.elapsed():.1f}s")


if __name__ == "__main__":
    main()
