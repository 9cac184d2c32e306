"""capture: the first block's inputs: hidden_states per sample, the other inputs once."""
from __future__ import annotations

from typing import Any, Dict

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from qrunner.models.block_io import save_block_kwargs
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.stages.data import SAMPLES

HIDDEN = "hidden_states.safetensors"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@register_stage
class CaptureStage(Stage):
    name = "capture"
    needs = ("load", "data")
    reads = ("model.compute_dtype", "family.block_names")
    version = 1
    description = "inputs of the first block"

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        session = ctx.session
        input_ids = load_file(str(ctx.inputs["data"] / SAMPLES))["input_ids"]
        model = session.model()
        first_block = session.blocks(model)[0][1]
        hidden, shared = [], None
        for i in tqdm(range(len(input_ids)), desc="capture", unit="sample", disable=not ctx.cfg.run.show_progress):
            h, kwargs = session.adapter.capture_first_block_inputs(model, first_block, input_ids[i:i + 1])
            hidden.append(h)
            if shared is None:
                shared = kwargs
            elif not all(_same(shared[k], kwargs.get(k)) for k in shared):
                raise RuntimeError("the first block's non-hidden inputs differ between samples; this family "
                                   "adapter must store them per sample")
        states = torch.cat(hidden).contiguous()
        save_file({"hidden_states": states}, str(ctx.out / HIDDEN), metadata={"format": "pt"})
        save_block_kwargs(shared or {}, ctx.out)
        return {"samples": int(states.shape[0]), "hidden_bytes": states.numel() * states.element_size(),
                "shared_inputs": sorted((shared or {}).keys())}
