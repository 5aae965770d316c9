"""cache-dit's DBCache, with and without its TaylorSeer calibrator, as a peer: `cache_dit.enable_cache` on a
`BlockAdapter` built from ditscope's family table (a ShapesPipeline is not a pipeline cache-dit knows),
removed with `cache_dit.disable_cache` plus a snapshot restore (see the package docstring)."""

from __future__ import annotations

import contextlib
import logging

import torch

from ...cache.registry import Knob
from ...errors import DitscopeError
from ...families import family_of
from .base import Peer, PeerUnavailable, config_error, one_line, register_peer

_ABSENT = object()


# ---------------------------------------------------------------------------------------- cache-dit
# cache-dit's BlockAdapter needs the block list and its forward pattern: what a block takes and returns,
# which is what the family table's `Blocks.args` / `Blocks.returns` say. Its patterns, by (args, returns):
_FORWARD_PATTERNS = {
    (("hidden", "encoder"), ("hidden", "encoder")): "Pattern_0",
    (("hidden", "encoder"), ("encoder", "hidden")): "Pattern_1",
    (("hidden", "encoder"), ("hidden",)): "Pattern_2",
    (("hidden",), ("hidden",)): "Pattern_3",
}
# models whose cache-dit adapter also patches the transformer's forward (by family name)
_PATCH_FUNCTORS = {"dit": "DiTPatchFunctor"}


def _recipe(transformer) -> tuple[list[str], list[str], str | None] | None:
    """(block list names, cache-dit forward pattern per list, patch functor) for a transformer, from
    families.py; None where cache-dit cannot be adapted: no block layout, interleaved lists (Latte: cache-dit
    runs lists one after the other), or a pattern it lacks."""
    family = family_of(transformer)
    layout = family.blocks
    if layout is None or layout.parallel:
        return None
    lists = [name for name in layout.lists if getattr(transformer, name, None) is not None]
    patterns = [_FORWARD_PATTERNS.get((layout.args, layout.returns_of(name))) for name in lists]
    if not lists or None in patterns:
        return None
    return lists, patterns, _PATCH_FUNCTORS.get(family.name)


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
    return [
        (o, dict(vars(o)), {"_modules": list(o._modules.items())} if isinstance(o, torch.nn.Module) else {})
        for o in objs
    ]


def _restore_snapshot(snapshot) -> None:
    for obj, saved, tables in snapshot:
        current = vars(obj)
        for key in [k for k in current if k not in saved]:
            del current[key]
        for key, value in saved.items():
            if current.get(key, _ABSENT) is not value:
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
    recipe = _recipe(transformer)
    if recipe is None:
        raise PeerUnavailable(
            f"cache-dit DBCache is not adapted to {model} here: its block layout in families.py is "
            "missing, has several block lists, or has no cache-dit forward pattern"
        )
    names, patterns, functor_name = recipe
    block_lists = [getattr(transformer, n) for n in names]
    blocks = [b for bl in block_lists for b in bl]
    if getattr(transformer, "_is_cached", False) or getattr(type(pipe), "_is_cached", False):
        raise PeerUnavailable(f"cache-dit is already applied to this {type(pipe).__name__}")
    opts = dict(opts)
    order = opts.pop("taylorseer_order", None)
    encoder_calibrator = opts.pop("enable_encoder_calibrator", False)
    shortest = min(len(bl) for bl in block_lists)  # cache-dit takes Fn / Bn in each list
    if opts["Fn_compute_blocks"] + opts["Bn_compute_blocks"] > shortest:
        raise DitscopeError(
            f"{name}: Fn_compute_blocks + Bn_compute_blocks must be at most the model's {shortest} blocks"
            + (" per list" if len(block_lists) > 1 else "")
        )
    try:
        cache_config = DBCacheConfig(**opts, num_inference_steps=steps, enable_separate_cfg=False)
        calibrator = (
            TaylorSeerCalibratorConfig(taylorseer_order=order, enable_encoder_calibrator=encoder_calibrator)
            if taylorseer
            else None
        )
    except (TypeError, ValueError) as e:
        raise config_error(name, e) from None
    functor = None
    if functor_name is not None:
        from cache_dit.caching import patch_functors

        functor = getattr(patch_functors, functor_name)()

    # what cache-dit touches and may leave: the transformer's and blocks' instance attributes and submodules,
    # and the pipeline class (the pipeline instance's own attributes cache_dit.disable_cache does remove, and
    # restoring them could undo what the caller changed meanwhile, e.g. set_progress_bar_config)
    pipe_cls = type(pipe)
    snapshot = _snapshot([transformer, *block_lists, *blocks])
    cls_saved = {
        k: vars(pipe_cls)[k] for k in ("__call__", "_is_cached", "_original_call") if k in vars(pipe_cls)
    }
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
        one = len(names) == 1  # several lists (Flux, HunyuanVideo): cache-dit takes lists of each
        adapter = BlockAdapter(
            pipe=pipe,
            transformer=transformer,
            blocks=block_lists[0] if one else block_lists,
            blocks_name=names[0] if one else names,
            forward_pattern=(
                getattr(ForwardPattern, patterns[0])
                if one
                else [getattr(ForwardPattern, p) for p in patterns]
            ),
            patch_functor=functor,
            check_forward_pattern=True,
            has_separate_cfg=False,
        )
        adapter = cache_dit.enable_cache(adapter, cache_config=cache_config, calibrator_config=calibrator)
    except Exception as e:
        with contextlib.suppress(Exception):
            cache_dit.disable_cache(pipe)
        restore()
        logs.restore()
        raise PeerUnavailable(f"cache-dit DBCache does not support {model}: {one_line(e)}") from None
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


def _apply_dbcache(pipe, opts, steps, run_once):
    return _apply_cachedit(pipe, opts, steps, run_once, taylorseer=False)


def _apply_dbcache_taylorseer(pipe, opts, steps, run_once):
    return _apply_cachedit(pipe, opts, steps, run_once, taylorseer=True)


_DBCACHE_DEFAULTS = {  # num_inference_steps is the benchmark's; guidance is batched (enable_separate_cfg=False)
    "Fn_compute_blocks": 1,
    "Bn_compute_blocks": 0,
    "residual_diff_threshold": 0.08,
    "max_warmup_steps": 4,
    "warmup_interval": 1,
    "max_cached_steps": -1,
    "max_continuous_cached_steps": -1,
}


register_peer(
    Peer(
        "cachedit-dbcache",
        "cache-dit",
        "cache-dit DBCache: compute the first Fn (and last Bn) blocks, reuse the middle blocks' residual when it barely changed",
        defaults=_DBCACHE_DEFAULTS,
        grid=[  # near-lossless to aggressive
            {"residual_diff_threshold": 0.06},
            {"residual_diff_threshold": 0.1},
            {"residual_diff_threshold": 0.2, "max_warmup_steps": 2},
        ],
        apply=_apply_dbcache,
        knob=Knob("residual_diff_threshold", 0.01, 3.0, log=True),
        package="cache_dit",
    )
)

register_peer(
    Peer(
        "cachedit-dbcache-taylorseer",
        "cache-dit",
        "cache-dit DBCache with its TaylorSeer calibrator forecasting the cached residual",
        # the text stream's forecast off, as cache-dit's own config loader has it (load_configs.py); on, cache-dit
        # 1.5.3 fails on blocks that return no text stream (SD3's last): set_Bn_encoder_buffer drops the None,
        # then get_Bn_encoder_buffer asks the calibrator for a state it never got (taylorseer.py: "not found")
        defaults={**_DBCACHE_DEFAULTS, "taylorseer_order": 1, "enable_encoder_calibrator": False},
        grid=[  # near-lossless to aggressive
            {"residual_diff_threshold": 0.1},
            {"residual_diff_threshold": 0.15},
            {"residual_diff_threshold": 0.25, "max_warmup_steps": 2},
        ],
        apply=_apply_dbcache_taylorseer,
        knob=Knob("residual_diff_threshold", 0.01, 3.0, log=True),
        package="cache_dit",
    )
)
