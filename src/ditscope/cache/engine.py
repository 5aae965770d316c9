"""The one mechanism every cache method runs on.

`apply()` wraps three levels of a diffusers transformer by setting `forward` on the module instance
(taken away again by `remove()`, which leaves the model exactly as it was):

- the model: tells generation, step and call apart (one call per guidance branch when a pipeline calls
  the model once per branch), optionally counts the FLOPs it executes, and, on the steps a method asks
  for, taps `scaled_dot_product_attention` so that a method can score tokens from q, k and v;
- each transformer block: block-level methods (FBCache, TeaCache, Delta-DiT) compute the block or add
  its cached residual;
- each child module of a block that the family table names (self-attention, cross-attention, MLP):
  module-level methods (ToCa, FORA, PAB, TaylorSeer, DuCa) compute it, reuse its cached output,
  predict it, or recompute a subset of its tokens.

A method is a `CacheMethod`; what it keeps between steps lives in `Context.state`, one dict per call
slot, so the cond and uncond passes of a pipeline that calls the model twice never share a cache (a
pipeline that batches them keeps them in separate batch rows). A new generation starts when the
pipeline's scheduler sets its timesteps; all state is dropped then, so nothing leaks between calls.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import DitscopeError
from ..families import FAMILIES, TEMPORAL, Blocks, Family, family_of
from ..patching import Patches, read_timestep, timestep_argument

COMPUTE, REUSE, PARTIAL, PREDICT = "compute", "reuse", "partial", "predict"


@dataclass
class Site:
    """A cached child module of a transformer block."""

    index: int
    name: str  # qualified module name
    kind: str  # self, cross, mlp, temporal
    stream: str  # image, text or joint
    block: int  # index of its block
    depth: int  # depth of its block, 0 .. depths - 1
    module: torch.nn.Module


@dataclass
class BlockSite:
    index: int
    name: str
    depth: int
    module: torch.nn.Module
    sites: list[Site] = field(default_factory=list)


class Context:
    """Where the model is: generation, step, call slot; plus per-slot method state and statistics."""

    def __init__(self, family: Family, layout: Blocks, blocks: list[BlockSite], sites: list[Site], depths: int):
        self.family, self.layout, self.blocks, self.sites, self.depths = family, layout, blocks, sites, depths
        self.num_steps: int | None = None
        self.schedule: list[float] | None = None
        self.generation = -1
        self.step = 0
        self.call = 0
        self.timestep: float | None = None
        self.rows = 0  # batch size of the current model call
        self.active: Site | None = None  # the module running now (read by the attention tap)
        self.in_forward = False
        self._fresh = True
        self._slots: dict[int, dict] = {}
        self.records: list[dict] = []  # one per model call of the current generation
        self.record: dict = {}
        self.flop_counting = False
        self.model: torch.nn.Module | None = None  # the transformer (set by the handle)

    @property
    def state(self) -> dict:
        """The current call slot's method state."""
        return self._slots.setdefault(self.call, {})

    def new_generation(self, num_steps: int | None = None, schedule: list[float] | None = None):
        if num_steps is not None:
            self.num_steps = int(num_steps)
        self.schedule = schedule
        self._fresh = True

    @property
    def scheduler_timestep(self) -> float | None:
        """The step's timestep in the scheduler's units (0..1000), also for models fed sigma in [0, 1]."""
        if self.schedule and len(self.schedule) == self.num_steps:
            return self.schedule[self.step]
        if self.timestep is not None and self.timestep <= 1.0:
            return self.timestep * 1000
        return self.timestep

    def begin_call(self, timestep, rows: int):
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else (float(timestep) if timestep is not None else None)
        if self._fresh or self.timestep is None:
            restart = True
        elif t is not None and t == self.timestep:
            restart = False
            self.call += 1
        else:
            # a later step has a smaller timestep; a larger one, or more steps than set, is a new generation
            restart = (t is not None and t > self.timestep) or (
                self.num_steps is not None and self.step + 1 >= self.num_steps
            )
            if not restart:
                self.step += 1
                self.call = 0
        if restart:
            if self.num_steps is None:
                raise DitscopeError(
                    "the cache does not know the number of inference steps: apply it to the pipeline, or "
                    "pass num_inference_steps=N to ditscope.apply when applying it to a bare transformer"
                )
            self._fresh = False
            self.generation += 1
            self.step, self.call = 0, 0
            self._slots.clear()
            self.records = []
        self.timestep = t
        self.rows = rows
        self.record = {"step": self.step, "call": self.call, "timestep": t, "computed": 0, "reused": 0,
                       "partial": 0, "predicted": 0, "tokens": 0, "tokens_total": 0, "blocks_computed": 0,
                       "blocks_reused": 0, "flops": None, "score_flops": 0}
        self.records.append(self.record)

    def count(self, action: str, tokens: int, tokens_total: int):
        key = {COMPUTE: "computed", REUSE: "reused", PARTIAL: "partial", PREDICT: "predicted"}[action]
        self.record[key] += 1
        self.record["tokens"] += tokens
        self.record["tokens_total"] += tokens_total

    def scoring(self):
        """Context for a method's scoring work: its FLOPs are counted apart from the model's."""
        if not self.flop_counting:
            return contextlib.nullcontext()
        return _ScoreCounter(self.record)


class _ScoreCounter:
    def __init__(self, record):
        from torch.utils.flop_counter import FlopCounterMode

        self.record, self.mode = record, FlopCounterMode(display=False)

    def __enter__(self):
        self.mode.__enter__()

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.record["score_flops"] += self.mode.get_total_flops()


class CacheMethod:
    """Base of the cache methods. A method overrides `module` and/or `block`."""

    uses_modules = False
    uses_blocks = False

    def __init__(self, config):
        self.config = config

    def validate(self, ctx: Context):
        """Raise DitscopeError for a config that cannot work on this model."""

    def wants_attention(self, ctx: Context) -> bool:
        """Whether the attention tap should call `on_attention` during this model call."""
        return False

    def on_attention(self, ctx: Context, site: Site, q, k, v, mask, scale):
        pass

    def module(self, ctx: Context, site: Site, run, args: tuple, kwargs: dict):
        return run(*args, **kwargs)

    def block(self, ctx: Context, bsite: BlockSite, run, args: tuple, kwargs: dict):
        return run(*args, **kwargs)


# ------------------------------------------------------------------------------- model discovery
def find_transformer(pipe_or_model) -> tuple[torch.nn.Module, object | None]:
    """(transformer, pipeline or None) for a pipeline or a bare transformer."""
    transformer = getattr(pipe_or_model, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, pipe_or_model
    if isinstance(pipe_or_model, torch.nn.Module):
        return pipe_or_model, None
    raise DitscopeError(
        f"cannot cache {type(pipe_or_model).__name__}: pass a diffusers pipeline with a .transformer or the "
        "transformer module itself"
    )


def layout_of(model: torch.nn.Module) -> tuple[Family, list[BlockSite], list[Site], int]:
    """The blocks and cached modules of a supported transformer, from the family table."""
    name = type(model).__name__
    family = family_of(model)
    if name not in FAMILIES or family.blocks is None:
        supported = ", ".join(k for k, f in FAMILIES.items() if f.blocks is not None)
        raise DitscopeError(f"caching is not supported yet: {name} (supported: {supported})")
    layout = family.blocks
    blocks: list[BlockSite] = []
    sites: list[Site] = []
    offset = 0
    for list_name in layout.lists:
        mlist = getattr(model, list_name, None)
        if mlist is None:
            continue
        for i, block in enumerate(mlist):
            depth = i if layout.parallel else offset + i
            bsite = BlockSite(len(blocks), f"{list_name}.{i}", depth, block)
            for child, kind, stream in layout.modules:
                module = getattr(block, child, None)
                if module is None:
                    continue
                if list_name in layout.temporal_lists and kind == "self":
                    kind = TEMPORAL
                site = Site(len(sites), f"{list_name}.{i}.{child}", kind, stream, bsite.index, depth, module)
                bsite.sites.append(site)
                sites.append(site)
            blocks.append(bsite)
        offset += len(mlist)
    if not blocks:
        raise DitscopeError(f"no transformer blocks found in {name} (looked for {', '.join(layout.lists)})")
    depths = max(b.depth for b in blocks) + 1
    return family, blocks, sites, depths


# --------------------------------------------------------------------------------------- tensors
def hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def with_hidden(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": x}
    return (x, *args[1:]), kwargs


def block_inputs(layout: Blocks, args: tuple, kwargs: dict) -> dict[str, torch.Tensor | None]:
    names = {"hidden": "hidden_states", "encoder": "encoder_hidden_states"}
    found = {}
    for i, name in enumerate(layout.args):
        found[name] = kwargs[names[name]] if names[name] in kwargs else (args[i] if i < len(args) else None)
    return found


def block_outputs(layout: Blocks, out) -> dict[str, torch.Tensor | None]:
    if len(layout.returns) == 1:
        return {layout.returns[0]: out}
    return dict(zip(layout.returns, out))


def pack_outputs(layout: Blocks, outs: dict):
    if len(layout.returns) == 1:
        return outs[layout.returns[0]]
    return tuple(outs[name] for name in layout.returns)


def residuals(inputs: dict, outputs: dict) -> dict:
    """What a block adds to each of its streams."""
    return {n: (o - inputs[n] if o is not None and inputs.get(n) is not None else None) for n, o in outputs.items()}


def add_residuals(inputs: dict, res: dict) -> dict:
    return {n: (inputs[n] + r if r is not None else None) for n, r in res.items()}


def rows_mask(ctx: Context, per_sample: torch.Tensor, rows: int) -> torch.Tensor:
    """Expand a per-model-row mask to a block's rows (Latte blocks run B x frames or B x patches rows)."""
    if rows == per_sample.shape[0]:
        return per_sample
    if rows % per_sample.shape[0]:
        raise DitscopeError(f"block batch {rows} does not fold onto model batch {per_sample.shape[0]}")
    return per_sample.repeat_interleave(rows // per_sample.shape[0])


def per_sample_mean(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Mean over everything but the batch, folded onto the model's rows: (rows,) float32."""
    per_row = x.float().flatten(1).mean(1)
    if per_row.shape[0] == ctx.rows or ctx.rows == 0:
        return per_row
    return per_row.reshape(ctx.rows, -1).mean(1)


def relative_change(ctx: Context, x: torch.Tensor, prev: torch.Tensor, per_sample: bool = True) -> torch.Tensor:
    """`mean|x - prev| / mean|prev|` per model row, or the batch's mean of it on every row (per_sample=False:
    one decision for the whole batch, as diffusers' caches make it)."""
    change = per_sample_mean(ctx, (x - prev).abs()) / per_sample_mean(ctx, prev.abs()).clamp_min(1e-12)
    return change if per_sample else change.mean().expand_as(change)


# ----------------------------------------------------------------------------------- attention tap
class AttentionTap:
    """While installed, `F.scaled_dot_product_attention` also hands q, k, v of the running site to a method."""

    def __init__(self, ctx: Context, method: CacheMethod):
        self.ctx, self.method, self.orig = ctx, method, None

    def __enter__(self):
        self.patches = Patches()
        self.orig = self.patches.set(F, "scaled_dot_product_attention", self._sdpa)
        return self

    def __exit__(self, *exc):
        self.patches.restore()

    def _sdpa(self, query, key, value, attn_mask=None, *args, **kwargs):
        out = self.orig(query, key, value, attn_mask, *args, **kwargs)
        site = self.ctx.active
        if site is not None and query.dim() == 4:
            scale = kwargs.get("scale")
            if scale is None:
                scale = query.shape[-1] ** -0.5
            with torch.no_grad(), self.ctx.scoring():
                self.method.on_attention(self.ctx, site, query, key, value, attn_mask, scale)
        return out


# ------------------------------------------------------------------------------------- the handle
class CacheHandle:
    """What `ditscope.apply` returns: `stats()`, `remove()`, and a context manager that removes on exit."""

    def __init__(self, target, method: CacheMethod, num_inference_steps: int | None = None, count_flops: bool = False):
        self.transformer, self.pipe = find_transformer(target)
        if getattr(self.transformer, "_ditscope_cache", None) is not None:
            raise DitscopeError("a ditscope cache is already applied to this model; call handle.remove() first")
        family, blocks, sites, depths = layout_of(self.transformer)
        self.method = method
        self.ctx = Context(family, family.blocks, blocks, sites, depths)
        self.ctx.flop_counting = count_flops
        self.ctx.num_steps = num_inference_steps
        self.ctx.model = self.transformer
        method.validate(self.ctx)
        self._patches = Patches()
        self._install()

    # ---------------------------------------------------------------------------------- install
    def _install(self):
        ctx, method, model = self.ctx, self.method, self.transformer
        if self.pipe is not None and hasattr(getattr(self.pipe, "scheduler", None), "set_timesteps"):
            scheduler = self.pipe.scheduler
            orig_set = scheduler.set_timesteps

            def set_timesteps(*args, **kwargs):
                out = orig_set(*args, **kwargs)
                ctx.new_generation(len(scheduler.timesteps), [float(t) for t in scheduler.timesteps])
                return out

            self._patches.set(scheduler, "set_timesteps", set_timesteps)
        orig_model = model.forward
        t_pos = timestep_argument(orig_model)

        def model_forward(*args, **kwargs):
            hidden = hidden_arg(args, kwargs)
            timestep = read_timestep(args, kwargs, t_pos)
            ctx.begin_call(timestep, hidden.shape[0])
            tap = AttentionTap(ctx, method) if method.wants_attention(ctx) else contextlib.nullcontext()
            counter = None
            if ctx.flop_counting:
                from torch.utils.flop_counter import FlopCounterMode

                counter = FlopCounterMode(display=False)
            ctx.in_forward = True
            try:
                with tap, (counter or contextlib.nullcontext()):
                    out = orig_model(*args, **kwargs)
            finally:
                ctx.in_forward = False
                ctx.active = None
            if counter is not None:
                ctx.record["flops"] = counter.get_total_flops()
            return out

        self._patches.set(model, "forward", model_forward)
        for bsite in ctx.blocks:
            if method.uses_blocks:
                self._patches.set(bsite.module, "forward", self._block_forward(bsite, bsite.module.forward))
            if method.uses_modules:
                for site in bsite.sites:
                    self._patches.set(site.module, "forward", self._module_forward(site, site.module.forward))
        model._ditscope_cache = self

    def _block_forward(self, bsite: BlockSite, orig):
        ctx, method = self.ctx, self.method

        def forward(*args, **kwargs):
            if not ctx.in_forward:
                return orig(*args, **kwargs)
            return method.block(ctx, bsite, orig, args, kwargs)

        return forward

    def _module_forward(self, site: Site, orig):
        ctx, method = self.ctx, self.method

        def run(*args, **kwargs):
            previous, ctx.active = ctx.active, site
            try:
                return orig(*args, **kwargs)
            finally:
                ctx.active = previous

        def forward(*args, **kwargs):
            if not ctx.in_forward:
                return orig(*args, **kwargs)
            return method.module(ctx, site, run, args, kwargs)

        return forward

    # ------------------------------------------------------------------------------------ public
    def remove(self):
        """Take every wrapper away; the model and the scheduler are exactly as before `apply`."""
        self._patches.restore()
        if getattr(self.transformer, "_ditscope_cache", None) is self:
            del self.transformer._ditscope_cache
        self.ctx._slots.clear()

    def reset(self, num_inference_steps: int | None = None):
        """Start a new generation at the next model call (needed only for a bare transformer driven by hand)."""
        self.ctx.new_generation(num_inference_steps)

    def stats(self):
        """Per model call of the last generation: modules computed / reused / partial / predicted, tokens
        recomputed, blocks computed / reused, and executed FLOPs (when `count_flops=True`)."""
        from .stats import CacheStats

        return CacheStats(type(self.method).__name__.removesuffix("Method"), list(self.ctx.records), self.ctx.sites)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

