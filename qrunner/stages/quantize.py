"""quantize: block by block, each block committed (quantized tensors + next block's inputs) before the next.

Two chains of activations run through the blocks. The original chain feeds the unquantized blocks and gives
each block's target (its original output). The quantized chain feeds the blocks as quantized so far: with
`quant.quantized_inputs` (default) block k is tuned on what blocks 0..k-1, already quantized, produce, and
judged against the original chain's output. Both chains' next inputs are committed with the block, so a
run killed at any point resumes exactly where it stopped.
"""
from __future__ import annotations


import dataclasses
import json
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from qrunner.memory.activations import ActivationFile, BlockRows, Rows, TokenSlice, batches
from qrunner.memory.device import (HOST, begin_block_peak, block_peak_vram_mb, on_device, placed, release_device,
                                   to_device)
from qrunner.memory.monitor import current_rss_mb
from qrunner.memory.narrow import narrowed
from qrunner.memory.trim import keep_freed_memory, release_freed_memory, return_freed_memory
from qrunner.pipeline.atomic import remove_tree
from qrunner.models.adapter import HIDDEN, LayerPlan, get_module
from qrunner.models.block_io import load_block_inputs
from qrunner.models.moe import expert_token_counts, reset_expert_counts
from qrunner.pipeline.faults import fault_point
from qrunner.pipeline.stopping import stop_point
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.phases import PhaseTimes
from qrunner.pipeline.status import report_status
from qrunner.quant.autoround import TuneSettings, tune_block
from qrunner.quant.opt_rtn import ImportanceCollector, quantize_weighted_rtn
from qrunner.quant.rtn import QuantizedWeight, quantize_rtn
from qrunner.quant.scheme import QuantScheme
from qrunner.report.experts import coverage_summary, coverage_text
from qrunner.stages.block_rows import (BATCH, ChainRows, block_inputs, fake_quantized, forward_rows, module_device,
                                      mse_rows, open_block_rows, publish_rows)
from qrunner.stages.capture import open_side_rows
from qrunner.stages.layer_plan import AUTOSCHEME, PLAN_KEYS, planned_layers

QUANTIZED = "quantized.safetensors"
# the next block's inputs, committed with each block as row files (.bin + .json)
QCHAIN, FPCHAIN = "quantized_chain", "original_chain"
SCRATCH = "scratch"  # activations of the block in progress (memory=low), inside the stage's partial folder
# side values a block hands to later blocks (shared keys/values), committed with it per chain, kept to the end
SIDE_Q, SIDE_FP = "side_quantized", "side_original"


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


def smaller_micro_batch(settings: TuneSettings) -> Optional[TuneSettings]:
    """Half the micro-batch, twice the accumulation steps: the same effective batch in less memory."""
    if settings.batch_size <= 1:
        return None
    half = settings.batch_size // 2
    return dataclasses.replace(settings, batch_size=half,
                               grad_accum=settings.grad_accum * -(-settings.batch_size // half))


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


class QuantizedLayers(Mapping[str, QuantizedWeight]):
    """The quantized layers of a committed quantize stage by full module name, read one layer at a time
    from the per-block files (so the export and evaluation never hold the whole quantized model)."""

    def __init__(self, quantize_stage_dir: Path) -> None:
        self._where: Dict[str, Tuple[Path, Tuple[int, int, bool]]] = {}
        for unit in sorted((quantize_stage_dir / "units").iterdir()):
            if unit.is_dir() and not unit.name.startswith("."):
                with safe_open(str(unit / QUANTIZED), framework="pt") as f:
                    for name, (b, g, s) in json.loads(f.metadata()["schemes"]).items():
                        self._where[name] = (unit / QUANTIZED, (int(b), int(g), bool(s)))

    def __getitem__(self, name: str) -> QuantizedWeight:
        file, (bits, group_size, sym) = self._where[name]
        with safe_open(str(file), framework="pt") as f:
            return QuantizedWeight(q=f.get_tensor(f"{name}.q"), scale=f.get_tensor(f"{name}.scale"),
                                   zero=f.get_tensor(f"{name}.zero"), bits=bits, group_size=group_size, sym=sym)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._where))

    def __len__(self) -> int:
        return len(self._where)

    def scheme(self, name: str) -> Tuple[int, int, bool]:
        """(bits, group size, symmetric) of a layer, without reading its tensors."""
        return self._where[name][1]

    def in_block(self, block_name: str) -> Dict[str, QuantizedWeight]:
        return {n: self[n] for n in self if n.startswith(block_name + ".")}


def quantized_layers(quantize_stage_dir: Path) -> QuantizedLayers:
    return QuantizedLayers(quantize_stage_dir)


@dataclasses.dataclass
class BlockWork:
    """What one block's quantization reads: its inputs on both chains, where its rows go, its layers and settings."""
    src_fp: BlockRows
    src_q: BlockRows
    x_fp: Rows
    x_q: Rows
    shared: Dict[str, Any]
    writes: Dict[str, str]
    chains: ChainRows
    plans: List[LayerPlan]
    settings: TuneSettings
    bar: Any


@dataclasses.dataclass
class BlockDone:
    """One block quantized: its weights (on the host), the tuning record, losses, and both chains' outputs."""
    weights: Dict[str, QuantizedWeight]
    tuning: Dict[str, Any]
    loss: float
    loss_rtn: float
    target: Rows
    target_side: Dict[str, Rows]
    out_q: Rows
    out_side: Dict[str, Rows]


@register_stage
class QuantizeStage(Stage):
    name = "quantize"
    needs = ("load", "capture")
    uses = (AUTOSCHEME,)  # scheme=auto: each layer's scheme from the plan
    reads = ("scheme.data_type", "quant.iters", "quant.lr",
             "quant.minmax_lr", "quant.batch_size", "quant.grad_accum", "quant.minmax_tuning",
             "quant.quantized_inputs", "quant.opt_rtn", "quant.amp_bf16", "quant.compile", "quant.seed",
             "quant.rtn_loss",
             *PLAN_KEYS, "model.compute_dtype", "family.loss_streams")
    version = 3
    description = "block-by-block AutoRound tuning, checkpointed per block"

    def estimate_bytes(self, cfg: Any, session: Any) -> int:
        """Packed codes (1 byte a weight) and scales of every layer, plus the activations on disk at the worst
        moment: the last committed block's two chains, the block in flight's two, and (low) its scratch."""
        codes = sum(p.in_features * p.out_features * 1.1 for p in session.layer_plan if p.quantize)
        return int(codes) + 5 * session.calibration_bytes()

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        session, cfg = ctx.session, ctx.cfg
        names = session.block_names()
        plan = planned_layers(ctx)
        for reason, n in Counter(p.reason for p in plan if not p.quantize).items():
            ctx.log.info("quantize: %d layer(s) stay in full precision: %s", n, reason)
        plan_by_block = _plan_by_block(plan, names)
        per_block = load_block_inputs(ctx.inputs["capture"], session.compute_dtype)
        settings = tune_settings(cfg)
        chains = ChainRows(ctx.out / SCRATCH, session.activations_on_disk)

        start = 0
        while start < len(names) and ctx.units.done(unit_key(start)):
            start += 1
        damaged = next(filter(None, (ctx.units.damaged(unit_key(i), _chain_files()) for i in range(start))), None)
        if damaged is None and start and not all(ActivationFile.exists(ctx.units.path(unit_key(start - 1)) / c)
                                                 for c in (QCHAIN, FPCHAIN)):
            damaged = f"{ctx.units.path(unit_key(start - 1))}: the next block's inputs are missing"
        if damaged:
            ctx.log.warning("quantize: committed block checkpoint damaged (%s); the blocks after it need inputs "
                            "that are no longer kept, so quantization starts again at block 1", damaged)
            ctx.units.clear()
            start = 0
        if start:
            ctx.log.info("quantize: resuming at block %d/%d (%d block(s) already committed)", start + 1,
                         len(names), start)
        x_q, x_fp = self._chains(ctx, chains, start)
        # per-sample side inputs by rows name, as files: captured ones, then those committed blocks handed on
        captured = open_side_rows(ctx.inputs["capture"])
        side_q, side_fp = dict(captured), dict(captured)
        for i in range(start):
            unit = ctx.units.path(unit_key(i))
            side_q.update(open_side_rows(unit, SIDE_Q))
            side_fp.update(open_side_rows(unit, SIDE_FP))

        bar = tqdm(range(start, len(names)), desc="quantize", unit="block", initial=start, total=len(names),
                   disable=not cfg.run.show_progress)
        for index in bar:
            started = time.time()
            report_status(block=index, blocks=len(names))
            shared, reads = block_inputs(session, per_block, index)
            writes = session.adapter.side_io(session.hf_config, index)[1]
            wrap = chains.reader()
            src_fp = open_block_rows(x_fp, reads, lambda g: wrap(side_fp[g]))
            src_q = open_block_rows(x_q, reads, lambda g: wrap(side_q[g]))
            with session.block(index) as (name, block):
                done = self._on_device_or_host(ctx, index, name, block, BlockWork(
                    src_fp, src_q, x_fp, x_q, shared, writes, chains, plan_by_block[name], settings, bar))
            weights, tuning, loss, loss_rtn = done.weights, done.tuning, done.loss, done.loss_rtn
            target, target_side, out_q, out_side = done.target, done.target_side, done.out_q, done.out_side
            del done
            next_q, next_q_side = (out_q, out_side) if cfg.quant.quantized_inputs else (target, target_side)

            def write(tmp: Path) -> Dict[str, Any]:
                started_write = time.perf_counter()
                save_quantized(weights, tmp / QUANTIZED)
                publish_rows(target, tmp / FPCHAIN, keep_original=next_q is target)
                publish_rows(next_q, tmp / QCHAIN)
                for folder, rows_by_name, keep in ((SIDE_FP, target_side, next_q is target),
                                                   (SIDE_Q, next_q_side, False)):
                    if rows_by_name:
                        (tmp / folder).mkdir()
                    for rows_name, rows in rows_by_name.items():
                        publish_rows(rows, tmp / folder / rows_name, keep_original=keep)
                seconds = {**tuning.pop("seconds"), "commit_write": round(time.perf_counter() - started_write, 4)}
                return {"block": name, "index": index, "layers": sorted(weights), "loss": loss,
                        "loss_rtn": loss_rtn, "side_outputs": sorted(writes.values()), **tuning, "seconds": seconds}

            ctx.units.commit(unit_key(index), write)
            ctx.log.info("quantize: block %d/%d %s committed: %d layers, loss %.3e%s, %.1fs, RSS %.0f MB",
                         index + 1, len(names), name, len(weights), loss,
                         "" if loss_rtn is None else f" (RTN {loss_rtn:.3e})", time.time() - started,
                         current_rss_mb())
            fault_point("quantize.block_committed")
            if index > 0:  # the previous block's outputs are no longer needed to resume
                _drop_next_inputs(ctx.units.path(unit_key(index - 1)))
            unit = ctx.units.path(unit_key(index))
            side_q.update(open_side_rows(unit, SIDE_Q))
            side_fp.update(open_side_rows(unit, SIDE_FP))
            if session.activations_on_disk:
                x_q, x_fp = ActivationFile.open(unit / QCHAIN), ActivationFile.open(unit / FPCHAIN)
            else:
                x_q, x_fp = next_q, target
            del out_q, target, next_q, out_side, target_side, next_q_side, src_q, src_fp
            release_freed_memory()
            bar.set_postfix(loss=f"{loss:.2e}", rss=f"{current_rss_mb():.0f}MB")
        bar.close()
        _drop_next_inputs(ctx.units.path(unit_key(len(names) - 1)))
        for i in range(len(names)):  # side values were kept for the blocks after them: all done now
            for folder in (SIDE_Q, SIDE_FP):
                remove_tree(ctx.units.path(unit_key(i)) / folder)
        chains.close()

        infos = [ctx.units.info(unit_key(i)) for i in range(len(names))]
        parts = {k: {"tuned": [i.get("loss_parts", {}).get(k) for i in infos],
                     "rtn": [i.get("loss_rtn_parts", {}).get(k) for i in infos]}
                 for k in sorted({k for i in infos for k in i.get("loss_parts", {})})}
        rtn = [i.get("loss_rtn") for i in infos]
        phase_seconds: Dict[str, float] = {}
        for i in infos:
            for phase, seconds in i.get("seconds", {}).items():
                phase_seconds[phase] = round(phase_seconds.get(phase, 0.0) + seconds, 4)
        experts = coverage_summary(infos)
        if experts:
            (ctx.log.warning if experts["experts_without_tokens"] else ctx.log.info)("quantize: %s",
                                                                                    coverage_text(experts))
        return {"blocks": len(names), "resumed_at_block": start, "iters": int(cfg.quant.iters), **experts,
                "block_loss": [i["loss"] for i in infos],
                "block_loss_rtn": rtn if all(r is not None for r in rtn) else [],
                "phase_seconds": phase_seconds,
                **({"block_loss_parts": parts} if parts else {}),
                "layers_quantized": sum(len(p) for p in plan_by_block.values()),
                "checkpoint_seconds": round(ctx.units.commit_seconds, 3)}

    def _on_device_or_host(self, ctx: StageContext, index: int, name: str, block: torch.nn.Module,
                           work: "BlockWork") -> "BlockDone":
        """Block `index` on the run's device; when it does not fit there even with a micro-batch of one sample
        (the tuner halves it first), on the host, with a warning. Where it ran and the device's peak memory go
        into the block's unit.json."""
        fallbacks: List[Dict[str, str]] = []
        for device in dict.fromkeys([ctx.session.device, HOST]):
            try:
                begin_block_peak(device)
                # the block's loops free and allocate the same sizes over and over: they reuse the freed pages, except
                # in memory=low, where the peak comes first: freed tensors go back at once (a few hundred MB less on
                # an 8B model's block, ~10 % slower tuning)
                heap = keep_freed_memory() if ctx.session.memory_mode != "low" else return_freed_memory()
                with placed(block, device), heap:
                    done = self._block(ctx, index, name, block, work)
                done.tuning["device"] = str(device)
                vram = block_peak_vram_mb(device)
                if vram:
                    done.tuning["vram"] = vram
                if fallbacks:
                    done.tuning["device_fallbacks"] = fallbacks
                return done
            except torch.OutOfMemoryError as err:
                if device == HOST:
                    raise
                release_device(device)
                release_freed_memory()
                ctx.log.warning("quantize: %s does not fit %s even with a micro-batch of one sample (%s); this block "
                                "runs on the CPU, many times slower (a smaller quant.batch_size or data.seqlen, or a "
                                "larger GPU, keeps it there)", name, device, str(err).splitlines()[0])
                fallbacks.append({"device": str(device), "error": str(err).splitlines()[0]})
        raise AssertionError("unreachable")

    def _block(self, ctx: StageContext, index: int, name: str, block: torch.nn.Module, work: "BlockWork"
               ) -> "BlockDone":
        """Quantize one block (on whatever device it is): its targets, the tuning, its quantized outputs, losses."""
        session, cfg, chains, times = ctx.session, ctx.cfg, work.chains, PhaseTimes()
        torch.manual_seed(block_seed(cfg.quant.seed, index))
        generator = torch.Generator().manual_seed(block_seed(cfg.quant.seed, index))
        shared = to_device(work.shared, module_device(block))
        reset_expert_counts(block)  # tokens routed to each expert on the original path (report/experts.py)
        with times.phase("target_forward"):
            target = chains.new("target", work.x_fp)
            target_side = forward_rows(session.adapter, block, work.src_fp, shared, target, work.writes,
                                       lambda n, *a: chains.new_shaped(f"target_{n}", *a))
            release_freed_memory()  # each step's temporaries go back before the next, larger one
        routed = expert_token_counts(block)
        weights, tuning = self._quantize_block(ctx, block, name, work.plans, work.src_q, target, shared,
                                               work.settings, generator, work.bar, times)
        release_freed_memory()
        with times.phase("quantized_forward"):
            out_q = chains.new("output", work.x_q)
            with fake_quantized(block, name, weights):
                out_side = forward_rows(session.adapter, block, work.src_q, shared, out_q, work.writes,
                                        lambda n, *a: chains.new_shaped(f"output_{n}", *a))
        parts = session.adapter.output_parts(block, shared)
        with times.phase("losses"):
            loss = mse_rows(out_q, target)
            tuning["loss_parts"] = {k: mse_rows(out_q, target, sl) for k, sl in parts.items()}
        rtn_weights = tuning.pop("rtn_weights")
        loss_rtn, tuning["loss_rtn_parts"] = None, {}
        if tuning.pop("plain_rtn"):  # the weights are RTN's: their loss is RTN's
            loss_rtn, tuning["loss_rtn_parts"] = loss, dict(tuning["loss_parts"])
        elif rtn_weights is not None:
            with times.phase("rtn_forward"):
                out_rtn = chains.new("output_rtn", work.x_q)
                with fake_quantized(block, name, rtn_weights):
                    forward_rows(session.adapter, block, work.src_q, shared, out_rtn)
                loss_rtn = mse_rows(out_rtn, target)
                tuning["loss_rtn_parts"] = {k: mse_rows(out_rtn, target, sl) for k, sl in parts.items()}
                chains.drop(out_rtn)
        tuning["seconds"] = times.as_dict()
        if routed:
            tuning["expert_tokens"] = routed
        return BlockDone(weights, tuning, loss, loss_rtn, target, target_side, out_q, out_side)

    def _chains(self, ctx: StageContext, chains: ChainRows, start: int) -> Tuple[Rows, Rows]:
        """Inputs of block `start`: the captured hidden states, or the chains committed with the block before."""
        if start == 0:
            hidden = chains.open(ctx.inputs["capture"] / HIDDEN)
            return hidden, hidden
        unit = ctx.units.path(unit_key(start - 1))
        return chains.open(unit / QCHAIN), chains.open(unit / FPCHAIN)

    def _quantize_block(self, ctx: StageContext, block: torch.nn.Module, block_name: str, plans: List[LayerPlan],
                        x_q: BlockRows, target: Rows, shared: Dict[str, Any], settings: TuneSettings,
                        generator: torch.Generator, bar: Any, times: PhaseTimes
                        ) -> Tuple[Dict[str, QuantizedWeight], Dict[str, Any]]:
        """The block's quantized weights, and the tuning record: with `quant.rtn_loss`, RTN's weights for the
        comparison forward ("rtn_weights"); "plain_rtn" when the weights are RTN's themselves."""
        cfg, adapter = ctx.cfg, ctx.session.adapter
        rel = {p.name: p.name[len(block_name) + 1:] for p in plans}
        device = module_device(block)
        x_q = on_device(x_q, device)  # rows travel to the block's device a mini-batch at a time

        def rtn_codes() -> Dict[str, QuantizedWeight]:
            with times.phase("rtn_codes"):
                return {p.name: quantize_rtn(get_module(block, rel[p.name]).weight.detach().float(),
                                             layer_scheme(p)).to(HOST) for p in plans}

        def rtn_weights() -> Optional[Dict[str, QuantizedWeight]]:
            """Plain RTN codes for the comparison forward, on request (`quant.rtn_loss`): the weights do not change
            while tuning, so these are the same before and after; made after tuning so that they are not held
            through it."""
            if not cfg.quant.rtn_loss:
                return None
            codes = rtn_codes()
            release_freed_memory()
            return codes

        if settings.iters > 0:
            forward, compared = tuning_pair(adapter, block, shared, cfg, target)

            def progress(step: int, loss: float) -> None:
                fault_point("quantize.tuning")
                stop_point()  # an unfinished block is dropped; the next run tunes it again
                if step % 25 == 0:
                    bar.set_postfix(iter=f"{step}/{settings.iters}", loss=f"{loss:.2e}")

            layers = {rel[p.name]: layer_scheme(p) for p in plans}
            # the tuned weights in their checkpoint's dtype while tuning (exact; the fused layer widens them)
            with narrowed([get_module(block, r) for r in layers]):
                result, retries = tune_block_retrying(ctx.log, block, block_name, layers, x_q, compared, forward,
                                                      settings, generator.initial_seed(), progress)
            times.merge(result.phases, prefix="tune.")
            weights = {f"{block_name}.{k}": v.to(HOST) for k, v in result.weights.items()}
            return weights, {"rtn_weights": rtn_weights(), "plain_rtn": False, "best_iter": result.best_iter,
                             "first_loss": result.first_loss, "best_loss": result.best_loss,
                             "tune_seconds": round(result.seconds, 3), "oom_retries": retries}
        if cfg.quant.opt_rtn:
            modules = {p.name: get_module(block, rel[p.name]) for p in plans}
            with ImportanceCollector(modules) as collector, torch.no_grad():
                for r in batches(len(x_q), BATCH):
                    adapter.run_block(block, x_q.read(r), shared)
            weights = {n: quantize_weighted_rtn(m.weight.detach().float(), layer_scheme(p),
                                                collector.importance[n]).to(HOST)
                       for (n, m), p in zip(modules.items(), plans)}
            return weights, {"rtn_weights": rtn_weights(), "plain_rtn": False}
        return rtn_codes(), {"rtn_weights": None, "plain_rtn": True}


def tune_block_retrying(log: Any, block: torch.nn.Module, block_name: str, layers: Dict[str, Any], x_q: Any,
                       compared: Any, forward: Callable[..., Any], settings: TuneSettings, seed: int,
                       progress: Callable[[int, float], None]) -> Tuple[Any, List[Dict[str, int]]]:
    """`tune_block`; out of memory, again with half the micro-batch and twice the accumulation steps (same
    effective batch, same mini-batches), down to one sample. Returns the result and the retries made."""
    retries: List[Dict[str, int]] = []
    while True:
        try:
            return tune_block(block, layers, x_q, compared, forward, settings, torch.Generator().manual_seed(seed),
                              progress), retries
        except torch.OutOfMemoryError as err:
            smaller = smaller_micro_batch(settings)
            if smaller is None:
                raise
            log.warning("quantize: %s out of memory with micro-batch %d (%s); retrying with micro-batch %d x %d "
                        "accumulation steps (same effective batch)", block_name, settings.batch_size,
                        str(err).splitlines()[0], smaller.batch_size, smaller.grad_accum)
            retries.append({"micro_batch": settings.batch_size, "retry_micro_batch": smaller.batch_size})
            settings = smaller


def tuning_pair(adapter: Any, block: torch.nn.Module, shared: Dict[str, Any], cfg: Any, target: Any
                ) -> Tuple[Callable[[torch.nn.Module, Any], torch.Tensor], Any]:
    """The forward the tuner runs and the targets it compares it with: the block's whole output, or the part
    of it `adapter.tuning_compared` names (the same slice of both)."""
    forward = adapter.tuning_forward(shared, cfg)
    part = adapter.tuning_compared(block, shared, cfg)
    if part is None:
        return forward, target
    return (lambda b, x: forward(b, x)[:, part]), TokenSlice(target, part)


def _chain_files() -> List[str]:
    return [f.name for c in (QCHAIN, FPCHAIN) for f in ActivationFile.paths(Path(c))]


def _drop_next_inputs(unit: Path) -> None:
    for name in (QCHAIN, FPCHAIN):
        ActivationFile.remove(unit / name)


def _plan_by_block(plan: List[LayerPlan], block_names: List[str]) -> Dict[str, List[LayerPlan]]:
    out: Dict[str, List[LayerPlan]] = {b: [] for b in block_names}
    for p in plan:
        if p.quantize:
            block = max((b for b in block_names if p.name.startswith(b + ".")), key=len)
            out[block].append(p)
    return out
