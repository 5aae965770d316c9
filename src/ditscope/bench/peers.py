"""Peer caching systems, adapted to a diffusers pipeline so a benchmark can run them beside ditscope's own.

The peers are the caches other people ship, applied the way their users apply them:

- diffusers' own hooks (`diffusers.hooks`): Pyramid Attention Broadcast, First Block Cache, FasterCache,
  TaylorSeer and MagCache, through `transformer.enable_cache(config)` / `disable_cache()` (or, on
  transformers without diffusers' CacheMixin, such as PixArt's, `apply_*(transformer, config)` and the
  hook registry);
- cache-dit's DBCache, with and without its TaylorSeer calibrator, through `cache_dit.enable_cache` on a
  hand-written `BlockAdapter` (ditscope's `ShapesPipeline` is not a pipeline cache-dit knows) and
  `cache_dit.disable_cache`.

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

import ast
import contextlib
import copy
import inspect
import io
import logging
import math
import sys
import weakref
from collections.abc import Callable

import torch

from ..errors import DitscopeError


class PeerUnavailable(Exception):
    """A peer cannot run here: its package is missing, or it does not support this model.

    The message is one line, saying why (and what to install, where that is the reason)."""


PEERS: dict[str, str] = {
    "diffusers-pab": "diffusers Pyramid Attention Broadcast: reuse self-/cross-attention outputs every N steps in a timestep window",
    "diffusers-fbcache": "diffusers First Block Cache: skip the remaining blocks when the first block's residual barely changed",
    "diffusers-fastercache": "diffusers FasterCache: extrapolate self-attention between steps and approximate the uncond branch (CFG-Cache)",
    "diffusers-taylorseer": "diffusers TaylorSeer: forecast attention/feed-forward outputs with a Taylor series between full steps",
    "diffusers-magcache": "diffusers MagCache: skip steps while the calibrated residual-magnitude ratios say the error stays small",
    "cachedit-dbcache": "cache-dit DBCache: compute the first Fn (and last Bn) blocks, reuse the middle blocks' residual when it barely changed",
    "cachedit-dbcache-taylorseer": "cache-dit DBCache with its TaylorSeer calibrator forecasting the cached residual",
}

# Every option a peer takes, with its default: the peer library's own config field names and defaults
# (deviations in the module docstring); `attention_weight` (FasterCache) and `taylorseer_order`
# (cache-dit) are the adapter's. Options override these; other keys are a DitscopeError.
_DEFAULTS: dict[str, dict] = {
    "diffusers-pab": {
        "spatial_attention_block_skip_range": 2,
        "cross_attention_block_skip_range": None,
        "temporal_attention_block_skip_range": None,
        "spatial_attention_timestep_skip_range": (100, 800),
        "cross_attention_timestep_skip_range": (100, 800),
        "temporal_attention_timestep_skip_range": (100, 800),
    },
    "diffusers-fbcache": {"threshold": 0.05},
    "diffusers-fastercache": {
        "spatial_attention_block_skip_range": 2,
        "spatial_attention_timestep_skip_range": (-1, 681),
        "unconditional_batch_skip_range": 5,
        "unconditional_batch_timestep_skip_range": (-1, 641),
        "low_frequency_weight_update_timestep_range": (99, 901),
        "high_frequency_weight_update_timestep_range": (-1, 301),
        "alpha_low_frequency": 1.1,
        "alpha_high_frequency": 1.1,
        "attention_weight": 0.5,  # -> attention_weight_callback=lambda _: attention_weight
        "tensor_format": None,  # None: BCFHW for video transformers, BCHW otherwise
        "is_guidance_distilled": False,
    },
    "diffusers-taylorseer": {
        "cache_interval": 5,
        "disable_cache_before_step": 3,
        "disable_cache_after_step": None,
        "max_order": 1,
        "taylor_factors_dtype": "float32",
        # None: every block's attention and feed-forward modules (what the TaylorSeer paper caches);
        # diffusers' own default patterns only match modules named exactly "attn", i.e. none in PixArt.
        "cache_identifiers": None,
        "skip_predict_identifiers": None,
        "use_lite_mode": False,
    },
    "diffusers-magcache": {
        "threshold": 0.06,
        "max_skip_steps": 3,
        "retention_ratio": 0.2,
        "mag_ratios": None,  # None: calibrate with run_once()
    },
    "cachedit-dbcache": {  # num_inference_steps is the benchmark's; guidance is batched (enable_separate_cfg=False)
        "Fn_compute_blocks": 1,
        "Bn_compute_blocks": 0,
        "residual_diff_threshold": 0.08,
        "max_warmup_steps": 4,
        "warmup_interval": 1,
        "max_cached_steps": -1,
        "max_continuous_cached_steps": -1,
    },
}
_DEFAULTS["cachedit-dbcache-taylorseer"] = {**_DEFAULTS["cachedit-dbcache"], "taylorseer_order": 1}

# From near-lossless to aggressive, chosen on tiny-pixart at 20 steps (PSNR vs the uncached image; share of
# attention/feed-forward rows still computed): each grid spans roughly 45 -> 25 dB and 0.85 -> 0.5 of the work.
PEER_GRIDS: dict[str, list[dict]] = {
    "diffusers-pab": [  # 37 dB / 0.88, 36 / 0.72, 27 / 0.52
        {"spatial_attention_block_skip_range": 2},
        {"spatial_attention_block_skip_range": 2, "cross_attention_block_skip_range": 4},
        {"spatial_attention_block_skip_range": 3, "cross_attention_block_skip_range": 6,
         "spatial_attention_timestep_skip_range": (0, 1000), "cross_attention_timestep_skip_range": (0, 1000)},
    ],
    "diffusers-fbcache": [{"threshold": 0.08}, {"threshold": 0.15}, {"threshold": 0.3}],  # 45 / 0.82, 37 / 0.69, 30 / 0.47
    "diffusers-fastercache": [  # 40 / 0.77, 34 / 0.68, 23 / 0.60 (rows: the uncond half is skipped, not the call)
        {"spatial_attention_block_skip_range": 2, "unconditional_batch_skip_range": 3},
        {"spatial_attention_block_skip_range": 2, "unconditional_batch_skip_range": 3,
         "spatial_attention_timestep_skip_range": (-1, 901), "unconditional_batch_timestep_skip_range": (-1, 801)},
        {"spatial_attention_block_skip_range": 3, "unconditional_batch_skip_range": 5,
         "spatial_attention_timestep_skip_range": (-1, 901), "unconditional_batch_timestep_skip_range": (-1, 801)},
    ],
    "diffusers-taylorseer": [  # 34 / 0.73, 30 / 0.67, 25 / 0.60
        {"cache_interval": 2, "disable_cache_before_step": 5},
        {"cache_interval": 3, "disable_cache_before_step": 5},
        {"cache_interval": 4, "disable_cache_before_step": 4},
    ],
    "diffusers-magcache": [  # 47 / 0.85, 35 / 0.55, 26 / 0.35
        {"threshold": 0.01, "max_skip_steps": 1},
        {"threshold": 0.03, "max_skip_steps": 2},
        {"threshold": 0.12, "max_skip_steps": 4},
    ],
    "cachedit-dbcache": [  # 57 / 0.96, 43 / 0.78, 35 / 0.65
        {"residual_diff_threshold": 0.06},
        {"residual_diff_threshold": 0.1},
        {"residual_diff_threshold": 0.2, "max_warmup_steps": 2},
    ],
    "cachedit-dbcache-taylorseer": [  # 44 / 0.78, 40 / 0.74, 34 / 0.65
        {"residual_diff_threshold": 0.1},
        {"residual_diff_threshold": 0.15},
        {"residual_diff_threshold": 0.25, "max_warmup_steps": 2},
    ],
}

CONTEXT_NAME = "cond_uncond"  # ShapesPipeline batches [uncond, cond] into one transformer call


def apply_peer(name: str, pipe, options: dict, num_inference_steps: int,
               run_once: Callable[[], object]) -> Callable[[], None]:
    """Apply peer `name` with `options` (override its defaults) to `pipe`. `run_once()` runs the pipeline once on
    a calibration prompt (MagCache uses it). Returns `remove()` that restores the pipeline exactly. Raises
    PeerUnavailable with a one-line reason when the peer's package is missing or it cannot run on this model.

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
        remove = _APPLY[name](pipe, opts, num_inference_steps, run_once)
    except (DitscopeError, PeerUnavailable, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:
        raise PeerUnavailable(f"{name} does not run on {type(transformer).__name__}: {type(e).__name__}: {_one_line(e)}") from None
    try:  # fail here, not an hour into a benchmark: some peers apply to a model they cannot run on
        run_once()
    except torch.cuda.OutOfMemoryError:
        remove()
        raise
    except Exception as e:
        remove()
        raise PeerUnavailable(f"{name} does not run on {type(transformer).__name__}: {type(e).__name__}: {_one_line(e)}") from None
    return remove


def peer_options(name: str) -> dict:
    """The options `name` takes, with their defaults."""
    if name not in PEERS:
        raise DitscopeError(f"unknown peer {name!r}; available: {', '.join(PEERS)}")
    return copy.deepcopy(_DEFAULTS[name])


def _resolve_options(name: str, options: dict | None) -> dict:
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise DitscopeError(f"options for {name} must be a dict, not {type(options).__name__}")
    unknown = sorted(set(options) - set(_DEFAULTS[name]))
    if unknown:
        raise DitscopeError(f"unknown option{'s' if len(unknown) > 1 else ''} for {name}: {', '.join(map(str, unknown))}; "
                            f"valid: {', '.join(_DEFAULTS[name])}")
    opts = {**copy.deepcopy(_DEFAULTS[name]), **options}
    for key, value in options.items():
        default = _DEFAULTS[name][key]
        if isinstance(default, tuple) and isinstance(value, list):  # JSON gives lists for (lo, hi) pairs
            opts[key] = value = tuple(value)
        if not _fits(default, value, nullable=(name, key) in _NULLABLE):
            raise DitscopeError(f"{name} option {key} must be {_kind(default)}, not {value!r}")
    return opts


# options whose None means "off" although their default is not None
_NULLABLE = {("diffusers-pab", "spatial_attention_block_skip_range"),
             ("diffusers-fastercache", "spatial_attention_block_skip_range")}


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


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


# ---------------------------------------------------------------------------------- diffusers hooks
class _PipelineGlue:
    """What a diffusers pipeline does for its caches and ShapesPipeline does not, done while a peer is on.

    - `transformer.forward` opens `cache_context(name)` around each call (diffusers' stateful hooks key
      their state on it) and records the call's `timestep` (for `current_timestep_callback`);
    - `scheduler.set_timesteps`, which starts every denoising loop, first resets the hooks' state (the
      pipeline's own reset in `maybe_free_model_hooks` only reaches transformers with diffusers' CacheMixin).
    """

    def __init__(self, pipe, name: str = CONTEXT_NAME):
        self.transformer = pipe.transformer
        self.scheduler = getattr(pipe, "scheduler", None)
        self.name = name
        self.timestep: float = math.nan
        params = list(inspect.signature(type(self.transformer).forward).parameters)[1:]  # skip self
        self._timestep_index = params.index("timestep") if "timestep" in params else None
        self._saved = []  # (object, attribute, had own attribute, own value, wrapper)

    def current_timestep(self) -> float:
        """The timestep of the transformer call in progress (NaN before any: no timestep window matches)."""
        return self.timestep

    def _read_timestep(self, args, kwargs) -> float:
        t = kwargs.get("timestep")
        if t is None and self._timestep_index is not None and self._timestep_index < len(args):
            t = args[self._timestep_index]
        if t is None:
            return math.nan
        if torch.is_tensor(t):
            return float(t.flatten()[0]) if t.numel() else math.nan
        return float(t)

    def _wrap(self, obj, attr: str, make) -> None:
        own = vars(obj).get(attr, _MISSING)
        wrapper = make(getattr(obj, attr))
        setattr(obj, attr, wrapper)
        self._saved.append((obj, attr, own, wrapper))

    def install(self) -> None:
        from diffusers.models.cache_utils import CacheMixin

        transformer = self.transformer

        def forward_wrapper(inner):
            def forward(*args, **kwargs):
                self.timestep = self._read_timestep(args, kwargs)
                with CacheMixin.cache_context(transformer, self.name):
                    return inner(*args, **kwargs)
            return forward

        def set_timesteps_wrapper(inner):
            def set_timesteps(*args, **kwargs):
                CacheMixin._reset_stateful_cache(transformer)
                return inner(*args, **kwargs)
            return set_timesteps

        self._wrap(transformer, "forward", forward_wrapper)
        if self.scheduler is not None and hasattr(self.scheduler, "set_timesteps"):
            self._wrap(self.scheduler, "set_timesteps", set_timesteps_wrapper)

    def uninstall(self) -> None:
        for obj, attr, own, wrapper in reversed(self._saved):
            if vars(obj).get(attr) is wrapper:
                if own is _MISSING:
                    delattr(obj, attr)
                else:
                    setattr(obj, attr, own)
        self._saved = []


_MISSING = object()


def _registries(module: torch.nn.Module) -> set[int]:
    return {id(m) for m in module.modules() if hasattr(m, "_diffusers_hook")}


def _count_hooks(module: torch.nn.Module) -> int:
    return sum(len(m._diffusers_hook.hooks) for m in module.modules() if hasattr(m, "_diffusers_hook"))


def _restore_forward(module: torch.nn.Module, own) -> None:
    """Undo the instance-level `forward` that diffusers' hook registry leaves after removing its hooks
    (it stores the bound method back as an instance attribute)."""
    current = vars(module).get("forward")
    if current is None or current is own:
        return
    if getattr(current, "__self__", None) is module and getattr(current, "__func__", None) is type(module).forward:
        if own is _MISSING:
            del module.forward
        else:
            module.forward = own


def _apply_diffusers_cache(pipe, label: str, make_config: Callable[[_PipelineGlue], object],
                           apply_fn: Callable) -> Callable[[], None]:
    """Enable a diffusers cache `config` with the glue the pipeline lacks; returns remove().

    Transformers with diffusers' CacheMixin (Flux, Latte, Wan, ...) get `transformer.enable_cache(config)` and
    `disable_cache()`. Those without it (PixArt, DiT, SD3) get what a user of such a model does: the cache's
    `apply_*(transformer, config)`, and removal of its hooks through the hook registry, by
    `CacheMixin.disable_cache` (which only needs the module and its `_cache_config`)."""
    from diffusers.hooks import HookRegistry
    from diffusers.models.cache_utils import CacheMixin

    transformer = pipe.transformer
    model = type(transformer).__name__
    if getattr(transformer, "_cache_config", None) is not None:
        raise PeerUnavailable(f"a diffusers cache ({type(transformer._cache_config).__name__}) is already enabled on {model}")
    had_registry = _registries(transformer)
    own_config = vars(transformer).get("_cache_config", _MISSING)
    own_forwards = {id(m): vars(m).get("forward", _MISSING) for m in transformer.modules()}
    glue = _PipelineGlue(pipe)
    config = make_config(glue)

    def cleanup():
        glue.uninstall()
        if getattr(transformer, "_cache_config", None) is not None:
            CacheMixin.disable_cache(transformer)
        if own_config is _MISSING:
            vars(transformer).pop("_cache_config", None)
        for m in transformer.modules():
            registry = getattr(m, "_diffusers_hook", None)
            if registry is not None and id(m) not in had_registry and not registry.hooks:
                del m._diffusers_hook  # a registry this peer created, now empty
            _restore_forward(m, own_forwards.get(id(m), _MISSING))

    hooks_before = _count_hooks(transformer)
    try:
        if isinstance(transformer, CacheMixin):
            transformer.enable_cache(config)
        else:
            apply_fn(transformer, config)
            HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
            transformer._cache_config = config
    except Exception as e:
        transformer._cache_config = config  # so disable_cache removes whatever was registered before the failure
        cleanup()
        raise PeerUnavailable(f"diffusers {label} does not support {model}: {_one_line(e)}") from None
    if _count_hooks(transformer) == hooks_before:
        cleanup()
        raise PeerUnavailable(f"diffusers {label} does not support {model}: no layer of it matches the cache's patterns")
    glue.install()
    CacheMixin._reset_stateful_cache(transformer)
    removed = False

    def remove() -> None:
        nonlocal removed
        if removed:
            return
        removed = True
        cleanup()

    return remove


def _config_error(name: str, e: Exception) -> DitscopeError:
    return DitscopeError(f"bad options for {name}: {_one_line(e)}")


def _apply_pab(pipe, opts, steps, run_once):
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    def make(context):
        try:
            return PyramidAttentionBroadcastConfig(**opts, current_timestep_callback=context.current_timestep)
        except (TypeError, ValueError) as e:
            raise _config_error("diffusers-pab", e) from None

    if all(opts[k] is None for k in opts if k.endswith("block_skip_range")):
        raise DitscopeError("diffusers-pab needs one of spatial/cross/temporal_attention_block_skip_range set")
    return _apply_diffusers_cache(pipe, "PyramidAttentionBroadcast", make, apply_pyramid_attention_broadcast)


def _apply_fbcache(pipe, opts, steps, run_once):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    try:
        config = FirstBlockCacheConfig(**opts)
    except (TypeError, ValueError) as e:
        raise _config_error("diffusers-fbcache", e) from None
    return _apply_diffusers_cache(pipe, "FirstBlockCache", lambda context: config, apply_first_block_cache)


def _apply_fastercache(pipe, opts, steps, run_once):
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache
    from diffusers.hooks.faster_cache import _UNCOND_COND_INPUT_KWARGS_IDENTIFIERS

    opts = dict(opts)
    weight = opts.pop("attention_weight")
    if opts["tensor_format"] is None:
        opts["tensor_format"] = "BCFHW" if "3D" in type(pipe.transformer).__name__ else "BCHW"
    if opts["tensor_format"] not in ("BCFHW", "BFCHW", "BCHW"):
        raise DitscopeError(f"diffusers-fastercache tensor_format must be BCFHW, BFCHW or BCHW, not {opts['tensor_format']!r}")

    # the batched [uncond, cond] inputs FasterCache splits to skip the uncond half: diffusers' list, plus the
    # conditioning DiT (class_labels) and SD3 (pooled_projections) also batch, as their users would add
    split = (*_UNCOND_COND_INPUT_KWARGS_IDENTIFIERS, "class_labels", "pooled_projections")

    def make(context):
        try:
            return FasterCacheConfig(**opts, attention_weight_callback=lambda _module: weight,
                                     current_timestep_callback=context.current_timestep,
                                     _unconditional_conditional_input_kwargs_identifiers=split)
        except (TypeError, ValueError) as e:
            raise _config_error("diffusers-fastercache", e) from None

    with _quiet_logger("diffusers.hooks.faster_cache"):  # "purely experimental" warning on every apply
        return _apply_diffusers_cache(pipe, "FasterCache", make, apply_faster_cache)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_TAYLORSEER_DEFAULT_IDENTIFIERS = [r"(transformer_blocks|single_transformer_blocks|blocks|temporal_transformer_blocks)\.\d+\.(attn\d*|ff|ff_context)"]


def _apply_taylorseer(pipe, opts, steps, run_once):
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    opts = dict(opts)
    dtype = opts["taylor_factors_dtype"]
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise DitscopeError(f"diffusers-taylorseer taylor_factors_dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
        opts["taylor_factors_dtype"] = _DTYPES[dtype.removeprefix("torch.")]
    if opts["cache_identifiers"] is None and opts["skip_predict_identifiers"] is None and not opts["use_lite_mode"]:
        opts["cache_identifiers"] = list(_TAYLORSEER_DEFAULT_IDENTIFIERS)
    try:
        config = TaylorSeerCacheConfig(**opts)
    except (TypeError, ValueError) as e:
        raise _config_error("diffusers-taylorseer", e) from None
    return _apply_diffusers_cache(pipe, "TaylorSeerCache", lambda context: config, apply_taylorseer_cache)


# MagCache ratios by transformer, then (steps, scheduler class): calibrating is a whole pipeline run.
_MAG_RATIOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MAG_MARKER = "[MagCache] Calibration Complete"


def _calibrate_magcache(pipe, steps: int, run_once) -> list[float]:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    key = (steps, type(pipe.scheduler).__name__)
    cached = _MAG_RATIOS.get(pipe.transformer, {}).get(key)
    if cached is not None:
        return list(cached)
    remove = _apply_diffusers_cache(pipe, "MagCache", lambda context: MagCacheConfig(calibrate=True, num_inference_steps=steps),
                                    apply_mag_cache)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            run_once()
    finally:
        remove()
    ratios, rest, lines = None, [], out.getvalue().splitlines()
    for i, line in enumerate(lines):  # MagCache prints the marker, then the ratios list on the next line
        if line.startswith(_MAG_MARKER) and i + 1 < len(lines):
            try:
                ratios = [float(r) for r in ast.literal_eval(lines[i + 1].strip())]
            except (ValueError, SyntaxError, TypeError):
                ratios = None
        elif not (i > 0 and lines[i - 1].startswith(_MAG_MARKER)):
            rest.append(line)
    if rest and any(r.strip() for r in rest):  # pass through what else run_once printed
        sys.stdout.write("\n".join(rest) + "\n")
    if not ratios or len(ratios) != steps:
        got = "no ratios" if not ratios else f"{len(ratios)} ratios"
        raise PeerUnavailable(f"diffusers MagCache calibration gave {got} for {steps} steps: run_once must run the "
                              f"pipeline once with num_inference_steps={steps}")
    _MAG_RATIOS.setdefault(pipe.transformer, {})[key] = list(ratios)
    return ratios


def _apply_magcache(pipe, opts, steps, run_once):
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    ratios = opts["mag_ratios"]
    if ratios is None:
        ratios = _calibrate_magcache(pipe, steps, run_once)
    try:
        config = MagCacheConfig(threshold=opts["threshold"], max_skip_steps=opts["max_skip_steps"],
                                retention_ratio=opts["retention_ratio"], num_inference_steps=steps,
                                mag_ratios=torch.as_tensor(ratios, dtype=torch.float32))
    except (TypeError, ValueError, RuntimeError) as e:
        raise _config_error("diffusers-magcache", e) from None
    return _apply_diffusers_cache(pipe, "MagCache", lambda context: config, apply_mag_cache)


@contextlib.contextmanager
def _quiet_logger(name: str, level: int = logging.ERROR):
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(max(level, old))
    try:
        yield
    finally:
        logger.setLevel(old)


# ---------------------------------------------------------------------------------------- cache-dit
# How a user of a custom pipeline describes each transformer to cache-dit's BlockAdapter: the block
# list, its forward pattern, and the patch functor cache-dit's own adapter for that model uses.
_CACHEDIT_RECIPES = {
    "PixArtTransformer2DModel": ("transformer_blocks", "Pattern_3", None),
    "DiTTransformer2DModel": ("transformer_blocks", "Pattern_3", "DiTPatchFunctor"),
    "SD3Transformer2DModel": ("transformer_blocks", "Pattern_1", None),
}


class _CacheDitLogs:
    """cache-dit logs every step of its setup (INFO, to stdout); keep it to errors while a peer is on."""

    def __init__(self):
        self._saved = []

    def quiet(self):
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger) and (name.startswith("cache_dit") or name == "CACHE_DIT"):
                self._saved.append((logger, logger.level))
                logger.setLevel(max(logging.ERROR, logger.level))

    def restore(self):
        for logger, level in self._saved:
            logger.setLevel(level)
        self._saved = []


def _snapshot(objs) -> list[tuple[object, dict, dict]]:
    """Instance attributes of `objs` and, for modules, their submodule table in order. (Not parameters or
    buffers: cache-dit adds none, and `pipe.to(device)` while a peer is on legitimately replaces buffers.)"""
    return [(o, dict(vars(o)), {"_modules": list(o._modules.items())} if isinstance(o, torch.nn.Module) else {})
            for o in objs]


def _restore_snapshot(snapshot) -> None:
    for obj, saved, tables in snapshot:
        current = vars(obj)
        for key in [k for k in current if k not in saved]:
            del current[key]
        for key, value in saved.items():
            if current.get(key, _MISSING) is not value:
                current[key] = value
        # cache-dit swaps the block list in and out with mock.patch.object on every call, which moves it to
        # the end of `_modules` (state_dict order); a patch functor may register extra submodules (DiT)
        for key, items in tables.items():
            table = getattr(obj, key)
            if [(k, id(v)) for k, v in table.items()] != [(k, id(v)) for k, v in items]:
                table.clear()
                table.update(items)


def _apply_cachedit(pipe, opts, steps, run_once, taylorseer: bool):
    name = "cachedit-dbcache-taylorseer" if taylorseer else "cachedit-dbcache"
    try:
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig
    except ImportError:
        raise PeerUnavailable("cache-dit is not installed: pip install ditscope[peers]") from None
    transformer = pipe.transformer
    model = type(transformer).__name__
    recipe = _CACHEDIT_RECIPES.get(model)
    if recipe is None:
        raise PeerUnavailable(f"cache-dit DBCache is not adapted to {model} here (ditscope has BlockAdapter recipes for "
                              f"{', '.join(_CACHEDIT_RECIPES)})")
    blocks_name, pattern, functor_name = recipe
    blocks = getattr(transformer, blocks_name)
    if getattr(transformer, "_is_cached", False) or getattr(type(pipe), "_is_cached", False):
        raise PeerUnavailable(f"cache-dit is already applied to this {type(pipe).__name__}")
    opts = dict(opts)
    order = opts.pop("taylorseer_order", None)
    if opts["Fn_compute_blocks"] + opts["Bn_compute_blocks"] > len(blocks):
        raise DitscopeError(f"{name}: Fn_compute_blocks + Bn_compute_blocks must be at most the model's {len(blocks)} blocks")
    try:
        cache_config = DBCacheConfig(**opts, num_inference_steps=steps, enable_separate_cfg=False)
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=order) if taylorseer else None
    except (TypeError, ValueError) as e:
        raise _config_error(name, e) from None
    functor = None
    if functor_name is not None:
        from cache_dit.caching import patch_functors

        functor = getattr(patch_functors, functor_name)()

    # what cache-dit touches and may leave: the transformer's and blocks' instance attributes and submodules,
    # and the pipeline class (the pipeline instance's own attributes cache_dit.disable_cache does remove, and
    # restoring them could undo what the caller changed meanwhile, e.g. set_progress_bar_config)
    pipe_cls = type(pipe)
    snapshot = _snapshot([transformer, blocks, *blocks])
    cls_saved = {k: vars(pipe_cls)[k] for k in ("__call__", "_is_cached", "_original_call") if k in vars(pipe_cls)}
    logs = _CacheDitLogs()
    logs.quiet()

    def restore():
        for key in ("__call__", "_is_cached", "_original_call"):
            if key in cls_saved:
                setattr(pipe_cls, key, cls_saved[key])
            elif key in vars(pipe_cls):
                delattr(pipe_cls, key)
        _restore_snapshot(snapshot)

    try:
        adapter = BlockAdapter(pipe=pipe, transformer=transformer, blocks=blocks, blocks_name=blocks_name,
                               forward_pattern=getattr(ForwardPattern, pattern), patch_functor=functor,
                               check_forward_pattern=True, has_separate_cfg=False)
        adapter = cache_dit.enable_cache(adapter, cache_config=cache_config, calibrator_config=calibrator)
    except Exception as e:
        with contextlib.suppress(Exception):
            cache_dit.disable_cache(pipe)
        restore()
        logs.restore()
        raise PeerUnavailable(f"cache-dit DBCache does not support {model}: {_one_line(e)}") from None
    removed = False

    def remove() -> None:
        nonlocal removed
        if removed:
            return
        removed = True
        try:
            cache_dit.disable_cache(adapter)
        finally:
            restore()
            logs.restore()

    return remove


_APPLY = {
    "diffusers-pab": _apply_pab,
    "diffusers-fbcache": _apply_fbcache,
    "diffusers-fastercache": _apply_fastercache,
    "diffusers-taylorseer": _apply_taylorseer,
    "diffusers-magcache": _apply_magcache,
    "cachedit-dbcache": lambda pipe, opts, steps, run_once: _apply_cachedit(pipe, opts, steps, run_once, False),
    "cachedit-dbcache-taylorseer": lambda pipe, opts, steps, run_once: _apply_cachedit(pipe, opts, steps, run_once, True),
}
