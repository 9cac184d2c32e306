"""family=diffusion, data: calibration prompts chosen from data.source and encoded by the pipeline's own text
encoders (loaded without the denoiser and the VAE, released before any transformer block is read)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import torch
from safetensors.torch import load_file, save_file

from qrunner.models.diffusion_sampling import PromptEmbeds, encode_prompts
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.prompts import choose_prompts, read_prompts

PROMPTS = "prompts.json"
EMBEDS = "embeds.safetensors"
SAMPLING_KEYS = ("data.guidance_scale", "data.negative_prompt", "data.max_sequence_length")


def save_embeds(embeds: PromptEmbeds, file: Path) -> None:
    tensors = {k: v.contiguous() for k, v in vars(embeds).items() if v is not None}
    save_file(tensors, str(file), metadata={"format": "pt"})


def load_embeds(file: Path, dtype: torch.dtype) -> PromptEmbeds:
    tensors = {k: v.to(dtype) for k, v in load_file(str(file)).items()}
    return PromptEmbeds(**tensors)


def encode(session: Any, prompts: List[str]) -> PromptEmbeds:
    d = session.cfg.data
    return encode_prompts(session.folder, prompts, str(d.negative_prompt), session.guidance_scale,
                          int(d.max_sequence_length), session.compute_dtype)


@register_stage
class DiffusionDataStage(Stage):
    name = "data"
    key = "diffusion_data"
    needs = ("load",)
    reads = ("data.source", "data.text_field", "data.nsamples", "data.seed", *SAMPLING_KEYS, "model.compute_dtype")
    version = 1
    description = "calibration prompts through the text encoders"

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        d = ctx.cfg.data
        available, origin = read_prompts(str(d.source), str(d.text_field))
        prompts = choose_prompts(available, int(d.nsamples), int(d.seed))
        ctx.log.info("data: %d prompts from %s, encoded by %s's text encoders", len(prompts), origin,
                     ctx.session.folder.pipeline_class)
        embeds = encode(ctx.session, prompts)
        save_embeds(embeds, ctx.out / EMBEDS)
        (ctx.out / PROMPTS).write_text(json.dumps(prompts, indent=1, ensure_ascii=False))
        return {"source": origin, "prompts": len(prompts), "text_tokens": int(embeds.text.shape[1]),
                "guidance_scale": ctx.session.guidance_scale, "negative_prompt": embeds.negative_text is not None}


def read_calibration_prompts(folder: Path) -> List[str]:
    return json.loads((folder / PROMPTS).read_text())
