"""How each supported pipeline samples: its initial noise, its timesteps, the denoiser's inputs at a step and
its guidance, as diffusers' `FluxPipeline` and `StableDiffusion3Pipeline` do them (their own static helpers are
reused), so that qrunner's block-major loop reproduces their latents.

- Flux: latents packed 2 x 2 into tokens with position ids; flow-matching sigmas `linspace(1, 1/N, N)` shifted
  by `mu` for the image's token count; the timestep goes in divided by 1000; guidance-distilled checkpoints
  (`guidance_embeds`) take the guidance scale as an input, and there is no classifier-free guidance batch.
- SD3 / SD3.5: latents as images; the scheduler's own timesteps; classifier-free guidance when the scale is
  above 1: every step runs the negative and the positive prompt (the model batch is twice the samples, negatives
  first) and mixes the two predictions.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional

import numpy as np
import torch


@dataclass
class PromptEmbeds:
    """The text encoders' output for a batch of prompts (and of the negative prompt, for guidance)."""

    text: torch.Tensor  # [B, T, D] encoder_hidden_states
    pooled: torch.Tensor  # [B, P] pooled_projections
    negative_text: Optional[torch.Tensor] = None
    negative_pooled: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.text.shape[0])


class Sampling(ABC):
    """One pipeline class's sampling loop, piece by piece."""

    pipeline: ClassVar[str]
    default_guidance: ClassVar[float]  # the pipeline's own default guidance_scale

    @abstractmethod
    def text_tokens(self, max_sequence_length: int) -> int:
        """Tokens of the text stream for prompts encoded with `max_sequence_length`."""
        ...

    @abstractmethod
    def image_tokens(self, config: Any, height: int, width: int, vae_scale: int) -> int:
        """Tokens of the image stream for an image of `height` x `width` pixels."""
        ...

    @abstractmethod
    def vae_latents(self, latents: torch.Tensor, height: int, width: int, vae_scale: int) -> torch.Tensor:
        """Final latents as the VAE takes them (before its scaling and shift are undone)."""
        ...

    @abstractmethod
    def encode(self, pipe: Any, prompts: List[str], negative_prompt: str, guidance_scale: float,
               max_sequence_length: int) -> PromptEmbeds:
        """The prompts through the pipeline's own `encode_prompt` (its text encoders only)."""
        ...

    @abstractmethod
    def latent_channels(self, config: Any) -> int:
        ...

    @abstractmethod
    def initial_latents(self, config: Any, n: int, height: int, width: int, vae_scale: int,
                        generator: torch.Generator) -> torch.Tensor:
        ...

    @abstractmethod
    def set_timesteps(self, scheduler: Any, steps: int, latents: torch.Tensor, config: Any) -> torch.Tensor:
        ...

    def uses_cfg(self, guidance_scale: float) -> bool:
        return False

    @abstractmethod
    def step_inputs(self, latents: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, guidance_scale: float,
                    config: Any, height: int, width: int, vae_scale: int) -> Dict[str, Any]:
        """The denoiser's forward inputs at timestep `t` for every row of the model batch."""
        ...

    def combine(self, prediction: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """The model batch's prediction turned into one noise prediction per sample."""
        return prediction


def _shift(scheduler: Any, image_seq_len: int, max_shift: float) -> float:
    """The scheduler's timestep shift `mu` for an image of `image_seq_len` tokens; `max_shift` is the pipeline's
    own default where the scheduler config has none (Flux 1.15, SD3 1.16)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", max_shift))


class FluxSampling(Sampling):
    pipeline = "FluxPipeline"
    default_guidance = 3.5

    def text_tokens(self, max_sequence_length: int) -> int:
        return int(max_sequence_length)

    def image_tokens(self, config: Any, height: int, width: int, vae_scale: int) -> int:
        rows, cols = self._grid(height, width, vae_scale)
        return (rows // 2) * (cols // 2)

    def vae_latents(self, latents: torch.Tensor, height: int, width: int, vae_scale: int) -> torch.Tensor:
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(latents, int(height), int(width), vae_scale)

    def encode(self, pipe: Any, prompts: List[str], negative_prompt: str, guidance_scale: float,
               max_sequence_length: int) -> PromptEmbeds:
        text, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=max_sequence_length)
        return PromptEmbeds(text.float(), pooled.float())

    def latent_channels(self, config: Any) -> int:
        return int(config.in_channels) // 4

    def _grid(self, height: int, width: int, vae_scale: int) -> tuple:
        return 2 * (int(height) // (vae_scale * 2)), 2 * (int(width) // (vae_scale * 2))

    def initial_latents(self, config: Any, n: int, height: int, width: int, vae_scale: int,
                        generator: torch.Generator) -> torch.Tensor:
        from diffusers import FluxPipeline
        from diffusers.utils.torch_utils import randn_tensor

        rows, cols = self._grid(height, width, vae_scale)
        channels = self.latent_channels(config)
        noise = randn_tensor((n, channels, rows, cols), generator=generator, dtype=torch.float32)
        return FluxPipeline._pack_latents(noise, n, channels, rows, cols)

    def set_timesteps(self, scheduler: Any, steps: int, latents: torch.Tensor, config: Any) -> torch.Tensor:
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=_shift(scheduler, int(latents.shape[1]), 1.15))
        return scheduler.timesteps

    def step_inputs(self, latents: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, guidance_scale: float,
                    config: Any, height: int, width: int, vae_scale: int) -> Dict[str, Any]:
        from diffusers import FluxPipeline

        rows, cols = self._grid(height, width, vae_scale)
        n = latents.shape[0]
        guidance = (torch.full((n,), float(guidance_scale), dtype=torch.float32) if config.guidance_embeds
                    else None)
        return {"hidden_states": latents, "timestep": t.expand(n).to(latents.dtype) / 1000, "guidance": guidance,
                "pooled_projections": embeds.pooled, "encoder_hidden_states": embeds.text,
                "txt_ids": torch.zeros(embeds.text.shape[1], 3, dtype=latents.dtype),
                "img_ids": FluxPipeline._prepare_latent_image_ids(n, rows // 2, cols // 2, latents.device,
                                                                  latents.dtype)}


class SD3Sampling(Sampling):
    pipeline = "StableDiffusion3Pipeline"
    default_guidance = 7.0
    clip_tokens = 77  # the CLIP encoders' fixed length, before the T5 tokens

    def text_tokens(self, max_sequence_length: int) -> int:
        return self.clip_tokens + int(max_sequence_length)

    def image_tokens(self, config: Any, height: int, width: int, vae_scale: int) -> int:
        p = int(config.patch_size)
        return (int(height) // vae_scale // p) * (int(width) // vae_scale // p)

    def vae_latents(self, latents: torch.Tensor, height: int, width: int, vae_scale: int) -> torch.Tensor:
        return latents

    def encode(self, pipe: Any, prompts: List[str], negative_prompt: str, guidance_scale: float,
               max_sequence_length: int) -> PromptEmbeds:
        cfg = self.uses_cfg(guidance_scale)
        text, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt if cfg else None, max_sequence_length=max_sequence_length)
        return PromptEmbeds(text.float(), pooled.float(), None if negative is None else negative.float(),
                            None if negative_pooled is None else negative_pooled.float())

    def latent_channels(self, config: Any) -> int:
        return int(config.in_channels)

    def initial_latents(self, config: Any, n: int, height: int, width: int, vae_scale: int,
                        generator: torch.Generator) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        shape = (n, self.latent_channels(config), int(height) // vae_scale, int(width) // vae_scale)
        return randn_tensor(shape, generator=generator, dtype=torch.float32)

    def set_timesteps(self, scheduler: Any, steps: int, latents: torch.Tensor, config: Any) -> torch.Tensor:
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            p = int(config.patch_size)
            kwargs["mu"] = _shift(scheduler, (latents.shape[2] // p) * (latents.shape[3] // p), 1.16)
        scheduler.set_timesteps(steps, **kwargs)
        return scheduler.timesteps

    def uses_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1

    def step_inputs(self, latents: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, guidance_scale: float,
                    config: Any, height: int, width: int, vae_scale: int) -> Dict[str, Any]:
        text, pooled, batch = embeds.text, embeds.pooled, latents
        if self.uses_cfg(guidance_scale):
            if embeds.negative_text is None or embeds.negative_pooled is None:
                raise ValueError("guidance_scale > 1 needs the negative prompt's embeddings")
            text = torch.cat([embeds.negative_text, text])
            pooled = torch.cat([embeds.negative_pooled, pooled])
            batch = torch.cat([latents, latents])
        return {"hidden_states": batch, "timestep": t.expand(batch.shape[0]), "encoder_hidden_states": text,
                "pooled_projections": pooled}

    def combine(self, prediction: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        if not self.uses_cfg(guidance_scale):
            return prediction
        uncond, cond = prediction.chunk(2)
        return uncond + guidance_scale * (cond - uncond)


SAMPLINGS: Dict[str, Sampling] = {"FluxTransformer2DModel": FluxSampling(), "SD3Transformer2DModel": SD3Sampling()}


@torch.no_grad()
def encode_prompts(folder: Any, prompts: List[str], negative_prompt: str = "", guidance_scale: float = 1.0,
                   max_sequence_length: int = 256, dtype: torch.dtype = torch.float32) -> PromptEmbeds:
    """The prompts' embeddings from the pipeline folder's text encoders, loaded without the denoiser and the VAE
    and released on return: nothing of them is resident when the transformer's blocks are read."""
    from diffusers import DiffusionPipeline

    from qrunner.memory.trim import release_freed_memory

    from qrunner.models.diffusion import dtype_argument

    pipe = DiffusionPipeline.from_pretrained(str(folder.path), transformer=None, vae=None, **dtype_argument(dtype))
    try:
        return SAMPLINGS[folder.denoiser_class].encode(pipe, list(prompts), negative_prompt, guidance_scale,
                                                      max_sequence_length)
    finally:
        del pipe
        release_freed_memory()


@torch.no_grad()
def decode_latents(folder: Any, latents: torch.Tensor, height: int, width: int, vae_scale: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Final latents as images `[N, 3, H, W]` in [0, 1], through the pipeline folder's VAE alone (loaded here and
    released on return), as the pipeline's own decoding does: unpacked, scaling and shift undone."""
    import diffusers

    from qrunner.memory.trim import release_freed_memory
    from qrunner.models.diffusion import dtype_argument

    library, cls = folder.components["vae"]
    vae = getattr(diffusers, cls).from_pretrained(str(folder.path / "vae"), **dtype_argument(dtype)).eval()
    try:
        z = SAMPLINGS[folder.denoiser_class].vae_latents(latents, height, width, vae_scale).to(dtype)
        z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
    finally:
        del vae
        release_freed_memory()
