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
import copy
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import DitscopeError
from ..families import FAMILIES, TEMPORAL, Blocks, Family, family_of
from ..parallel import agree, forward_owner, run_layout, sequence_group, split_inputs
from ..patching import Patches, read_timestep, timestep_argument
from .registry import check_fields

COMPUTE, REUSE, PARTIAL, PREDICT = "compute", "reuse", "partial", "predict"
WHOLE = "whole"  # a partial recompute asked for, the module computed whole instead (no token subset of it)


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
    hidden: str = "hidden_states"  # its hidden-state argument's name (positional: the first)
    tokenwise: bool = True  # a token subset can run alone (families.Child)
    kv: str = "encoder_hidden_states"  # self-attention: the keyword that hands a query subset every token


@dataclass
class BlockSite:
    index: int
    name: str
    depth: int
    module: torch.nn.Module
    sites: list[Site] = field(default_factory=list)
    args: tuple[str, ...] = ("hidden",)  # roles of the leading positional arguments
    names: dict = field(default_factory=lambda: {"hidden": "hidden_states", "encoder": "encoder_hidden_states"})
    returns: tuple[str, ...] = ("hidden",)  # what the block returns, in order


class Clock:
    """Generation, step and call of a pipeline run, shared by every transformer of a pipeline (Wan 2.2 calls
    `transformer` on the early steps and `transformer_2` on the late ones: one step axis for both)."""

    def __init__(self):
        self.num_steps: int | None = None
        self.schedule: list[float] | None = None
        self.generation = -1
        self.step = 0
        self.call = 0
        self.timestep: float | None = None
        self.fresh = True

    def new_generation(self, num_steps: int | None = None, schedule: list[float] | None = None):
        if num_steps is not None:
            self.num_steps = int(num_steps)
        self.schedule = schedule
        self.fresh = True

    def tick(self, t: float | None):
        """Advance to the model call with timestep `t`."""
        if self.fresh or self.timestep is None:
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
            self.fresh = False
            self.generation += 1
            self.step, self.call = 0, 0
        self.timestep = t


class Context:
    """Where the model is: generation, step, call slot; plus per-slot method state and statistics."""

    def __init__(self, family: Family, layout: Blocks, blocks: list[BlockSite], sites: list[Site], depths: int,
                 clock: Clock | None = None):
        self.family, self.layout, self.blocks, self.sites, self.depths = family, layout, blocks, sites, depths
        self.clock = clock or Clock()
        self.generation = -1
        self.rows = 0  # batch size of the current model call
        self.active: Site | None = None  # the module running now (read by the attention tap)
        self.in_forward = False
        self.partial_batch = False  # a block is running on some of the batch rows only (actions.run_rows)
        self._slots: dict[int, dict] = {}
        self.records: list[dict] = []  # one per model call of the current generation
        self.record: dict = {}
        self.notes: dict[str, str] = {}  # unit -> what a method could not do there, and what it did instead
        self.flop_counting = False
        self.model: torch.nn.Module | None = None  # the transformer (set by the handle)
        self.scheduler: str | None = None  # the pipeline's scheduler class, when there is a pipeline
        self.prefix = ""  # unit-name prefix of a pipeline's second transformer ("transformer_2.")
        self.unit_names: set[str] = set()  # units of every transformer the handle caches (plans name them)
        self.sequence_group = None  # the ranks the sequence is split over (context parallelism; parallel.py)
        self.split = None  # how: "ulysses" (heads split in attention), "ring" (keys go round), "ulysses+ring"
        self.split_inputs: set[str] = set()  # the model's inputs split over the ranks (others: whole on each)
        self.run_layout: dict = {}  # processes, sequence split, compiled (parallel.py's run_layout)

    # the step axis lives on the clock, shared between a pipeline's transformers
    step = property(lambda self: self.clock.step)
    call = property(lambda self: self.clock.call)
    timestep = property(lambda self: self.clock.timestep)
    num_steps = property(lambda self: self.clock.num_steps, lambda self, v: setattr(self.clock, "num_steps", v))
    schedule = property(lambda self: self.clock.schedule)

    @property
    def state(self) -> dict:
        """The current call slot's method state."""
        return self._slots.setdefault(self.call, {})

    def new_generation(self, num_steps: int | None = None, schedule: list[float] | None = None):
        self.clock.new_generation(num_steps, schedule)

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
        self.clock.tick(t)
        if self.generation != self.clock.generation:
            self.generation = self.clock.generation
            self._slots.clear()
            self.records = []
        self.rows = rows
        self.record = {"step": self.step, "call": self.call, "timestep": self.timestep, "computed": 0, "reused": 0,
                       "partial": 0, "predicted": 0, "whole": 0, "tokens": 0, "tokens_total": 0,
                       "blocks_computed": 0, "blocks_reused": 0, "flops": None, "score_flops": 0}
        if self.prefix:
            self.record["model"] = self.prefix.rstrip(".")
        self.records.append(self.record)

    def note(self, unit: str, text: str):
        """Say (in `stats()`) that a method could not do what it was asked at a unit, and what it did instead."""
        self.notes.setdefault(unit, text)

    def count(self, action: str, tokens: int, tokens_total: int):
        key = {COMPUTE: "computed", REUSE: "reused", PARTIAL: "partial", PREDICT: "predicted", WHOLE: "whole"}[action]
        self.record[key] += 1
        self.record["tokens"] += tokens
        self.record["tokens_total"] += tokens_total

    def scoring(self):
        """Context for a method's scoring work: its FLOPs are counted apart from the model's."""
        if not self.flop_counting:
            return contextlib.nullcontext()
        return _ScoreCounter(self.record)


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: ditscope reads only the total, and the tracker's
    hooks fail under torch.inference_mode() when a module input requires grad (Mochi's rope gets a Parameter)."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flop_counter():
    """A `torch.utils.flop_counter.FlopCounterMode` that counts the total only (works under inference_mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _GlobalOnly()
    return counter


class _ScoreCounter:
    def __init__(self, record):
        self.record, self.mode = record, flop_counter()

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

    def check(self):
        """Raise DitscopeError for options no model can run (an interval below 1, a ratio above 1): what
        `config_from_options` checks before a model loads."""

    def validate(self, ctx: Context):
        """Raise DitscopeError for a config that cannot work on this model (and for what `check` refuses)."""
        check_fields(self.config)
        self.check()

    def wants_attention(self, ctx: Context) -> bool:
        """Whether the attention tap should call `on_attention` during this model call."""
        return False

    def on_attention(self, ctx: Context, site: Site, q, k, v, mask, scale):
        pass

    def module(self, ctx: Context, site: Site, run, args: tuple, kwargs: dict):
        return run(*args, **kwargs)

    def block(self, ctx: Context, bsite: BlockSite, run, args: tuple, kwargs: dict):
        return run(*args, **kwargs)

    def default_steps(self) -> int | None:
        """The step count to assume when neither a pipeline's scheduler nor the caller tells it."""
        return None


# ------------------------------------------------------------------------------- model discovery
def find_transformers(pipe_or_model) -> tuple[list[tuple[str, torch.nn.Module]], object | None]:
    """([(attribute, transformer), ...], pipeline or None): a pipeline's `transformer` and, where it has one,
    `transformer_2` (Wan 2.2's low-noise expert), or a bare transformer."""
    found = [(name, getattr(pipe_or_model, name, None)) for name in ("transformer", "transformer_2")]
    found = [(n, uncompiled(m)) for n, m in found if isinstance(m, torch.nn.Module)]
    if found:
        return found, pipe_or_model
    if isinstance(pipe_or_model, torch.nn.Module):
        return [("transformer", uncompiled(pipe_or_model))], None
    raise DitscopeError(
        f"cannot cache {type(pipe_or_model).__name__}: pass a diffusers pipeline with a .transformer or the "
        "transformer module itself"
    )


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module `torch.compile(model)` wraps: ditscope's wrappers go on it, and the compiled wrapper traces
    them with the model (a decision in Python between blocks is a graph break, not an error)."""
    return getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model


def find_transformer(pipe_or_model) -> tuple[torch.nn.Module, object | None]:
    """(transformer, pipeline or None) for a pipeline or a bare transformer (the first, if it has two)."""
    found, pipe = find_transformers(pipe_or_model)
    return found[0][1], pipe


def _argument_name(forward, preferred: str) -> str:
    """`preferred` if `forward` takes an argument of that name, else the name of its first argument."""
    try:
        params = list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return preferred
    return preferred if preferred in params or not params else params[0]


def _takes_any_keyword(forward) -> bool:
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return True


def _resolve(model: torch.nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def layout_of(model: torch.nn.Module, layout: Blocks | None = None, prefix: str = "") -> tuple[Family, list[BlockSite], list[Site], int]:
    """The blocks and cached modules of a transformer, from the family table or a declared `layout`.
    `prefix` goes in front of every unit name (a pipeline's second transformer)."""
    name = type(model).__name__
    family = family_of(model)
    declared = layout is not None
    if layout is None:
        layout = family.blocks
    elif not isinstance(layout, Blocks):
        raise DitscopeError(f"layout must be a ditscope.Blocks, not {type(layout).__name__}")
    if layout is None:
        supported = ", ".join(k for k, f in FAMILIES.items() if f.blocks is not None)
        raise DitscopeError(f"caching is not supported yet: {name} (supported: {supported}); for another "
                            "PyTorch DiT declare its blocks: ditscope.apply(model, config, layout=ditscope.Blocks(...))")
    blocks: list[BlockSite] = []
    sites: list[Site] = []
    offset = 0
    for list_name in layout.lists:
        mlist = _resolve(model, list_name)
        if mlist is None:
            if declared:
                raise DitscopeError(f"{name} has no block list {list_name!r} (layout lists: {', '.join(layout.lists)})")
            continue
        if not isinstance(mlist, (torch.nn.ModuleList, torch.nn.Sequential)):
            raise DitscopeError(f"{name}.{list_name} is a {type(mlist).__name__}, not a ModuleList of blocks")
        for i, block in enumerate(mlist):
            depth = i if layout.parallel else offset + i
            names = {"hidden": _argument_name(block.forward, layout.hidden), "encoder": layout.encoder}
            bsite = BlockSite(len(blocks), f"{prefix}{list_name}.{i}", depth, block, args=layout.args, names=names,
                              returns=layout.returns_of(list_name))
            for child in layout.modules:
                module = getattr(block, child.name, None)
                if module is None:
                    continue
                kind = TEMPORAL if list_name in layout.temporal_lists and child.kind == "self" else child.kind
                site = Site(len(sites), f"{prefix}{list_name}.{i}.{child.name}", kind, child.stream, bsite.index,
                            depth, module, hidden=_argument_name(module.forward, layout.hidden),
                            tokenwise=child.tokenwise, kv=child.kv)
                bsite.sites.append(site)
                sites.append(site)
            blocks.append(bsite)
        offset += len(mlist)
    if not blocks:
        raise DitscopeError(f"no transformer blocks found in {name} (looked for {', '.join(layout.lists)})")
    if declared:  # a typo in a declared child name would otherwise cache nothing, silently
        missing = [c.name for c in layout.modules if not any(s.name.endswith("." + c.name) for s in sites)]
        if missing:
            raise DitscopeError(f"no block of {name} has a child module {missing[0]!r} (declared in layout.modules)")
    depths = max(b.depth for b in blocks) + 1
    return family, blocks, sites, depths


# --------------------------------------------------------------------------------------- tensors
def hidden_arg(args: tuple, kwargs: dict, name: str = "hidden_states") -> torch.Tensor:
    return kwargs[name] if name in kwargs else args[0]


def with_hidden(args: tuple, kwargs: dict, x: torch.Tensor, name: str = "hidden_states") -> tuple[tuple, dict]:
    if name in kwargs:
        return args, {**kwargs, name: x}
    return (x, *args[1:]), kwargs


# The block helpers take the block (its list's returns, its argument names); a `Blocks` layout works too
# (the layout's defaults), for code written before returns were per list.
def block_inputs(bsite: BlockSite | Blocks, args: tuple, kwargs: dict) -> dict[str, torch.Tensor | None]:
    names = getattr(bsite, "names", None) or {"hidden": bsite.hidden, "encoder": bsite.encoder}
    found = {}
    for i, role in enumerate(bsite.args):
        key = names[role]
        found[role] = kwargs[key] if key in kwargs else (args[i] if i < len(args) else None)
    return found


def block_outputs(bsite: BlockSite | Blocks, out) -> dict[str, torch.Tensor | None]:
    if len(bsite.returns) == 1:
        return {bsite.returns[0]: out}
    return dict(zip(bsite.returns, out))


def pack_outputs(bsite: BlockSite | Blocks, outs: dict):
    if len(bsite.returns) == 1:
        return outs[bsite.returns[0]]
    return tuple(outs[name] for name in bsite.returns)


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


def take_rows(ctx: Context, tree, rows: torch.Tensor, block_rows: int):
    """`tree` (a call's args or kwargs, nested in tuples, lists and dicts) restricted to the batch rows marked
    in `rows` (a per-model-row mask): every tensor whose first dimension is the block's batch `block_rows` or
    the model's is indexed; other values (rotary tables, flags, a mask shared by all rows) pass unchanged."""
    if torch.is_tensor(tree):
        if tree.dim() and tree.shape[0] == block_rows:
            return tree[rows_mask(ctx, rows, block_rows).to(tree.device)]
        if tree.dim() and tree.shape[0] == rows.shape[0]:
            return tree[rows.to(tree.device)]
        return tree
    if type(tree) in (tuple, list):
        return type(tree)(take_rows(ctx, t, rows, block_rows) for t in tree)
    if type(tree) is dict:
        return {k: take_rows(ctx, v, rows, block_rows) for k, v in tree.items()}
    return tree


def row_abs_sums(xs: list[torch.Tensor], rows: int, group=None) -> torch.Tensor:
    """sum|x| per model row over a list of tensors whose first dim folds onto the model's rows: (rows,) float64;
    over the whole sequence when it is split over `group` (context parallelism)."""
    total = torch.zeros(rows, dtype=torch.float64)
    for x in xs:
        per = x.detach().float().abs().flatten(1).sum(1).double().cpu()
        total += per.reshape(rows, -1).sum(1)
    return agree(total, group)


def per_sample_mean(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Mean over everything but the batch, folded onto the model's rows: (rows,) float32."""
    per_row = x.float().flatten(1).mean(1)
    if per_row.shape[0] == ctx.rows or ctx.rows == 0:
        return per_row
    return per_row.reshape(ctx.rows, -1).mean(1)


def relative_change(ctx: Context, x: torch.Tensor, prev: torch.Tensor, per_sample: bool = True) -> torch.Tensor:
    """`mean|x - prev| / mean|prev|` per model row, or the batch's mean of it on every row (per_sample=False:
    one decision for the whole batch, as diffusers' caches make it). Under context parallelism, the ratio of
    the sums over the whole sequence, the same on every rank."""
    if ctx.sequence_group is not None:
        sums = agree(torch.stack([row_abs_sums([x - prev], ctx.rows), row_abs_sums([prev], ctx.rows)], 1),
                     ctx.sequence_group)
        change = (sums[:, 0] / sums[:, 1].clamp_min(1e-300)).float().to(x.device)
    else:
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
def contexts_of(found: list[tuple[str, torch.nn.Module]], layout: Blocks | None = None,
                clock: Clock | None = None) -> list[Context]:
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

    def __init__(self, target, method: CacheMethod, num_inference_steps: int | None = None, count_flops: bool = False,
                 layout: Blocks | None = None):
        if num_inference_steps is not None and (isinstance(num_inference_steps, bool)
                                                or not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise DitscopeError(f"num_inference_steps must be a whole number >= 1, not {num_inference_steps!r}")
        found, self.pipe = find_transformers(target)
        for _, model in found:
            if getattr(model, "_ditscope_cache", None) is not None:
                raise DitscopeError("a ditscope cache is already applied to this model; call handle.remove() first")
        clock = Clock()
        clock.num_steps = num_inference_steps if num_inference_steps is not None else method.default_steps()
        self.transformers = [model for _, model in found]
        self.contexts = contexts_of(found, layout, clock)
        self.methods = [method if i == 0 else copy.copy(method) for i in range(len(found))]  # per-model tables
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
        hidden_name = _argument_name(orig_model, ctx.layout.hidden)
        t_name = ctx.layout.timestep
        t_pos = timestep_argument(orig_model, t_name) if t_name else None
        if t_name and t_pos is None and not _takes_any_keyword(orig_model):
            raise DitscopeError(f"{type(model).__name__}.forward has no argument {t_name!r} (layout timestep=); "
                                "name its timestep argument, or timestep=None if every call is the next step")

        def model_forward(*args, **kwargs):
            hidden = hidden_arg(args, kwargs, hidden_name)
            timestep = read_timestep(args, kwargs, t_pos, t_name) if t_name else None
            ctx.begin_call(timestep, hidden.shape[0])
            tap = AttentionTap(ctx, method) if method.wants_attention(ctx) else contextlib.nullcontext()
            counter = None
            if ctx.flop_counting:
                counter = flop_counter()
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
                    self._patches.set(owner, attr, self._module_forward(ctx, method, site, getattr(owner, attr)))
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
        return CacheStats(type(self.method).__name__.removesuffix("Method"), records,
                          [s for c in self.contexts for s in c.sites], notes)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
