"""evaluate: perplexity of the original and of the quantized model on held-out text."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterator, Sequence

import torch
from tqdm import tqdm

from qrunner.data_sources import text_windows
from qrunner.errors import UserError
from qrunner.memory.device import placed
from qrunner.models.adapter import get_module
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.pipeline.stopping import stop_point
from qrunner.stages.capture import capture_block_inputs
from qrunner.stages.block_rows import (ChainRows, block_inputs, fake_quantized, forward_rows, module_device,
                                      open_block_rows)
from qrunner.stages.quantize import QuantizedLayers, quantized_layers


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, desc: str, show: bool) -> float:
    """exp(mean negative log-likelihood) over every predicted token of every window."""
    total, count = 0.0, 0
    device = module_device(model)
    with torch.no_grad():
        for i in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", disable=not show):
            batch = windows[i:i + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            labels = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    reduction="sum")
            total += float(nll)
            count += labels.numel()
    return math.exp(total / count)


def perplexity_on(device: torch.device, model: torch.nn.Module, windows: torch.Tensor, batch_size: int, desc: str,
                  show: bool, log: Any) -> float:
    """`perplexity` with the whole model on `device` (memory=high), or on the CPU when it does not fit there."""
    if device.type != "cpu":
        try:
            with placed(model, device):
                return perplexity(model, windows, batch_size, desc, show)
        except torch.OutOfMemoryError as err:
            log.warning("evaluate: the model does not fit %s (%s); %s runs on the CPU", device,
                        str(err).splitlines()[0], desc)
    return perplexity(model, windows, batch_size, desc, show)


def evaluation_windows(cfg: Any, tokenizer: Any) -> torch.Tensor:
    e = cfg.eval
    windows = text_windows(tokenizer, e, "evaluation")[0]
    if len(windows) == 0:
        raise UserError(f"eval.source={e.source!r} has fewer than eval.seqlen={e.seqlen} tokens; lower eval.seqlen")
    return windows if e.nsamples == 0 else windows[: e.nsamples]


@register_stage
class EvaluateStage(Stage):
    name = "evaluate"
    needs = ("load", "quantize")
    reads = ("eval.enabled", "eval.source", "eval.format", "eval.text_field", "eval.separator",
             "eval.split_paragraphs", "eval.seqlen", "eval.nsamples", "eval.original", "model.compute_dtype")
    version = 2
    description = "perplexity, original vs quantized"

    def estimate_bytes(self, cfg: Any, session: Any) -> int:
        if not (cfg.eval.enabled and session.activations_on_disk):
            return 0
        windows = int(cfg.eval.nsamples) or 256  # all windows of the held-out text: rarely more
        return 5 * session.activation_bytes(windows, int(cfg.eval.seqlen))

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        cfg, session = ctx.cfg, ctx.session
        if not cfg.eval.enabled:
            return {"skipped": True}
        windows = evaluation_windows(cfg, session.tokenizer)
        show, bs = cfg.run.show_progress, int(cfg.eval.batch_size)
        metrics: Dict[str, Any] = {"windows": len(windows), "seqlen": int(cfg.eval.seqlen),
                                   "tokens": int(windows[:, 1:].numel())}
        layers = quantized_layers(ctx.inputs["quantize"])
        if session.streams_blocks:
            metrics.update(streamed_perplexities(ctx, windows, layers, bool(cfg.eval.original)))
        else:
            device = session.device
            if cfg.eval.original:
                metrics["ppl_original"] = perplexity_on(device, session.model(), windows, bs, "eval original", show,
                                                        ctx.log)
            with fake_quantized_model(session, layers) as model:
                metrics["ppl_quantized"] = perplexity_on(device, model, windows, bs, "eval quantized", show, ctx.log)
        if "ppl_original" in metrics:
            metrics["ppl_ratio"] = metrics["ppl_quantized"] / metrics["ppl_original"]
            ctx.log.info("evaluate: perplexity original %.4f, quantized %.4f (x%.4f)", metrics["ppl_original"],
                         metrics["ppl_quantized"], metrics["ppl_ratio"])
        else:
            ctx.log.info("evaluate: perplexity quantized %.4f", metrics["ppl_quantized"])
        return metrics


@contextlib.contextmanager
def fake_quantized_model(session: Any, layers: QuantizedLayers) -> Iterator[torch.nn.Module]:
    """The whole model in RAM (memory=high) with every quantized layer's weight replaced by its dequantized
    value. The session hands the model over: later stages load it again."""
    model = session.take_model()
    with contextlib.ExitStack() as views:
        for _, block in session.blocks(model):
            views.enter_context(session.adapter.block_view(block))
        for name, qw in layers.items():
            layer = get_module(model, name)
            layer.weight.data = qw.dequantize(layer.weight.dtype)
        yield model


@contextlib.contextmanager
def streamed_chains(ctx: StageContext, windows: torch.Tensor, layers: QuantizedLayers, chains: Sequence[str],
                    desc: str = "eval") -> Iterator[Dict[str, Any]]:
    """The last block's output rows of `windows` (same-length token rows), with one block in RAM at a time
    (memory=medium/low): the hidden states run through the blocks streamed from the shards (each on the run's
    device), each chain ("original", "quantized") side by side. Yields chain -> rows; the rows are removed on
    exit."""
    session, show = ctx.session, ctx.cfg.run.show_progress
    adapter = session.adapter
    rows_store = ChainRows(ctx.out / "scratch", session.activations_on_disk)
    with session.input_model() as model:
        hidden, per_block, captured = capture_block_inputs(adapter, model, session.blocks(model), windows,
                                                           rows_store.scratch, f"{desc} inputs", show)
    hidden = rows_store.wrap(hidden)
    # the original chain first: the quantized one then replaces the streamed block's weights in place
    x = {chain: hidden for chain in sorted(chains, key=lambda c: c != "original")}
    side = {chain: dict(captured) for chain in x}
    for index in tqdm(range(len(session.block_names())), desc=f"{desc} blocks", unit="block", disable=not show):
        shared, reads = block_inputs(session, per_block, index)
        stop_point()
        writes = adapter.side_io(session.hf_config, index)[1]
        wrap = rows_store.reader()
        with session.block(index) as (name, block), placed(block, session.device):
            y = {}
            for chain, rows in x.items():
                y[chain] = rows_store.new(f"{chain}_{index}", rows)
                src = open_block_rows(rows, reads, lambda g, c=chain: wrap(side[c][g]))
                new = lambda n, *a, c=chain: rows_store.new_shaped(f"{c}_{n}", *a)  # noqa: E731
                context = (fake_quantized(block, name, layers.in_block(name), restore=False)
                           if chain == "quantized" else contextlib.nullcontext())
                with context:
                    side[chain].update(forward_rows(adapter, block, src, shared, y[chain], writes, new))
        for rows in x.values():
            rows_store.drop(rows)
        x = y
    try:
        yield x
    finally:
        rows_store.close()


def streamed_perplexities(ctx: StageContext, windows: torch.Tensor, layers: QuantizedLayers,
                          original: bool) -> Dict[str, float]:
    """Perplexity with one block in RAM at a time (memory=medium/low): the original and the quantized chain
    side by side through the streamed blocks, then the head, applied in slices of its rows."""
    chains = ("quantized", "original") if original else ("quantized",)
    labels = windows[:, 1:]
    with streamed_chains(ctx, windows, layers, chains) as last, ctx.session.sliced_head() as head:
        return {f"ppl_{chain}": math.exp(head.nll(rows.read, labels) / labels.numel())
                for chain, rows in last.items()}
