"""quantize: block by block, each block committed (quantized tensors + next block's inputs) before the next.

Two chains of activations run through the blocks. The original chain feeds the unquantized blocks and gives
each block's target (its original output). The quantized chain feeds the blocks as quantized so far: with
`quant.quantized_inputs` (default) block k is tuned on what blocks 0..k-1, already quantized, produce, and
judged against the original chain's output. Both chains' next inputs are committed with the block, so a
run killed at any point resumes exactly where it stopped.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from qrunner.memory.monitor import current_rss_mb
from qrunner.models.adapter import LayerPlan, get_module
from qrunner.models.block_io import load_block_kwargs
from qrunner.pipeline.faults import fault_point
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.quant.autoround import TuneSettings, tune_block
from qrunner.quant.opt_rtn import ImportanceCollector, quantize_weighted_rtn
from qrunner.quant.rtn import QuantizedWeight, quantize_rtn
from qrunner.quant.scheme import QuantScheme
from qrunner.stages.capture import HIDDEN

QUANTIZED = "quantized.safetensors"
NEXT_INPUTS = "next_inputs.safetensors"
QCHAIN, FPCHAIN = "quantized_chain", "original_chain"
BATCH = 8


def unit_key(index: int) -> str:
    return f"block_{index:04d}"


def scheme_of(cfg: Any) -> QuantScheme:
    s = cfg.scheme
    return QuantScheme(bits=int(s.bits), group_size=int(s.group_size), sym=bool(s.sym), data_type=str(s.data_type))


def layer_scheme(plan: LayerPlan) -> QuantScheme:
    return QuantScheme(bits=plan.bits, group_size=plan.group_size, sym=plan.sym)


def tune_settings(cfg: Any) -> TuneSettings:
    q = cfg.quant
    return TuneSettings(iters=int(q.iters), lr=q.lr, minmax_lr=q.minmax_lr, batch_size=int(q.batch_size),
                        grad_accum=int(q.grad_accum), minmax_tuning=bool(q.minmax_tuning),
                        amp_bf16=bool(q.amp_bf16), compile=bool(q.compile))


def block_seed(seed: int, index: int) -> int:
    """Per-block seed from (seed, block index): a resumed run draws exactly what an uninterrupted one does."""
    return (int(seed) * 1_000_003 + index * 7_919) % (2**31 - 1)


def save_quantized(layers: Dict[str, QuantizedWeight], file: Path) -> None:
    tensors: Dict[str, torch.Tensor] = {}
    for name, qw in sorted(layers.items()):
        tensors[f"{name}.q"] = qw.q.contiguous()
        tensors[f"{name}.scale"] = qw.scale.contiguous()
        tensors[f"{name}.zero"] = qw.zero.contiguous()
    schemes = {name: [qw.bits, qw.group_size, qw.sym] for name, qw in sorted(layers.items())}
    save_file(tensors, str(file), metadata={"format": "pt", "schemes": json.dumps(schemes, sort_keys=True)})


def load_quantized(file: Path) -> Dict[str, QuantizedWeight]:
    with safe_open(str(file), framework="pt") as f:
        schemes = json.loads(f.metadata()["schemes"])
    tensors = load_file(str(file))
    return {n: QuantizedWeight(q=tensors[f"{n}.q"], scale=tensors[f"{n}.scale"], zero=tensors[f"{n}.zero"],
                               bits=b, group_size=g, sym=s) for n, (b, g, s) in schemes.items()}


def quantized_layers(quantize_stage_dir: Path) -> Dict[str, QuantizedWeight]:
    """All quantized layers of a committed quantize stage, by full module name."""
    out: Dict[str, QuantizedWeight] = {}
    for unit in sorted((quantize_stage_dir / "units").iterdir()):
        if unit.is_dir() and not unit.name.startswith("."):
            out.update(load_quantized(unit / QUANTIZED))
    return out


def _forward(adapter: Any, block: torch.nn.Module, hidden: torch.Tensor, shared: Dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        outs = [adapter.run_block(block, hidden[i:i + BATCH], shared) for i in range(0, len(hidden), BATCH)]
    return torch.cat(outs)


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.mse_loss(a.float(), b.float()))


def _fake_quantized(block: torch.nn.Module, block_name: str, weights: Dict[str, QuantizedWeight]) -> torch.nn.Module:
    """A copy of the block whose quantized layers hold their dequantized weights."""
    qblock = copy.deepcopy(block)
    for name, qw in weights.items():
        layer = get_module(qblock, name[len(block_name) + 1:])
        layer.weight.data = qw.dequantize(layer.weight.dtype)
    return qblock


@register_stage
class QuantizeStage(Stage):
    name = "quantize"
    needs = ("load", "capture")
    reads = ("scheme.bits", "scheme.group_size", "scheme.sym", "scheme.data_type", "quant.iters", "quant.lr",
             "quant.minmax_lr", "quant.batch_size", "quant.grad_accum", "quant.minmax_tuning",
             "quant.quantized_inputs", "quant.opt_rtn", "quant.amp_bf16", "quant.compile", "quant.seed",
             "quant.ignore_layers", "quant.layer_overrides", "model.compute_dtype")
    version = 2
    description = "block-by-block AutoRound tuning, checkpointed per block"

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        session, cfg = ctx.session, ctx.cfg
        model = session.model()
        blocks = session.blocks(model)
        plan_by_block = _plan_by_block(session.layer_plan, [name for name, _ in blocks])
        shared = load_block_kwargs(ctx.inputs["capture"], session.compute_dtype)
        settings = tune_settings(cfg)

        start = 0
        while start < len(blocks) and ctx.units.done(unit_key(start)):
            start += 1
        if start:
            ctx.log.info("quantize: resuming at block %d/%d (%d block(s) already committed)", start + 1,
                         len(blocks), start)
        x_q, x_fp = self._chains(ctx, start, session.compute_dtype)

        bar = tqdm(range(start, len(blocks)), desc="quantize", unit="block", initial=start, total=len(blocks),
                   disable=not cfg.run.show_progress)
        for index in bar:
            name, block = blocks[index]
            started = time.time()
            torch.manual_seed(block_seed(cfg.quant.seed, index))
            generator = torch.Generator().manual_seed(block_seed(cfg.quant.seed, index))
            plans = plan_by_block[name]
            target = _forward(session.adapter, block, x_fp, shared)
            weights, tuning = self._quantize_block(ctx, block, name, plans, x_q, target, shared, settings,
                                                   generator, bar)
            qblock = _fake_quantized(block, name, weights)
            out_q = _forward(session.adapter, qblock, x_q, shared)
            loss = _mse(out_q, target)
            if tuning.get("rtn_weights") is not None:
                rtn_block = _fake_quantized(block, name, tuning.pop("rtn_weights"))
                loss_rtn = _mse(_forward(session.adapter, rtn_block, x_q, shared), target)
                del rtn_block
            else:
                tuning.pop("rtn_weights", None)
                loss_rtn = loss
            del qblock
            next_q = out_q if cfg.quant.quantized_inputs else target

            def write(tmp: Path) -> Dict[str, Any]:
                save_quantized(weights, tmp / QUANTIZED)
                save_file({QCHAIN: next_q.contiguous(), FPCHAIN: target.contiguous()}, str(tmp / NEXT_INPUTS),
                          metadata={"format": "pt"})
                return {"block": name, "index": index, "layers": sorted(weights), "loss": loss,
                        "loss_rtn": loss_rtn, **tuning}

            ctx.units.commit(unit_key(index), write)
            ctx.log.info("quantize: block %d/%d %s committed: %d layers, loss %.3e (RTN %.3e), %.1fs, RSS %.0f MB",
                         index + 1, len(blocks), name, len(weights), loss, loss_rtn, time.time() - started,
                         current_rss_mb())
            fault_point("quantize.block_committed")
            if index > 0:  # the previous block's outputs are no longer needed to resume
                (ctx.units.path(unit_key(index - 1)) / NEXT_INPUTS).unlink(missing_ok=True)
            x_q, x_fp = next_q, target
            bar.set_postfix(loss=f"{loss:.2e}", rss=f"{current_rss_mb():.0f}MB")
        bar.close()
        (ctx.units.path(unit_key(len(blocks) - 1)) / NEXT_INPUTS).unlink(missing_ok=True)

        infos = [ctx.units.info(unit_key(i)) for i in range(len(blocks))]
        return {"blocks": len(blocks), "resumed_at_block": start, "iters": int(cfg.quant.iters),
                "block_loss": [i["loss"] for i in infos], "block_loss_rtn": [i["loss_rtn"] for i in infos],
                "layers_quantized": sum(len(p) for p in plan_by_block.values())}

    def _chains(self, ctx: StageContext, start: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        if start == 0:
            hidden = load_file(str(ctx.inputs["capture"] / HIDDEN))["hidden_states"].to(dtype)
            return hidden, hidden
        saved = load_file(str(ctx.units.path(unit_key(start - 1)) / NEXT_INPUTS))
        return saved[QCHAIN].to(dtype), saved[FPCHAIN].to(dtype)

    def _quantize_block(self, ctx: StageContext, block: torch.nn.Module, block_name: str, plans: List[LayerPlan],
                        x_q: torch.Tensor, target: torch.Tensor, shared: Dict[str, Any], settings: TuneSettings,
                        generator: torch.Generator, bar: Any) -> Tuple[Dict[str, QuantizedWeight], Dict[str, Any]]:
        cfg, adapter = ctx.cfg, ctx.session.adapter
        rel = {p.name: p.name[len(block_name) + 1:] for p in plans}
        rtn = {p.name: quantize_rtn(get_module(block, rel[p.name]).weight.detach().float(), layer_scheme(p))
               for p in plans}
        if settings.iters > 0:
            def forward(b: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
                return adapter.run_block(b, x, shared)

            def progress(step: int, loss: float) -> None:
                if step % 25 == 0:
                    bar.set_postfix(iter=f"{step}/{settings.iters}", loss=f"{loss:.2e}")

            result = tune_block(block, {rel[p.name]: layer_scheme(p) for p in plans}, x_q, target, forward,
                                settings, generator, progress)
            weights = {f"{block_name}.{k}": v for k, v in result.weights.items()}
            return weights, {"rtn_weights": rtn, "best_iter": result.best_iter, "first_loss": result.first_loss,
                             "best_loss": result.best_loss, "tune_seconds": round(result.seconds, 3)}
        if cfg.quant.opt_rtn:
            modules = {p.name: get_module(block, rel[p.name]) for p in plans}
            with ImportanceCollector(modules) as collector:
                _forward(adapter, block, x_q, shared)
            weights = {n: quantize_weighted_rtn(m.weight.detach().float(), layer_scheme(p), collector.importance[n])
                       for (n, m), p in zip(modules.items(), plans)}
            return weights, {"rtn_weights": rtn}
        return rtn, {"rtn_weights": None}


def _plan_by_block(plan: List[LayerPlan], block_names: List[str]) -> Dict[str, List[LayerPlan]]:
    out: Dict[str, List[LayerPlan]] = {b: [] for b in block_names}
    for p in plan:
        if p.quantize:
            block = max((b for b in block_names if p.name.startswith(b + ".")), key=len)
            out[block].append(p)
    return out
