"""What every peer adapter shares: the `Peer` record, the registry `PEERS`, applying a peer, checking its
options (the package's docstring says what a peer is)."""

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


def apply_peer(
    name: str,
    pipe,
    options: dict,
    num_inference_steps: int,
    run_once: Callable[[], object],
    calibrate: Callable[[], object] | None = None,
) -> Callable[[], None]:
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
        raise PeerUnavailable(
            f"{name} does not run on {type(transformer).__name__}: {type(e).__name__}: {one_line(e)}"
        ) from None
    try:  # fail here, not an hour into a benchmark: some peers apply to a model they cannot run on
        run_once()
    except torch.cuda.OutOfMemoryError:
        remove()
        raise
    except Exception as e:
        remove()
        raise PeerUnavailable(
            f"{name} does not run on {type(transformer).__name__}: {type(e).__name__}: {one_line(e)}"
        ) from None
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
        raise DitscopeError(
            f"unknown option{'s' if len(unknown) > 1 else ''} for {name}: {', '.join(map(str, unknown))}; "
            f"valid: {', '.join(PEERS[name].defaults)}"
        )
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
