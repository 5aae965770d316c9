"""Every cache method on a tiny model under diffusers' context parallelism (Ulysses over the ranks, gloo) and
in one process on the same rank, on inputs whose two sequence halves change by different amounts (each rank
sees its own signal). Each rank writes OUT.rank<R>.json: per method, the largest difference to the
one-process output, the cache's per-step decisions and its notes. Started by tests/test_parallel.py:
`python -m torch.distributed.run --standalone --nproc-per-node 2 tests/cp_worker.py OUT flux [ulysses|ring]
[cache|profile]` (profile: the recorder's distances instead, one process's and the split model's)."""

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402

import ditscope  # noqa: E402
from ditscope.cache import REGISTRY  # noqa: E402

STEPS = 8
# thresholds at which one process skips on some steps and not on others (per family: the signals differ)
ACTIVE = {
    "flux": {"fbcache": {"threshold": 0.6}, "teacache": {"threshold": 1.0}},
    "wan": {"fbcache": {"threshold": 0.2}, "teacache": {"threshold": 1.0}},
}


def uneven(inputs: dict, step: int) -> dict:
    """The second half of the image tokens (video: the lower half of every frame) moves 6x more per step."""
    x = inputs["hidden_states"].clone()
    if step:
        g = torch.Generator().manual_seed(500 + step)
        part = (
            (slice(None), slice(x.shape[1] // 2, None))
            if x.dim() == 3
            else (..., slice(x.shape[-2] // 2, None), slice(None))
        )
        x[part] += 0.3 * step * torch.randn(x[part].shape, generator=g)
    return {**inputs, "hidden_states": x}


def run(model, config, inputs_of):
    outs = []
    with ditscope.apply(model, config, num_inference_steps=STEPS) as handle:
        for step in range(STEPS):
            with torch.no_grad():
                outs.append(model(**uneven(inputs_of(2, step), step), return_dict=False)[0])
    stats = handle.stats()
    decisions = [
        {k: r[k] for k in ("computed", "reused", "partial", "predicted", "blocks_computed", "blocks_reused")}
        for r in stats.records
    ]
    return (
        torch.stack(outs),
        decisions,
        {"notes": dict(stats.notes), "tokens": sum(r["tokens_total"] for r in stats.records)},
    )


def attention_with_lse(
    ctx,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    _save_ctx=True,
    _parallel_config=None,
):
    """diffusers' native attention op, able to give the log-sum-exp that ring attention merges its partial
    results with (on a GPU flash attention gives it; a CPU has no kernel that does). Layout (batch, seq, heads)."""
    q, k = (x.permute(0, 2, 1, 3).double() for x in (query, key))
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores = (
            scores.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else scores + attn_mask
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        *(x.permute(0, 2, 1, 3) for x in (query, key, value)), attn_mask=attn_mask, scale=scale
    ).permute(0, 2, 1, 3)
    return (out, torch.logsumexp(scores, -1).permute(0, 2, 1).to(query.dtype)) if return_lse else out


def profiled(model, inputs_of) -> dict:
    """Every step-to-step distance the recorder measures over STEPS steps (q, k, v, attention output, and
    the attention modules' and blocks' outputs), by (layer, target, stream, branch)."""
    from ditscope.capture.recorder import Recorder, output_sites

    with Recorder(model, targets=("q", "k", "v", "a", "out"), outputs=output_sites(model, "blocks")) as rec:
        for step in range(STEPS):
            with torch.no_grad():
                model(**uneven(inputs_of(2, step), step), return_dict=False)
    sample = rec.next_sample()
    return {f"{rec.layer_names[k[0]]}/{k[1]}/{k[2]}/{k[3]}": v.tolist() for k, v in sample.values.items()}


def calibrated(model, inputs_of) -> dict:
    """What a plan's calibration measures of every unit (errors of serving it from earlier steps, by prompt row
    and step), over STEPS steps."""
    from ditscope.cache.engine import CacheHandle
    from ditscope.cache.observe import Calibrator

    observer = Calibrator(max_lag=3, forecast_lag=2)
    handle = CacheHandle(model, observer, num_inference_steps=STEPS)
    try:
        for step in range(STEPS):
            with torch.no_grad():
                model(**uneven(inputs_of(2, step), step), return_dict=False)
    finally:
        handle.remove()
    errors = {
        "/".join(key): [[p, s, v] for (p, s), v in sorted(values.items())]
        for key, values in observer.errors.items()
    }
    grams = {  # the fitted forecast's sums (sums of products of two tensors, added over the ranks too)
        f"{unit}/gram@{k}": [[p, s, *v.tolist()] for (p, s), v in sorted(values.items())]
        for (unit, k), values in observer.gram.items()
    }
    return {**errors, **grams}


def main(out: str, family: str, split_by: str = "ulysses", what: str = "cache"):
    torch.accelerator.device_count = lambda: 1  # diffusers takes the rank modulo it; a CPU has no accelerator
    if split_by == "ring":
        from diffusers.models import attention_dispatch

        attention_dispatch._native_attention_forward_op = attention_with_lse
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    from diffusers import ContextParallelConfig

    build, inputs_of = getattr(tiny, f"build_{family}"), getattr(tiny, f"inputs_{family}")
    plain, split = build(), build()
    split.enable_parallelism(config=ContextParallelConfig(**{f"{split_by}_degree": dist.get_world_size()}))
    if (
        what == "profile"
    ):  # the recorder's and the calibration's measures: one process's, and the ranks' added up
        results = {
            "one": profiled(plain, inputs_of),
            "split": profiled(split, inputs_of),
            "calibration_one": calibrated(plain, inputs_of),
            "calibration_split": calibrated(split, inputs_of),
        }
        ringed = build()
        ringed.enable_parallelism(config=ContextParallelConfig(ring_degree=dist.get_world_size()))
        try:
            profiled(ringed, inputs_of)
        except ditscope.DitscopeError as e:
            results["ring"] = str(e)
        with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
            json.dump(results, f)
        dist.barrier()
        dist.destroy_process_group()
        return
    with torch.no_grad():
        uncached = torch.stack(
            [plain(**uneven(inputs_of(2, s), s), return_dict=False)[0] for s in range(STEPS)]
        )
    results = {}
    for name, entry in REGISTRY.items():
        if (
            name == "plan"
        ):  # a plan is a schedule: tested by the plan tests (the same on every rank by construction)
            continue
        config = entry.config(**ACTIVE[family].get(name, {}))
        one, one_decisions, one_extra = run(plain, config, inputs_of)
        many, decisions, extra = run(split, config, inputs_of)
        results[name] = {
            "max_diff": float((one - many).abs().max()),
            "cached_vs_uncached": float((one - uncached).abs().max()),
            "decisions": decisions,
            "one_process_decisions": one_decisions,
            "notes": extra["notes"],
            "tokens": extra["tokens"],
            "one_process_tokens": one_extra["tokens"],
        }
        print(f"rank {dist.get_rank()} {name}: max diff {results[name]['max_diff']:.2e}", flush=True)
    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(results, f)
    dist.barrier()  # no rank tears its group down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
