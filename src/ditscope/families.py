"""What ditscope needs to know about each model family, as one small table.

Everything else (capture, statistics, caching) is a single mechanism shared by all models. A family
entry only answers questions the tensors cannot answer by themselves:

- where text tokens sit in a joint (image + text) attention sequence,
- which attention modules see an already-joined sequence without being told the text length,
- which attention modules are not part of the denoising trunk (a text refiner, say),
- in which order a pipeline lays out the classifier-free-guidance branches,
- for caching: where the transformer blocks are, what they take and return, and which of their child
  modules are self-attention, cross-attention and MLP (`Blocks`).

"image" means the visual tokens, frames included, for video models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

IMAGE, TEXT, JOINT = "image", "text", "joint"

# Module kinds a cache method treats differently (ToCa's ratio factors, PAB's broadcast ranges).
SELF, CROSS, MLP, TEMPORAL = "self", "cross", "mlp", "temporal"


@dataclass(frozen=True)
class Blocks:
    """How a family's transformer blocks are laid out, for the cache engine.

    Attributes:
        lists: attribute names of the model's block `ModuleList`s.
        parallel: the lists interleave (Latte: spatial block i, then temporal block i), so block i of
            each list is depth i; otherwise depth counts through the lists in order (Flux: double, single).
        args: names of `block.forward`'s leading positional arguments ("hidden", "encoder").
        returns: what a block returns, in order ("hidden", "encoder"); a single name = a bare tensor.
        modules: child module name -> (kind, stream). kind: self, cross, mlp or temporal; stream: which
            tokens its input holds: image, text, or joint (the joined sequence, in the family's order).
        temporal_lists: lists whose self-attention runs over frames (kind "temporal").
    """

    lists: tuple[str, ...]
    args: tuple[str, ...] = ("hidden",)
    returns: tuple[str, ...] = ("hidden",)
    modules: tuple[tuple[str, str, str], ...] = ()
    parallel: bool = False
    temporal_lists: tuple[str, ...] = ()


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
    "DiTTransformer2DModel": Family("dit", cfg_batched=("cond", "uncond"),
                                    blocks=Blocks(("transformer_blocks",), modules=_BASIC)),
    "PixArtTransformer2DModel": Family("pixart", blocks=Blocks(("transformer_blocks",), modules=_BASIC)),
    "SD3Transformer2DModel": Family(
        "sd3", joint_order=(IMAGE, TEXT),
        blocks=Blocks(("transformer_blocks",), args=("hidden", "encoder"), returns=("encoder", "hidden"),
                      modules=(("attn", SELF, JOINT), ("attn2", SELF, IMAGE), ("ff", MLP, IMAGE),
                               ("ff_context", MLP, TEXT))),
    ),
    "FluxTransformer2DModel": Family(
        "flux", joint_order=(TEXT, IMAGE), single_stream=r"single_transformer_blocks",
        blocks=Blocks(("transformer_blocks", "single_transformer_blocks"), args=("hidden", "encoder"),
                      returns=("encoder", "hidden"),
                      modules=(("attn", SELF, JOINT), ("ff", MLP, IMAGE), ("ff_context", MLP, TEXT),
                               ("proj_mlp", MLP, JOINT))),
    ),
    "CogVideoXTransformer3DModel": Family(
        "cogvideox", joint_order=(TEXT, IMAGE),
        blocks=Blocks(("transformer_blocks",), args=("hidden", "encoder"), returns=("hidden", "encoder"),
                      modules=(("attn1", SELF, JOINT), ("ff", MLP, JOINT))),
    ),
    "LatteTransformer3DModel": Family(
        "latte",
        blocks=Blocks(("transformer_blocks", "temporal_transformer_blocks"), parallel=True, modules=_BASIC,
                      temporal_lists=("temporal_transformer_blocks",)),
    ),
    "MochiTransformer3DModel": Family("mochi", joint_order=(IMAGE, TEXT)),
    "HunyuanVideoTransformer3DModel": Family(
        "hunyuanvideo", joint_order=(IMAGE, TEXT), exclude=(r"context_embedder",)
    ),
    "WanTransformer3DModel": Family("wan"),
    "QwenImageTransformer2DModel": Family("qwenimage", joint_order=(TEXT, IMAGE)),
}

# Any other model: image-first joint attention, no exclusions; the user names attention modules.
GENERIC = Family("generic")


def family_of(model) -> Family:
    """The family entry for a transformer (or GENERIC for models outside the table)."""
    return FAMILIES.get(type(model).__name__, GENERIC)
