"""`ditscope recommend`: which cache to use for a quality target, fitted and scored on held-out prompts."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from textwrap import shorten
from typing import Annotated

import typer

from ..errors import DitscopeError
from ..runtime import check_steps, check_writable_dir, progress_bar
from .common import app, user_errors
from .plan import CALIBRATION_SEED, calibration_run

TEST_SEED = (
    3000  # zoo models: held-out prompts, drawn apart from the calibration ones (as the bench draws them)
)


@app.command()
@user_errors
def recommend(
    model: Annotated[str, typer.Argument(help="zoo name, local diffusers folder or hub id")] = "tiny-pixart",
    target: Annotated[
        str,
        typer.Option(
            help="quality to keep, psnr=DB or ssim=S against the uncached images at the "
            "full step count; it holds when the lower end of the 95% interval of the "
            "mean over the held-out prompts reaches it. Default psnr=35: what the "
            "tuned knobs and plans in benchmarks/RESULTS.md were fitted for"
        ),
    ] = "psnr=35",
    budget: Annotated[
        str,
        typer.Option(
            help="time box, e.g. 10m, 90s, 1h: candidates are tried in order while it "
            "lasts; the rest are named (a rerun of the same command continues)"
        ),
    ] = "10m",
    candidates: Annotated[
        str,
        typer.Option(
            help="comma list, tried in this order: steps (the uncached model at "
            "fewer steps), plan, and methods whose knob tune fits"
        ),
    ] = "steps,fora,plan,teacache,fbcache,toca",
    n_prompts: Annotated[int, typer.Option(help="calibration prompts (zoo: drawn with --prompt-seed)")] = 8,
    test_prompts: Annotated[
        int, typer.Option(help="held-out prompts the candidates are scored on (zoo: drawn with --test-seed)")
    ] = 16,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="non-zoo models: a prompt file (.txt, .jsonl, .csv); the first "
            "--n-prompts calibrate, the next --test-prompts are held out"
        ),
    ] = None,
    prompt_seed: Annotated[
        int, typer.Option(help="zoo models: seed of the calibration prompts")
    ] = CALIBRATION_SEED,
    test_seed: Annotated[int, typer.Option(help="zoo models: seed of the held-out prompts")] = TEST_SEED,
    steps: Annotated[
        int | None, typer.Option(help="denoising steps of the uncached reference (default: the model's)")
    ] = None,
    guidance_scale: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per pipeline call")] = 8,
    out: Annotated[
        Path,
        typer.Option(
            help="folder for the winning config (MODEL.plan.json or MODEL.METHOD.json), "
            "MODEL.recommend.json (table and per-prompt values) and the work folder"
        ),
    ] = Path("recommend"),
    device: Annotated[str, typer.Option()] = "auto",
    dtype: Annotated[str, typer.Option()] = "auto",
):
    """Which cache to use: fit each candidate to a quality target on calibration prompts, score it on held-out
    prompts against the uncached model, print a ranked table and the fastest setting that holds."""
    import torch

    from ..bench.recommend import (
        check_candidates,
        check_target,
        parse_budget,
        recommend,
        work_key,
        write_result,
    )

    started = time.monotonic()
    goal = check_target(target)
    seconds = parse_budget(budget)
    names = check_candidates(candidates)
    if n_prompts < 1 or test_prompts < 1 or batch_size < 1:
        raise DitscopeError("--n-prompts, --test-prompts and --batch-size must be at least 1")
    check_steps(steps, least=2)
    if prompts is None and prompt_seed == test_seed:
        raise DitscopeError(
            "--test-seed must differ from --prompt-seed: candidates are scored on prompts they were "
            "not fitted on"
        )
    check_writable_dir(out)
    test_list = None
    if prompts is not None:  # checked before the model loads
        from ..profiling.prompts import load_prompts

        every = load_prompts(prompts)
        if len(every) < n_prompts + test_prompts:
            raise DitscopeError(
                f"{prompts} holds {len(every)} prompts; --n-prompts {n_prompts} and --test-prompts "
                f"{test_prompts} need {n_prompts + test_prompts}"
            )
        test_list = every[n_prompts : n_prompts + test_prompts]
    result_file = out / f"{Path(model).name}.recommend.json"
    pipe, calibration, n_steps, guidance = calibration_run(
        model,
        result_file,
        "model.recommend.json",
        prompts,
        n_prompts,
        prompt_seed,
        steps,
        guidance_scale,
        device,
        dtype,
        distributed=False,
    )
    if test_list is None:
        from ..zoo import evaluator

        test_list = evaluator.evaluation_prompts(pipe, test_prompts, seed=test_seed)[1]
    key = work_key(
        model=model,
        target=str(goal),
        steps=n_steps,
        guidance=guidance,
        batch_size=batch_size,
        calibration=[str(p) for p in calibration],
        test=[str(p) for p in test_list],
        candidates=names,
        dtype=str(getattr(pipe, "dtype", dtype)),
    )
    work = out / f".{Path(model).name}.{key}.work"
    resumed = work.exists()
    print(
        f"recommend {model}: {goal} on {len(test_list)} held-out prompts"
        f"{f' (seed {test_seed})' if prompts is None else ''}, fitted on {len(calibration)} calibration prompts"
        f"{f' (seed {prompt_seed})' if prompts is None else ''}, {n_steps} steps, time box {budget}"
        f"{'; continuing ' + str(work) if resumed else ''}",
        file=sys.stderr,
    )

    with progress_bar("parts") as bar, torch.inference_mode():
        task = bar.add_task("recommend", total=len(names) + 1)
        try:
            rec = recommend(
                pipe,
                calibration,
                test_list,
                str(goal),
                n_steps,
                candidates=names,
                budget=seconds,
                batch_size=batch_size,
                guidance_scale=guidance,
                work_dir=work,
                started=started,
                progress=lambda text: bar.update(
                    task, description=shorten(f"recommend: {text}", 70, placeholder=" ...")
                ),
                advance=lambda done, total: bar.update(task, completed=done),
            )
        except KeyboardInterrupt:
            kept = len(list((work / "candidates").glob("*.json"))) if work.exists() else 0
            print(
                f"interrupted: {kept} of {len(names)} candidates are kept in {work}; run the same command again "
                "to resume",
                file=sys.stderr,
            )
            raise
    line, result, _ = write_result(
        rec,
        out,
        model,
        steps_flag=steps is not None,
        extra={
            "calibration": {
                "prompts": [str(p) for p in calibration],
                "seed": prompt_seed if prompts is None else None,
            },
            "test": {"prompts": [str(p) for p in test_list], "seed": test_seed if prompts is None else None},
        },
    )
    print(
        f"{model}: {goal} held when the lower end of the 95% interval of the mean over {rec.n_test} held-out "
        f"prompts reaches it; speedup = executed FLOPs against the uncached model at {n_steps} steps"
    )
    for text in rec.table():
        print(text)
    if rec.skipped:
        print(
            f"not finished in the time box ({budget}): {', '.join(rec.skipped)}; run the same command again to try "
            f"them (the finished candidates are kept in {work})"
        )
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {result}")
    print(line)
