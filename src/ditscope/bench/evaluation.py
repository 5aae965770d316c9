"""`ditscope eval`: a zoo model's samples scored against their prompts and real renders (zoo/evaluator.py scores;
the samples come from the one workload, profiling/workload.py, shared over the ranks of a torchrun launch)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..files import atomic_path
from ..holds import hold
from ..zoo.evaluator import AttributeNet, evaluation_prompts, frechet_to_real, load_evaluator, score


def evaluate(
    pipe,
    n: int = 256,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    seed: int = 1000,
    max_objects: int = 1,
    batch: int = 32,
    net: AttributeNet | None = None,
    progress=None,
    state_path: Path | None = None,
    state_key: dict | None = None,
) -> dict:
    """Generate n images (or videos) from generator prompts; score them against the prompts and real renders.

    `progress(x)` is called after every denoising step with the share of a sample it finished (a batch
    of k samples over s steps: k / s per step), so it adds up to n. With `state_path`, the samples made so far
    are saved there after every batch and a rerun continues from them (the result equals an unbroken
    run: every sample has its own seeded generator); `state_key` (e.g. the model's name) must match
    too. The state file is removed once the evaluation is complete."""
    from ..profiling.workload import Workload, data_parallel, gather, share

    net = net or load_evaluator()
    scenes, prompts = evaluation_prompts(pipe, n, seed, max_objects)
    rank, world = data_parallel(pipe)  # under torchrun each rank makes its share (and keeps its own state)
    mine = share(n, rank, world)
    key = {
        "n": n,
        "steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "max_objects": max_objects,
        **(state_key or {}),
    }
    if world > 1:
        key["share"] = f"{rank}/{world}"
    state_path = rank_state(state_path, pipe)
    images = _resume(state_path, key)
    done = sum(len(x) for x in images)
    if progress is not None and done:
        progress(done)

    def saved(batch, got):
        images.append(got)
        if state_path is not None:
            with atomic_path(state_path) as tmp:
                torch.save({"key": key, "images": images}, tmp)
            hold("eval state saved")

    work = Workload(prompts, num_inference_steps, (seed,), batch, guidance_scale)
    work.run(
        pipe,
        items=mine[done:],
        after_batch=saved,
        on_step=(lambda b: progress(len(b) / num_inference_steps)) if progress is not None else None,
    )
    generated = torch.cat([part for rank_images in gather(images, world) for part in rank_images])
    result = score(net, generated, scenes, pipe.is_class_conditional)
    result["frechet"] = frechet_to_real(net, generated, scenes)
    result["n"] = n
    if state_path is not None:
        state_path.unlink(missing_ok=True)
    return result


def rank_state(state_path: Path | None, pipe) -> Path | None:
    """The state file this process keeps: `state_path`, or under torchrun one file per rank (each keeps its
    own share of the samples)."""
    from ..profiling.workload import data_parallel

    rank, world = data_parallel(pipe)
    if state_path is None or world == 1:
        return state_path
    return state_path.with_name(f"{state_path.stem}.rank{rank}of{world}{state_path.suffix}")


def _resume(state_path: Path | None, key: dict) -> list[torch.Tensor]:
    from ..errors import DitscopeError

    if state_path is None or not state_path.is_file():
        return []
    try:
        state = torch.load(state_path, weights_only=True)
    except Exception:  # a truncated file cannot happen (atomic replace), but a foreign one can
        raise DitscopeError(f"{state_path} is not an evaluation state; delete it to start over") from None
    if state.get("key") != key:
        diff = ", ".join(
            f"{k}: saved {state.get('key', {}).get(k)!r}, now {v!r}"
            for k, v in key.items()
            if state.get("key", {}).get(k) != v
        )
        raise DitscopeError(
            f"{state_path} holds an evaluation with other settings ({diff}); "
            "rerun with those settings or delete it to start over"
        )
    return list(state["images"])
