"""SmoothCache (Liu et al., 2024; pip package `dit-smoothcache`) as a peer: a per component-type x step
schedule of which steps reuse a component's previous output, calibrated on the model, run by the package's
own `SmoothCacheHelper`.

What the adapter adds, and nothing else:

- the calibration. The wheel ships SmoothCache's runtime but not the calibration helper of its repository,
  so the adapter calibrates as the paper describes. `calibrate()` runs the uncached pipeline over the
  calibration prompts (the bench's calibration prompts, BenchInputs.calibration; `tune`'s prompts) while
  forward hooks read the output y of every wrapped component (by default `attn1` self-attention, `attn2`
  cross-attention and `ff` feed-forward of every diffusers `BasicTransformerBlock`) at every step t, and
  record its relative L1 error against its output k steps earlier, |y_t - y_{t-k}|_1 / |y_t|_1 over the
  pipeline call's whole batched output, for k = 1..`lookahead`. The errors are averaged over the blocks
  and the pipeline calls, per component type, step t and lag k (`calibration()`). A component type is a
  component name in one block list (`transformer_blocks.attn1`): Latte's temporal attention is a type of
  its own, apart from its spatial attention.
- the schedule, from those errors by the paper's greedy rule (`schedule_from_errors`): a component computes
  step i; the longest lag k <= lookahead whose mean error between steps i and i+k is at most `alpha` makes
  steps i+1..i+k reuse the output of step i, and step i+k+1 is the next computed one; where no lag is
  under alpha, step i+1 computes. The first and the last step always compute. The errors are remembered
  per transformer, step count, scheduler and calibration run (the `key` the bench and `tune` give their
  `calibrate`), so a grid or `tune` scanning alpha calibrates once.
- glue for the runtime: one `SmoothCacheHelper` per block list, over a `ModuleList` of that list's blocks
  (its schedule keys are component names; Latte's temporal blocks have no `attn2`, which the helper would
  try to wrap). `SmoothCacheHelper` counts each component's calls and never resets between
  pipeline calls, so while the peer is on `scheduler.set_timesteps` (the start of every denoising loop)
  first resets its state; it prints on every wrapped call, so its module's `print` is silenced while on.

One transformer call per step is assumed (guidance batched, as ShapesPipeline and diffusers' PixArt
pipelines do): the calibration checks that each component ran a whole number of `num_inference_steps`
runs and refuses (PeerUnavailable) otherwise. Models without `BasicTransformerBlock` (SD3, Flux, Wan, ...)
raise PeerUnavailable.

Removal: `SmoothCacheHelper.disable()` sets each component's `forward` back as an instance attribute; the
adapter deletes those, so every module is as before, bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import math
import weakref
from collections.abc import Callable

import torch

from ...cache.registry import Knob
from ...errors import DitscopeError
from ...patching import Patches
from .base import Peer, PeerUnavailable, register_peer

_ABSENT = object()
COMPONENTS = "attn1,attn2,ff"  # self-attention, cross-attention, feed-forward: the paper's component types

# errors by transformer, then (steps, scheduler class, lookahead, components, calibration key)
_ERRORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lists(transformer, names: list[str]) -> dict[str, tuple[list, dict[str, list[torch.nn.Module]]]]:
    """{block list name: (its blocks, {component name: [that component of each block]})} for the diffusers
    `BasicTransformerBlock`s of `transformer`, with the named components every block of the list has (Latte's
    temporal blocks have no cross-attention)."""
    from diffusers.models.attention import BasicTransformerBlock

    blocks: dict[str, list[torch.nn.Module]] = {}
    for block_name, block in transformer.named_modules():
        if isinstance(block, BasicTransformerBlock):
            blocks.setdefault(block_name.rpartition(".")[0], []).append(block)
    found = {}
    for list_name, members in blocks.items():
        have = {n: [getattr(b, n, None) for b in members] for n in names}
        have = {n: ms for n, ms in have.items() if all(isinstance(m, torch.nn.Module) for m in ms)}
        if have:
            found[list_name] = (members, have)
    return found


def component_type(list_name: str, component: str) -> str:
    """The key of a component type: the block list and the component's name (`transformer_blocks.attn1`)."""
    return f"{list_name}.{component}" if list_name else component


def _output(y):
    return y[0] if isinstance(y, (tuple, list)) else y


def relative_l1(current: torch.Tensor, earlier: torch.Tensor) -> float:
    """|current - earlier|_1 / |current|_1 over the whole tensor."""
    current, earlier = current.double(), earlier.double()
    return float((current - earlier).abs().sum() / current.abs().sum().clamp_min(1e-30))


def calibration(
    transformer, run: Callable[[], object], steps: int, components: list[str], lookahead: int
) -> dict[str, list[list[float | None]]]:
    """Run `run()` (the uncached pipeline over the calibration prompts) and return, per component type
    (`component_type(list, name)`), errors[t][k - 1]: the relative L1 error of its output at step t against
    step t - k, averaged over the list's blocks and the pipeline calls (None where t < k)."""
    lists = _lists(transformer, components)
    if not lists:
        raise PeerUnavailable(_unsupported(transformer, components))
    kinds = [component_type(lst, c) for lst, (_, have) in lists.items() for c in have]
    sums = {k: [[0.0] * lookahead for _ in range(steps)] for k in kinds}
    counts = {k: [[0] * lookahead for _ in range(steps)] for k in kinds}
    calls: dict[int, int] = {}
    history: dict[int, list[torch.Tensor]] = {}  # per module, newest first, at most lookahead

    def hook_for(kind: str, key: int):
        calls[key], history[key] = 0, []

        def hook(module, args, output):
            y = _output(output).detach()
            t = calls[key] % steps
            calls[key] += 1
            if t == 0:
                history[key].clear()
            for k, earlier in enumerate(history[key], start=1):
                sums[kind][t][k - 1] += relative_l1(y, earlier)
                counts[kind][t][k - 1] += 1
            history[key] = [y.clone(), *history[key]][:lookahead]

        return hook

    handles = []
    for lst, (_, have) in lists.items():
        for c, modules in have.items():
            for m in modules:
                handles.append(m.register_forward_hook(hook_for(component_type(lst, c), len(handles))))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    odd = sorted({n for n in calls.values() if n == 0 or n % steps})
    if odd:
        raise PeerUnavailable(
            f"SmoothCache calibration: a component ran {odd[0]} times, not a multiple of "
            f"{steps} steps (one transformer call per step is needed: guidance batched)"
        )
    return {
        k: [
            [sums[k][t][j] / counts[k][t][j] if counts[k][t][j] else None for j in range(lookahead)]
            for t in range(steps)
        ]
        for k in kinds
    }


def _unsupported(transformer, components: list[str]) -> str:
    return (
        f"SmoothCache wraps {', '.join(components)} of diffusers BasicTransformerBlocks (DiT, PixArt, Latte); "
        f"{type(transformer).__name__} has none"
    )


def schedule_from_errors(errors: list[list[float | None]], alpha: float) -> list[int]:
    """The paper's greedy schedule of one component type: 1 computes, 0 reuses (see the module docstring)."""
    steps = len(errors)
    lookahead = len(errors[0]) if errors else 0
    schedule = [1] * steps
    i = 0
    while i < steps:
        for k in range(lookahead, 0, -1):  # the longest reuse first
            if i + k < steps and errors[i + k][k - 1] is not None and errors[i + k][k - 1] <= alpha:
                for s in range(i + 1, i + k + 1):
                    schedule[s] = 0
                i += k + 1
                break
        else:
            i += 1
    if steps:
        schedule[0] = schedule[-1] = 1
    return schedule


def _calibrated_errors(pipe, steps: int, components: list[str], lookahead: int, calibrate) -> dict:
    """The calibration's errors, remembered when `calibrate` carries a `key` (what it runs: the bench and
    `tune` set one), so that a grid or a search over alpha calibrates once."""
    key = getattr(calibrate, "key", None)
    if key is None:
        return calibration(pipe.transformer, calibrate, steps, components, lookahead)
    key = (steps, type(getattr(pipe, "scheduler", None)).__name__, lookahead, tuple(components), key)
    cached = _ERRORS.get(pipe.transformer, {}).get(key)
    if cached is None:
        cached = calibration(pipe.transformer, calibrate, steps, components, lookahead)
        _ERRORS.setdefault(pipe.transformer, {})[key] = cached
    return cached


def _quiet(*args, **kwargs):
    return None


def _apply_smoothcache(pipe, opts, steps, run_once, calibrate):
    try:
        from diffusers.models.attention import BasicTransformerBlock

        with contextlib.redirect_stdout(io.StringIO()):  # warnings about the helpers it cannot import
            from SmoothCache import smooth_cache_helper
    except ImportError:
        raise PeerUnavailable("dit-smoothcache is not installed: pip install ditscope[peers]") from None
    components = [c.strip() for c in opts["components"].split(",") if c.strip()]
    if not components:
        raise DitscopeError("smoothcache components must name at least one component, e.g. attn1,attn2,ff")
    if not isinstance(opts["lookahead"], int) or opts["lookahead"] < 1:
        raise DitscopeError(f"smoothcache lookahead must be a positive integer, not {opts['lookahead']!r}")
    if not math.isfinite(opts["alpha"]) or opts["alpha"] < 0:
        raise DitscopeError(f"smoothcache alpha must be a number >= 0, not {opts['alpha']!r}")
    transformer = pipe.transformer
    lists = _lists(transformer, components)
    if not lists:
        raise PeerUnavailable(_unsupported(transformer, components))
    errors = _calibrated_errors(pipe, steps, components, opts["lookahead"], calibrate)
    schedule = {kind: schedule_from_errors(e, opts["alpha"]) for kind, e in errors.items()}
    own = {id(m): vars(m).get("forward") for m in transformer.modules()}
    # one helper per block list (its schedule keys are component names only: Latte's spatial and temporal
    # attention get their own schedules), each over a ModuleList of that list's blocks
    helpers = [
        smooth_cache_helper.SmoothCacheHelper(
            model=torch.nn.ModuleList(blocks),
            block_classes=BasicTransformerBlock,
            components_to_wrap=list(have),
            schedule={c: schedule[component_type(lst, c)] for c in have},
        )
        for lst, (blocks, have) in lists.items()
    ]
    patches = Patches()
    own_print = vars(smooth_cache_helper).get("print", _ABSENT)
    smooth_cache_helper.print = _quiet  # the runtime prints on every wrapped call

    def set_timesteps_wrapper(inner):
        def set_timesteps(*args, **kwargs):
            for helper in helpers:
                helper.reset_state()
            return inner(*args, **kwargs)

        return set_timesteps

    def cleanup():
        try:
            for helper in helpers:
                helper.disable()
        finally:
            for m in (
                transformer.modules()
            ):  # disable() leaves the original bound forward as an instance attribute
                if "forward" in vars(m) and own.get(id(m)) is None:
                    del m.forward
            patches.restore()
            if own_print is _ABSENT:
                vars(smooth_cache_helper).pop("print", None)
            else:
                smooth_cache_helper.print = own_print

    try:
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is not None and hasattr(scheduler, "set_timesteps"):
            patches.wrap(scheduler, "set_timesteps", set_timesteps_wrapper)
        for helper in helpers:
            helper.enable()
    except Exception:
        cleanup()
        raise
    removed = False

    def remove() -> None:
        nonlocal removed
        if removed:
            return
        removed = True
        cleanup()

    remove.schedule = schedule  # what runs, for whoever inspects it
    return remove


register_peer(
    Peer(
        "smoothcache",
        "smoothcache",
        "SmoothCache: per component type (attention, cross-attention, feed-forward) x step reuse, calibrated greedily "
        "under an error threshold alpha",
        defaults={"alpha": 0.15, "lookahead": 3, "components": COMPONENTS},
        grid=[{"alpha": 0.08}, {"alpha": 0.15}, {"alpha": 0.3}],  # tiny-pixart, 20 steps: 38 / 33 / 28 dB
        apply=_apply_smoothcache,
        knob=Knob("alpha", 0.01, 1.0, log=True),
        package="SmoothCache",
        calibrates=True,
    )
)
