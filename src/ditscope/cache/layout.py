"""Layout discovery: the blocks of a transformer and the child modules of each block that a cache method acts
on, named as plans and statistics name them (`transformer_blocks.3.attn1`, `transformer_blocks.3`, a second
transformer's with the prefix `transformer_2.`), from the family table or a declared `ditscope.Blocks`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from ..errors import DitscopeError
from ..families import FAMILIES, TEMPORAL, Blocks, Family, family_of

STACK = "stack"  # the unit that is the whole block stack of a transformer (`transformer_2.stack` for a second one)


def unit_kind(name: str) -> str:
    """What a unit name names, the one parser of it: "stack" (`stack`, `transformer_2.stack`), "block" (a block
    list's entry, named by its index: `transformer_blocks.3`) or "module" (a child module of a block:
    `transformer_blocks.3.attn1`)."""
    last = name.rsplit(".", 1)[-1]
    if last == STACK:
        return "stack"
    return "block" if last.isdigit() else "module"


def block_of(name: str, units=None) -> str | None:
    """The block a module unit belongs to (`transformer_blocks.3` for `transformer_blocks.3.attn1`): the longest
    name above it that ends in a block index (and is one of `units`, when given); None for a block or a stack."""
    if unit_kind(name) != "module":
        return None
    parts = name.split(".")
    return next(
        (
            ".".join(parts[:k])
            for k in range(len(parts) - 1, 0, -1)
            if parts[k - 1].isdigit() and (units is None or ".".join(parts[:k]) in units)
        ),
        None,
    )


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
    names: dict = field(
        default_factory=lambda: {"hidden": "hidden_states", "encoder": "encoder_hidden_states"}
    )
    returns: tuple[str, ...] = ("hidden",)  # what the block returns, in order


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


def argument_name(forward, preferred: str) -> str:
    """`preferred` if `forward` takes an argument of that name, else the name of its first argument."""
    try:
        params = list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return preferred
    return preferred if preferred in params or not params else params[0]


def takes_any_keyword(forward) -> bool:
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


def layout_of(
    model: torch.nn.Module, layout: Blocks | None = None, prefix: str = ""
) -> tuple[Family, list[BlockSite], list[Site], int]:
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
        raise DitscopeError(
            f"caching is not supported yet: {name} (supported: {supported}); for another "
            "PyTorch DiT declare its blocks: ditscope.apply(model, config, layout=ditscope.Blocks(...))"
        )
    blocks: list[BlockSite] = []
    sites: list[Site] = []
    offset = 0
    for list_name in layout.lists:
        mlist = _resolve(model, list_name)
        if mlist is None:
            if declared:
                raise DitscopeError(
                    f"{name} has no block list {list_name!r} (layout lists: {', '.join(layout.lists)})"
                )
            continue
        if not isinstance(mlist, (torch.nn.ModuleList, torch.nn.Sequential)):
            raise DitscopeError(f"{name}.{list_name} is a {type(mlist).__name__}, not a ModuleList of blocks")
        for i, block in enumerate(mlist):
            depth = i if layout.parallel else offset + i
            names = {"hidden": argument_name(block.forward, layout.hidden), "encoder": layout.encoder}
            bsite = BlockSite(
                len(blocks),
                f"{prefix}{list_name}.{i}",
                depth,
                block,
                args=layout.args,
                names=names,
                returns=layout.returns_of(list_name),
            )
            for child in layout.modules:
                module = getattr(block, child.name, None)
                if module is None:
                    continue
                kind = TEMPORAL if list_name in layout.temporal_lists and child.kind == "self" else child.kind
                site = Site(
                    len(sites),
                    f"{prefix}{list_name}.{i}.{child.name}",
                    kind,
                    child.stream,
                    bsite.index,
                    depth,
                    module,
                    hidden=argument_name(module.forward, layout.hidden),
                    tokenwise=child.tokenwise,
                    kv=child.kv,
                )
                bsite.sites.append(site)
                sites.append(site)
            blocks.append(bsite)
        offset += len(mlist)
    if not blocks:
        raise DitscopeError(f"no transformer blocks found in {name} (looked for {', '.join(layout.lists)})")
    if declared:  # a typo in a declared child name would otherwise cache nothing, silently
        missing = [c.name for c in layout.modules if not any(s.name.endswith("." + c.name) for s in sites)]
        if missing:
            raise DitscopeError(
                f"no block of {name} has a child module {missing[0]!r} (declared in layout.modules)"
            )
    depths = max(b.depth for b in blocks) + 1
    return family, blocks, sites, depths
