"""The `ditscope` command line: profile, show, merge, plot.

Every user error is one line on stderr and exit code 2, and leaves nothing behind that this
invocation created. A killed `profile` leaves its saved state; the same command resumes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import DitscopeError
from ..runtime import check_writable_dir, progress_bar
from .common import app, user_errors


# ------------------------------------------------------------------------------------ profile
@app.command()
@user_errors
def profile(
    model: Annotated[str | None, typer.Argument(help="zoo name, local diffusers folder, or hub id")] = None,
    prompts: Annotated[
        Path | None, typer.Option(help=".txt (a line each), .jsonl or .csv; default: built-in prompts")
    ] = None,
    column: Annotated[str | None, typer.Option(help="column of a .csv/.jsonl prompts file")] = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the model's)")] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="diffusers scheduler class name or alias (ddim, dpm, flow-euler, ...)")
    ] = None,
    seed: Annotated[int, typer.Option(help="base seed; prompt i uses seed + i")] = 0,
    out: Annotated[Path | None, typer.Option(help="output folder (default: runs/<model>)")] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per pipeline call")] = 1,
    dtype: Annotated[
        str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    guidance_scale: Annotated[
        float | None, typer.Option(help="classifier-free guidance scale (default: the model's)")
    ] = None,
    targets: Annotated[str, typer.Option(help="comma list from q,k,v,a,out")] = "k,v,a",
    storage_dtype: Annotated[str | None, typer.Option(help="dtype of the kept previous-step tensors")] = None,
    offload: Annotated[bool, typer.Option(help="keep previous-step tensors on the CPU")] = False,
    shard: Annotated[
        str | None,
        typer.Option(help="i/n: profile the i-th of n contiguous parts of the prompts (merge shards later)"),
    ] = None,
    plot: Annotated[bool, typer.Option(help="write figures")] = True,
    outputs: Annotated[
        str | None,
        typer.Option(
            help="also record output-only sites (target out): mlp, blocks "
            "(their residuals), mlp,blocks, or a module-name pattern"
        ),
    ] = None,
):
    """Profile step-to-step redundancy of a DiT over prompts; writes OUT/profile.ditscope and figures."""
    from ..profiling.job import profile_model

    result, path = profile_model(
        model=model,
        prompts=prompts,
        column=column,
        steps=steps,
        scheduler=scheduler,
        seed=seed,
        out=out,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        guidance_scale=guidance_scale,
        targets=targets,
        storage_dtype=storage_dtype,
        offload=offload,
        shard=shard,
        progress=lambda: progress_bar("steps"),
        outputs=outputs,
    )
    if result is None:  # a torchrun rank other than 0
        return
    if plot and shard is None:
        draw_figures(result, path)
    _print_summary(result)


def draw_figures(result, path: Path) -> None:
    """The profile's figures, in `figures/` beside its file `path`: drawn again only where the profile, or the
    code that draws them, changed since the stamp kept beside them was written (a rerun of the README's main
    job read a finished profile and then spent most of its time drawing the same figures again)."""
    import hashlib
    import json

    from .. import plots
    from ..files import write_text_atomic

    folder = path.parent / "figures"
    stamp_file = folder / ".drawn.json"
    stamp = {
        "profile": hashlib.sha256(path.read_bytes()).hexdigest(),
        "drawn_by": hashlib.sha256(Path(plots.__file__).read_bytes()).hexdigest(),
    }
    try:
        kept = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        kept = {}
    files = kept.get("files") if isinstance(kept, dict) else None
    if (
        files
        and all(kept.get(k) == v for k, v in stamp.items())
        and all((folder / f).is_file() for f in files)
    ):
        print(f"the {len(files)} figure files in {folder} are up to date")
        return
    figures = result.plot(folder)
    write_text_atomic(
        stamp_file, json.dumps(stamp | {"files": sorted(str(f.relative_to(folder)) for f in figures)})
    )
    print(f"wrote {len(figures)} figure files to {folder}")


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
    streams = (
        "image tokens; text K/V in cross-attention"
        if view["stream"] == "auto"
        else f"{view['stream']} tokens"
    )
    table = Table(title=f"mean L1 distance over steps ({streams}, {view['branch']} branch)")
    table.add_column("layer", justify="right")
    table.add_column("name", overflow="fold")
    grids = {t: prof.grid(t, view["stream"], view["branch"]) for t in targets}
    for t in targets:
        table.add_column(t.upper(), justify="right")
    table.add_column("most redundant step", justify="right")
    for layer in range(prof.n_layers):
        means = [
            np.nanmean(grids[t][layer]) if np.isfinite(grids[t][layer]).any() else np.nan for t in targets
        ]
        row = grids[targets[-1]][layer]
        best = str(int(np.nanargmin(row)) + 1) if np.isfinite(row).any() else "-"
        table.add_row(str(layer), prof.layer_names[layer], *[f"{m:.3g}" for m in means], best)
    console.print(table)
    cov = prof.cov_table()
    # a title wider than this narrow table would be folded to its width: a line of its own instead
    console.print("[italic]coefficient of variation over prompts (mean over layers and steps)[/italic]")
    cov_table = Table()
    for col in cov.columns:
        cov_table.add_column(str(col))
    for row in cov.itertuples(index=False):
        cov_table.add_row(
            *[
                f"{v:.1%}"
                if isinstance(v, float) and np.isfinite(v)
                else ("-" if isinstance(v, float) else str(v))
                for v in row
            ]
        )
    console.print(cov_table)


@app.command()
@user_errors
def show(path: Annotated[Path, typer.Argument(help="a .ditscope profile or a .plan.json plan")]):
    """Print a profile's summary table, or a plan's summary (and write its heatmap beside it)."""
    from ..profiling.artifact import Profile

    if path.is_dir():
        inside = sorted(path.glob("*.ditscope")) + sorted(path.glob("*.plan.json"))
        hint = f"pass {inside[0]}" if inside else "pass a .ditscope profile or a .plan.json plan file"
        raise DitscopeError(f"{path} is a folder; {hint}")
    if path.suffix == ".json":
        from ..cache.schedule_data import Schedule
        from ..planning.show import heatmap, summary_rows

        plan = Schedule.load(path)
        for key, value in summary_rows(plan):
            print(f"{key:24s} {value}")
        figure = path.with_name(path.name.removesuffix(".json") + ".png")
        try:
            print(f"wrote {heatmap(plan, figure)}")
        except OSError as e:  # a plan in a read-only folder: shown, with no figure beside it
            print(f"(no figure: cannot write {figure}: {e.strerror or e})")
        return
    _print_summary(Profile.load(path))


@app.command()
@user_errors
def merge(
    paths: Annotated[list[Path], typer.Argument(help="profiles of disjoint prompts of the same run")],
    output: Annotated[Path, typer.Option("-o", "--output", help="merged profile file")],
):
    """Merge shard profiles into one."""
    from ..profiling.artifact import Profile

    if len(paths) < 2:
        raise DitscopeError("merge needs at least two profiles")
    if output.is_dir():
        raise DitscopeError(f"-o {output} is a folder; give the merged profile's file name")
    profiles = [Profile.load(p) for p in paths]
    check_writable_dir(output.parent, "-o")
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
    """Write a profile's figures (PNG and SVG) for one metric: layers_METRIC, heatmap_TARGET_METRIC, cov_table_METRIC."""
    from ..profiling.artifact import Profile
    from ..profiling.plots import plot_profile

    prof = Profile.load(path)
    if metric not in prof.metrics:
        raise DitscopeError(f"unknown metric {metric!r}; choose from {', '.join(prof.metrics)}")
    out = out or path.parent / "figures"
    check_writable_dir(out)
    files = plot_profile(prof, out, metric=metric)
    print(f"wrote {len(files)} figure files to {out}")


from . import bench as _bench_commands  # noqa: E402,F401  (registers bench)
from . import generate as _generate_commands  # noqa: E402,F401  (registers generate)
from . import plan as _plan_commands  # noqa: E402,F401  (registers plan)
from . import recommend as _recommend_commands  # noqa: E402,F401  (registers recommend)
from . import study as _study_commands  # noqa: E402,F401  (registers study)
from . import tune as _tune_commands  # noqa: E402,F401  (registers tune)
from . import zoo as _zoo_commands  # noqa: E402,F401  (registers eval, zoo)


def main(argv: list[str] | None = None):
    """The console script. The CLI framework's own usage errors (an option value of the wrong type, an
    unknown option, a missing argument) become one line on stderr and exit code 2, like every other
    user error, instead of a framed help box."""
    import signal
    import sys
    import threading

    # SIGTERM (a scheduler's or a container's stop) takes the Ctrl-C path: what was kept is said, the
    # state stays resumable; the exit code is SIGTERM's (143), not Ctrl-C's (130)
    terminated = []

    def on_sigterm(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        code = app(args=argv, standalone_mode=False)
    except typer.Abort:
        sys.exit(143 if terminated else 130)
    except typer.TyperException as e:  # the framework's usage errors (typer vendors click's)
        message = " ".join(e.format_message().split()) if hasattr(e, "format_message") else str(e)
        ctx = getattr(e, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"error: {message}{where}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    code = code if isinstance(code, int) else 0
    sys.exit(143 if terminated and code == 130 else code)  # a command that caught the interrupt itself


if __name__ == "__main__":
    main()
