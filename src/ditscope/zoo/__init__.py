"""The zoo: models ditscope can run with no download, and how a MODEL argument becomes a pipeline."""

from __future__ import annotations

import contextlib
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
    calibration_prompts: int = 8  # what `plan` and `tune` fit on when --n-prompts is not given
    check_prompts: int | None = None  # how many of them `plan` checks on after its first check (None: all)
    measure_prompts: int | None = None  # on how many of them `plan` measures the errors (None: all)


ASSETS = Path(__file__).parent / "assets"


def _trained(name: str):
    def build(dtype):
        from .pipeline import ShapesPipeline

        folder = ASSETS / name
        if not (folder / "model_index.json").is_file():
            raise DitscopeError(
                f"zoo model {name} has no weights in {folder}; train it with `ditscope zoo train {name}`"
            )
        with quiet_loading():
            pipe = ShapesPipeline.from_pretrained(str(folder))
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)

    return build


ZOO: dict[str, ZooEntry] = {
    "tiny-pixart": ZooEntry(
        build=_trained("tiny-pixart"),
        description="PixArtTransformer2DModel trained here on shapes captions (8 blocks, 256 tokens, T5 text encoder)",
        steps=20,
        guidance_scale=4.5,
        calibration_prompts=24,  # 8 missed the hard prompts a plan then fails on (benchmarks/RESULTS.md)
    ),
    "tiny-dit": ZooEntry(
        build=_trained("tiny-dit"),
        description="DiTTransformer2DModel, class-conditional (shape x colour), trained here (8 blocks, 256 tokens)",
        steps=50,
        guidance_scale=1.5,  # DiT-XL/2's own setting; 4.0 oversaturates into fragments (lower colour accuracy)
        calibration_prompts=24,  # 8 missed the hard prompts a plan then fails on (benchmarks/RESULTS.md)
    ),
    "tiny-mmdit": ZooEntry(
        build=_trained("tiny-mmdit"),
        description="SD3Transformer2DModel (joint attention) trained here with rectified flow (8 blocks, 256 tokens)",
        steps=28,
        guidance_scale=4.5,
        calibration_prompts=24,  # 8 missed the hard prompts a plan then fails on (benchmarks/RESULTS.md)
    ),
    "tiny-latte": ZooEntry(
        build=_trained("tiny-latte"),
        description="LatteTransformer3DModel trained here on moving shapes from tiny-pixart's weights (8 spatial + 8 temporal blocks, 8 frames)",
        steps=20,
        guidance_scale=4.5,
        calibration_prompts=8,  # 8 videos: 4 missed the hard ones a plan then fails on (benchmarks/RESULTS.md)
        check_prompts=4,  # checks on the 4 hardest of the 8 after the first: 5 minutes on two cores (RESULTS.md)
        measure_prompts=4,  # the errors of the first 4: the calibration's cost halved, the checks still on 8
    ),
    "random-pixart": ZooEntry(
        build=lambda dtype: builtin.random_pixart(dtype=dtype),
        description="PixArt-alpha-shaped, random weights (8 blocks, 256 tokens, T5 text encoder)",
        steps=20,
        guidance_scale=4.5,
        call_kwargs={
            "max_sequence_length": builtin.MAX_TEXT_TOKENS,
            "clean_caption": False,
            "use_resolution_binning": False,
        },
    ),
}


def available(name: str) -> bool:
    """Whether a zoo model can be built here (trained models need their shipped weights)."""
    return name in ZOO and (name.startswith("random-") or (ASSETS / name / "model_index.json").is_file())


# The trained tiny-pixart once its weights ship; the random-weight pipeline until then.
DEFAULT_MODEL = "tiny-pixart" if available("tiny-pixart") else "random-pixart"


@contextlib.contextmanager
def quiet_loading():
    """Silence diffusers/transformers loading chatter (progress bars, advice, deprecations)."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def builtin_prompts() -> list[str]:
    text = resources.files(__package__).joinpath("prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _reason(e: Exception) -> str:
    """An exception's first line, short (library errors can run to pages)."""
    text = str(e).strip()
    return (text.splitlines()[0][:300].rstrip(". ") if text else "") or type(e).__name__


def load(name: str, dtype: torch.dtype = torch.float32):
    """A zoo pipeline by name."""
    if name not in ZOO:
        raise DitscopeError(f"unknown zoo model {name!r}; available: {', '.join(ZOO)}")
    return ZOO[name].build(dtype)


def check_model(model: str) -> str:
    """What a MODEL argument names, checked without loading it: "zoo", "folder" or "hub" (a hub id that,
    offline, must be in the local cache). Raises a DitscopeError for anything else."""
    if model in ZOO:
        return "zoo"
    path = Path(model)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise DitscopeError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
        if not (path / "transformer").is_dir():
            raise DitscopeError(
                f"{model} has no transformer/ folder; ditscope profiles diffusion transformers"
            )
        return "folder"
    if model.count("/") == 1 and not model.startswith((".", "/")):
        import os

        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            from huggingface_hub import try_to_load_from_cache

            try:
                cached = try_to_load_from_cache(model, "model_index.json")
            except Exception:  # an id huggingface_hub refuses
                cached = None
            if not isinstance(cached, str):
                raise DitscopeError(
                    f"cannot load model {model!r} (HF_HUB_OFFLINE is set and it is not in the local "
                    "cache); check the id, or download it first"
                )
        return "hub"
    raise DitscopeError(
        f"unknown model {model!r}: not a zoo name ({', '.join(ZOO)}), a local folder, or a hub id (org/name)"
    )


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Resolve a MODEL argument: a zoo name, a local diffusers folder, or a Hugging Face hub id."""
    kind = check_model(model)
    if kind == "zoo":
        return load(model, dtype).to(device)
    path = Path(model)
    source = str(path) if kind == "folder" else model
    if kind == "folder":
        if '"ShapesPipeline"' in (path / "model_index.json").read_text(encoding="utf-8", errors="replace"):
            from .pipeline import ShapesPipeline

            try:
                with quiet_loading():
                    pipe = ShapesPipeline.from_pretrained(source)
            except Exception as e:  # a damaged model_index.json, config or weights file
                raise DitscopeError(
                    f"cannot load model {model!r}: {_reason(e)}; its files are damaged or incomplete "
                    "(save or copy the folder again)"
                ) from None
            return (pipe if dtype == torch.float32 else pipe.to(dtype=dtype)).to(device)
    import inspect

    from diffusers import DiffusionPipeline

    # newer diffusers call it `dtype`, older ones `torch_dtype`
    takes_dtype = "dtype" in inspect.getsource(DiffusionPipeline.from_pretrained)
    try:
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(
                source, **{"dtype" if takes_dtype else "torch_dtype": dtype}
            )
    except Exception as e:
        raise DitscopeError(
            f"cannot load model {model!r} ({_reason(e)}); check the id, or download it first"
        ) from None
    if getattr(pipe, "transformer", None) is None:
        raise DitscopeError(
            f"{model} ({type(pipe).__name__}) has no transformer; ditscope profiles diffusion transformers"
        )
    return pipe.to(device)
