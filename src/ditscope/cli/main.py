"""The `ditscope` command line: profile, show, merge, plot.

Every user error is one line on stderr and exit code 2, and leaves nothing behind that this
invocation created. A killed `profile` leaves its saved state; the same command resumes it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import DitscopeError
from .common import (  # noqa: E402
    app,
    check_writable_dir,
    parse_scheduler,
    parse_shard,
    pick_device,
    progress_bar,
    torch_dtype,
    user_errors,
)


# ------------------------------------------------------------------------------------ profile
@app.command()
@user_errors
def profile(
    model: Annotated[str | None, typer.Argument(help="zoo name, local diffusers folder, or hub id")] = None,
    prompts: Annotated[Path | None, typer.Option(help=".txt (a line each), .jsonl or .csv; default: built-in prompts")] = None,
    column: Annotated[str | None, typer.Option(help="column of a .csv/.jsonl prompts file")] = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the model's)")] = None,
    scheduler: Annotated[str | None, typer.Option(help="diffusers scheduler class name or alias (ddim, dpm, flow-euler, ...)")] = None,
    seed: Annotated[int, typer.Option(help="base seed; prompt i uses seed + i")] = 0,
    out: Annotated[Path | None, typer.Option(help="output folder (default: runs/<model>)")] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per pipeline call")] = 1,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, float16, bfloat16")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    guidance_scale: Annotated[float | None, typer.Option(help="classifier-free guidance scale (default: the model's)")] = None,
    targets: Annotated[str, typer.Option(help="comma list from q,k,v,a,out")] = "k,v,a",
    storage_dtype: Annotated[str | None, typer.Option(help="dtype of the kept previous-step tensors")] = None,
    offload: Annotated[bool, typer.Option(help="keep previous-step tensors on the CPU")] = False,
    shard: Annotated[str | None, typer.Option(help="i/n: profile every n-th prompt from i (merge shards later)")] = None,
    plot: Annotated[bool, typer.Option(help="write figures")] = True,
):
    """Profile step-to-step redundancy of a DiT over prompts; writes OUT/profile.ditscope and figures."""
    from .. import zoo

    model = model or zoo.DEFAULT_MODEL
    entry = zoo.ZOO.get(model)
    steps = steps if steps is not None else (entry.steps if entry else 20)
    guidance_scale = guidance_scale if guidance_scale is not None else (entry.guidance_scale if entry else None)
    if steps < 2:
        raise DitscopeError(f"--steps must be at least 2 to measure step-to-step distances (got {steps})")
    if batch_size < 1:
        raise DitscopeError(f"--batch-size must be at least 1 (got {batch_size})")
    sched_cls, sched_overrides = parse_scheduler(scheduler) if scheduler else (None, {})
    shard_arg = parse_shard(shard)
    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    from ..capture.recorder import TARGETS

    if not target_list or any(t not in TARGETS for t in target_list):
        raise DitscopeError(f"--targets {targets!r}: choose a comma list from {','.join(TARGETS)}")
    prompt_list = _read_prompts(prompts, column)
    out = out or Path("runs") / Path(model).name.replace("/", "_")
    check_writable_dir(out)
    dev = pick_device(device)
    dt = torch_dtype(dtype, dev)
    store_dt = torch_dtype(storage_dtype, dev) if storage_dtype else None

    rank, world = _init_distributed(dev)
    if world > 1 and shard_arg is not None:
        raise DitscopeError("--shard and torchrun both split the prompts; use one of them")
    if world > 1 and dev.startswith("cuda"):
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    pipe = zoo.load_pipeline(model, dtype=dt, device=dev)
    if sched_cls is not None:
        pipe.scheduler = sched_cls.from_config(pipe.scheduler.config, **sched_overrides)

    final = out / "profile.ditscope"
    part = shard_arg or ((rank, world) if world > 1 else None)
    state = out / (f"profile.shard{part[0]}of{part[1]}.partial" if part else "profile.ditscope.partial")
    created_dir = not out.exists()
    created_state = not state.exists()
    from ..profile.artifact import Profile
    from ..profile.runner import RUN_FIELDS, run_metadata
    from ..profile.runner import profile as run_profile

    if final.exists() and part is None:
        done = Profile.load(final)
        meta = run_metadata(pipe, prompt_list, model_id=model, num_inference_steps=steps, seed=seed,
                            guidance_scale=guidance_scale, batch_size=batch_size, targets=target_list,
                            storage_dtype=store_dt)
        differs = [k for k in RUN_FIELDS if done.meta.get(k) != meta.get(k)]
        if differs:
            raise DitscopeError(f"{final} holds a finished profile of different arguments (differs in: "
                                f"{', '.join(differs)}); use another --out")
        if rank == 0:
            print(f"{final} is already complete; nothing to compute", file=sys.stderr)
            _finish(done, final, out, plot)
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _progress(enabled=rank == 0) as bar:
            result = run_profile(
                pipe, prompt_list, num_inference_steps=steps, seed=seed, guidance_scale=guidance_scale,
                batch_size=batch_size, targets=target_list, storage_dtype=store_dt, offload=offload,
                state_path=state, shard=shard_arg, progress=bar, model_id=model,
                call_kwargs=entry.call_kwargs if entry else None,
            )
    except DitscopeError:
        if created_dir:
            shutil.rmtree(out, ignore_errors=True)
        elif created_state:
            state.unlink(missing_ok=True)
        raise
    if world > 1:
        import torch.distributed as dist

        if rank == 0:
            result.save(final)
        dist.barrier()
        state.unlink(missing_ok=True)
        if rank == 0:
            _finish(result, final, out, plot, save=False)
        dist.destroy_process_group()
        return
    target_file = final if part is None else out / f"profile.shard{part[0]}of{part[1]}.ditscope"
    result.save(target_file)
    state.unlink(missing_ok=True)
    _finish(result, target_file, out, plot and part is None, save=False)


def _read_prompts(path: Path | None, column: str | None) -> list[str]:
    from .. import zoo
    from ..profile.prompts import load_prompts

    if path is not None:
        return load_prompts(path, column)
    return zoo.builtin_prompts()


def _init_distributed(device: str) -> tuple[int, int]:
    """Join the torchrun group if launched by torchrun (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


class _progress:
    """A rich progress bar over prompts x steps on stderr (silent on non-zero ranks)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        self.bar = progress_bar("steps")
        self.bar.__enter__()
        return self.bar

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def _finish(result, path: Path, out: Path, plot: bool, save: bool = False):
    if save:
        result.save(path)
    print(f"wrote {path}")
    if plot:
        figures = result.plot(out / "figures")
        print(f"wrote {len(figures)} figure files to {out / 'figures'}")
    _print_summary(result)


# --------------------------------------------------------------------------- show, merge, plot
def _print_summary(prof) -> None:
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped to a file: do not fold layer names
    meta = prof.meta
    console.print(
        f"[bold]{meta.get('model', '?')}[/bold] ({meta.get('transformer', '?')}), {prof.n_layers} attention layers, "
        f"{prof.n_steps} steps ({meta.get('scheduler', '?')}), {prof.n_prompts}/{meta.get('n_prompts_total', '?')} "
        f"prompts, seed {meta.get('seed', '?')}, dtype {meta.get('dtype', '?')}"
    )
    view = prof.default_view()
    targets = prof.options("target")
    streams = "image tokens; text K/V in cross-attention" if view["stream"] == "auto" else f"{view['stream']} tokens"
    table = Table(title=f"mean L1 distance over steps ({streams}, {view['branch']} branch)")
    table.add_column("layer", justify="right")
    table.add_column("name", overflow="fold")
    grids = {t: prof.grid(t, view["stream"], view["branch"]) for t in targets}
    for t in targets:
        table.add_column(t.upper(), justify="right")
    table.add_column("most redundant step", justify="right")
    for layer in range(prof.n_layers):
        means = [np.nanmean(grids[t][layer]) if np.isfinite(grids[t][layer]).any() else np.nan for t in targets]
        row = grids[targets[-1]][layer]
        best = str(int(np.nanargmin(row)) + 1) if np.isfinite(row).any() else "-"
        table.add_row(str(layer), prof.layer_names[layer], *[f"{m:.3g}" for m in means], best)
    console.print(table)
    cov = prof.cov_table()
    cov_table = Table(title="coefficient of variation over prompts (mean over layers and steps)")
    for col in cov.columns:
        cov_table.add_column(str(col))
    for row in cov.itertuples(index=False):
        cov_table.add_row(*[f"{v:.1%}" if isinstance(v, float) and np.isfinite(v) else ("-" if isinstance(v, float) else str(v)) for v in row])
    console.print(cov_table)


@app.command()
@user_errors
def show(path: Annotated[Path, typer.Argument(help="a .ditscope profile")]):
    """Print a profile's summary table."""
    from ..profile.artifact import Profile

    _print_summary(Profile.load(path))


@app.command()
@user_errors
def merge(
    paths: Annotated[list[Path], typer.Argument(help="profiles of disjoint prompts of the same run")],
    output: Annotated[Path, typer.Option("-o", "--output", help="merged profile file")],
):
    """Merge shard profiles into one."""
    from ..profile.artifact import Profile

    if len(paths) < 2:
        raise DitscopeError("merge needs at least two profiles")
    profiles = [Profile.load(p) for p in paths]
    check_writable_dir(output.parent)
    merged = profiles[0]
    for p in profiles[1:]:
        merged = merged.merge(p)
    merged.meta["n_prompts"] = merged.n_prompts
    merged.save(output)
    print(f"wrote {output} ({merged.n_prompts}/{merged.meta.get('n_prompts_total', '?')} prompts)")


@app.command("plot")
@user_errors
def plot_cmd(
    path: Annotated[Path, typer.Argument(help="a .ditscope profile")],
    out: Annotated[Path | None, typer.Option(help="figures folder (default: next to the profile)")] = None,
    metric: Annotated[str, typer.Option(help="l1, rel_l1 or cos")] = "l1",
):
    """Write a profile's figures (PNG and SVG)."""
    from ..profile.artifact import Profile
    from ..profile.plots import plot_profile

    prof = Profile.load(path)
    if metric not in prof.metrics:
        raise DitscopeError(f"unknown metric {metric!r}; choose from {', '.join(prof.metrics)}")
    out = out or path.parent / "figures"
    check_writable_dir(out)
    files = plot_profile(prof, out, metric=metric)
    print(f"wrote {len(files)} figure files to {out}")


from . import bench as _bench_commands  # noqa: E402,F401  (registers bench)
from . import study as _study_commands  # noqa: E402,F401  (registers study)
from . import zoo as _zoo_commands  # noqa: E402,F401  (registers generate, eval, zoo)


def main():
    app()


if __name__ == "__main__":
    main()
