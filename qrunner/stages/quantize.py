"""quantize: block by block, each block committed (quantized tensors + next block's inputs) before the next.

The block inputs are chained through the quantized blocks: block k sees what blocks 0..k-1, already
quantized, produce. The reported per-block loss is the MSE between the quantized and the original block's
outputs on those inputs.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from qrunner.memory.monitor import current_rss_mb
from qrunner.models.adapter import LayerPlan, get_module
from qrunner.models.block_io import load_block_kwargs
from qrunner.pipeline.faults import fault_point
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.quant.rtn import QuantizedWeight, quantize_rtn
from qrunner.quant.scheme import QuantScheme
from qrunner.stages.capture import HIDDEN

QUANTIZED = "quantized.safetensors"
NEXT_INPUTS = "next_inputs.safetensors"
BATCH = 8


def unit_key(index: int) -> str:
    return f"block_{index:04d}"


def scheme_of(cfg: Any) -> QuantScheme:
    s = cfg.scheme
    return QuantScheme(bits=int(s.bits), group_size=int(s.group_size), sym=bool(s.sym), data_type=str(s.data_type))


def block_seed(seed: int, index: int) -> int:
    """Per-block seed from (seed, block index): a resumed run draws exactly what an uninterrupted one does."""
    return (int(seed) * 1_000_003 + index * 7_919) % (2**31 - 1)


def save_quantized(layers: Dict[str, QuantizedWeight], file: Path) -> None:
    tensors: Dict[str, torch.Tensor] = {}
    for name, qw in sorted(layers.items()):
        tensors[f"{name}.q"] = qw.q.contiguous()
        tensors[f"{name}.scale"] = qw.scale.contiguous()
        tensors[f"{name}.zero"] = qw.zero.contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})


def load_quantized(file: Path, scheme: QuantScheme) -> Dict[str, QuantizedWeight]:
    tensors = load_file(str(file))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {n: QuantizedWeight(q=tensors[f"{n}.q"], scale=tensors[f"{n}.scale"], zero=tensors[f"{n}.zero"],
                               bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym) for n in names}


def quantized_layers(quantize_stage_dir: Path, scheme: QuantScheme) -> Dict[str, QuantizedWeight]:
    """All quantized layers of a committed quantize stage, by full module name."""
    out: Dict[str, QuantizedWeight] = {}
    for unit in sorted((quantize_stage_dir / "units").iterdir()):
        if unit.is_dir() and not unit.name.startswith("."):
            out.update(load_quantized(unit / QUANTIZED, scheme))
    return out


def _forward(adapter: Any, block: torch.nn.Module, hidden: torch.Tensor, shared: Dict[str, Any]) -> torch.Tensor:
    outs = [adapter.run_block(block, hidden[i:i + BATCH], shared) for i in range(0, len(hidden), BATCH)]
    return torch.cat(outs)


@register_stage
class QuantizeStage(Stage):
    name = "quantize"
    needs = ("load", "capture")
    reads = ("scheme.bits", "scheme.group_size", "scheme.sym", "scheme.data_type", "quant.iters", "quant.seed",
             "quant.ignore_layers", "model.compute_dtype")
    version = 1
    description = "block-by-block quantization, checkpointed per block"

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        session, scheme = ctx.session, scheme_of(ctx.cfg)
        model = session.model()
        blocks = session.blocks(model)
        plan_by_block = _plan_by_block(session.layer_plan, [name for name, _ in blocks])
        shared = load_block_kwargs(ctx.inputs["capture"], session.compute_dtype)

        done = [i for i in range(len(blocks)) if ctx.units.done(unit_key(i))]
        start = 0
        while start < len(blocks) and ctx.units.done(unit_key(start)):
            start += 1
        if start:
            ctx.log.info("quantize: resuming at block %d/%d (%d block(s) already committed)", start + 1,
                         len(blocks), len(done))
        source = (ctx.inputs["capture"] / HIDDEN) if start == 0 else (ctx.units.path(unit_key(start - 1)) / NEXT_INPUTS)
        hidden = load_file(str(source))["hidden_states"].to(session.compute_dtype)

        bar = tqdm(range(start, len(blocks)), desc="quantize", unit="block", initial=start, total=len(blocks),
                   disable=not ctx.cfg.run.show_progress)
        for index in bar:
            name, block = blocks[index]
            torch.manual_seed(block_seed(ctx.cfg.quant.seed, index))
            started = time.time()
            qblock, layers = _quantize_block(block, name, plan_by_block[name], scheme)
            with torch.no_grad():
                target = _forward(session.adapter, block, hidden, shared)
                output = _forward(session.adapter, qblock, hidden, shared)
            loss = float(torch.nn.functional.mse_loss(output.float(), target.float()))
            del target, qblock

            def write(tmp: Path, layers=layers, output=output) -> Dict[str, Any]:
                save_quantized(layers, tmp / QUANTIZED)
                save_file({"hidden_states": output.contiguous()}, str(tmp / NEXT_INPUTS), metadata={"format": "pt"})
                return {"block": name, "index": index, "layers": sorted(layers), "loss": loss}

            info = ctx.units.commit(unit_key(index), write)
            ctx.log.info("quantize: block %d/%d %s committed: %d layers, loss %.3e, %.2fs, RSS %.0f MB",
                         index + 1, len(blocks), name, len(layers), loss, time.time() - started, current_rss_mb())
            fault_point("quantize.block_committed")
            if index > 0:  # the previous block's outputs are no longer needed to resume
                (ctx.units.path(unit_key(index - 1)) / NEXT_INPUTS).unlink(missing_ok=True)
            hidden = output
            bar.set_postfix(loss=f"{info['loss']:.2e}", rss=f"{current_rss_mb():.0f}MB")
        bar.close()
        last = ctx.units.path(unit_key(len(blocks) - 1)) / NEXT_INPUTS
        last.unlink(missing_ok=True)

        losses = [ctx.units.info(unit_key(i))["loss"] for i in range(len(blocks))]
        return {"blocks": len(blocks), "resumed_at_block": start, "block_loss": losses,
                "layers_quantized": sum(len(p) for p in plan_by_block.values())}


def _plan_by_block(plan: List[LayerPlan], block_names: List[str]) -> Dict[str, List[LayerPlan]]:
    out: Dict[str, List[LayerPlan]] = {b: [] for b in block_names}
    for p in plan:
        if p.quantize:
            block = max((b for b in block_names if p.name.startswith(b + ".")), key=len)
            out[block].append(p)
    return out


def _quantize_block(block: torch.nn.Module, block_name: str, plans: List[LayerPlan], scheme: QuantScheme):
    """A copy of the block with fake-quantized weights, and the quantized weights by full layer name."""
    qblock = copy.deepcopy(block)
    layers: Dict[str, QuantizedWeight] = {}
    for p in plans:
        layer = get_module(qblock, p.name[len(block_name) + 1:])
        qw = quantize_rtn(layer.weight.detach().float(), scheme)
        layers[p.name] = qw
        layer.weight.data = qw.dequantize(layer.weight.dtype)
    return qblock, layers
