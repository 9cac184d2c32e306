"""family=diffusion, evaluate: the same prompts and noise through the original and the quantized transformer.

`eval.nsamples` prompts from `eval.source` (the bundled prompts by default; those not used for calibration come
first) are denoised twice, block-major as in capture (so `low` holds one block at a time): with the original
blocks and with the quantized ones (their dequantized weights). Reported: the final latents' mean squared error,
and, when the pipeline has a VAE, the decoded images' PSNR and SSIM against the original's, with `images.png`
(original | quantized, one row per prompt) in the stage folder and the report.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List

import torch
from safetensors.torch import save_file

from qrunner.image_metrics import latent_mse, psnr, ssim
from qrunner.models.diffusion_sampling import decode_latents
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.prompts import choose_prompts, read_prompts
from qrunner.report.images import side_by_side
from qrunner.stages.diffusion_capture import SAMPLING_KEYS, denoise
from qrunner.stages.diffusion_data import SAMPLING_KEYS as PROMPT_KEYS
from qrunner.stages.diffusion_data import encode, read_calibration_prompts
from qrunner.stages.block_rows import fake_quantized
from qrunner.stages.quantize import quantized_layers

IMAGES = "images.png"
LATENTS = "latents.safetensors"


def evaluation_prompts(cfg: Any, calibration: List[str]) -> List[str]:
    """eval.nsamples prompts of eval.source (0 = all), those not used for calibration first."""
    available, _ = read_prompts(str(cfg.eval.source), str(cfg.eval.text_field), "eval.source")
    unseen = [p for p in available if p not in set(calibration)]
    pool = unseen + [p for p in available if p in set(calibration)]
    n = int(cfg.eval.nsamples) or len(pool)
    return choose_prompts(pool[:max(n, len(unseen))], n, int(cfg.data.seed) + 1, "eval.nsamples")


@register_stage
class DiffusionEvaluateStage(Stage):
    name = "evaluate"
    key = "diffusion_evaluate"
    needs = ("load", "data", "quantize")
    reads = ("eval.enabled", "eval.source", "eval.text_field", "eval.nsamples", *SAMPLING_KEYS, *PROMPT_KEYS,
             "model.compute_dtype")
    version = 1
    description = "same noise through the original and the quantized transformer: latent MSE, PSNR, SSIM"

    @classmethod
    def in_pipeline(cls, cfg: Any) -> bool:
        return bool(cfg.eval.enabled)

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        session, cfg = ctx.session, ctx.cfg
        prompts = evaluation_prompts(cfg, read_calibration_prompts(ctx.inputs["data"]))
        embeds = encode(session, prompts)
        layers = quantized_layers(ctx.inputs["quantize"])

        @contextmanager
        def quantized_block(index: int) -> Iterator[torch.nn.Module]:
            with session.block(index) as (name, block), fake_quantized(block, name, layers.in_block(name)):
                yield block

        seed = int(cfg.data.seed)
        with session.outer() as model:
            original = denoise(session, model, embeds, seed, session.block_at, "evaluate original")
            quantized = denoise(session, model, embeds, seed, quantized_block, "evaluate quantized")
        save_file({"original": original.contiguous(), "quantized": quantized.contiguous()}, str(ctx.out / LATENTS))
        per_prompt = [{"prompt": p, "latent_mse": m} for p, m in zip(prompts, latent_mse(quantized, original))]
        metrics: Dict[str, Any] = {"prompts": len(prompts), "latent_mse": _mean(r["latent_mse"] for r in per_prompt)}
        if "vae" in session.folder.components and (session.folder.path / "vae").is_dir():
            d = cfg.data
            decode = lambda z: decode_latents(session.folder, z, int(d.height), int(d.width),  # noqa: E731
                                              session.vae_scale, session.compute_dtype)
            images_o, images_q = decode(original), decode(quantized)
            for row, p, s in zip(per_prompt, psnr(images_q, images_o), ssim(images_q, images_o)):
                row.update(psnr_db=p, ssim=s)
            side_by_side(images_o, images_q, ctx.out / IMAGES, prompts)
            metrics.update(psnr_db=_mean(r["psnr_db"] for r in per_prompt), ssim=_mean(r["ssim"] for r in per_prompt),
                           images=IMAGES)
        else:
            ctx.log.warning("evaluate: %s has no VAE; only the latents are compared", session.folder.path)
        (ctx.out / "per_prompt.json").write_text(json.dumps(per_prompt, indent=1, ensure_ascii=False))
        metrics["per_prompt"] = per_prompt
        ctx.log.info("evaluate: latent MSE %.4g%s", metrics["latent_mse"],
                     f", PSNR {metrics['psnr_db']:.2f} dB, SSIM {metrics['ssim']:.4f}" if "ssim" in metrics else "")
        return metrics


def _mean(values: Any) -> float:
    values = [float(v) for v in values]
    finite = [v for v in values if v != float("inf")]
    return sum(finite) / len(finite) if finite else float("inf")
