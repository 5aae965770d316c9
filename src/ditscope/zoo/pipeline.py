"""`ShapesPipeline`: the zoo's diffusers pipeline, pixel space, one class for every zoo transformer.

It is a real `DiffusionPipeline` (save_pretrained / from_pretrained, progress bar, generators, a
scheduler whose `step` marks each denoising step), called like diffusers' own:

    pipe("a small red circle at the top left on a grey background", num_inference_steps=20,
         guidance_scale=4.5, generator=torch.Generator().manual_seed(0), output_type="pil").images

and, for the video model, `.frames` ((B, F, C, H, W) tensors, or a list of frame lists), as diffusers'
video pipelines (Latte, CogVideoX, ...) return them.

Images live in pixel space in [-1, 1] (no autoencoder). Guidance batches [uncond, cond] in one call,
as PixArt and SD3 do. How each transformer takes its condition is `_conditioning` below: the text
models take the encoder's token states (SD3 also a mean-pooled vector), DiT takes class labels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..errors import DitscopeError, DitscopeWarning


@dataclass
class VideoPipelineOutput(BaseOutput):
    """A video pipeline's output, as diffusers' own: `frames` per video."""

    frames: torch.Tensor | np.ndarray | list


class ShapesPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer"
    _optional_components = ["tokenizer", "text_encoder"]
    cfg_batched_branches = ("uncond", "cond")  # read by ditscope's recorder: guidance batch order

    def __init__(self, transformer, scheduler, tokenizer=None, text_encoder=None):
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, tokenizer=tokenizer, text_encoder=text_encoder
        )

    # ------------------------------------------------------------------------------ conditioning
    @property
    def is_class_conditional(self) -> bool:
        return self.text_encoder is None

    def encode_prompt(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states (B, T, C) and mask (B, T). Unknown words become [UNK] (with a warning)."""
        unk = self.tokenizer.unk_token_id
        batch = self.tokenizer(
            [p.lower() for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        )
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        if (ids == unk).any():
            vocab = self.tokenizer.get_vocab()
            unknown = sorted({w for p in prompts for w in p.lower().split() if w not in vocab})
            warnings.warn(
                f"words outside the model's vocabulary are read as [UNK]: {', '.join(unknown)}",
                DitscopeWarning,
                stacklevel=3,
            )
        states = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        return states, mask

    def class_labels(self, prompts) -> list[int]:
        from .data import class_label, parse_caption

        labels = []
        for p in prompts:
            if isinstance(p, int) or str(p).strip().isdigit():
                labels.append(int(p))
                continue
            try:
                scene = parse_caption(
                    str(p) if " on a " in str(p) else f"a small {p} in the center on a grey background"
                )
            except (ValueError, IndexError):
                raise DitscopeError(
                    f"tiny-dit takes a class index or '<colour> <shape>' (e.g. 'red circle'), not {p!r}"
                ) from None
            labels.append(class_label(scene.objects[0]))
        n = self.transformer.config.num_embeds_ada_norm
        if any(not 0 <= label < n for label in labels):
            raise DitscopeError(f"class labels must be in 0..{n - 1}")
        return labels

    def _conditioning(self, prompts, negative: str, cfg: bool, device) -> dict:
        name = type(self.transformer).__name__
        if self.is_class_conditional:
            labels = torch.tensor(self.class_labels(prompts), device=device)
            if cfg:  # the null class is the last embedding row
                labels = torch.cat(
                    [torch.full_like(labels, self.transformer.config.num_embeds_ada_norm), labels]
                )
            return {"class_labels": labels}
        states, mask = self.encode_prompt(list(prompts), device)
        if cfg:
            neg_states, neg_mask = self.encode_prompt([negative] * len(prompts), device)
            states, mask = torch.cat([neg_states, states]), torch.cat([neg_mask, mask])
        if name == "SD3Transformer2DModel":
            pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            return {"encoder_hidden_states": states, "pooled_projections": pooled}
        if (
            name == "LatteTransformer3DModel"
        ):  # Latte hands its mask to every frame unrepeated: no mask, as LattePipeline
            return {"encoder_hidden_states": states, "enable_temporal_attentions": True}
        kwargs = {"encoder_hidden_states": states, "encoder_attention_mask": mask}
        if name == "PixArtTransformer2DModel":
            kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return kwargs

    # --------------------------------------------------------------------------------- sampling
    def sample_shape(self, batch: int) -> tuple[int, ...]:
        cfg = self.transformer.config
        if type(self.transformer).__name__ == "LatteTransformer3DModel":
            return (batch, cfg.in_channels, cfg.video_length, cfg.sample_size, cfg.sample_size)
        return (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The transformer's noise (or velocity) prediction, trimmed of learned-variance channels."""
        timestep = t.expand(x.shape[0])
        if type(self.transformer).__name__ == "SD3Transformer2DModel":
            timestep = timestep.float()
        out = self.transformer(x, timestep=timestep, return_dict=False, **cond)[0]
        return out[:, : x.shape[1]]

    @torch.no_grad()
    def __call__(
        self,
        prompt,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.5,
        generator=None,
        output_type: str = "pil",
        negative_prompt: str = "",
        return_dict: bool = True,
        callback_on_step_end=None,
    ):
        if output_type not in ("pil", "np", "pt", "latent"):
            raise DitscopeError(f"output_type must be pil, np, pt or latent, not {output_type!r}")
        prompts = [prompt] if isinstance(prompt, (str, int)) else list(prompt)
        device = self._execution_device
        cfg = guidance_scale > 1
        cond = self._conditioning(prompts, negative_prompt, cfg, device)
        x = randn_tensor(
            self.sample_shape(len(prompts)), generator=generator, device=device, dtype=self.transformer.dtype
        )
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            x_in = torch.cat([x, x]) if cfg else x
            if hasattr(self.scheduler, "scale_model_input"):
                x_in = self.scheduler.scale_model_input(x_in, t)
            out = self.predict(x_in, t, cond)
            if cfg:
                uncond, text = out.chunk(2)
                out = uncond + guidance_scale * (text - uncond)
            x = self.scheduler.step(out, t, x, return_dict=False)[0]
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": x})
        if output_type == "latent":
            images = x
        else:
            images = (x / 2 + 0.5).clamp(0, 1)
            if images.dim() == 5:  # (B, C, F, H, W) -> (B, F, C, H, W), as diffusers' video outputs
                images = images.permute(0, 2, 1, 3, 4)
            if output_type in ("np", "pil"):
                images = images.float().cpu().movedim(-3, -1).numpy()
            if output_type == "pil":
                images = _to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return VideoPipelineOutput(frames=images) if x.dim() == 5 else ImagePipelineOutput(images=images)


def _to_pil(images: np.ndarray):
    from PIL import Image

    def one(a):
        return Image.fromarray((a * 255).round().astype(np.uint8))

    if images.ndim == 5:
        return [[one(f) for f in video] for video in images]
    return [one(a) for a in images]
