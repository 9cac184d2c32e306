"""capture: the first block's inputs: hidden_states per sample, the other inputs once."""
from __future__ import annotations

from typing import Any, Dict

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from qrunner.memory.activations import ActivationFile
from qrunner.models.block_io import save_block_kwargs
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.stages.data import SAMPLES

HIDDEN = "hidden_states"  # row file (hidden_states.bin + .json): one row per calibration sample


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
    version = 2
    description = "inputs of the first block"

    def estimate_bytes(self, cfg: Any, session: Any) -> int:
        return session.activation_bytes(int(cfg.data.nsamples), int(cfg.data.seqlen))

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        session = ctx.session
        input_ids = load_file(str(ctx.inputs["data"] / SAMPLES))["input_ids"]
        with session.input_model() as model:
            hidden, shared = capture_block_inputs(session.adapter, model, session.blocks(model)[0][1], input_ids,
                                                  ctx.out / HIDDEN, "capture", ctx.cfg.run.show_progress)
        save_block_kwargs(shared, ctx.out)
        return {"samples": len(hidden), "hidden_bytes": len(hidden) * hidden.row_bytes,
                "shared_inputs": sorted(shared.keys())}


def capture_block_inputs(adapter: Any, model: torch.nn.Module, first_block: torch.nn.Module,
                         input_ids: torch.Tensor, path: Any, desc: str, show: bool):
    """Run every sample up to the first block; its hidden states go to a row file, one sample at a time,
    and the inputs every sample shares (positions, rotary tables, masks) are returned once."""
    rows, shared = None, None
    for i in tqdm(range(len(input_ids)), desc=desc, unit="sample", disable=not show):
        h, kwargs = adapter.capture_first_block_inputs(model, first_block, input_ids[i:i + 1])
        if rows is None:
            rows = ActivationFile.create(path, len(input_ids), tuple(h.shape[1:]), h.dtype)
            shared = kwargs
        elif not all(_same(shared[k], kwargs.get(k)) for k in shared):
            raise RuntimeError("the first block's non-hidden inputs differ between samples; this family "
                               "adapter must store them per sample")
        rows.write(i, h)
    return rows, shared or {}
