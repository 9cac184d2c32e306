"""Tiny random-weight diffusion transformers (Flux, SD3, SD3.5) saved as diffusers pipeline folders.

Every linear width is a multiple of 128 (the default group size), so packing is exercised for real. Only the
denoiser and the scheduler are written; `model_index.json` names the other components of the real pipeline class
so that reading the folder sees what a real one holds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch

DIFFUSION_KINDS = ("flux", "sd3", "sd35")

_CONFIGS: Dict[str, Dict[str, Any]] = {
    "flux": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
                 num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=False,
                 axes_dims_rope=(16, 24, 24)),
    "sd3": dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64,
                num_attention_heads=2, joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=128,
                out_channels=16, pos_embed_max_size=16),
    "sd35": dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64,
                 num_attention_heads=2, joint_attention_dim=128, caption_projection_dim=128,
                 pooled_projection_dim=128, out_channels=16, pos_embed_max_size=16, dual_attention_layers=(0, 1),
                 qk_norm="rms_norm"),
}
_PIPELINES = {"flux": ("FluxPipeline", "FluxTransformer2DModel"),
              "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
              "sd35": ("StableDiffusion3Pipeline", "SD3Transformer2DModel")}


def make_tiny_transformer(kind: str, seed: int = 0) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(seed)
    cls = getattr(diffusers, _PIPELINES[kind][1])
    model = cls(**_CONFIGS[kind]).eval()
    with torch.no_grad():  # adaLN and output projections start at zero in some classes: give every weight a value
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def make_tiny_pipeline(kind: str, folder: Path, seed: int = 0) -> Path:
    """A pipeline folder with the tiny transformer (safetensors) and a flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    make_tiny_transformer(kind, seed).save_pretrained(folder / "transformer")
    FlowMatchEulerDiscreteScheduler().save_pretrained(folder / "scheduler")
    pipeline, denoiser = _PIPELINES[kind]
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", denoiser], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def tiny_inputs(kind: str, batch: int = 2, text_tokens: int = 8, seed: int = 1) -> Dict[str, torch.Tensor]:
    """A forward's inputs for the tiny transformer of `kind`: latents, text embeddings, pooled text, timesteps."""
    g = torch.Generator().manual_seed(seed)
    cfg = _CONFIGS[kind]
    text = torch.randn(batch, text_tokens, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=g)
    if kind == "flux":
        side = 4  # a 4 x 4 grid of packed latent patches
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] = torch.arange(side)[:, None]
        img_ids[..., 2] = torch.arange(side)[None, :]
        return {"hidden_states": torch.randn(batch, side * side, cfg["in_channels"], generator=g),
                "encoder_hidden_states": text, "pooled_projections": pooled,
                "timestep": torch.rand(batch, generator=g), "img_ids": img_ids.reshape(-1, 3),
                "txt_ids": torch.zeros(text_tokens, 3)}
    return {"hidden_states": torch.randn(batch, cfg["in_channels"], 8, 8, generator=g),
            "encoder_hidden_states": text, "pooled_projections": pooled,
            "timestep": torch.rand(batch, generator=g) * 1000}
