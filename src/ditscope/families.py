"""What ditscope needs to know about each model family, as one small table.

Everything else (capture, statistics, caching) is a single mechanism shared by all models. A family
entry only answers questions the tensors cannot answer by themselves:

- where text tokens sit in a joint (image + text) attention sequence,
- which attention modules see an already-joined sequence without being told the text length,
- which attention modules are not part of the denoising trunk (a text refiner, say),
- in which order a pipeline lays out the classifier-free-guidance branches.

"image" means the visual tokens, frames included, for video models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

IMAGE, TEXT = "image", "text"


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
    """

    name: str
    joint_order: tuple[str, str] = (IMAGE, TEXT)
    single_stream: str | None = None
    exclude: tuple[str, ...] = ()
    cfg_batched: tuple[str, ...] = ("uncond", "cond")
    cfg_separate: tuple[str, ...] = ("cond", "uncond")
    _exclude_re: tuple[re.Pattern, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_exclude_re", tuple(re.compile(p) for p in self.exclude))

    def excludes(self, module_name: str) -> bool:
        return any(p.search(module_name) for p in self._exclude_re)

    def is_single_stream(self, module_name: str) -> bool:
        return self.single_stream is not None and re.search(self.single_stream, module_name) is not None


FAMILIES: dict[str, Family] = {
    "DiTTransformer2DModel": Family("dit", cfg_batched=("cond", "uncond")),
    "PixArtTransformer2DModel": Family("pixart"),
    "SD3Transformer2DModel": Family("sd3", joint_order=(IMAGE, TEXT)),
    "FluxTransformer2DModel": Family("flux", joint_order=(TEXT, IMAGE), single_stream=r"single_transformer_blocks"),
    "CogVideoXTransformer3DModel": Family("cogvideox", joint_order=(TEXT, IMAGE)),
    "LatteTransformer3DModel": Family("latte"),
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


def pipeline_prompt_kwargs(pipe, prompts: list[str]) -> dict:
    """How a pipeline takes a batch of prompts. DiT is class-conditional: its "prompts" are labels."""
    if type(pipe).__name__ == "DiTPipeline":
        return {"class_labels": [_dit_label(pipe, p) for p in prompts]}
    return {"prompt": list(prompts)}


def _dit_label(pipe, prompt: str) -> int:
    text = prompt.strip()
    if text.isdigit():
        return int(text)
    labels = getattr(pipe, "labels", None) or {}
    if text in labels:
        return int(labels[text])
    from .errors import DitscopeError

    raise DitscopeError(
        f"DiT prompt {text!r} is neither a class index nor a known label name; "
        "use integers 0..999 or names from pipe.labels"
    )
