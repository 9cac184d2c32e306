"""family=diffusion, capture: the first block's inputs at every denoising step of every calibration sample.

The prompts' denoising runs block-major (`qrunner.denoise`): in medium/low each block is read from the shards once
per step and applied to every sample, so no more than one block is resident. Row `step * R + r` of the row files
is model-batch row r (a sample, or its negative-prompt twin under classifier-free guidance) at step `step`:
`hidden_states` holds both streams joined (text tokens first), `side/temb` the timestep embedding. The rotary
table (Flux), the text token count and the denoiser's class are shared values. The quantize stage recomputes
every later block's inputs from these, block by block, as for a decoder.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from tqdm import tqdm

from qrunner.denoise import denoise_block_major
from qrunner.errors import UserError
from qrunner.memory.activations import ActivationFile
from qrunner.models.adapter import HIDDEN
from qrunner.models.block_io import SampleRows, save_block_inputs
from qrunner.models.diffusion import CONTEXT, ROTARY, TEMB, BlockValues
from qrunner.models.diffusion_adapter import DENOISER, TEXT_OUTPUT_READ, TEXT_TOKENS
from qrunner.pipeline.faults import fault_point
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.stages.capture import SIDE
from qrunner.stages.diffusion_data import EMBEDS, load_embeds

BATCH = 8  # model-batch rows a block runs at once
SAMPLING_KEYS = ("data.num_inference_steps", "data.guidance_scale", "data.height", "data.width", "data.seed")


def load_scheduler(folder: Any) -> Any:
    """The pipeline's scheduler, from its folder's scheduler config."""
    import diffusers

    library, cls = folder.components.get("scheduler", ("diffusers", "FlowMatchEulerDiscreteScheduler"))
    return getattr(diffusers, cls).from_pretrained(str(folder.path / "scheduler"))


def denoise(session: Any, model: torch.nn.Module, embeds: Any, seed: int, block_at: Any, desc: str,
            on_block_input: Any = None) -> torch.Tensor:
    """The final latents of `embeds` denoised as the pipeline would (same noise for the same seed)."""
    d = session.cfg.data
    steps, height, width = int(d.num_inference_steps), int(d.height), int(d.width)
    latents = session.sampling.initial_latents(model.config, len(embeds), height, width, session.vae_scale,
                                               torch.Generator().manual_seed(int(seed)))
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not session.cfg.run.show_progress)
    try:
        return denoise_block_major(session.spec, session.sampling, model, block_at, load_scheduler(session.folder),
                                   embeds, latents, steps, session.guidance_scale, height, width, session.vae_scale,
                                   BATCH, on_block_input, lambda step: bar.update(1))
    finally:
        bar.close()


class FirstBlockRows:
    """Writes block 0's input at every step as calibration rows (joined streams, temb); keeps the shared values."""

    def __init__(self, ctx: StageContext, rows_per_step: int, steps: int) -> None:
        self.ctx, self.per_step, self.n = ctx, rows_per_step, rows_per_step * steps
        self.hidden: Optional[ActivationFile] = None
        self.temb: Optional[ActivationFile] = None
        self.shared: Dict[str, Any] = {}

    def __call__(self, step: int, index: int, values: BlockValues) -> None:
        if index:
            return
        fault_point("capture.step")
        text, image = values.streams[CONTEXT], values.streams[HIDDEN]
        if text.shape[-1] != image.shape[-1]:
            raise UserError(f"the text stream ({text.shape[-1]}) and the image stream ({image.shape[-1]}) of "
                            "this denoiser differ in width; qrunner joins them into one row and cannot")
        joined = torch.cat([text, image], dim=1)
        if self.hidden is None:
            (self.ctx.out / SIDE).mkdir(exist_ok=True)  # a killed capture's partial folder is rewritten
            self.hidden = ActivationFile.create(self.ctx.out / HIDDEN, self.n, tuple(joined.shape[1:]), joined.dtype)
            self.temb = ActivationFile.create(self.ctx.out / SIDE / TEMB, self.n, tuple(values.temb.shape[1:]),
                                              values.temb.dtype)
            self.shared = {TEXT_TOKENS: int(text.shape[1]), **({ROTARY: values.shared[ROTARY]}
                                                               if ROTARY in values.shared else {})}
        self.hidden.write(step * self.per_step, joined)
        self.temb.write(step * self.per_step, values.temb)


@register_stage
class DiffusionCaptureStage(Stage):
    name = "capture"
    key = "diffusion_capture"
    needs = ("load", "data")
    reads = (*SAMPLING_KEYS, "model.compute_dtype", "family.block_names")
    version = 2
    description = "first block's inputs at every denoising step (block-major loop)"

    def estimate_bytes(self, cfg: Any, session: Any) -> int:
        return session.calibration_bytes()

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        session, d = ctx.session, ctx.cfg.data
        embeds = load_embeds(ctx.inputs["data"] / EMBEDS, session.compute_dtype)
        per_step = len(embeds) * (2 if session.sampling.uses_cfg(session.guidance_scale) else 1)
        rows = FirstBlockRows(ctx, per_step, int(d.num_inference_steps))
        with session.outer() as model:
            denoise(session, model, embeds, int(d.seed), session.block_at, "capture", rows)
        shared = {**rows.shared, DENOISER: session.folder.denoiser_class, TEMB: SampleRows(TEMB)}
        names = session.block_names()  # the denoiser reads no block's text output after the last block's
        save_block_inputs([{**shared, TEXT_OUTPUT_READ: i < len(names) - 1} for i in range(len(names))], ctx.out)
        return {"samples": len(embeds), "rows": rows.n, "rows_per_step": per_step,
                "tokens": tuple(rows.hidden.row_shape)[0], "text_tokens": rows.shared[TEXT_TOKENS],
                "hidden_bytes": rows.n * rows.hidden.row_bytes}
