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

from .base import (  # noqa: F401  (the peers API, read from here)
    CONTEXT_NAME,
    PEERS,
    Peer,
    PeerUnavailable,
    _fits,
    _is_number,
    _kind,
    _resolve_options,
    apply_peer,
    config_error,
    one_line,
    peer_of,
    peer_options,
    quiet_logger,
    register_peer,
)

# each registers its peers; diffusers' first, the order the bench lists them in
# isort: off
from . import diffusers_peers  # noqa: F401
from . import cachedit_peers  # noqa: F401
from . import smoothcache_peers  # noqa: F401
from . import tgate_peers  # noqa: F401
# isort: on

# near-lossless to aggressive, chosen on tiny-pixart at 20 steps: each spans roughly 45 -> 25 dB against the
# uncached image and 0.85 -> 0.5 of the attention/feed-forward rows computed (per grid in its peer's file)
PEER_GRIDS: dict[str, list[dict]] = {name: [dict(o) for o in peer.grid] for name, peer in PEERS.items()}
