"""capture: every block's inputs: block 0's hidden_states and other per-sample inputs as row files, the inputs
every sample shares once."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from qrunner.memory.activations import ActivationFile
from qrunner.models.adapter import HIDDEN
from qrunner.models.block_io import SampleRows, same_value, save_block_inputs
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.stages.data import SAMPLES

SIDE = "side"  # folder of the per-sample inputs other than hidden_states (one row file per block and name)


@register_stage
class CaptureStage(Stage):
    name = "capture"
    needs = ("load", "data")
    reads = ("model.compute_dtype", "family.block_names")
    version = 3
    description = "inputs of every block"

    def estimate_bytes(self, cfg: Any, session: Any) -> int:
        return session.activation_bytes(int(cfg.data.nsamples), int(cfg.data.seqlen))

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        session = ctx.session
        input_ids = load_file(str(ctx.inputs["data"] / SAMPLES))["input_ids"]
        with session.input_model() as model:
            hidden, per_block, side = capture_block_inputs(session.adapter, model, session.blocks(model), input_ids,
                                                           ctx.out, "capture", ctx.cfg.run.show_progress)
        save_block_inputs(per_block, ctx.out)
        return {"samples": len(hidden), "hidden_bytes": len(hidden) * hidden.row_bytes,
                "side_bytes": sum(len(r) * r.row_bytes for r in side.values()),
                "block_inputs": sorted({k for b in per_block for k in b})}


def capture_block_inputs(adapter: Any, model: torch.nn.Module, blocks: List[Tuple[str, torch.nn.Module]],
                         input_ids: torch.Tensor, folder: Path, desc: str, show: bool
                         ) -> Tuple[ActivationFile, List[Dict[str, Any]], Dict[str, ActivationFile]]:
    """Run every sample up to the blocks (which only record what they are given): block 0's hidden states go to
    the row file `folder/hidden_states`, the per-sample inputs the adapter names (`per_sample_inputs`) to row
    files in `folder/side`, one sample at a time; the inputs every sample shares are returned once per block."""
    modules = [m for _, m in blocks]
    rows, shared = None, None
    side: Dict[str, ActivationFile] = {}
    (folder / SIDE).mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(len(input_ids)), desc=desc, unit="sample", disable=not show):
        h, per_block = adapter.capture_block_inputs(model, modules, input_ids[i:i + 1])
        for b, inputs in enumerate(per_block):
            for key in adapter.per_sample_inputs:
                value = inputs.get(key)
                if value is None:
                    continue
                name = f"{key}.{b}"
                if name not in side:
                    side[name] = ActivationFile.create(folder / SIDE / name, len(input_ids), tuple(value.shape[1:]),
                                                       value.dtype)
                side[name].write(i, value)
                inputs[key] = SampleRows(name)
        if rows is None:
            rows = ActivationFile.create(folder / HIDDEN, len(input_ids), tuple(h.shape[1:]), h.dtype)
            shared = per_block
        else:
            for b, (inputs, first) in enumerate(zip(per_block, shared)):
                differs = sorted(k for k in set(first) | set(inputs) if not same_value(first.get(k), inputs.get(k)))
                if differs:
                    raise RuntimeError(f"inputs {differs} of block {blocks[b][0]} differ between calibration samples; "
                                       f"the family adapter must list them in per_sample_inputs")
        rows.write(i, h)
    return rows, shared or [], side


def open_side_rows(folder: Path, sub: str = SIDE) -> Dict[str, ActivationFile]:
    """The per-sample side rows in `folder/sub` by name (none when the folder does not exist)."""
    side = folder / sub
    if not side.is_dir():
        return {}
    return {p.name[:-len(".json")]: ActivationFile.open(side / p.name[:-len(".json")])
            for p in sorted(side.glob("*.json"))}
