"""`ditscope tune`: fit a cache method's knob (threshold, ratio, interval) so that a target holds."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import DitscopeError
from ..files import missing_folders, remove_empty
from ..profiling.workload import barrier, writes
from ..runtime import check_steps
from .common import app, user_errors
from .generate import split_cache_opts
from .plan import CALIBRATION_SEED, calibration_run, kept_work, say_resuming, seed_of_prompts


@app.command()
@user_errors
def tune(
    model: Annotated[str, typer.Argument(help="zoo name, local diffusers folder or hub id")] = "tiny-pixart",
    method: Annotated[
        str,
        typer.Option(
            help="a ditscope method (fbcache, teacache, toca, fora...) or a peer "
            "(diffusers-magcache, cachedit-dbcache...)"
        ),
    ] = "fbcache",
    target: Annotated[
        str,
        typer.Option(
            help="psnr=DB or ssim=S (on the calibration prompts), psnr_p5=DB (their "
            "worst images: the 5th percentile; with --assurance lower its 95% lower bound, the worst "
            "image below 59 prompts), or speedup=X"
        ),
    ] = "psnr=35",
    knob: Annotated[str | None, typer.Option(help="the option to fit (default: the method's knob)")] = None,
    cache_opt: Annotated[
        list[str] | None, typer.Option(help="options held fixed, key=value (repeatable)")
    ] = None,
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
    assurance: Annotated[
        str,
        typer.Option(help="lower: the 95% interval's lower end must reach a quality target; mean: the mean"),
    ] = "lower",
    out: Annotated[Path | None, typer.Option(help="fitted config (default tuned/MODEL.METHOD.json)")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    dtype: Annotated[str, typer.Option()] = "auto",
):
    """Fit METHOD's knob on calibration prompts so the target holds; writes a config generate --cache takes."""
    import torch

    from ..bench.tune import check_request
    from ..bench.tune import tune as fit
    from ..planning.planner import Target

    goal = Target.parse(target)
    if goal.kind == "flops":
        raise DitscopeError("--target flops= is for ditscope plan; tune psnr=, ssim= or speedup=")
    if (n_prompts is not None and n_prompts < 1) or batch_size < 1:
        raise DitscopeError("--n-prompts and --batch-size must be at least 1")
    check_steps(steps)
    if steps is not None and steps < 2:
        raise DitscopeError("--steps must be at least 2")
    if assurance not in ("lower", "mean"):
        raise DitscopeError(f"--assurance must be lower or mean, not {assurance!r}")
    fixed = {}
    for item in split_cache_opts(cache_opt):
        key, sep, raw = item.partition("=")
        if not sep:
            raise DitscopeError(f"--cache-opt {item!r} is not key=value")
        try:
            fixed[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            fixed[key.replace("-", "_")] = raw
    # an unknown method, preset or option, a bad option value, or a method without a knob fails before the model loads
    check_request(method, fixed, knob)
    _check_peer(method)
    out = out or Path("tuned") / f"{Path(model).name}.{method}.json"
    prompt_seed = seed_of_prompts(prompts, prompt_seed)
    pipe, prompt_list, n_steps, guidance = calibration_run(
        model, out, "model.method.json", prompts, n_prompts, prompt_seed, steps, guidance_scale, device, dtype
    )
    made = missing_folders(out.parent)  # removed again if the run is refused
    work = out.parent / f".{out.name}.work"  # reference images and evaluations: a rerun resumes from them
    from rich.console import Console

    console = Console(stderr=True)
    say_resuming(work)
    with torch.inference_mode():
        try:
            result = fit(
                pipe,
                method,
                prompt_list,
                str(goal),
                n_steps,
                batch_size=batch_size,
                guidance_scale=guidance,
                options=fixed,
                knob=knob,
                assurance=assurance,
                work_dir=work,
                progress=lambda text: (
                    writes() and console.print(f"tune: {text}", highlight=False, soft_wrap=True)
                ),
            )
        except (
            DitscopeError
        ):  # a target it cannot reach: nothing is left (an interrupt keeps the work to resume)
            barrier()
            if writes():
                shutil.rmtree(work, ignore_errors=True)
                remove_empty(made)
            raise
        except KeyboardInterrupt:
            if writes():
                print(
                    f"interrupted: {kept_work(work)} kept in {work}; rerun the same command to resume",
                    file=sys.stderr,
                )
            raise
    result.meta["model"] = model
    result.meta["calibration"]["prompt_seed"] = prompt_seed if prompts is None else None
    barrier()  # under torchrun every rank fitted the same; the first writes
    if not writes():
        return
    result.save(out)
    shutil.rmtree(work, ignore_errors=True)
    m = result.meta
    print(f"wrote {out}")
    print(
        f"  {m['knob']} = {m['value']:.4g}   PSNR {m['quality']['psnr']:.2f} dB (95% lower {m['quality']['psnr_lo']:.2f}), "
        f"SSIM {m['quality']['ssim']:.3f}, measured {m['measured_speedup']:.2f}x on the calibration prompts"
    )
    if "teacache_fit" in m:
        print(
            f"  teacache polynomial R^2 {m['teacache_fit']['r2']:.3f} over {m['teacache_fit']['points']} step pairs"
        )


def _check_peer(method: str) -> None:
    """A peer whose package is missing fails now, not after the model has loaded."""
    import importlib.util

    from ..bench.peers import PEERS

    peer = PEERS.get(method)
    if peer is not None and importlib.util.find_spec(peer.package) is None:
        raise DitscopeError(f"{method} needs the {peer.package} package: pip install 'ditscope[peers]'")
