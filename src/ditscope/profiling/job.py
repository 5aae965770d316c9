"""A whole profiling job from names and paths: what `ditscope profile` runs and the studies reuse.

Checks every argument before anything is loaded or written, resolves the model, joins a torchrun group
when launched by torchrun, resumes from the saved state, and removes what it created if it fails on
bad input. `ditscope.profile(pipe, ...)` (runner.py) is the in-memory core it drives.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path

from ..artifact import RUN_FIELDS, Profile
from ..capture.recorder import TARGETS
from ..errors import DitscopeError
from ..runtime import (
    check_writable_dir,
    configure_scheduler,
    parse_scheduler,
    parse_shard,
    pick_device,
    torch_dtype,
)
from .prompts import load_prompts
from .runner import profile as run_profile
from .runner import run_metadata
from .workload import share


def profile_model(
    model: str | None = None,
    prompts: Path | None = None,
    column: str | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    seed: int = 0,
    out: Path | None = None,
    batch_size: int = 1,
    dtype: str = "auto",
    device: str = "auto",
    guidance_scale: float | None = None,
    targets: str = "k,v,a",
    storage_dtype: str | None = None,
    offload: bool = False,
    shard: str | None = None,
    progress=None,
    outputs: str | None = None,
) -> tuple[Profile | None, Path | None]:
    """Profile `model` (a zoo name, local diffusers folder or hub id; default the zoo's default) over
    `prompts` (a prompt file; default the built-in prompts) and save it under `out`.

    Returns (profile, the file it was saved to); (None, None) on torchrun ranks other than 0. A finished
    profile of the same arguments is returned without computing anything. `progress` is a rich Progress
    advanced per step (or a callable returning a context manager that yields one; None: silent)."""
    from .. import zoo

    model = model or zoo.DEFAULT_MODEL
    zoo.check_model(model)
    entry = zoo.ZOO.get(model)
    steps = steps if steps is not None else (entry.steps if entry else 20)
    guidance_scale = (
        guidance_scale if guidance_scale is not None else (entry.guidance_scale if entry else None)
    )
    if steps < 2:
        raise DitscopeError(f"--steps must be at least 2 to measure step-to-step distances (got {steps})")
    if batch_size < 1:
        raise DitscopeError(f"--batch-size must be at least 1 (got {batch_size})")
    if scheduler:
        parse_scheduler(scheduler)  # the name and option keys, before anything loads
    shard_arg = parse_shard(shard)
    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    if not target_list or any(t not in TARGETS for t in target_list):
        raise DitscopeError(f"--targets {targets!r}: choose a comma list from {','.join(TARGETS)}")
    prompt_list = load_prompts(prompts, column) if prompts is not None else zoo.builtin_prompts()
    if shard_arg is not None and shard_arg[0] >= len(prompt_list):
        raise DitscopeError(
            f"--shard {shard}: shard {shard_arg[0]} has no prompts (only {len(prompt_list)} prompts); "
            f"use at most {len(prompt_list)} shards"
        )
    out = out or Path("runs") / Path(model).name.replace("/", "_")
    check_writable_dir(out)
    dev = pick_device(device)
    dt = torch_dtype(dtype, dev)
    store_dt = torch_dtype(storage_dtype, dev) if storage_dtype else None

    rank, world, dev = join_ranks(dev)
    if world > 1 and shard_arg is not None:
        raise DitscopeError("--shard and torchrun both split the prompts; use one of them")
    pipe = zoo.load_pipeline(model, dtype=dt, device=dev)
    configure_scheduler(pipe, scheduler, steps)

    final = out / "profile.ditscope"
    part = shard_arg or ((rank, world) if world > 1 else None)
    state = out / (f"profile.shard{part[0]}of{part[1]}.partial" if part else "profile.ditscope.partial")
    created_dir = not out.exists()
    created_state = not state.exists()
    if final.exists() and part is None:
        done = Profile.load(final)
        meta = run_metadata(
            pipe,
            prompt_list,
            model_id=model,
            num_inference_steps=steps,
            seed=seed,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
            targets=target_list,
            storage_dtype=store_dt,
        )
        differs = [k for k in RUN_FIELDS if done.meta.get(k) != meta.get(k)]
        if differs:
            raise DitscopeError(
                f"{final} holds a finished profile of different arguments (differs in: "
                f"{', '.join(differs)}); use another --out"
            )
        if rank == 0:
            print(f"{final} is already complete; nothing to compute", file=sys.stderr)
        return (done, final) if rank == 0 else (None, None)
    mine = share(len(prompt_list), *part) if part else range(len(prompt_list))

    def resuming(done: int, total: int):
        if rank == 0:
            print(f"resuming {state}: {done} of {total} prompts already profiled", file=sys.stderr)

    try:
        out.mkdir(parents=True, exist_ok=True)
        with progress() if progress is not None and rank == 0 else nullcontext() as bar:
            result = run_profile(
                pipe,
                prompt_list,
                num_inference_steps=steps,
                seed=seed,
                guidance_scale=guidance_scale,
                batch_size=batch_size,
                targets=target_list,
                storage_dtype=store_dt,
                offload=offload,
                state_path=state,
                shard=shard_arg,
                progress=bar,
                model_id=model,
                call_kwargs=entry.call_kwargs if entry else None,
                outputs=outputs,
                on_resume=resuming,
            )
    except DitscopeError:
        if created_dir:
            shutil.rmtree(out, ignore_errors=True)
        elif created_state:
            state.unlink(missing_ok=True)
        raise
    except KeyboardInterrupt:  # Ctrl-C: say what was kept and how to go on
        if state.exists():
            print(
                f"interrupted: {_saved_prompts(state)} of {len(mine)} prompts are saved in {state}; run the same "
                "command again to resume",
                file=sys.stderr,
            )
        else:
            if created_dir:
                shutil.rmtree(out, ignore_errors=True)
            print("interrupted before the first prompts were saved; nothing was kept", file=sys.stderr)
        raise
    if world > 1:
        import torch.distributed as dist

        if rank == 0:
            result.save(final)
            print(f"wrote {final}")
        dist.barrier()
        state.unlink(missing_ok=True)
        dist.destroy_process_group()
        return (result, final) if rank == 0 else (None, None)
    target_file = final if part is None else out / f"profile.shard{part[0]}of{part[1]}.ditscope"
    result.save(target_file)
    print(f"wrote {target_file}")
    state.unlink(missing_ok=True)
    return result, target_file


def _saved_prompts(state: Path) -> int:
    """How many prompts a saved partial profile holds (an unreadable one is reported by the run itself)."""
    try:
        return Profile.load(state).n_prompts
    except DitscopeError:
        return 0


def join_ranks(device: str) -> tuple[int, int, str]:
    """Join the torchrun group if launched by torchrun: (rank, world size, this rank's device: its own GPU,
    cuda:LOCAL_RANK, when `device` is a GPU)."""
    rank, world = init_distributed(device)
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    return rank, world, device


def init_distributed(device: str) -> tuple[int, int]:
    """Join the torchrun group if launched by torchrun (gloo on CPU, nccl on GPU): (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()
