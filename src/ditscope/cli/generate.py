"""`ditscope generate`: one image (or video) from a prompt, with or without a cache method."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..cache import CONFIGS
from ..errors import DitscopeError
from ..runtime import check_guidance, check_steps, check_writable_dir, configure_scheduler
from .common import app, library_warnings, user_errors
from .zoo import load_model


@app.command(context_settings={"allow_extra_args": True})
@user_errors
def generate(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="zoo name, local diffusers folder or hub id")],
    prompt: Annotated[str, typer.Option(help="text prompt (tiny-dit: a class index or '<colour> <shape>')")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="image file to write (.png, .jpg, .gif, .webp; default "
            "MODEL.png, or MODEL.gif for a video model)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the model's)")] = None,
    guidance_scale: Annotated[
        float | None, typer.Option(help="guidance scale (default: the model's)")
    ] = None,
    upscale: Annotated[int, typer.Option(help="nearest-neighbour enlargement of the saved image")] = 1,
    device: Annotated[str, typer.Option()] = "auto",
    dtype: Annotated[str, typer.Option()] = "auto",
    cache: Annotated[
        str | None,
        typer.Option(
            help=f"cache method ({', '.join(CONFIGS)}) or a config written by ditscope tune (FILE.json)"
        ),
    ] = None,
    cache_opt: Annotated[
        list[str] | None, typer.Option(help="cache option key=value (repeatable; preset=dit picks a preset)")
    ] = None,
    cache_stats: Annotated[bool, typer.Option(help="print what the cache did per step, with FLOPs")] = False,
    compare: Annotated[
        bool,
        typer.Option(
            help="also run uncached with the same seed (first, after a 2-step warm-up), "
            "save it as OUT.uncached.png and print both times, the speedup, and the "
            "cached image's PSNR / SSIM against it (--cache-stats slows the cached "
            "run: it counts FLOPs)"
        ),
    ] = False,
):
    """Generate one image from a prompt, optionally with a cache method."""
    import torch

    from ..profiling.workload import samples

    if out is not None and out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".gif", ".webp"):
        raise DitscopeError(f"--out {out}: use an image file name (.png, .jpg, .gif, .webp)")
    if upscale < 1:
        raise DitscopeError("--upscale must be at least 1")
    check_steps(steps)
    check_guidance(guidance_scale)
    check_writable_dir(out.parent if out is not None else Path("."))
    # `--cache-opt interval=3 ratio=0.3`: the values after the first arrive as extra arguments
    extra = list(ctx.args)
    if any("=" not in a for a in extra):
        raise DitscopeError(f"unexpected argument(s): {' '.join(a for a in extra if '=' not in a)}")
    cache_opt = list(cache_opt or []) + extra
    given = [o.partition("=")[0].strip().replace("-", "_") for o in cache_opt if "=" in o]
    twice = sorted({k for k in given if given.count(k) > 1})
    if twice:
        raise DitscopeError(f"--cache-opt {twice[0]} is given more than once; give each option once")
    config, tuned = None, None
    if cache is not None:
        from ..cache import config_from_options

        options = split_cache_opts(cache_opt)
        if cache.lower().endswith(".json"):  # a fitted config from `ditscope tune`; --cache-opt overrides it
            from ..bench.grid import option_strings
            from ..bench.tune import Tuned

            tuned = Tuned.load(cache)
            tuned.config()  # a peer's config is refused here, with what to do instead
            cache = tuned.method
            options = option_strings(tuned.options) + options  # not split again: a list's JSON holds spaces
        config = config_from_options(cache, options)
    elif cache_opt:
        raise DitscopeError("--cache-opt needs --cache METHOD")
    if compare and config is None:
        raise DitscopeError("--compare needs --cache METHOD: it compares a cached run with the uncached one")
    pipe, entry = load_model(model, device, dtype)
    tuned_steps = None
    if tuned is not None:
        tuned.config(pipe)  # refused on a model other than the one it was tuned on
        tuned_steps = tuned.meta.get("num_inference_steps")
    # a tuned knob holds its target at the step count it was fitted at: that is the default, and another warns
    steps = steps or tuned_steps or (entry.steps if entry else 20)
    if tuned_steps and steps != tuned_steps:
        print(
            f"warning: {tuned.method} was tuned at {tuned_steps} steps and runs at {steps}: its fitted setting "
            f"may miss its target there; tune again with --steps {steps}",
            file=sys.stderr,
        )
    configure_scheduler(pipe, None, steps)
    handle = None
    guidance = guidance_scale if guidance_scale is not None else (entry.guidance_scale if entry else 4.5)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(entry.call_kwargs) if entry else {}

    def run(n: int = steps):
        return samples(
            pipe(
                prompt,
                num_inference_steps=n,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed),
                output_type="pil",
                **kwargs,
            )
        )[0]

    with library_warnings():
        if compare:  # the uncached run first, same seed: the image and time the cached run is held against
            from ..bench.compare import uncached_run
            from ..profiling.workload import timed

            reference, uncached_seconds = uncached_run(run, steps)
        if config is not None:
            from ..cache import apply

            handle = apply(pipe, config, count_flops=cache_stats)
        image, seconds = timed(run) if compare else (run(), None)
    if handle is not None:
        stats = handle.stats()
        handle.remove()
        if cache_stats:
            print(stats)
        else:
            s = stats.summary()
            print(
                f"{cache}: {s['computed']} modules computed, {s['reused'] + s['predicted']} reused or predicted, "
                f"{s['partial']} partial, {s['blocks_reused']} blocks reused"
            )
    out = out or Path(f"{Path(model).name}.{'gif' if isinstance(image, list) else 'png'}")
    save_image(image, out, upscale)
    print(f"wrote {out}")
    if compare:
        from ..bench.compare import compare as held_against

        uncached_out = out.with_name(f"{out.stem}.uncached{out.suffix}")
        save_image(reference, uncached_out, upscale)
        print(f"wrote {uncached_out}")
        print(held_against(cache, image, seconds, reference, uncached_seconds).line())


def save_image(image, out: Path, upscale: int = 1) -> None:
    """An image, or video frames as an animated image, enlarged `upscale` times (nearest neighbour)."""
    if isinstance(image, list):  # video frames -> animated image
        frames = [f.resize((f.width * upscale, f.height * upscale), 0) for f in image]
        out.parent.mkdir(parents=True, exist_ok=True)
        frames[0].save(out, save_all=True, append_images=frames[1:], duration=150, loop=0)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        image.resize((image.width * upscale, image.height * upscale), 0).save(out)


def split_cache_opts(options: list[str] | None) -> list[str]:
    """`--cache-opt "interval=3 ratio=0.3"` and repeated `--cache-opt k=v` both work."""
    return [part for opt in options or [] for part in opt.split()]
