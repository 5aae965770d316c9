"""diffusers' own caches as peers: Pyramid Attention Broadcast, First Block Cache, FasterCache, TaylorSeer
and MagCache, through `transformer.enable_cache(config)` / `disable_cache()` (or `apply_*` and the hook
registry on transformers without diffusers' CacheMixin), with the glue a ShapesPipeline lacks (see the
package docstring)."""

from __future__ import annotations

import ast
import contextlib
import io
import math
import sys
import weakref
from collections.abc import Callable

import torch

from ...cache.registry import Knob
from ...errors import DitscopeError
from ...patching import Patches, read_timestep, timestep_argument
from .base import CONTEXT_NAME, Peer, PeerUnavailable, config_error, one_line, quiet_logger, register_peer

_ABSENT = object()


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
        # the class's forward (bound), not an instance-level hook wrapper with a (*args, **kwargs) signature
        self._timestep_index = timestep_argument(type(self.transformer).forward.__get__(self.transformer))
        self._patches = Patches()

    def current_timestep(self) -> float:
        """The timestep of the transformer call in progress (NaN before any: no timestep window matches)."""
        return self.timestep

    def _read_timestep(self, args, kwargs) -> float:
        t = read_timestep(args, kwargs, self._timestep_index)
        if t is None:
            return math.nan
        if torch.is_tensor(t):
            return float(t.flatten()[0]) if t.numel() else math.nan
        return float(t)

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

        self._patches.wrap(transformer, "forward", forward_wrapper)
        if self.scheduler is not None and hasattr(self.scheduler, "set_timesteps"):
            self._patches.wrap(self.scheduler, "set_timesteps", set_timesteps_wrapper)

    def uninstall(self) -> None:
        self._patches.restore()


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
    if (
        getattr(current, "__self__", None) is module
        and getattr(current, "__func__", None) is type(module).forward
    ):
        if own is _ABSENT:
            del module.forward
        else:
            module.forward = own


def _apply_diffusers_cache(
    pipe, label: str, make_config: Callable[[_PipelineGlue], object], apply_fn: Callable
) -> Callable[[], None]:
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
        raise PeerUnavailable(
            f"a diffusers cache ({type(transformer._cache_config).__name__}) is already enabled on {model}"
        )
    had_registry = _registries(transformer)
    own_config = vars(transformer).get("_cache_config", _ABSENT)
    own_forwards = {id(m): vars(m).get("forward", _ABSENT) for m in transformer.modules()}
    glue = _PipelineGlue(pipe)
    config = make_config(glue)

    def cleanup():
        glue.uninstall()
        if getattr(transformer, "_cache_config", None) is not None:
            CacheMixin.disable_cache(transformer)
        if own_config is _ABSENT:
            vars(transformer).pop("_cache_config", None)
        for m in transformer.modules():
            registry = getattr(m, "_diffusers_hook", None)
            if registry is not None and id(m) not in had_registry and not registry.hooks:
                del m._diffusers_hook  # a registry this peer created, now empty
            _restore_forward(m, own_forwards.get(id(m), _ABSENT))

    hooks_before = _count_hooks(transformer)
    try:
        if isinstance(transformer, CacheMixin):
            transformer.enable_cache(config)
        else:
            apply_fn(transformer, config)
            HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
            transformer._cache_config = config
    except Exception as e:
        transformer._cache_config = (
            config  # so disable_cache removes whatever was registered before the failure
        )
        cleanup()
        raise PeerUnavailable(f"diffusers {label} does not support {model}: {one_line(e)}") from None
    if _count_hooks(transformer) == hooks_before:
        cleanup()
        raise PeerUnavailable(
            f"diffusers {label} does not support {model}: no layer of it matches the cache's patterns"
        )
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


def _apply_pab(pipe, opts, steps, run_once):
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    def make(context):
        try:
            return PyramidAttentionBroadcastConfig(**opts, current_timestep_callback=context.current_timestep)
        except (TypeError, ValueError) as e:
            raise config_error("diffusers-pab", e) from None

    if all(opts[k] is None for k in opts if k.endswith("block_skip_range")):
        raise DitscopeError(
            "diffusers-pab needs one of spatial/cross/temporal_attention_block_skip_range set"
        )
    return _apply_diffusers_cache(pipe, "PyramidAttentionBroadcast", make, apply_pyramid_attention_broadcast)


def _apply_fbcache(pipe, opts, steps, run_once):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    try:
        config = FirstBlockCacheConfig(**opts)
    except (TypeError, ValueError) as e:
        raise config_error("diffusers-fbcache", e) from None
    return _apply_diffusers_cache(pipe, "FirstBlockCache", lambda context: config, apply_first_block_cache)


def _apply_fastercache(pipe, opts, steps, run_once):
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache
    from diffusers.hooks.faster_cache import _UNCOND_COND_INPUT_KWARGS_IDENTIFIERS

    opts = dict(opts)
    weight = opts.pop("attention_weight")
    if opts["tensor_format"] is None:
        opts["tensor_format"] = "BCFHW" if "3D" in type(pipe.transformer).__name__ else "BCHW"
    if opts["tensor_format"] not in ("BCFHW", "BFCHW", "BCHW"):
        raise DitscopeError(
            f"diffusers-fastercache tensor_format must be BCFHW, BFCHW or BCHW, not {opts['tensor_format']!r}"
        )

    # the batched [uncond, cond] inputs FasterCache splits to skip the uncond half: diffusers' list, plus the
    # conditioning DiT (class_labels) and SD3 (pooled_projections) also batch, as their users would add
    split = (*_UNCOND_COND_INPUT_KWARGS_IDENTIFIERS, "class_labels", "pooled_projections")

    def make(context):
        try:
            return FasterCacheConfig(
                **opts,
                attention_weight_callback=lambda _module: weight,
                current_timestep_callback=context.current_timestep,
                _unconditional_conditional_input_kwargs_identifiers=split,
            )
        except (TypeError, ValueError) as e:
            raise config_error("diffusers-fastercache", e) from None

    with quiet_logger("diffusers.hooks.faster_cache"):  # "purely experimental" warning on every apply
        return _apply_diffusers_cache(pipe, "FasterCache", make, apply_faster_cache)


_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_TAYLORSEER_DEFAULT_IDENTIFIERS = [
    r"(transformer_blocks|single_transformer_blocks|blocks|temporal_transformer_blocks)\.\d+\.(attn\d*|ff|ff_context)"
]


def _apply_taylorseer(pipe, opts, steps, run_once):
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    opts = dict(opts)
    dtype = opts["taylor_factors_dtype"]
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise DitscopeError(
                f"diffusers-taylorseer taylor_factors_dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}"
            )
        opts["taylor_factors_dtype"] = _DTYPES[dtype.removeprefix("torch.")]
    if (
        opts["cache_identifiers"] is None
        and opts["skip_predict_identifiers"] is None
        and not opts["use_lite_mode"]
    ):
        opts["cache_identifiers"] = list(_TAYLORSEER_DEFAULT_IDENTIFIERS)
    try:
        config = TaylorSeerCacheConfig(**opts)
    except (TypeError, ValueError) as e:
        raise config_error("diffusers-taylorseer", e) from None
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
    remove = _apply_diffusers_cache(
        pipe,
        "MagCache",
        lambda context: MagCacheConfig(calibrate=True, num_inference_steps=steps),
        apply_mag_cache,
    )
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
        raise PeerUnavailable(
            f"diffusers MagCache calibration gave {got} for {steps} steps: run_once must run the "
            f"pipeline once with num_inference_steps={steps}"
        )
    _MAG_RATIOS.setdefault(pipe.transformer, {})[key] = list(ratios)
    return ratios


def _apply_magcache(pipe, opts, steps, run_once):
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    ratios = opts["mag_ratios"]
    if ratios is None:
        ratios = _calibrate_magcache(pipe, steps, run_once)
    try:
        config = MagCacheConfig(
            threshold=opts["threshold"],
            max_skip_steps=opts["max_skip_steps"],
            retention_ratio=opts["retention_ratio"],
            num_inference_steps=steps,
            mag_ratios=torch.as_tensor(ratios, dtype=torch.float32),
        )
    except (TypeError, ValueError, RuntimeError) as e:
        raise config_error("diffusers-magcache", e) from None
    return _apply_diffusers_cache(pipe, "MagCache", lambda context: config, apply_mag_cache)


register_peer(
    Peer(
        "diffusers-pab",
        "diffusers",
        "diffusers Pyramid Attention Broadcast: reuse self-/cross-attention outputs every N steps in a timestep window",
        defaults={
            "spatial_attention_block_skip_range": 2,
            "cross_attention_block_skip_range": None,
            "temporal_attention_block_skip_range": None,
            "spatial_attention_timestep_skip_range": (100, 800),
            "cross_attention_timestep_skip_range": (100, 800),
            "temporal_attention_timestep_skip_range": (100, 800),
        },
        grid=[  # near-lossless to aggressive
            {"spatial_attention_block_skip_range": 2},
            {"spatial_attention_block_skip_range": 2, "cross_attention_block_skip_range": 4},
            {
                "spatial_attention_block_skip_range": 3,
                "cross_attention_block_skip_range": 6,
                "spatial_attention_timestep_skip_range": (0, 1000),
                "cross_attention_timestep_skip_range": (0, 1000),
            },
        ],
        apply=_apply_pab,
        nullable=frozenset({"spatial_attention_block_skip_range"}),
        knob=Knob("spatial_attention_block_skip_range", 2, 10, integer=True),
    )
)


register_peer(
    Peer(
        "diffusers-fbcache",
        "diffusers",
        "diffusers First Block Cache: skip the remaining blocks when the first block's residual barely changed",
        defaults={"threshold": 0.05},
        grid=[{"threshold": 0.08}, {"threshold": 0.15}, {"threshold": 0.3}],
        apply=_apply_fbcache,
        knob=Knob("threshold", 0.005, 1.0, log=True),
    )
)


register_peer(
    Peer(
        "diffusers-fastercache",
        "diffusers",
        "diffusers FasterCache: extrapolate self-attention between steps and approximate the uncond branch (CFG-Cache)",
        defaults={
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
        grid=[  # near-lossless to aggressive (rows: the uncond half is skipped, not the call)
            {"spatial_attention_block_skip_range": 2, "unconditional_batch_skip_range": 3},
            {
                "spatial_attention_block_skip_range": 2,
                "unconditional_batch_skip_range": 3,
                "spatial_attention_timestep_skip_range": (-1, 901),
                "unconditional_batch_timestep_skip_range": (-1, 801),
            },
            {
                "spatial_attention_block_skip_range": 3,
                "unconditional_batch_skip_range": 5,
                "spatial_attention_timestep_skip_range": (-1, 901),
                "unconditional_batch_timestep_skip_range": (-1, 801),
            },
        ],
        apply=_apply_fastercache,
        nullable=frozenset({"spatial_attention_block_skip_range"}),
        knob=Knob("spatial_attention_block_skip_range", 2, 10, integer=True),
    )
)


register_peer(
    Peer(
        "diffusers-taylorseer",
        "diffusers",
        "diffusers TaylorSeer: forecast attention/feed-forward outputs with a Taylor series between full steps",
        defaults={
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
        grid=[  # near-lossless to aggressive
            {"cache_interval": 2, "disable_cache_before_step": 5},
            {"cache_interval": 3, "disable_cache_before_step": 5},
            {"cache_interval": 4, "disable_cache_before_step": 4},
        ],
        apply=_apply_taylorseer,
        knob=Knob("cache_interval", 2, 10, integer=True),
    )
)


register_peer(
    Peer(
        "diffusers-magcache",
        "diffusers",
        "diffusers MagCache: skip steps while the calibrated residual-magnitude ratios say the error stays small",
        defaults={
            "threshold": 0.06,
            "max_skip_steps": 3,
            "retention_ratio": 0.2,
            "mag_ratios": None,  # None: calibrate with run_once()
        },
        grid=[  # near-lossless to aggressive
            {"threshold": 0.01, "max_skip_steps": 1},
            {"threshold": 0.03, "max_skip_steps": 2},
            {"threshold": 0.12, "max_skip_steps": 4},
        ],
        apply=_apply_magcache,
        knob=Knob("threshold", 0.01, 3.0, log=True),
    )
)
