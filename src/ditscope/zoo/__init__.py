"""The zoo: models ditscope can run with no download, and how a MODEL argument becomes a pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..errors import DitscopeError
from . import builtin


@dataclass(frozen=True)
class ZooEntry:
    build: object  # callable(dtype) -> pipeline
    description: str
    steps: int
    guidance_scale: float | None
    call_kwargs: dict = field(default_factory=dict)


ZOO: dict[str, ZooEntry] = {
    "random-pixart": ZooEntry(
        build=lambda dtype: builtin.random_pixart(dtype=dtype),
        description="PixArt-alpha-shaped, random weights (8 blocks, 256 tokens, T5 text encoder)",
        steps=20,
        guidance_scale=4.5,
        call_kwargs={"max_sequence_length": builtin.MAX_TEXT_TOKENS, "clean_caption": False, "use_resolution_binning": False},
    ),
}
DEFAULT_MODEL = "random-pixart"


def builtin_prompts() -> list[str]:
    text = resources.files(__package__).joinpath("prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load(name: str, dtype: torch.dtype = torch.float32):
    """A zoo pipeline by name."""
    if name not in ZOO:
        raise DitscopeError(f"unknown zoo model {name!r}; available: {', '.join(ZOO)}")
    return ZOO[name].build(dtype)


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Resolve a MODEL argument: a zoo name, a local diffusers folder, or a Hugging Face hub id."""
    if model in ZOO:
        return load(model, dtype).to(device)
    path = Path(model)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise DitscopeError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
        if not (path / "transformer").is_dir():
            raise DitscopeError(f"{model} has no transformer/ folder; ditscope profiles diffusion transformers")
        source = str(path)
    elif model.count("/") == 1 and not model.startswith((".", "/")):
        source = model
    else:
        raise DitscopeError(
            f"unknown model {model!r}: not a zoo name ({', '.join(ZOO)}), a local folder, or a hub id (org/name)"
        )
    import inspect
    import warnings

    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    # newer diffusers call it `dtype`, older ones `torch_dtype`
    takes_dtype = "dtype" in inspect.getsource(DiffusionPipeline.from_pretrained)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # loading chatter would bury our one-line error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = DiffusionPipeline.from_pretrained(source, **{"dtype" if takes_dtype else "torch_dtype": dtype})
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DitscopeError(f"cannot load model {model!r} ({reason[:200]}); check the id, or download it first") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if getattr(pipe, "transformer", None) is None:
        raise DitscopeError(f"{model} ({type(pipe).__name__}) has no transformer; ditscope profiles diffusion transformers")
    return pipe.to(device)
