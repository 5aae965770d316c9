"""Peer caching systems, adapted to a diffusers pipeline so a benchmark can run them beside ditscope's own.

The peers are the caches other people ship, applied the way their users apply them:

- diffusers' own hooks (`diffusers.hooks`): Pyramid Attention Broadcast, First Block Cache, FasterCache,
  TaylorSeer and MagCache, through `transformer.enable_cache(config)` / `disable_cache()` (or, on
  transformers without diffusers' CacheMixin, such as PixArt's, `apply_*(transformer, config)` and the
  hook registry);
- cache-dit's DBCache, with and without its TaylorSeer calibrator, through `cache_dit.enable_cache` on a
  hand-written `BlockAdapter` (ditscope's `ShapesPipeline` is not a pipeline cache-dit knows) and
  `cache_dit.disable_cache`;
- SmoothCache (`dit-smoothcache`): a per component-type x step schedule calibrated on the calibration
  prompts (`smoothcache_peers.py`: the wheel lacks the calibration, the adapter does it as the paper
  describes), run by the package's own `SmoothCacheHelper`;
- T-GATE (`tgate`): cross-attention cached after a gate step, guidance dropped from there, self-attention
  refreshed on T-GATE's intervals, with the package's own attention forward and scheduler
  (`tgate_peers.py`).

Which system a method belongs to, its options, grid and knob are in one record, its `Peer` (registered by
its module in `PEERS`); the bench (`grid.methods()`), `tune` and the CLI read them there, never from the
method's name.

    remove = apply_peer("diffusers-fbcache", pipe, {"threshold": 0.1}, num_inference_steps=20,
                        run_once=lambda: pipe("a red circle", num_inference_steps=20))
    images = pipe(prompts, num_inference_steps=20, ...).images   # cached
    remove()                                                      # the pipeline is as before, bit for bit

What the adapter adds, and nothing else, is what the pipeline lacks for a peer to work:

- diffusers' stateful caches key their state on a *cache context* that diffusers' own pipelines open
  around every transformer call (`with transformer.cache_context("cond_uncond"):`). `ShapesPipeline`
  opens none, so while a diffusers peer is applied the transformer's `forward` is wrapped to open one
  (named "cond_uncond": guidance is batched into one call). The wrapper also records the call's
  `timestep` argument, which is what PAB's and FasterCache's `current_timestep_callback` return.
- diffusers pipelines reset the hooks' state after each call, but only on transformers that have
  diffusers' `CacheMixin`; PixArt, DiT and SD3 transformers do not (they have no `enable_cache` either,
  so their caches are applied with `apply_*` and removed through the hook registry, exactly as
  `CacheMixin` does). So while a diffusers peer is applied, `pipe.scheduler.set_timesteps` (the start of
  every denoising loop) first resets the hooks' state.
- MagCache needs magnitude ratios calibrated on the model: `apply_peer` runs `run_once()` under
  `MagCacheConfig(calibrate=True)`, reads the ratios MagCache prints, and applies MagCache with them
  (ratios are remembered per transformer, step count and scheduler, so a grid calibrates once).

Options are the libraries' own config fields with the libraries' defaults, except: TaylorSeer keeps its
Taylor factors in float32 (diffusers: bfloat16) and by default forecasts every block's attention and
feed-forward outputs (diffusers' default patterns match only modules named `attn`, none in PixArt);
DBCache computes Fn_compute_blocks=1 front block and warms up 4 steps (cache-dit: 8 and 8, for 28+-block
models at 28+ steps; the zoo models have 8 blocks and run 20 steps). `peer_options(name)` lists them.

Removal. Every diffusers peer is removed with `disable_cache` (its hooks, by name, through the hook
registry), the wrappers above are undone, and hook registries the peer created are deleted.
`cache_dit.disable_cache` restores the pipeline class's `__call__` and the transformer's behaviour, but
leaves the transformer with an instance-level `forward`, its block list moved to the end of `_modules`
(state_dict order; cache-dit swaps the blocks in with `mock.patch.object` on every call), and, for models
with a patch functor (DiT), the patched `forward` for good. So the adapter also snapshots the instance
attributes and submodule tables of the transformer and its blocks (and the pipeline class's `__call__`)
before applying and puts them back after `disable_cache`: the caller can keep using the same
pipeline, no fresh copy needed. The tests check outputs after `remove()` equal the uncached ones bit
for bit.

Caveats. cache-dit patches `type(pipe).__call__` (the class, not the instance): while a cache-dit peer
is applied, *every* `ShapesPipeline` in the process runs through its cache context, so apply it to one
pipeline at a time. Guidance must be batched into one transformer call (as ShapesPipeline and
PixArt/SD3 pipelines do); FasterCache additionally needs guidance on (`guidance_scale > 1`) unless it
is told `is_guidance_distilled=True`. If a call's timestep cannot be read, PAB's and FasterCache's
timestep windows match nothing (they then compute every step).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...cache.registry import Knob
from ...errors import DitscopeError


class PeerUnavailable(Exception):
    """A peer cannot run here: its package is missing, or it does not support this model.

    The message is one line, saying why (and what to install, where that is the reason)."""


@dataclass(frozen=True)
class Peer:
    """One peer cache as the bench runs it: everything about it in one record.

    Attributes:
        name: the bench's name for it (`diffusers-fbcache`, ...).
        system: whose it is: "diffusers", "cache-dit", "smoothcache" or "t-gate".
        summary: one line on what it caches.
        defaults: every option it takes, with its default (the library's own field names and defaults,
            deviations in the docstring above); options a user gives override these.
        grid: the bench's settings, near-lossless to aggressive.
        apply: (pipe, options, num_inference_steps, run_once) -> remove().
        nullable: options whose None means "off" although their default is not None.
        knob: the option `ditscope tune` fits (None: nothing to fit).
        package: the module it needs (checked before a model loads; missing -> `pip install ditscope[peers]`).
        calibrates: `apply` also takes `calibrate=`, a callable that runs the uncached pipeline over the
            calibration prompts (SmoothCache's schedule is fitted on them).
    """

    name: str
    system: str
    summary: str
    defaults: dict
    grid: list
    apply: Callable
    nullable: frozenset = frozenset()
    knob: Knob | None = None
    package: str = "diffusers"
    calibrates: bool = False


PEERS: dict[str, Peer] = {}
CONTEXT_NAME = "cond_uncond"  # ShapesPipeline batches [uncond, cond] into one transformer call


def register_peer(peer: Peer) -> Peer:
    PEERS[peer.name] = peer
    return peer


def apply_peer(name: str, pipe, options: dict, num_inference_steps: int,
               run_once: Callable[[], object], calibrate: Callable[[], object] | None = None) -> Callable[[], None]:
    """Apply peer `name` with `options` (override its defaults) to `pipe`. `run_once()` runs the pipeline once on
    a calibration prompt (MagCache uses it); `calibrate()` runs it, uncached, over all the calibration prompts
    (peers with `calibrates`, SmoothCache, fit on it; None: `run_once`; a `calibrate.key` naming what it runs
    lets them remember the fit across calls). Returns `remove()` that restores the
    pipeline exactly. Raises PeerUnavailable with a one-line reason when the peer's package is missing or it
    cannot run on this model.

    To find the latter before a benchmark does, `run_once()` is also called once with the peer applied (and
    MagCache's calibration calls it once more, the first time per transformer and step count); unknown or
    malformed options raise DitscopeError before anything is applied."""
    if name not in PEERS:
        raise DitscopeError(f"unknown peer {name!r}; available: {', '.join(PEERS)}")
    opts = _resolve_options(name, options)
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise DitscopeError(f"num_inference_steps must be a positive integer, not {num_inference_steps!r}")
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise PeerUnavailable(f"{name} needs a pipeline with a transformer; {type(pipe).__name__} has none")
    try:  # applying may itself run the model (MagCache calibrates), and fail on it
        extra = {"calibrate": calibrate or run_once} if PEERS[name].calibrates else {}
        remove = PEERS[name].apply(pipe, opts, num_inference_steps, run_once, **extra)
    except (DitscopeError, PeerUnavailable, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:
        raise PeerUnavailable(f"{name} does not run on {type(transformer).__name__}: {type(e).__name__}: {one_line(e)}") from None
    try:  # fail here, not an hour into a benchmark: some peers apply to a model they cannot run on
        run_once()
    except torch.cuda.OutOfMemoryError:
        remove()
        raise
    except Exception as e:
        remove()
        raise PeerUnavailable(f"{name} does not run on {type(transformer).__name__}: {type(e).__name__}: {one_line(e)}") from None
    return remove


def peer_of(name: str) -> Peer | None:
    """The peer registered as `name`, None for a method that is not a peer."""
    return PEERS.get(name)


def peer_options(name: str) -> dict:
    """The options `name` takes, with their defaults."""
    if name not in PEERS:
        raise DitscopeError(f"unknown peer {name!r}; available: {', '.join(PEERS)}")
    return copy.deepcopy(PEERS[name].defaults)


def _resolve_options(name: str, options: dict | None) -> dict:
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise DitscopeError(f"options for {name} must be a dict, not {type(options).__name__}")
    unknown = sorted(set(options) - set(PEERS[name].defaults))
    if unknown:
        raise DitscopeError(f"unknown option{'s' if len(unknown) > 1 else ''} for {name}: {', '.join(map(str, unknown))}; "
                            f"valid: {', '.join(PEERS[name].defaults)}")
    opts = {**copy.deepcopy(PEERS[name].defaults), **options}
    for key, value in options.items():
        default = PEERS[name].defaults[key]
        if isinstance(default, tuple) and isinstance(value, list):  # JSON gives lists for (lo, hi) pairs
            opts[key] = value = tuple(value)
        if not _fits(default, value, nullable=key in PEERS[name].nullable):
            raise DitscopeError(f"{name} option {key} must be {_kind(default)}, not {value!r}")
    return opts


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fits(default, value, nullable: bool) -> bool:
    if default is None or (value is None and nullable):
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return _is_number(value)
    if isinstance(default, tuple):
        return isinstance(value, tuple) and len(value) == len(default) and all(map(_is_number, value))
    if isinstance(default, str):
        return isinstance(value, (str, torch.dtype))
    return True


def _kind(default) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, tuple):
        return f"a pair of numbers like {list(default)}"
    return "a string"


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def config_error(name: str, e: Exception) -> DitscopeError:
    return DitscopeError(f"bad options for {name}: {one_line(e)}")


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR):
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(max(level, old))
    try:
        yield
    finally:
        logger.setLevel(old)


# each registers its peers; diffusers' first, the order the bench lists them in
# isort: off
from . import diffusers_peers  # noqa: E402,F401
from . import cachedit_peers  # noqa: E402,F401
from . import smoothcache_peers  # noqa: E402,F401
from . import tgate_peers  # noqa: E402,F401
# isort: on

# near-lossless to aggressive, chosen on tiny-pixart at 20 steps: each spans roughly 45 -> 25 dB against the
# uncached image and 0.85 -> 0.5 of the attention/feed-forward rows computed (per grid in its peer's file)
PEER_GRIDS: dict[str, list[dict]] = {name: [dict(o) for o in peer.grid] for name, peer in PEERS.items()}
