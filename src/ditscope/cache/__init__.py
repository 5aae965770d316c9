"""Cache methods for diffusion transformers, all on one mechanism (`engine.py`: `CacheHandle`).

    handle = ditscope.apply(pipe, ditscope.ToCaConfig(interval=3, ratio=0.3))
    image = pipe(prompt, num_inference_steps=20).images[0]
    print(handle.stats())
    handle.remove()

Module-level: ToCa (token-wise), FORA, PAB, TaylorSeer, DuCa. Block-level: Delta-DiT, FBCache, TeaCache.
"""

from __future__ import annotations

from ..errors import DitscopeError, closest

# Import order is registration order: the order in which the CLI and the bench list the methods.
# isort: off
from .toca import ToCaConfig
from .duca import DuCaConfig
from .fora import FORAConfig
from .pab import PABConfig
from .taylorseer import TaylorSeerConfig
from .delta_dit import DeltaDiTConfig
from .fbcache import FBCacheConfig
from .teacache import TeaCacheConfig
from .plan import PlanConfig
from .schedule import schedule_of
from .schedule_data import Schedule

# isort: on
from .engine import CacheHandle
from .registry import REGISTRY, ConfigsByName, Registered, check_fields, for_config, register

CONFIGS = ConfigsByName()  # name -> config class, live: a method registered later appears here too


def apply(
    pipe_or_transformer,
    config,
    num_inference_steps: int | None = None,
    count_flops: bool = False,
    layout=None,
) -> CacheHandle:
    """Apply a cache method to a diffusers pipeline (or its transformer). Returns a `CacheHandle`:
    `handle.stats()`, `handle.remove()`, or use it as a context manager.

    `num_inference_steps` is needed only for a bare transformer (a pipeline tells it through its
    scheduler; a plan knows its own). `count_flops=True` counts executed FLOPs with
    torch.utils.flop_counter (slower). `layout`: a `ditscope.Blocks` declaring the blocks of a model the
    family table does not know (any PyTorch DiT; see the README's "Any PyTorch DiT").
    """
    entry = for_config(config)
    if entry is None or isinstance(config, type):
        known = ", ".join(e.config.__name__ for e in REGISTRY.values())
        raise DitscopeError(
            f"{getattr(config, '__name__', type(config).__name__)} is not a cache config; use one of {known}"
        )
    return CacheHandle(pipe_or_transformer, entry.method(config), num_inference_steps, count_flops, layout)


def config_from_options(name: str, options: list[str] | None = None):
    """A config from a method name and `key=value` strings (the CLI's --cache / --cache-opt)."""
    import dataclasses
    import json

    cls = CONFIGS.get(name.lower())
    if cls is None:
        raise DitscopeError(
            f"unknown cache method {name!r}{closest(name.lower(), CONFIGS)} (methods: {', '.join(CONFIGS)})"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    preset = None
    for item in options or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise DitscopeError(f"cache option {item!r} is not key=value")
        if key == "preset":
            preset = raw.strip()
            continue
        if key not in fields:
            raise DitscopeError(
                f"{cls.__name__} has no option {key!r}{closest(key, fields)} (options: {', '.join(fields)})"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, list):
            value = tuple(value)
        default = _default(fields[key])
        ok = (
            (isinstance(value, (int, float)) and not isinstance(value, bool))
            if isinstance(default, float)
            else (
                isinstance(value, type(default))
                and not (isinstance(value, bool) and not isinstance(default, bool))
            )
        )
        if default is not None and not ok:
            raise DitscopeError(f"{name} option {key} expects a {type(default).__name__}, not {raw!r}")
        values[key] = float(value) if isinstance(default, float) else value
    if preset is not None:
        factory = getattr(cls, preset, None)
        if not callable(factory) or preset.startswith("_"):
            raise DitscopeError(f"{cls.__name__} has no preset {preset!r}")
        config = factory(**values)
    else:
        config = cls(**values)
    check_fields(config)
    REGISTRY[name.lower()].method(config).check()  # option ranges (and a plan's file), before a model loads
    return config


def option_strings(opts: dict) -> list[str]:
    """Options as the CLI's key=value strings (what `config_from_options` parses)."""
    import json

    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in opts.items()]


def _default(f):
    import dataclasses

    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


__all__ = [
    "CONFIGS",
    "REGISTRY",
    "CacheHandle",
    "DeltaDiTConfig",
    "DuCaConfig",
    "FBCacheConfig",
    "FORAConfig",
    "PABConfig",
    "PlanConfig",
    "Registered",
    "Schedule",
    "TaylorSeerConfig",
    "TeaCacheConfig",
    "ToCaConfig",
    "apply",
    "config_from_options",
    "option_strings",
    "register",
    "schedule_of",
]
