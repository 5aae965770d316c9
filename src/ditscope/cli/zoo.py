"""Commands around the zoo models: generate an image, evaluate a model, list and train the zoo."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import DitscopeError, EveryRankError
from ..files import write_text_atomic
from ..runtime import (
    check_steps,
    check_writable_dir,
    configure_scheduler,
    pick_device,
    progress_bar,
    torch_dtype,
)
from .common import app, user_errors

zoo_app = typer.Typer(help="The zoo: small models that run with no download.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


def load_model(model: str, device: str, dtype: str):
    """(pipeline, zoo entry or None) for a zoo name, local folder or hub id."""
    from .. import zoo

    dev = pick_device(device)
    return zoo.load_pipeline(model, dtype=torch_dtype(dtype, dev), device=dev), zoo.ZOO.get(model)


@app.command("eval")
@user_errors
def eval_cmd(
    model: Annotated[str, typer.Argument(help="zoo name or local pipeline folder")],
    n: Annotated[
        int,
        typer.Option(
            "--n",
            "--samples",
            help="number of generated images (--samples: the same, "
            "for torchrun, whose own options --n abbreviates)",
        ),
    ] = 256,
    steps: Annotated[int | None, typer.Option()] = None,
    guidance_scale: Annotated[float | None, typer.Option()] = None,
    objects: Annotated[int, typer.Option(help="objects per prompt: 1, or up to 2")] = 1,
    seed: Annotated[int, typer.Option(help="seed of the evaluation prompts and noise")] = 1000,
    random_init: Annotated[bool, typer.Option(help="evaluate the same architecture untrained")] = False,
    device: Annotated[str, typer.Option()] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the results as JSON")] = None,
    state_dir: Annotated[
        Path,
        typer.Option(
            help="where unfinished evaluations keep their samples; rerunning the same command continues one"
        ),
    ] = Path("runs/eval"),
):
    """Score a model's images against their prompts (attribute accuracy) and real renders (Fréchet)."""
    import contextlib
    import hashlib

    from rich.console import Console
    from rich.table import Table

    from ..bench import evaluation
    from ..zoo import evaluator
    from ..zoo.train import build

    if n < 2:
        raise DitscopeError("--n must be at least 2 (the Fréchet distance needs a covariance)")
    if objects not in (1, 2):
        raise DitscopeError("--objects must be 1 or 2")
    check_steps(steps)
    check_writable_dir(state_dir, "--state-dir")
    if json_out is not None:
        check_writable_dir(json_out.parent, "--json")
    net = evaluator.load_evaluator()
    from .. import zoo
    from ..profiling.job import join_ranks

    rank, world, device = join_ranks(pick_device(device))  # torchrun: the ranks share the samples
    if world > n:
        raise EveryRankError(
            f"{world} ranks share --n {n} samples: give at least one per rank, or launch fewer ranks"
        )
    manifest = (
        Path(model) / "manifest.json"
    )  # a trained folder names its recipe, whose steps and guidance it takes
    recipe = json.loads(manifest.read_text())["name"] if manifest.is_file() else model
    if random_init:
        pipe, entry = build(recipe), zoo.ZOO.get(recipe)
    else:
        pipe, entry = load_model(model, device, "float32")
        entry = entry or zoo.ZOO.get(recipe)
    pipe.set_progress_bar_config(disable=True)
    steps = steps or (entry.steps if entry else 20)
    configure_scheduler(pipe, None, steps)
    guidance = guidance_scale if guidance_scale is not None else (entry.guidance_scale if entry else 4.5)
    # one state file per (model, settings): the same command resumes, another one starts its own
    key = {"model": str(model), "random_init": random_init}
    digest = hashlib.sha1(repr((key, n, steps, guidance, seed, objects)).encode()).hexdigest()[:10]
    state_dir.mkdir(parents=True, exist_ok=True)
    state = state_dir / f"{Path(model).name}{'-random-init' if random_init else ''}-{digest}.pt"
    if evaluation.rank_state(state, pipe).is_file():
        print(f"resuming the evaluation kept in {evaluation.rank_state(state, pipe)}", file=sys.stderr)
    try:
        with progress_bar("samples") if rank == 0 else contextlib.nullcontext(None) as bar:
            task = bar.add_task(f"evaluating {model}", total=n) if bar is not None else None
            result = evaluation.evaluate(
                pipe,
                n=n,
                num_inference_steps=steps,
                guidance_scale=guidance,
                seed=seed,
                max_objects=objects,
                net=net,
                progress=(lambda k: bar.advance(task, k)) if bar is not None else None,
                state_path=state,
                state_key=key,
            )
    except KeyboardInterrupt:
        mine = evaluation.rank_state(state, pipe)
        kept = f"the samples made so far are kept in {mine}" if mine.is_file() else "no samples were kept yet"
        with contextlib.suppress(OSError):
            state_dir.rmdir()  # only if empty
        print(f"interrupted: {kept}; run the same command again to resume", file=sys.stderr)
        raise
    from ..profiling.workload import barrier

    barrier()  # every rank's state file is gone
    with contextlib.suppress(OSError):
        state_dir.rmdir()  # only if no other unfinished evaluation is kept there
    if rank > 0:  # the first rank reports and writes
        return
    table = Table(
        title=f"{model}{' (random init)' if random_init else ''}: {n} images, {steps} steps, guidance {guidance}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("chance", justify="right")
    for key, value in result.items():
        chance = evaluator.CHANCE.get(key)
        shown = f"{value:.1%}" if key not in ("frechet", "n") else f"{value:.3g}"
        table.add_row(key, shown, f"{chance:.1%}" if chance else "")
    Console().print(table)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(result, indent=2))


@zoo_app.command("list")
def zoo_list():
    """The zoo's models and whether their weights are here."""
    from .. import zoo

    for name, entry in zoo.ZOO.items():
        state = "ready" if zoo.available(name) else "not trained yet"
        print(f"{name:14s} {state:16s} {entry.description}")


@zoo_app.command("train")
@user_errors
def zoo_train(
    name: Annotated[str, typer.Argument(help="tiny-pixart, tiny-dit, tiny-mmdit, tiny-latte or evaluator")],
    out: Annotated[Path | None, typer.Option(help="folder to write (default: a runs/ folder)")] = None,
    minutes: Annotated[float | None, typer.Option(help="stop after this much training time")] = None,
    steps: Annotated[int, typer.Option(help="stop after this many optimizer steps")] = 100_000,
    batch: Annotated[int, typer.Option()] = 32,
    lr: Annotated[float, typer.Option()] = 1e-3,
    seed: Annotated[int, typer.Option()] = 0,
    lr_decay: Annotated[
        float, typer.Option(help="fraction of --steps at the end over which lr falls linearly to 0")
    ] = 0.0,
    init: Annotated[
        str | None,
        typer.Option(
            help="start from these weights: a zoo name or pipeline folder "
            "(tiny-latte: tiny-pixart by default)"
        ),
    ] = None,
):
    """Train a zoo model (resumes from OUT/train_state.pt if present)."""
    from ..zoo import evaluator, train

    out = out or Path("runs") / "zoo" / name
    check_writable_dir(out)
    if name == "evaluator":
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        net = evaluator.train_evaluator(steps=min(steps, 1500), seed=seed)
        save_file(net.state_dict(), str(out / "attribute_net.safetensors"))
        print(f"wrote {out / 'attribute_net.safetensors'}")
        return
    if name not in train.RECIPES:
        raise DitscopeError(
            f"no training recipe for {name!r}; choose {', '.join(train.RECIPES)} or evaluator"
        )
    train.train(
        name,
        out,
        steps=steps,
        minutes=minutes,
        batch=batch,
        lr=lr,
        seed=seed,
        ema_decay=0.995,
        lr_decay=lr_decay,
        init=init,
    )


@zoo_app.command("prompts")
@user_errors
def zoo_prompts(
    out: Annotated[Path, typer.Option(help=".txt file to write, a caption a line")],
    n: Annotated[int, typer.Option(help="number of captions")] = 32,
    objects: Annotated[int, typer.Option(help="objects per caption: 1, or up to 2")] = 1,
    seed: Annotated[int, typer.Option()] = 4000,
    video: Annotated[bool, typer.Option(help="captions of moving objects (for tiny-latte)")] = False,
):
    """Write captions drawn from the data generator (prompts for profiles and studies of the zoo models)."""
    from ..zoo import evaluator

    if n < 1 or objects not in (1, 2):
        raise DitscopeError("--n must be at least 1 and --objects 1 or 2")
    check_writable_dir(out.parent)
    if out.is_dir():
        raise DitscopeError(f"--out {out} is a folder; give a .txt file name")
    scenes = evaluator.evaluation_scenes(n, seed, objects, video=video)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(s.caption() + "\n" for s in scenes))
    print(f"wrote {n} captions to {out}")


@zoo_app.command("grid")
@user_errors
def zoo_grid(
    model: Annotated[str, typer.Argument(help="zoo name or local pipeline folder")],
    out: Annotated[Path, typer.Option(help="PNG file to write")],
    n: Annotated[int, typer.Option(help="number of prompts")] = 12,
    objects: Annotated[int, typer.Option(help="objects per prompt: 1, or up to 2")] = 1,
    seed: Annotated[int, typer.Option()] = 2000,
    random_init: Annotated[bool, typer.Option(help="the same architecture untrained")] = False,
):
    """A sample grid: each prompt's generated image beside the generator's real render of it."""
    import textwrap

    import numpy as np
    from matplotlib.figure import Figure

    from .. import zoo
    from ..profiling.workload import Workload
    from ..zoo import data, evaluator
    from ..zoo.train import build

    check_writable_dir(out.parent)
    pipe = build(model) if random_init else load_model(model, "cpu", "float32")[0]
    entry = zoo.ZOO.get(model)
    pipe.set_progress_bar_config(disable=True)
    scenes, prompts = evaluator.evaluation_prompts(pipe, n, seed, objects)
    class_cond, video = pipe.is_class_conditional, evaluator.is_video(pipe)
    work = Workload(prompts, entry.steps if entry else 20, (seed,), n, entry.guidance_scale if entry else 4.5)
    images = work.run(pipe).movedim(-3, -1).numpy()  # channels last, for imshow
    cols = 4
    rows = -(-n // cols)
    fig = Figure(figsize=(cols * (6.4 if video else 3.2), rows * 2.2), layout="constrained")
    axes = fig.subplots(rows, cols * 2, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        k, real = divmod(i, 2)
        if k >= n:
            continue
        if video:  # first, middle and last frame side by side
            frames = data.render_video(scenes[k]).transpose(0, 2, 3, 1) if real else images[k]
            img = np.concatenate([frames[0], frames[len(frames) // 2], frames[-1]], axis=1)
        else:
            img = data.render(scenes[k]).transpose(1, 2, 0) if real else images[k]
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
        text = data.class_name(prompts[k]) if class_cond else "\n".join(textwrap.wrap(prompts[k], 34))
        ax.set_title(("real" if real else "generated") + ("" if real else f"\n{text}"), fontsize=5)
    what = "generated | real render" + (" (frames: first, middle, last)" if video else "")
    fig.suptitle(f"{model}{' (random init)' if random_init else ''}: {what}", fontsize=9)
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")
