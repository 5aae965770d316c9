"""T-GATE (Liu et al., 2024; pip package `tgate`) as a peer: cross-attention is computed until a gate step,
then its output, averaged over the guidance branches, is reused for every later step and guidance is
dropped; self-attention is cached and reused on T-GATE's intervals (every `sp_interval` steps after
`warm_up` before the gate, every `fi_interval` steps after it).

The package ships T-GATE as replacement pipeline methods for diffusers' PixArt-alpha/Sigma, SD and SDXL
pipelines (`TgatePixArtAlphaLoader(pipe).tgate(...)`), built on two functions it exports: `tgate_scheduler`
(which attention to cache or reuse at a step) and `register_forward` (puts its attention forward, with
those flags, on every `Attention` module). The adapter calls those two on the pipeline's transformer, so
any pipeline that batches guidance into one transformer call runs T-GATE. What it adds, and nothing else,
is what the package's pipeline loop does around them:

- per transformer call (one per denoising step, counted from `scheduler.set_timesteps`, the start of every
  denoising loop), `tgate_scheduler(step, ...)` and `register_forward(transformer, "Attention", ...)`;
- from the gate step on, guidance off, as T-GATE's pipelines do: the transformer runs on the unconditional
  half of the batch only and its output is returned for both halves, so the pipeline's guidance
  `uncond + s * (cond - uncond)` gives that output unchanged. Guidance is detected at the first call of a
  loop: an even batch whose two halves of latents are identical ([uncond, cond], as ShapesPipeline and
  diffusers' PixArt pipelines batch it). Without guidance the batch is kept whole and the gate step's
  cache keeps its shape (the package's `lcm` path).

Runs where the package's attention forward computes what the model's own does: `Attention` modules with
diffusers' `AttnProcessor2_0` (or `AttnProcessor`), no QK norm, and cross-attention in the model (PixArt,
Latte). DiT (no cross-attention: class-conditional) and SD3 (joint attention) raise PeerUnavailable.

Removal: every `Attention` module's instance `forward` and `cache` are deleted (or put back where they
were before) and the transformer's and scheduler's wrappers undone: the pipeline is as before, bit for bit.
"""

from __future__ import annotations

import contextlib
import io

import torch

from ...cache.registry import Knob
from ...errors import DitscopeError
from ...patching import Patches
from .base import Peer, PeerUnavailable, quiet_logger, register_peer

_ABSENT = object()
_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")  # what tgate_processor re-implements


def _attention_modules(transformer) -> list[torch.nn.Module]:
    return [m for m in transformer.modules() if type(m).__name__ == "Attention"]  # tgate's filter_name


def _unsupported(transformer) -> str | None:
    model = type(transformer).__name__
    modules = _attention_modules(transformer)
    if not modules:
        return f"T-GATE replaces diffusers Attention modules; {model} has none"
    other = sorted({type(getattr(m, "processor", None)).__name__ for m in modules} - set(_PROCESSORS))
    if other:
        return f"T-GATE's attention forward re-implements AttnProcessor2_0; {model} uses {other[0]}"
    if any(getattr(m, "norm_q", None) is not None or getattr(m, "norm_k", None) is not None for m in modules):
        return f"T-GATE's attention forward has no QK norm, which {model} uses"
    if not any(getattr(m, "is_cross_attention", False) for m in modules):
        return f"T-GATE caches cross-attention; {model} has none (class-conditional)"
    return None


def _halve(value, n: int):
    """The first half (the unconditional branch) of every tensor of batch n in `value`."""
    if torch.is_tensor(value) and value.dim() and value.shape[0] == n:
        return value[: n // 2]
    if isinstance(value, dict):
        return {k: _halve(v, n) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and value and all(torch.is_tensor(v) for v in value):
        return type(value)(_halve(v, n) for v in value)
    return value


def _double(out):
    """The output for both guidance branches: the unconditional one, twice."""
    if torch.is_tensor(out):
        return torch.cat([out, out])
    if isinstance(out, tuple):
        return (_double(out[0]), *out[1:])
    if hasattr(out, "sample"):
        out.sample = torch.cat([out.sample, out.sample])
        return out
    raise TypeError(f"cannot read the transformer's output ({type(out).__name__})")


def _apply_tgate(pipe, opts, steps, run_once):
    try:
        with contextlib.redirect_stdout(io.StringIO()), quiet_logger("transformers"):
            from tgate.tgate_utils import register_forward, tgate_scheduler
    except ImportError:
        raise PeerUnavailable("tgate is not installed: pip install ditscope[peers]") from None
    for key in ("gate_step", "sp_interval", "fi_interval"):
        if opts[key] < 1:
            raise DitscopeError(f"tgate {key} must be at least 1, not {opts[key]}")
    if opts["warm_up"] < 0:
        raise DitscopeError(f"tgate warm_up must be 0 or more, not {opts['warm_up']}")
    transformer = pipe.transformer
    reason = _unsupported(transformer)
    if reason:
        raise PeerUnavailable(reason)
    modules = _attention_modules(transformer)
    own = [(m, {k: vars(m).get(k, _ABSENT) for k in ("forward", "cache")}) for m in modules]
    state = {"step": 0, "cfg": None}
    patches = Patches()

    def reset():
        state.update(step=0, cfg=None)
        for m in modules:  # a cache from the previous image is never reused
            vars(m).pop("cache", None)

    def hidden(args, kwargs):
        return args[0] if args else kwargs.get("hidden_states")

    def forward_wrapper(inner):
        def forward(*args, **kwargs):
            x = hidden(args, kwargs)
            if state["cfg"] is None:  # the loop's first call: is guidance batched into it?
                n = x.shape[0] if torch.is_tensor(x) and x.dim() else 1
                state["cfg"] = n % 2 == 0 and torch.equal(x[: n // 2], x[n // 2 :])
            step = state["step"]
            state["step"] += 1
            ca, sa, keep_shape = tgate_scheduler(
                cur_step=step,
                gate_step=opts["gate_step"],
                sp_interval=opts["sp_interval"],
                fi_interval=opts["fi_interval"],
                warm_up=opts["warm_up"],
            )
            register_forward(
                transformer,
                "Attention",
                ca_kward=ca,
                sa_kward=sa,
                keep_shape=keep_shape if state["cfg"] else True,
            )
            if state["cfg"] and step >= opts["gate_step"]:  # guidance dropped: the uncond branch alone
                n = x.shape[0]
                return _double(inner(*_halve(args, n), **_halve(kwargs, n)))
            return inner(*args, **kwargs)

        return forward

    def set_timesteps_wrapper(inner):
        def set_timesteps(*args, **kwargs):
            reset()
            return inner(*args, **kwargs)

        return set_timesteps

    patches.wrap(transformer, "forward", forward_wrapper)
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None and hasattr(scheduler, "set_timesteps"):
        patches.wrap(scheduler, "set_timesteps", set_timesteps_wrapper)
    reset()
    removed = False

    def remove() -> None:
        nonlocal removed
        if removed:
            return
        removed = True
        patches.restore()
        for m, saved in own:
            for key, value in saved.items():
                if value is _ABSENT:
                    vars(m).pop(key, None)
                else:
                    vars(m)[key] = value

    return remove


register_peer(
    Peer(
        "tgate",
        "t-gate",
        "T-GATE: cross-attention cached after a gate step (guidance dropped there), self-attention cached on intervals",
        # the package's defaults (gate_step=10 of its 25 PixArt steps)
        defaults={"gate_step": 10, "sp_interval": 5, "fi_interval": 1, "warm_up": 2},
        grid=[
            {"gate_step": 14},
            {"gate_step": 10},
            {"gate_step": 6},
        ],  # tiny-pixart, 20 steps: 32 / 30 / 28 dB
        apply=_apply_tgate,
        knob=Knob("gate_step", 16, 2, integer=True),
        package="tgate",
    )
)
