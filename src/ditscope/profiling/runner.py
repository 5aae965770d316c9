"""`ditscope.profile(pipe, prompts, ...)`: run a diffusers pipeline over prompts and record a Profile.

Each prompt gets its own generator seeded with `seed + prompt index`, so a prompt's numbers do not
depend on which shard, batch or resumed run computed it. With `state_path`, the partial profile is
saved atomically after every batch and a rerun with the same arguments continues where it stopped.
Under torch.distributed each rank takes prompts `i % world == rank`, and rank 0 returns the merge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch

from ..artifact import RUN_FIELDS, Profile, sha256_of
from ..capture.recorder import DEFAULT_TARGETS, Recorder
from ..errors import DitscopeError
from ..families import family_of
from ..holds import hold
from ..patching import Patches
from ..version import __version__
from .prompts import pipeline_prompt_kwargs
from .workload import Workload, data_parallel, share


def config_dict(config) -> dict:
    """A diffusers config without its private bookkeeping (`_use_default_values` is built from a set,
    so its order changes from process to process)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def run_metadata(
    pipe, prompts, *, model_id, num_inference_steps, seed, guidance_scale, batch_size, targets, storage_dtype
) -> dict:
    transformer = pipe.transformer
    scheduler_config = config_dict(pipe.scheduler.config)
    return {
        "model": model_id or getattr(pipe, "name_or_path", None) or type(transformer).__name__,
        "transformer": type(transformer).__name__,
        "pipeline": type(pipe).__name__,
        "family": family_of(transformer).name,
        "model_config_hash": sha256_of(config_dict(transformer.config)),
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": scheduler_config,
        "scheduler_config_hash": sha256_of(scheduler_config),
        "num_inference_steps": int(num_inference_steps),
        "dtype": str(transformer.dtype).removeprefix("torch."),
        "seed": int(seed),
        "prompts_hash": sha256_of(list(prompts)),
        "n_prompts_total": len(prompts),
        "guidance_scale": guidance_scale,
        "batch_size": int(batch_size),
        "targets": list(targets),
        "storage_dtype": str(storage_dtype).removeprefix("torch.") if storage_dtype else None,
        "ditscope_version": __version__,
    }


def dist_shard() -> tuple[int, int] | None:
    """(rank, world) when running under an initialised torch.distributed group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


def load_state(state_path, meta: dict, shard: str) -> Profile | None:
    """A saved partial run, after checking it was made with the same arguments."""
    if state_path is None or not Path(state_path).exists():
        return None
    try:
        state = Profile.load(state_path)
    except DitscopeError as e:
        raise DitscopeError(
            f"the saved state of an interrupted run is unusable ({e}); delete {state_path} to start over"
        ) from None
    differs = [k for k in RUN_FIELDS if state.meta.get(k) != meta.get(k)]
    if state.meta.get("shard") != shard:
        differs.append("shard")
    if differs:
        raise DitscopeError(
            f"{state_path} was made with different arguments (differs in: {', '.join(differs)}); "
            "rerun with the original arguments, or use a new --out"
        )
    return state


@contextlib.contextmanager
def _steps_end_at_scheduler(scheduler, rec: Recorder):
    """Mark the end of each denoising step where every diffusers pipeline marks it: scheduler.step."""

    def ending_the_step(original):
        def step(model_output, timestep, *args, **kwargs):
            rec.end_step(timestep)
            return original(model_output, timestep, *args, **kwargs)

        return step

    with Patches() as patches:
        patches.wrap(scheduler, "step", ending_the_step)
        yield


def profile(
    pipe,
    prompts: Sequence[str],
    num_inference_steps: int = 20,
    seed: int = 0,
    guidance_scale: float | None = None,
    batch_size: int = 1,
    targets: Sequence[str] = DEFAULT_TARGETS,
    storage_dtype: torch.dtype | None = None,
    offload: bool = False,
    attention=None,
    state_path=None,
    shard: tuple[int, int] | None = None,
    progress=None,
    model_id: str | None = None,
    call_kwargs: dict | None = None,
    outputs=None,
    on_resume=None,
) -> Profile:
    """Profile step-to-step redundancy of `pipe.transformer` over `prompts`.

    Args:
        pipe: a diffusers pipeline with a `.transformer`.
        prompts: text prompts (class labels or names for DiT).
        num_inference_steps, seed, guidance_scale: sampling settings (guidance: pipeline default if None).
        batch_size: prompts per pipeline call.
        targets: which tensors to record, from ("q", "k", "v", "a", "out").
        storage_dtype, offload: how the previous step's tensors are kept (see `Recorder`).
        attention: which modules are attention layers (default: every module with a `.processor`).
        state_path: save the partial profile here after each batch, and resume from it.
        shard: (i, n) to profile prompts i, i+n, ...; default: the torch.distributed rank, or all.
        progress: a rich Progress to advance per step, or None.
        model_id: recorded in the metadata (default: the pipeline's name_or_path).
        call_kwargs: extra keyword arguments for every pipeline call.
        outputs: output-only sites too (target "out"): "mlp", "blocks", "mlp,blocks" (from the family
            table) or module patterns as for `attention`; see `Recorder`.
        on_resume: called as on_resume(done, total) when a saved state is resumed (prompts of this shard).
    """
    if num_inference_steps < 2:
        raise DitscopeError(
            f"--steps must be at least 2 to measure step-to-step distances (got {num_inference_steps})"
        )
    if not prompts:
        raise DitscopeError("no prompts given")
    if batch_size < 1:
        raise DitscopeError(f"--batch-size must be at least 1 (got {batch_size})")
    if not hasattr(pipe, "transformer") or pipe.transformer is None:
        raise DitscopeError(
            f"{type(pipe).__name__} has no transformer; ditscope profiles diffusion transformers"
        )
    dist = (
        dist_shard() if data_parallel(pipe)[1] > 1 else None
    )  # a model split over the ranks runs every prompt
    shard = shard or dist or (0, 1)
    shard_name = f"{shard[0]}/{shard[1]}"
    meta = run_metadata(
        pipe,
        prompts,
        model_id=model_id,
        num_inference_steps=num_inference_steps,
        seed=seed,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        targets=targets,
        storage_dtype=storage_dtype,
    )
    meta["shard"] = shard_name
    if isinstance(outputs, str) and set(outputs.replace(" ", "").split(",")) <= {"mlp", "blocks"}:
        from ..capture.recorder import output_sites

        outputs = output_sites(pipe.transformer, outputs)
    if outputs:
        meta["outputs"] = [outputs] if isinstance(outputs, str) else list(outputs)
    done = load_state(state_path, meta, shard_name)
    todo = share(len(prompts), *shard)
    if done is not None:
        finished = set(done.prompt_index.tolist())
        if on_resume is not None:
            on_resume(sum(i in finished for i in todo), len(todo))
        todo = [i for i in todo if i not in finished]
    task = (
        progress.add_task("profiling", total=len(todo) * num_inference_steps)
        if progress is not None
        else None
    )

    family = family_of(pipe.transformer)
    rec = Recorder(
        pipe.transformer,
        attention=attention,
        targets=targets,
        storage_dtype=storage_dtype,
        offload=offload,
        step_on="external",
        batched_branches=getattr(pipe, "cfg_batched_branches", family.cfg_batched),
        separate_branches=family.cfg_separate,
        outputs=outputs,
        on_step=(lambda _: progress.advance(task)) if progress is not None else None,
    )
    if done is not None:
        rec.number_layers(done.layer_names)  # keep layer numbering identical across resumes
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    work = Workload(
        prompts,
        num_inference_steps,
        (seed,),
        batch_size,
        guidance_scale,
        dict(call_kwargs or {}),
        pipeline_prompt_kwargs,
    )
    parts = [done]  # the profile so far

    def record(batch, _):
        part = Profile.from_sample(rec.next_sample(), rec.layer_names, batch, meta)
        result = part if parts[0] is None else parts[0].merge(part)
        result.meta = dict(meta)
        parts[0] = result
        if state_path is not None:
            result.save(state_path)
            hold("profile state saved")

    with torch.inference_mode(), rec, _steps_end_at_scheduler(pipe.scheduler, rec):
        work.run(
            pipe,
            items=todo,
            output_type="latent",
            after_batch=record,
            before_batch=lambda batch: setattr(rec, "prompts_per_sample", len(batch)),
        )
    result = parts[0]
    if result is None:
        raise DitscopeError(
            f"shard {shard_name} has no prompts (only {len(prompts)} prompts for {shard[1]} shards)"
        )
    result.meta.update({"timesteps": result.timesteps, "n_prompts": result.n_prompts})
    if dist is not None and shard == dist:
        result = _gather_to_rank0(result)
    elif shard[1] == 1:
        result.meta.pop("shard", None)  # a whole run; only partial profiles carry a shard label
    return result


def _gather_to_rank0(part: Profile) -> Profile:
    """Rank 0 receives every rank's profile and merges them; other ranks keep their own."""
    rank, world = dist_shard()
    parts = [None] * world if rank == 0 else None
    torch.distributed.gather_object(part, parts, dst=0)
    if rank != 0:
        return part
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    merged.meta["n_prompts"] = merged.n_prompts
    merged.meta.pop("shard", None)
    return merged
