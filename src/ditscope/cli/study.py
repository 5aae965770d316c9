"""`ditscope study prompts|steps|scheduler|models`: the paper's experiments, one command each."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import DitscopeError
from ..runtime import check_scheduler, check_writable_dir
from .common import app, user_errors

study_app = typer.Typer(
    help="The redundancy paper's experiments, each finding as a number, in HTML reports.",
    no_args_is_help=True,
)
app.add_typer(study_app, name="study")

Prompts = Annotated[
    Path | None, typer.Option(help="prompts file (.txt, .jsonl, .csv); default: built-in prompts")
]
Out = Annotated[Path, typer.Option(help="study folder: profiles are kept and reused under OUT/profiles")]
Seed = Annotated[int, typer.Option()]
Device = Annotated[str, typer.Option()]


def _checked(
    models: list[str], prompts: Path | None, steps: list[int | None], out: Path, least_prompts: int = 1
):
    """Every input of a study, checked before any profile is computed: the models (without loading them),
    the prompts file, the step counts and the output folder."""
    from .. import zoo
    from ..profiling.prompts import load_prompts

    for model in models:
        zoo.check_model(model)
    if prompts is not None:
        n = len(load_prompts(prompts))
        if n < least_prompts:
            raise DitscopeError(
                f"{prompts} holds {n} prompt{'s' * (n != 1)}; this study needs at least {least_prompts}"
            )
    for count in steps:
        if count is not None and count < 2:
            raise DitscopeError(f"--steps must be at least 2 to measure step-to-step distances (got {count})")
    check_writable_dir(out)


def _run(out: Path, compute):
    """Run a study; a user error removes the output folder if this call created it (nothing is left)."""
    import shutil

    created = not out.exists()
    try:
        return compute()
    except DitscopeError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _done(result, study: str, out: Path, sub: str = ""):
    if result is None:  # a torchrun rank other than 0
        return
    print(result["verdict"])
    print(f"wrote {out / study / sub / 'report.html' if sub else out / study / 'report.html'}")


@study_app.command("prompts")
@user_errors
def prompts_cmd(
    model: Annotated[str, typer.Argument()] = "tiny-pixart",
    prompts: Prompts = None,
    steps: Annotated[int | None, typer.Option()] = None,
    out: Out = Path("runs/study"),
    seed: Seed = 0,
    device: Device = "auto",
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples")] = 1000,
):
    """Coefficient of variation over prompts per (layer, step, target), averaged per target with a bootstrap CI."""
    from ..study import study_prompts

    if bootstrap < 10:
        raise DitscopeError("--bootstrap must be at least 10")
    _checked([model], prompts, [steps], out, least_prompts=2)
    _done(
        _run(
            out,
            lambda: study_prompts(
                model, prompts, out, n_boot=bootstrap, steps=steps, seed=seed, device=device
            ),
        ),
        "prompts",
        out,
    )


@study_app.command("steps")
@user_errors
def steps_cmd(
    model: Annotated[str, typer.Argument()] = "tiny-pixart",
    steps: Annotated[str, typer.Option(help="comma-separated step counts")] = "10,20,40",
    prompts: Prompts = None,
    out: Out = Path("runs/study"),
    seed: Seed = 0,
    device: Device = "auto",
):
    """Profiles at several step counts on a normalised step axis: correlation and change points."""
    from ..study import study_variants

    counts = _ints(steps, "--steps")
    if any(n < 3 for n in counts) or len(counts) < 2:
        raise DitscopeError("--steps needs at least two step counts, each at least 3")
    _checked([model], prompts, counts, out)
    variants = {str(n): {"steps": n} for n in counts}
    _done(
        _run(out, lambda: study_variants("steps", model, variants, prompts, out, seed=seed, device=device)),
        "steps",
        out,
        Path(model).name,
    )


@study_app.command("scheduler")
@user_errors
def scheduler_cmd(
    model: Annotated[str, typer.Argument()] = "tiny-pixart",
    schedulers: Annotated[
        str,
        typer.Option(
            help="comma-separated scheduler names or aliases; "
            "NAME:key=value sets a config field, e.g. flow-euler:shift=3"
        ),
    ] = "dpm,ddim",
    steps: Annotated[int | None, typer.Option()] = None,
    prompts: Prompts = None,
    out: Out = Path("runs/study"),
    seed: Seed = 0,
    device: Device = "auto",
):
    """The same model under several schedulers, compared on the normalised step axis."""
    from ..study import study_variants

    names = [s.strip() for s in schedulers.split(",") if s.strip()]
    if len(names) < 2:
        raise DitscopeError("--schedulers needs at least two schedulers")
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise DitscopeError(f"--schedulers names {twice} more than once; compare different schedulers")
    for name in names:
        check_scheduler(name)  # names, option keys and values, before any variant runs
    _checked([model], prompts, [steps], out)
    variants = {n.replace(":", "-").replace("=", ""): {"scheduler": n, "steps": steps} for n in names}
    _done(
        _run(
            out, lambda: study_variants("scheduler", model, variants, prompts, out, seed=seed, device=device)
        ),
        "scheduler",
        out,
        Path(model).name,
    )


@study_app.command("models")
@user_errors
def models_cmd(
    models: Annotated[list[str], typer.Argument(help="two or more models")],
    prompts: Prompts = None,
    steps: Annotated[int | None, typer.Option(help="steps for every model (default: each model's)")] = None,
    out: Out = Path("runs/study"),
    seed: Seed = 0,
    device: Device = "auto",
):
    """Several models on the normalised axis: the cross-model correlation matrix beside within-model r."""
    from ..study import study_models

    if len(models) < 2:
        raise DitscopeError("the models study compares at least 2 models")
    if len(set(models)) < len(models):
        twice = next(m for m in models if list(models).count(m) > 1)
        raise DitscopeError(f"the models study names {twice} more than once; compare different models")
    _checked(list(models), prompts, [steps], out)
    _done(
        _run(out, lambda: study_models(list(models), prompts, out, steps=steps, seed=seed, device=device)),
        "models",
        out,
    )


def _ints(text: str, name: str) -> list[int]:
    items = [x.strip() for x in text.split(",")]
    try:
        values = [int(x) for x in items]
    except ValueError:
        raise DitscopeError(f"{name} must be comma-separated integers, not {text!r}") from None
    if len(set(values)) != len(values):
        raise DitscopeError(f"{name} {text!r} names a value twice; give each once")
    return values
