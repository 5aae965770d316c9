"""`ditscope plan`: compile a caching plan from the model's measured redundancy."""

from __future__ import annotations

import shutil
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from ..errors import DitscopeError, EveryRankError
from ..files import missing_folders, remove_empty
from ..profiling.job import join_ranks
from ..profiling.workload import barrier, writes
from ..runtime import (
    check_guidance,
    check_writable_dir,
    configure_scheduler,
    pick_device,
    progress_status,
    torch_dtype,
)
from .common import app, user_errors

CALIBRATION_SEED = 7000  # zoo models: calibration prompts are drawn apart from the bench's (seed 3000)


@app.command()
@user_errors
def plan(
    model: Annotated[str, typer.Argument(help="zoo name, local diffusers folder or hub id")] = "tiny-pixart",
    target: Annotated[
        str | None,
        typer.Option(
            help="psnr=DB, ssim=S (the lower end of their 95% interval on the calibration prompts), "
            "psnr_p5=DB (their worst images: a 95% lower bound of the 5th percentile, the worst image "
            "below 59 prompts), speedup=X or flops=X "
            "(default: psnr=35)"
        ),
    ] = None,
    speedup: Annotated[float | None, typer.Option(help="shorthand for --target speedup=X")] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="calibration prompts (.txt, .jsonl, .csv); zoo models draw them")
    ] = None,
    n_prompts: Annotated[
        int | None,
        typer.Option(
            help="calibration prompts drawn for zoo models, or the first N of "
            "--prompts (default: the zoo model's (24 images; tiny-latte: 8 videos); a file: up to 8)"
        ),
    ] = None,
    prompt_seed: Annotated[
        int | None,
        typer.Option(help=f"zoo models: seed of the drawn calibration prompts (default: {CALIBRATION_SEED})"),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the model's)")] = None,
    guidance_scale: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per pipeline call")] = 8,
    granularity: Annotated[
        str,
        typer.Option(
            help="step (one row for every module), kind (per module kind) or site (per module of every block)"
        ),
    ] = "step",
    predictors: Annotated[
        str,
        typer.Option(
            help="what a served module may be made of, letters of R (reuse), F (linear forecast), T (Taylor, "
            "second order), L (fitted on the calibration); the search chooses per module and step"
        ),
    ] = "RFTL",
    cost: Annotated[
        str,
        typer.Option(
            help="cost model: time (measured; the finalists are timed), flops (counted: the choice does "
            "not depend on a busy machine's timings) or uniform"
        ),
    ] = "time",
    modes: Annotated[
        str,
        typer.Option(
            help="what the search may cache, comma list of both (stack and modules), "
            "stack, sites; fewer modes plan faster (video models)"
        ),
    ] = "both,stack,sites",
    iterations: Annotated[
        int,
        typer.Option(
            help="speed targets (speedup=, flops=): prices tried per search line; quality targets check "
            "at most --max-checks plans instead"
        ),
    ] = 8,
    max_checks: Annotated[
        int,
        typer.Option(
            help="quality targets: end-to-end checks per plan at most (each is one run of the calibration "
            "prompts); fewer plan faster, with less choice"
        ),
    ] = 10,
    check_prompts: Annotated[
        int | None,
        typer.Option(
            help="quality targets: the first check runs on every calibration prompt, the others on the N it "
            "found hardest (lowest PSNR) (default: every one; tiny-latte: 4 of its 8 videos)"
        ),
    ] = None,
    measure_prompts: Annotated[
        int | None,
        typer.Option(
            help="the calibration measures the errors on the first N calibration prompts and runs the others "
            "uncached, for the checks alone (default: every one; tiny-latte: 4 of its 8 videos)"
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="plan file (default plans/MODEL.plan.json)")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    dtype: Annotated[str, typer.Option()] = "auto",
):
    """Plan the cache from measured redundancy so that a quality (or speed) target holds; writes a plan file."""
    import torch

    from ..planning.planner import GRANULARITIES, MODES, Target
    from ..planning.planner import plan as make_plan

    if target is not None and speedup is not None:
        raise DitscopeError(
            f"--target {target} and --speedup {speedup:g} both say what to plan for; give one"
        )
    goal = Target.parse(
        f"speedup={speedup}" if speedup is not None else target if target is not None else "psnr=35"
    )
    if granularity not in GRANULARITIES:
        raise DitscopeError(f"--granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    if (n_prompts is not None and n_prompts < 1) or batch_size < 1:
        raise DitscopeError("--n-prompts and --batch-size must be at least 1")
    if steps is not None and steps < 2:
        raise DitscopeError("--steps must be at least 2")
    mode_list = tuple(m.strip() for m in modes.split(",") if m.strip())
    bad = [m for m in mode_list if m not in MODES]
    if bad or not mode_list:
        raise DitscopeError(f"--modes takes a comma list of {', '.join(MODES)}, not {modes!r}")
    if iterations < 3:
        raise DitscopeError(f"--iterations must be at least 3, not {iterations}")
    if not predictors or set(predictors) - set("RFTL"):
        raise DitscopeError(
            f"--predictors takes letters of RFTL (R reuse, F linear, T Taylor, L fitted), not {predictors!r}"
        )
    if max_checks < 1:
        raise DitscopeError(f"--max-checks must be at least 1, not {max_checks}")
    out = out or Path("plans") / f"{Path(model).name}.plan.json"
    prompt_seed = seed_of_prompts(prompts, prompt_seed)
    pipe, prompt_list, n_steps, guidance = calibration_run(
        model, out, "model.plan.json", prompts, n_prompts, prompt_seed, steps, guidance_scale, device, dtype
    )
    check_prompts = zoo_count(model, "check_prompts", check_prompts, len(prompt_list))
    measure_prompts = zoo_count(model, "measure_prompts", measure_prompts, len(prompt_list))
    made = missing_folders(out.parent)  # removed again if the run is refused
    work = out.parent / f".{out.name}.work"  # calibration and evaluations: a rerun resumes from them
    from rich.console import Console

    console = Console(stderr=True)
    first = writes()  # under torchrun the first rank reports and writes; every rank plans the same
    say_resuming(work)
    with progress_status("planning") if first else nullcontext(_Silent()) as status, torch.inference_mode():
        try:
            result = make_plan(
                pipe,
                prompt_list,
                str(goal),
                n_steps,
                batch_size=batch_size,
                guidance_scale=guidance,
                modes=mode_list,
                granularity=granularity,
                predictors=predictors,
                cost=cost,
                iterations=iterations,
                max_checks=max_checks,
                check_prompts=check_prompts,
                measure_prompts=measure_prompts,
                work_dir=work,
                progress=lambda text: status.update(f"planning: {text}"),
                log=console.print if first else None,
            )
        except (
            DitscopeError
        ):  # a target no plan reaches: nothing is left (an interrupt keeps the work to resume)
            barrier()
            if first:
                shutil.rmtree(work, ignore_errors=True)
                remove_empty(made)
            raise
        except KeyboardInterrupt:
            if first:
                print(
                    f"interrupted: {kept_work(work)} kept in {work}; rerun the same command to resume",
                    file=sys.stderr,
                )
            raise
    result.meta["calibration"]["prompt_seed"] = prompt_seed if prompts is None else None
    barrier()  # every rank is done with the work folder
    if not first:
        return
    result.save(out)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}")
    from ..planning.show import summary_rows

    for key, value in summary_rows(result):
        print(f"  {key:24s} {value}")


def zoo_count(model: str, field: str, given: int | None, n_prompts: int) -> int | None:
    """How many calibration prompts the checks run on (`field` "check_prompts") or the errors are measured on
    ("measure_prompts"): the given count (`ditscope.plan` checks it), else the zoo row's where there are more
    prompts than that, else every one (None)."""
    from .. import zoo

    if given is not None:
        return given
    entry = zoo.ZOO.get(model)
    default = getattr(entry, field) if entry else None
    return default if default is not None and default < n_prompts else None


def say_resuming(work: Path) -> None:
    """Says what a rerun resumes from. Every rank looks before any goes on: under torchrun another rank's run
    makes the folder, and the first rank then said it resumed from nothing."""
    existed = work.exists()
    barrier()
    if existed and writes():
        print(f"resuming from {work}: {kept_work(work)} (reused where they match this run)", file=sys.stderr)


def kept_work(work: Path) -> str:
    """What a plan's or tune's work folder holds, in words."""
    parts = []
    if (work / "calibration.ditscope").exists():
        parts.append("the calibration")
    elif (work / "reference.safetensors").exists():
        parts.append("the uncached reference images")
    rows = work / "evaluations.jsonl"
    n = len(rows.read_text().splitlines()) if rows.exists() else 0
    parts.append(f"{n} end-to-end evaluation{'s' if n != 1 else ''}")
    return " and ".join(parts)


class _Silent:
    """The progress line of a rank that does not report."""

    def update(self, text: str):
        pass


DEFAULT_PROMPTS = 8  # calibration prompts when --n-prompts is not given


def seed_of_prompts(prompts: Path | None, prompt_seed: int | None, default: int = CALIBRATION_SEED) -> int:
    """The seed zoo prompts are drawn with; refused beside a prompt file (it would be ignored)."""
    if prompts is not None and prompt_seed is not None:
        raise DitscopeError(
            f"--prompt-seed draws zoo prompts; it does not apply to the prompts of {prompts}: drop it"
        )
    return default if prompt_seed is None else prompt_seed


def calibration_run(
    model: str,
    out: Path,
    example: str,
    prompts: Path | None,
    n_prompts: int | None,
    prompt_seed: int,
    steps: int | None,
    guidance_scale: float | None,
    device: str,
    dtype: str,
    distributed: bool = True,
):
    """What `plan` and `tune` both fit on: checks the output file, loads the model, and gives (pipe,
    calibration prompts, steps, guidance). Zoo models draw their prompts with `prompt_seed`; others need
    a prompt file. `example` is the file name suggested when `out` is a folder. `distributed`: under torchrun,
    join the ranks so that they share the prompts (profiling/workload.py)."""
    from .. import zoo
    from ..profiling.prompts import load_prompts
    from ..zoo import evaluator

    check_guidance(guidance_scale)
    if prompt_seed < 0:
        raise DitscopeError(f"--prompt-seed must be 0 or more, got {prompt_seed}")
    if out.is_dir():
        raise DitscopeError(f"--out {out} is a folder; give a file name such as {out / example}")
    check_writable_dir(out.parent)
    entry = zoo.ZOO.get(model)
    default = entry.calibration_prompts if entry else DEFAULT_PROMPTS
    prompt_list = None
    if prompts is not None:
        prompt_list = load_prompts(prompts)
        if n_prompts is not None and n_prompts > len(prompt_list):
            raise DitscopeError(
                f"--n-prompts {n_prompts} but {prompts} holds {len(prompt_list)} prompts; ask for at "
                f"most {len(prompt_list)} or add prompts to the file"
            )
        prompt_list = prompt_list[: n_prompts or default]
    n_prompts = n_prompts or default
    n_steps = steps or (entry.steps if entry else 20)
    dev = pick_device(device)
    _, world, dev = (
        join_ranks(dev) if distributed else (0, 1, dev)
    )  # the ranks share the prompts (workload.py)
    pipe = zoo.load_pipeline(model, dtype=torch_dtype(dtype, dev), device=dev)
    configure_scheduler(pipe, None, n_steps)
    pipe.set_progress_bar_config(disable=True)
    if prompt_list is None:
        if not hasattr(pipe, "is_class_conditional"):
            raise DitscopeError(f"{model} is not a zoo model: give calibration prompts with --prompts")
        _, prompt_list = evaluator.evaluation_prompts(pipe, n_prompts, seed=prompt_seed)
    guidance = guidance_scale if guidance_scale is not None else (entry.guidance_scale if entry else None)
    if world > len(prompt_list):
        raise EveryRankError(
            f"{world} ranks share {len(prompt_list)} calibration prompts: give at least one per rank "
            f"(--n-prompts {world} or more), or launch fewer ranks"
        )
    return pipe, prompt_list, n_steps, guidance
