"""What ditscope needs to know about each model family, as one small table.

Everything else (capture, statistics, caching) is a single mechanism shared by all models. A family
entry only answers questions the tensors cannot answer by themselves:

- where text tokens sit in a joint (image + text) attention sequence,
- which attention modules see an already-joined sequence without being told the text length,
- which attention modules are not part of the denoising trunk (a text refiner, say),
- in which order a pipeline lays out the classifier-free-guidance branches,
- for caching: where the transformer blocks are, what they take and return, and which of their child
  modules are self-attention, cross-attention and MLP (`Blocks`). A model outside the table is cached
  from a `Blocks` its user declares (`ditscope.apply(model, config, layout=Blocks(...))`): the same row,
  not another mechanism.

"image" means the visual tokens, frames included, for video models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

IMAGE, TEXT, JOINT = "image", "text", "joint"

# Module kinds a cache method treats differently (ToCa's ratio factors, PAB's broadcast ranges).
SELF, CROSS, MLP, TEMPORAL = "self", "cross", "mlp", "temporal"
KINDS = (SELF, CROSS, MLP, TEMPORAL)


class Child(NamedTuple):
    """A cached child module of a block.

    Attributes:
        name: attribute name on the block (``attn1``).
        kind: self, cross, mlp or temporal.
        stream: which tokens its input holds: image, text, or joint (the joined sequence, in the family's order).
        tokenwise: a subset of its tokens can run alone and give those tokens' outputs exactly (ToCa's
            partial steps). False for attention that applies rotary embeddings inside to the whole sequence
            (Wan's self-attention): a subset would mis-slice them. Joint self-attention never is.
        kv: for self- and temporal attention, the keyword through which a subset of queries still attends to
            every token (diffusers' ``Attention``: ``encoder_hidden_states``).
    """

    name: str
    kind: str
    stream: str
    tokenwise: bool = True
    kv: str = "encoder_hidden_states"


@dataclass(frozen=True)
class Blocks:
    """How a model's transformer blocks are laid out, for the cache engine: a row of the family table, or
    a layout a user declares for a model of their own (`ditscope.apply(model, config, layout=Blocks(...))`).

    Attributes:
        lists: attribute paths of the model's block `ModuleList`s (dotted for nested ones: ``backbone.blocks``).
        parallel: the lists interleave (Latte: spatial block i, then temporal block i), so block i of
            each list is depth i; otherwise depth counts through the lists in order (Flux: double, single).
        args: roles of `block.forward`'s leading positional arguments ("hidden", "encoder").
        returns: what a block returns, in order ("hidden", "encoder"); a single name = a bare tensor.
        list_returns: (list, returns) pairs for lists whose blocks return otherwise than `returns`.
        modules: the cached child modules of a block: `Child` rows, or (name, kind, stream) tuples.
        temporal_lists: lists whose self-attention runs over frames (kind "temporal").
        hidden: the name of the hidden-state argument of the blocks, their child modules and the model
            (positional: the first argument).
        encoder: the name of the blocks' text-state argument (role "encoder").
        timestep: the name of the model's timestep argument, which tells steps and guidance calls apart;
            None: every model call is the next step (a sampling loop that calls the model once per step).
    """

    lists: tuple[str, ...]
    args: tuple[str, ...] = ("hidden",)
    returns: tuple[str, ...] = ("hidden",)
    modules: tuple[Child, ...] = ()
    parallel: bool = False
    temporal_lists: tuple[str, ...] = ()
    list_returns: tuple[tuple[str, tuple[str, ...]], ...] = ()
    hidden: str = "hidden_states"
    encoder: str = "encoder_hidden_states"
    timestep: str | None = "timestep"

    def __post_init__(self):
        from .errors import DitscopeError

        def names(value, what):
            value = (value,) if isinstance(value, str) else tuple(value)
            if not value or not all(isinstance(v, str) and v for v in value):
                raise DitscopeError(f"block layout: {what} must be non-empty names, not {value!r}")
            return value

        object.__setattr__(self, "lists", names(self.lists, "lists"))
        object.__setattr__(self, "args", names(self.args, "args"))
        object.__setattr__(self, "returns", names(self.returns, "returns"))
        object.__setattr__(self, "temporal_lists", tuple(self.temporal_lists))
        children = []
        for m in self.modules:
            try:
                child = Child(*m)
            except TypeError:
                raise DitscopeError(f"block layout: module {m!r} is not (name, kind, stream)") from None
            if child.kind not in KINDS or child.stream not in (IMAGE, TEXT, JOINT):
                raise DitscopeError(
                    f"block layout: module {child.name!r} has kind {child.kind!r} and stream "
                    f"{child.stream!r}; kinds are {', '.join(KINDS)}, streams image, text, joint"
                )
            children.append(child)
        object.__setattr__(self, "modules", tuple(children))
        roles = set(self.args) | set(self.returns) | {r for _, rs in self.list_returns for r in rs}
        if not roles <= {"hidden", "encoder"} or "hidden" not in self.returns:
            raise DitscopeError(
                f"block layout: args and returns are roles 'hidden' and 'encoder' (returns must "
                f"include 'hidden'), not {sorted(roles)}"
            )

    def returns_of(self, list_name: str) -> tuple[str, ...]:
        """What the blocks of one list return."""
        return dict(self.list_returns).get(list_name, self.returns)


_BASIC = (("attn1", SELF, IMAGE), ("attn2", CROSS, IMAGE), ("ff", MLP, IMAGE))


@dataclass(frozen=True)
class Family:
    """Per-model facts, keyed by the transformer's class name.

    Attributes:
        name: short family name used in reports.
        joint_order: order of the two streams when an attention module receives `encoder_hidden_states`
            and attends over image and text jointly (SD3: image first; Flux: text first).
        single_stream: regex on module names whose attention input is the already-joined sequence with
            no `encoder_hidden_states` (Flux single blocks). Their text length is read from the
            transformer's own `encoder_hidden_states` argument.
        exclude: regexes of attention modules that are not trunk layers (never recorded).
        cfg_batched: branch names, in batch order, when the pipeline batches guidance into one call
            (the diffusers pipeline's order; a pipeline may override it with `cfg_batched_branches`).
        cfg_separate: branch names, in call order, when the pipeline calls the model once per branch.
        blocks: the block layout for caching (None: caching not supported yet).
    """

    name: str
    joint_order: tuple[str, str] = (IMAGE, TEXT)
    single_stream: str | None = None
    exclude: tuple[str, ...] = ()
    cfg_batched: tuple[str, ...] = ("uncond", "cond")
    cfg_separate: tuple[str, ...] = ("cond", "uncond")
    blocks: Blocks | None = None
    _exclude_re: tuple[re.Pattern, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_exclude_re", tuple(re.compile(p) for p in self.exclude))

    def excludes(self, module_name: str) -> bool:
        return any(p.search(module_name) for p in self._exclude_re)

    def is_single_stream(self, module_name: str) -> bool:
        return self.single_stream is not None and re.search(self.single_stream, module_name) is not None


FAMILIES: dict[str, Family] = {
    "DiTTransformer2DModel": Family(
        "dit", cfg_batched=("cond", "uncond"), blocks=Blocks(("transformer_blocks",), modules=_BASIC)
    ),
    "PixArtTransformer2DModel": Family("pixart", blocks=Blocks(("transformer_blocks",), modules=_BASIC)),
    "SD3Transformer2DModel": Family(
        "sd3",
        joint_order=(IMAGE, TEXT),
        blocks=Blocks(
            ("transformer_blocks",),
            args=("hidden", "encoder"),
            returns=("encoder", "hidden"),
            modules=(
                ("attn", SELF, JOINT),
                ("attn2", SELF, IMAGE),
                ("ff", MLP, IMAGE),
                ("ff_context", MLP, TEXT),
            ),
        ),
    ),
    "FluxTransformer2DModel": Family(
        "flux",
        joint_order=(TEXT, IMAGE),
        single_stream=r"single_transformer_blocks",
        blocks=Blocks(
            ("transformer_blocks", "single_transformer_blocks"),
            args=("hidden", "encoder"),
            returns=("encoder", "hidden"),
            modules=(
                ("attn", SELF, JOINT),
                ("ff", MLP, IMAGE),
                ("ff_context", MLP, TEXT),
                ("proj_mlp", MLP, JOINT),
            ),
        ),
    ),
    "CogVideoXTransformer3DModel": Family(
        "cogvideox",
        joint_order=(TEXT, IMAGE),
        blocks=Blocks(
            ("transformer_blocks",),
            args=("hidden", "encoder"),
            returns=("hidden", "encoder"),
            modules=(("attn1", SELF, JOINT), ("ff", MLP, JOINT)),
        ),
    ),
    "LatteTransformer3DModel": Family(
        "latte",
        blocks=Blocks(
            ("transformer_blocks", "temporal_transformer_blocks"),
            parallel=True,
            modules=_BASIC,
            temporal_lists=("temporal_transformer_blocks",),
        ),
    ),
    "MochiTransformer3DModel": Family(
        "mochi",
        joint_order=(IMAGE, TEXT),
        blocks=Blocks(
            ("transformer_blocks",),
            args=("hidden", "encoder"),
            returns=("hidden", "encoder"),
            modules=(("attn1", SELF, JOINT), ("ff", MLP, IMAGE), ("ff_context", MLP, TEXT)),
        ),
    ),
    # double-stream blocks, then single-stream ones (which split the joined sequence again before returning);
    # the token refiner (context_embedder) is not a trunk block
    "HunyuanVideoTransformer3DModel": Family(
        "hunyuanvideo",
        joint_order=(IMAGE, TEXT),
        exclude=(r"context_embedder",),
        blocks=Blocks(
            ("transformer_blocks", "single_transformer_blocks"),
            args=("hidden", "encoder"),
            returns=("hidden", "encoder"),
            modules=(
                ("attn", SELF, JOINT),
                ("ff", MLP, IMAGE),
                ("ff_context", MLP, TEXT),
                ("proj_mlp", MLP, JOINT),
            ),
        ),
    ),
    # attn1 applies rotary embeddings to the whole sequence inside: no token subset of it (Child.tokenwise)
    "WanTransformer3DModel": Family(
        "wan",
        blocks=Blocks(
            ("blocks",),
            args=("hidden", "encoder"),
            modules=(
                Child("attn1", SELF, IMAGE, tokenwise=False),
                ("attn2", CROSS, IMAGE),
                ("ffn", MLP, IMAGE),
            ),
        ),
    ),
    "QwenImageTransformer2DModel": Family(
        "qwenimage",
        joint_order=(TEXT, IMAGE),
        blocks=Blocks(
            ("transformer_blocks",),
            args=("hidden", "encoder"),
            returns=("encoder", "hidden"),
            modules=(("attn", SELF, JOINT), ("img_mlp", MLP, IMAGE), ("txt_mlp", MLP, TEXT)),
        ),
    ),
}

# Any other model: image-first joint attention, no exclusions; the user names attention modules.
GENERIC = Family("generic")


def family_of(model) -> Family:
    """The family entry for a transformer: by its class name, a base class's name, or as a variant of a
    family (``WanVACETransformer3DModel``, ``HunyuanVideoFramepackTransformer3DModel``: the family's stem
    followed by a capitalised word; ``Flux2...`` or ``HunyuanVideo15...`` are other architectures). GENERIC
    for models outside the table."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    name = type(model).__name__
    for key, family in FAMILIES.items():
        stem = re.sub(r"Transformer[23]DModel$", "", key)
        if re.fullmatch(rf"{re.escape(stem)}[A-Z][A-Za-z]*Transformer[23]DModel", name):
            return family
    return GENERIC
