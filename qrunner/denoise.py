"""The denoising loop run block-major: for each step, each block is taken once and applied to every sample.

A pipeline's own loop is sample-major (the whole transformer per step), so a streaming run would read every
block once per step *and* per mini-batch. Here the loop is turned around: at step t the prologue makes every
row's block inputs (row = one sample of the model batch; with classifier-free guidance the negative prompts are
rows too), each block in turn is fetched (`block_at`, which may read it from the shards and release it after),
run over the rows in mini-batches and handed back, then the epilogue and the scheduler advance the latents.
Step t+1 needs all of step t, so this is the order that holds one block at a time.

`on_block_input(step, index, values)` sees every block's input at every step: what the capture stage keeps as
calibration rows.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Optional

import torch

from qrunner.memory.activations import batches
from qrunner.models.diffusion import HIDDEN, BlockValues, DenoiserSpec
from qrunner.models.diffusion_sampling import PromptEmbeds, Sampling

BlockInputHook = Callable[[int, int, BlockValues], None]


def _rows(values: BlockValues, r: range) -> BlockValues:
    return BlockValues({k: None if v is None else v[r.start:r.stop] for k, v in values.streams.items()},
                       values.temb[r.start:r.stop], values.shared)


def run_block_over_rows(spec: DenoiserSpec, block: torch.nn.Module, values: BlockValues, batch: int) -> BlockValues:
    """One block applied to every row of `values`, `batch` rows at a time."""
    parts = [spec.run_block(block, _rows(values, r)) for r in batches(len(values.temb), batch)]
    streams = {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in parts[0]}
    return BlockValues(streams, values.temb, values.shared)


@torch.no_grad()
def denoise_block_major(spec: DenoiserSpec, sampling: Sampling, model: torch.nn.Module,
                        block_at: Callable[[int], AbstractContextManager], scheduler: Any, embeds: PromptEmbeds,
                        latents: torch.Tensor, steps: int, guidance_scale: float, height: int, width: int,
                        vae_scale: int, batch: int = 8, on_block_input: Optional[BlockInputHook] = None,
                        progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """The final latents of `steps` denoising steps from `latents`. `model` needs only its parts outside the
    blocks (the prologue's embedders, the epilogue's norm and projection); block `i` comes from `block_at(i)`."""
    config = model.config
    n_blocks = len(spec.blocks(model))
    timesteps = sampling.set_timesteps(scheduler, steps, latents, config)
    for step, t in enumerate(timesteps):
        inputs = sampling.step_inputs(latents, t, embeds, guidance_scale, config, height, width, vae_scale)
        values, context = spec.prologue(model, **inputs)
        for index in range(n_blocks):
            if on_block_input is not None:
                on_block_input(step, index, values)
            with block_at(index) as block:
                values = run_block_over_rows(spec, block, values, batch)
        prediction = spec.epilogue(model, values.streams[HIDDEN], values.temb, context)
        latents = scheduler.step(sampling.combine(prediction, guidance_scale), t, latents, return_dict=False)[0]
        if progress is not None:
            progress(step)
    return latents
