"""The one mechanism every cache method runs on.

`apply()` wraps three levels of a diffusers transformer by setting `forward` on the module instance
(taken away again by `remove()`, which leaves the model exactly as it was):

- the model: tells generation, step and call apart (one call per guidance branch when a pipeline calls
  the model once per branch), optionally counts the FLOPs it executes, and, on the steps a method asks
  for, taps `scaled_dot_product_attention` so that a method can score tokens from q, k and v; a method's
  observer hooks `before_call` / `after_call` run at the start and end of each model call (what
  calibration and TeaCache's fit measure with: cache/observe.py);
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
import copy

import torch

from ..errors import DitscopeError
from ..families import Blocks
from ..parallel import forward_owner, run_layout, sequence_group, split_inputs
from ..patching import Patches, read_timestep, timestep_argument
from .context import Clock, Context
from .flops import flop_counter
from .layout import BlockSite, Site, argument_name, find_transformers, layout_of, takes_any_keyword
from .method import CacheMethod
from .tap import AttentionTap
from .tensors import hidden_arg


def contexts_of(
    found: list[tuple[str, torch.nn.Module]], layout: Blocks | None = None, clock: Clock | None = None
) -> list[Context]:
    """One Context per transformer of `find_transformers` (a second one's units named `transformer_2.*`), on
    one clock, each knowing the unit names of them all (a plan names every transformer's units)."""
    clock = clock or Clock()
    contexts = []
    for attr, model in found:
        prefix = "" if attr == "transformer" else f"{attr}."
        family, blocks, sites, depths = layout_of(model, layout, prefix)
        ctx = Context(family, layout or family.blocks, blocks, sites, depths, clock)
        ctx.model, ctx.prefix = model, prefix
        contexts.append(ctx)
    names = {u for c in contexts for u in [*(s.name for s in c.sites), *(b.name for b in c.blocks)]}
    for ctx in contexts:
        ctx.unit_names = names
    return contexts


class CacheHandle:
    """What `ditscope.apply` returns: `stats()`, `remove()`, and a context manager that removes on exit.

    A pipeline with two transformers (Wan 2.2: `transformer`, `transformer_2`) gets both cached, each with
    its own method instance and caches, on one step axis; the second one's units are named `transformer_2.*`.
    """

    def __init__(
        self,
        target,
        method: CacheMethod,
        num_inference_steps: int | None = None,
        count_flops: bool = False,
        layout: Blocks | None = None,
    ):
        if num_inference_steps is not None and (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise DitscopeError(
                f"num_inference_steps must be a whole number >= 1, not {num_inference_steps!r}"
            )
        found, self.pipe = find_transformers(target)
        for _, model in found:
            if getattr(model, "_ditscope_cache", None) is not None:
                raise DitscopeError(
                    "a ditscope cache is already applied to this model; call handle.remove() first"
                )
        clock = Clock()
        clock.num_steps = num_inference_steps if num_inference_steps is not None else method.default_steps()
        self.transformers = [model for _, model in found]
        self.contexts = contexts_of(found, layout, clock)
        self.methods = [
            method if i == 0 else copy.copy(method) for i in range(len(found))
        ]  # per-model tables
        for (name, _), ctx, m in zip(found, self.contexts, self.methods):
            ctx.run_layout = run_layout(getattr(self.pipe, name) if self.pipe is not None else target)
            ctx.flop_counting = count_flops
            ctx.scheduler = type(self.pipe.scheduler).__name__ if hasattr(self.pipe, "scheduler") else None
            m.validate(ctx)
        self.transformer, self.method, self.ctx = self.transformers[0], self.methods[0], self.contexts[0]
        self._patches = Patches()
        try:
            self._install_scheduler(clock)
            for model, m, ctx in zip(self.transformers, self.methods, self.contexts):
                self._install(model, m, ctx)
        except BaseException:
            self.remove()  # nothing half-installed stays behind
            raise

    # ---------------------------------------------------------------------------------- install
    def _install_scheduler(self, clock: Clock):
        if self.pipe is not None and hasattr(getattr(self.pipe, "scheduler", None), "set_timesteps"):
            scheduler = self.pipe.scheduler
            orig_set = scheduler.set_timesteps

            def set_timesteps(*args, **kwargs):
                out = orig_set(*args, **kwargs)
                clock.new_generation(len(scheduler.timesteps), [float(t) for t in scheduler.timesteps])
                return out

            self._patches.set(scheduler, "set_timesteps", set_timesteps)

    def _install(self, model: torch.nn.Module, method: CacheMethod, ctx: Context):
        orig_model = model.forward
        hidden_name = argument_name(orig_model, ctx.layout.hidden)
        t_name = ctx.layout.timestep
        t_pos = timestep_argument(orig_model, t_name) if t_name else None
        if t_name and t_pos is None and not takes_any_keyword(orig_model):
            raise DitscopeError(
                f"{type(model).__name__}.forward has no argument {t_name!r} (layout timestep=); "
                "name its timestep argument, or timestep=None if every call is the next step"
            )

        def model_forward(*args, **kwargs):
            hidden = hidden_arg(args, kwargs, hidden_name)
            timestep = read_timestep(args, kwargs, t_pos, t_name) if t_name else None
            ctx.begin_call(timestep, hidden.shape[0])
            method.before_call(ctx)
            tap = AttentionTap(ctx, method) if method.wants_attention(ctx) else contextlib.nullcontext()
            counter = None
            if ctx.flop_counting:
                counter = flop_counter()
            ctx.in_forward = True
            try:
                with tap, counter or contextlib.nullcontext():
                    out = orig_model(*args, **kwargs)
            finally:
                ctx.in_forward = False
                ctx.active = None
            if counter is not None:
                ctx.record["flops"] = counter.get_total_flops()
            method.after_call(ctx, out)
            return out

        self._patches.set(model, "forward", model_forward)
        ctx.sequence_group = sequence_group(model)
        if ctx.sequence_group is not None:
            ctx.split_inputs = split_inputs(model)
            layout = run_layout(model)
            ctx.split = "+".join(k for k in ("ulysses", "ring") if layout[f"{k}_degree"] > 1)
        for bsite in ctx.blocks:
            if method.uses_blocks:
                owner, attr = forward_owner(bsite.module)
                self._patches.set(owner, attr, self._block_forward(ctx, method, bsite, getattr(owner, attr)))
            if method.uses_modules:
                for site in bsite.sites:
                    owner, attr = forward_owner(site.module)
                    self._patches.set(
                        owner, attr, self._module_forward(ctx, method, site, getattr(owner, attr))
                    )
        model._ditscope_cache = self

    @staticmethod
    def _block_forward(ctx: Context, method: CacheMethod, bsite: BlockSite, orig):
        def forward(*args, **kwargs):
            if not ctx.in_forward:
                return orig(*args, **kwargs)
            return method.block(ctx, bsite, orig, args, kwargs)

        return forward

    @staticmethod
    def _module_forward(ctx: Context, method: CacheMethod, site: Site, orig):
        def run(*args, **kwargs):
            previous, ctx.active = ctx.active, site
            try:
                return orig(*args, **kwargs)
            finally:
                ctx.active = previous

        def forward(*args, **kwargs):
            # a module inside a block that runs on part of the batch (actions.run_rows) runs plainly: a
            # method's kept outputs are for the whole batch
            if not ctx.in_forward or ctx.partial_batch:
                return orig(*args, **kwargs)
            return method.module(ctx, site, run, args, kwargs)

        return forward

    # ------------------------------------------------------------------------------------ public
    def remove(self):
        """Take every wrapper away; the models and the scheduler are exactly as before `apply`."""
        self._patches.restore()
        for model, ctx in zip(self.transformers, self.contexts):
            if getattr(model, "_ditscope_cache", None) is self:
                del model._ditscope_cache
            ctx._slots.clear()

    def reset(self, num_inference_steps: int | None = None):
        """Start a new generation at the next model call (needed only for a bare transformer driven by hand)."""
        self.ctx.new_generation(num_inference_steps)

    def stats(self):
        """Per model call of the last generation: modules computed / reused / partial / predicted / computed
        whole where a partial recompute cannot apply, tokens recomputed, blocks computed / reused, executed
        FLOPs (when `count_flops=True`), and notes on what a method could not do where."""
        from .stats import CacheStats

        records = sorted((r for c in self.contexts for r in c.records), key=lambda r: (r["step"], r["call"]))
        notes = {u: t for c in self.contexts for u, t in c.notes.items()}
        return CacheStats(
            type(self.method).__name__.removesuffix("Method"),
            records,
            [s for c in self.contexts for s in c.sites],
            notes,
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
