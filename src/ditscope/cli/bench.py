"""`ditscope bench`: every cache method (ours and the peers') against no cache, speed and quality."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import DitscopeError, EveryRankError
from ..runtime import (
    check_guidance,
    check_writable_dir,
    configure_scheduler,
    pick_device,
    progress_bar,
    torch_dtype,
)
from .common import app, user_errors
from .plan import DEFAULT_PROMPTS, seed_of_prompts


@app.command()
@user_errors
def bench(
    model: Annotated[str, typer.Argument(help="zoo name, local diffusers folder or hub id")] = "tiny-pixart",
    methods: Annotated[
        str | None,
        typer.Option(
            help="comma-separated methods (ours: toca, fora, ...; peers: "
            "diffusers-fbcache, cachedit-dbcache, smoothcache, tgate, ...; steps: fewer steps). "
            "Default: every method in the grid, plus fewer steps"
        ),
    ] = None,
    grid: Annotated[
        str,
        typer.Option(help="a preset (default, compact: ours and the peers, quick) or a JSON/YAML grid file"),
    ] = "default",
    prompts: Annotated[
        int | None,
        typer.Option(
            help="number of prompts: zoo models draw them from the data generator "
            "(default 16); with --prompt-file the first N (default all)"
        ),
    ] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help="prompts for non-zoo models (.txt, .jsonl, .csv)")
    ] = None,
    prompt_seed: Annotated[
        int | None,
        typer.Option(
            help="zoo models: seed of the drawn prompts; fit a plan or threshold "
            "on one seed and score it on another (default: 3000)"
        ),
    ] = None,
    calibration_seed: Annotated[
        int, typer.Option(help="zoo models: seed of the calibration prompts a plan is fitted on")
    ] = 7000,
    max_objects: Annotated[
        int,
        typer.Option(
            help="zoo text models: up to N objects per bench image (the calibration "
            "prompts keep one): a test set unlike the one plans and knobs were fitted on"
        ),
    ] = 1,
    calibration_prompts: Annotated[
        int | None,
        typer.Option(
            help="calibration prompts for plans, tune= settings and SmoothCache (zoo: drawn, default the "
            "model's zoo row, as plan and tune; a prompt file: the ones after --prompts, default 8)"
        ),
    ] = None,
    seeds: Annotated[int, typer.Option(help="seeds per prompt")] = 2,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the model's)")] = None,
    guidance_scale: Annotated[float | None, typer.Option()] = None,
    repeats: Annotated[
        int,
        typer.Option(
            help="timed passes per setting, after one untimed (median); 0: not timed, "
            "speed is executed FLOPs (for a machine shared with other work)"
        ),
    ] = 3,
    batch_size: Annotated[int, typer.Option(help="prompts per pipeline call")] = 16,
    out: Annotated[Path | None, typer.Option(help="output folder (default runs/bench/MODEL)")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    dtype: Annotated[str, typer.Option()] = "auto",
):
    """Speed against quality for each cache method over a grid of its settings, beside the peers' caches."""
    import torch
    from rich.console import Console

    from .. import zoo
    from ..bench import BenchInputs, expand, load_grid, run_bench, write_outputs
    from ..bench.report import summary
    from ..profiling.prompts import load_prompts
    from ..zoo import evaluator

    if (prompts is not None and prompts < 1) or seeds < 1 or batch_size < 1:
        raise DitscopeError("--prompts, --seeds and --batch-size must be at least 1")
    if repeats < 0:
        raise DitscopeError(f"--repeats must be 0 (not timed: FLOPs only) or more, got {repeats}")
    prompt_seed = seed_of_prompts(prompt_file, prompt_seed, default=3000)
    if prompt_seed < 0:
        raise DitscopeError(f"--prompt-seed must be 0 or more, got {prompt_seed}")
    if calibration_seed < 0:
        raise DitscopeError(f"--calibration-seed must be 0 or more, got {calibration_seed}")
    if calibration_seed == prompt_seed:
        raise DitscopeError(
            "--calibration-seed must differ from --prompt-seed: a plan is scored on prompts it was not fitted on"
        )
    if not 1 <= max_objects <= 4:
        raise DitscopeError(f"--max-objects must be 1 to 4 (objects per 32x32 image), got {max_objects}")
    if calibration_prompts is not None and calibration_prompts < 1:
        raise DitscopeError("--calibration-prompts must be at least 1")
    if steps is not None and steps < 2:
        raise DitscopeError("--steps must be at least 2")
    check_guidance(guidance_scale)
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods is not None else None
    if method_list is not None and not method_list:
        raise DitscopeError(f"--methods {methods!r} names no method; give a comma list such as toca,fora")
    grid_spec = load_grid(grid)
    entry = zoo.ZOO.get(model)
    calibration_prompts = calibration_prompts or (entry.calibration_prompts if entry else DEFAULT_PROMPTS)
    n_steps = steps or (entry.steps if entry else 20)
    settings = expand(method_list, grid_spec, n_steps)  # validates every method and option up front
    out = out or Path("runs") / "bench" / Path(model).name
    check_writable_dir(out)
    prompt_list, calibration = None, None
    if prompt_file is not None:  # checked before the model loads: a bad file costs nothing
        if max_objects > 1:
            raise DitscopeError("--max-objects draws zoo prompts; it does not apply to --prompt-file")
        prompt_list = load_prompts(prompt_file)
        if prompts is not None and prompts > len(prompt_list):
            raise DitscopeError(
                f"--prompts {prompts} but {prompt_file} holds {len(prompt_list)} prompts; "
                f"ask for at most {len(prompt_list)} or add prompts to the file"
            )
        calibration = prompt_list[prompts:][:calibration_prompts] if prompts is not None else []
        prompt_list = prompt_list[:prompts]

    from ..profiling.job import join_ranks

    rank, world, dev = join_ranks(pick_device(device))  # torchrun: the ranks share every setting's samples
    pipe = zoo.load_pipeline(model, dtype=torch_dtype(dtype, dev), device=dev)
    configure_scheduler(pipe, None, n_steps)
    pipe.set_progress_bar_config(disable=True)
    scenes, net, drawn_with = None, None, None
    if prompt_list is None:
        if not hasattr(pipe, "is_class_conditional"):
            raise DitscopeError(f"{model} is not a zoo model: give its prompts with --prompt-file")
        if max_objects > 1 and (pipe.is_class_conditional or evaluator.is_video(pipe)):
            what = "one class per image" if pipe.is_class_conditional else "one moving object per video"
            raise DitscopeError(f"--max-objects: {model} draws {what}; drop the option")
        # a zoo pipeline: prompts drawn from the data generator with --prompt-seed
        scenes, prompt_list = evaluator.evaluation_prompts(
            pipe, prompts or 16, seed=prompt_seed, max_objects=max_objects
        )
        net, drawn_with = evaluator.load_evaluator(), prompt_seed
    from ..bench.peers import PEERS

    # fitted on calibration prompts: plans made here (target=; not a plan file given by path), tune= settings and
    # peers that calibrate a schedule (SmoothCache)
    uses_plan = any(
        (s.method == "plan" and "target" in s.options)
        or "tune" in s.options
        or (s.method in PEERS and PEERS[s.method].calibrates)
        for s in settings
    )
    if uses_plan and prompt_file is None:
        calibration = evaluator.evaluation_prompts(pipe, calibration_prompts, seed=calibration_seed)[1]
    elif uses_plan and not calibration:
        raise DitscopeError(
            f"plans, tune= settings and smoothcache fit on prompts apart from the bench's: put more than --prompts "
            f"prompts in {prompt_file} (the ones after them calibrate)"
        )
    guidance = guidance_scale if guidance_scale is not None else (entry.guidance_scale if entry else None)
    from ..planning.calibrate import pipeline_identity

    inputs = BenchInputs(
        model=model,
        prompts=prompt_list,
        seeds=list(range(seeds)),
        steps=n_steps,
        guidance_scale=guidance,
        batch_size=batch_size,
        repeats=repeats,
        scenes=scenes,
        class_conditional=getattr(pipe, "is_class_conditional", False),
        prompt_seed=drawn_with,
        calibration=calibration if uses_plan else None,
        calibration_seed=calibration_seed if uses_plan and prompt_file is None else None,
        identity=pipeline_identity(pipe),
    )

    if world > len(prompt_list) * seeds:
        raise EveryRankError(
            f"{world} ranks share {len(prompt_list) * seeds} samples (prompts x seeds): give at least "
            "one per rank, or launch fewer ranks"
        )
    if rank > 0:  # the first rank reports and writes
        with torch.inference_mode():
            run_bench(pipe, settings, inputs, out, evaluator_net=net, log=lambda *_: None)
        return
    console = Console(stderr=True)
    try:
        with progress_bar("settings") as bar, torch.inference_mode():  # the bar is gone when interrupted
            task = bar.add_task("bench", total=len(settings))

            def progress(setting, row):
                speed = f" {row['seconds']:.2f}s" if row.get("seconds") is not None else ""
                bar.update(task, advance=1, description=f"{setting.label[:40]}{speed}")

            rows = run_bench(
                pipe, settings, inputs, out, evaluator_net=net, progress=progress, log=console.print
            )
    except KeyboardInterrupt:
        from ..bench.runner import read_rows

        done = len({r["key"] for r in read_rows(out)} & {s.key for s in settings})
        print(
            f"interrupted: {done} of {len(settings)} settings are saved in {out}; run the same command "
            "again to resume",
            file=sys.stderr,
        )
        raise
    drawn = (
        f" (prompt seed {drawn_with}{f', up to {max_objects} objects' if max_objects > 1 else ''})"
        if drawn_with is not None
        else f" from {prompt_file}"
    )
    if inputs.calibration_seed is not None:
        drawn += f", plans and tuned knobs fitted on {len(inputs.calibration)} calibration prompts (seed {inputs.calibration_seed})"
    title = f"{model}: {len(prompt_list)} prompts{drawn} x {seeds} seeds, {n_steps} steps"
    df = write_outputs(rows, out, title, prompt_list)
    print(summary(df, title))  # the key columns, in 100 columns; results.md has them all
    print(
        f"wrote {out / 'results.csv'}, results.md (every column), pareto.png, grid.png ({len(df)} settings)"
    )
