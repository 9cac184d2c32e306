"""autoscheme_scores: for every candidate scheme and every quantizable layer, the first-order estimate of how
much the model's loss grows when that layer is quantized with that scheme, sum |dL/dŴ ⊙ (W − Ŵ)|.

For one option, every scored layer is quantized with it at once (round-to-nearest) and L_b is the model's own
next-token loss (mean over every predicted token) on scoring batch b (`scheme.auto.batch_size` samples, as
auto-round's AutoScheme takes one backward per batch); a layer's score is the sum over batches of
sum |dL_b/dŴ ⊙ (W − Ŵ)|. A batch size of at least nsamples is the gradient of the loss on all samples. The gradient is computed with one
block in RAM at a time: a no-grad forward through the blocks keeps each block's input (RAM in high/medium, row
files in low); the loss and its gradient with respect to the last block's output come from the head alone; then
a reverse replay recomputes one block at a time with autograd, accumulates its layers' weight gradients into
their scores and hands the gradient of its input to the block before. Values a block hands to later blocks
(Gemma 4's shared keys/values) carry their gradients back to the block that wrote them.

Checkpoints: the head's gradient, then each block of the replay, are units; a killed run redoes the no-grad
forward of the option it was in and continues the replay at the block after the last committed one.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

from qrunner.data_sources import text_windows
from qrunner.errors import UserError
from qrunner.memory.activations import ActivationFile, Rows, batches
from qrunner.memory.trim import release_freed_memory
from qrunner.models.adapter import HIDDEN
from qrunner.pipeline.atomic import remove_tree
from qrunner.pipeline.faults import fault_point
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.quant.rtn import quantize_rtn
from qrunner.quant.scheme import parse_scheme_name
from qrunner.stages.capture import capture_block_inputs
from qrunner.stages.layer_plan import PLAN_KEYS, scheme_is_auto
from qrunner.stages.block_rows import BATCH, ChainRows, block_inputs, forward_rows, open_block_rows, publish_rows

SCORES = "scores.json"
GRAD = "grad"  # in a unit: the gradient of the loss with respect to the input of the block (or head) it holds
SIDE_GRADS = "side_grads"  # in a block unit: gradients owed to the blocks that wrote side values


def scoring_windows(cfg: Any, tokenizer: Any) -> torch.Tensor:
    """scheme.auto.nsamples windows of scheme.auto.seqlen tokens, read from data.source as calibration is and
    drawn with data.seed."""
    d, auto = cfg.data, cfg.scheme.auto
    section = SimpleNamespace(source=d.source, format=d.format, text_field=d.text_field, separator=d.separator,
                              split_paragraphs=d.split_paragraphs, seqlen=int(auto.seqlen))
    windows = text_windows(tokenizer, section, "calibration")[0]
    if len(windows) == 0:
        raise UserError(f"data.source={d.source!r} has fewer than scheme.auto.seqlen={auto.seqlen} tokens; lower "
                        "scheme.auto.seqlen")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(int(d.seed)))
    return windows[order[: int(auto.nsamples)]]


def option_key(index: int, name: str) -> str:
    return f"o{index}_{name}"


def read_scores(stage_dir: Any) -> Dict[str, Any]:
    return json.loads((stage_dir / SCORES).read_text())


@register_stage
class AutoSchemeScoresStage(Stage):
    name = "autoscheme_scores"
    needs = ("load",)
    reads = ("scheme.name", "scheme.auto.options", "scheme.auto.nsamples", "scheme.auto.seqlen",
             "scheme.auto.batch_size", "data.source",
             "data.format", "data.text_field", "data.separator", "data.split_paragraphs", "data.seed",
             "model.compute_dtype", *PLAN_KEYS)
    version = 1
    description = "first-order loss change per layer and candidate scheme (block-streamed)"

    @classmethod
    def in_pipeline(cls, cfg: Any) -> bool:
        return scheme_is_auto(cfg)

    def estimate_bytes(self, cfg: Any, session: Any) -> int:
        """low: every block's input of one option, plus two gradients in flight, on disk."""
        if not session.activations_on_disk:
            return 0
        one = session.activation_bytes(int(cfg.scheme.auto.nsamples), int(cfg.scheme.auto.seqlen))
        return (len(session.block_names()) + 3) * one

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        cfg, session = ctx.cfg, ctx.session
        windows = scoring_windows(cfg, session.tokenizer)
        scored = [p.name for p in session.layer_plan if p.quantize]
        options = list(cfg.scheme.auto.options)
        scores: Dict[str, Dict[str, float]] = {}
        losses: Dict[str, Optional[float]] = {}
        for i, option in enumerate(options):
            scheme = parse_scheme_name(option)
            if scheme is None:  # full precision: W = Ŵ, nothing changes
                scores[option], losses[option] = {name: 0.0 for name in scored}, None
                continue
            replay = OptionReplay(ctx, option_key(i, option), scheme, windows, set(scored))
            losses[option], scores[option] = replay.run(f"scores {option}")
        (ctx.out / SCORES).write_text(json.dumps({"options": options, "samples": len(windows),
                                                  "seqlen": int(windows.shape[1]), "loss": losses,
                                                  "scores": scores}, indent=1, sort_keys=True))
        for i, option in enumerate(options):
            if losses[option] is not None:
                ctx.log.info("autoscheme: %s everywhere: loss %.4f, summed layer scores %.4g", option,
                             losses[option], sum(scores[option].values()))
        return {"samples": len(windows), "seqlen": int(windows.shape[1]), "options": options, "layers": len(scored),
                "loss": losses, "checkpoint_seconds": round(ctx.units.commit_seconds, 3)}


class OptionReplay:
    """One option's loss and layer scores: a no-grad forward keeping each block's input, the head's gradient,
    then the reverse replay block by block, each committed as a unit."""

    def __init__(self, ctx: StageContext, key: str, scheme: Any, windows: torch.Tensor, scored: set) -> None:
        self.ctx, self.key, self.scheme, self.windows, self.scored = ctx, key, scheme, windows, scored
        self.session = ctx.session
        self.batch = max(1, min(int(ctx.cfg.scheme.auto.batch_size), len(windows)))
        self.n_blocks = len(self.session.block_names())

    def unit(self, index: Optional[int]) -> str:
        return f"{self.key}_head" if index is None else f"{self.key}_b{index:04d}"

    def run(self, desc: str) -> Tuple[float, Dict[str, float]]:
        units, n = self.ctx.units, self.n_blocks
        resume = n  # replay continues at block resume-1: blocks resume..n-1 are committed
        while resume > 0 and units.done(self.unit(resume - 1)):
            resume -= 1
        if 0 < resume < n and not ActivationFile.exists(units.path(self.unit(resume)) / GRAD):
            self.ctx.log.warning("autoscheme: %s: the gradient kept with block %d is missing; scoring the option "
                                 "again", self.key, resume)
            for key in [self.unit(None), *map(self.unit, range(n))]:
                remove_tree(units.path(key))
            resume = n
        if resume > 0:
            self._replay(resume, desc)
        scores: Dict[str, float] = {}
        for index in range(n):
            scores.update(units.info(self.unit(index))["scores"])
        return units.info(self.unit(None))["loss"], scores

    # ---- weights of the option ----------------------------------------------------------------
    @contextmanager
    def _option_weights(self, block: torch.nn.Module, name: str
                        ) -> Iterator[Tuple[Dict[str, torch.nn.Parameter], Dict[str, torch.Tensor]]]:
        """The block with each scored layer's weight replaced by its round-to-nearest value Ŵ under the option,
        one layer at a time (no block's worth of codes held); yields (parameters, original weights W) by layer name
        and puts the originals back on exit."""
        saved: Dict[str, Tuple[torch.nn.Module, torch.Tensor]] = {}
        try:
            for rel, layer in self.session.adapter.linears(block):
                full = f"{name}.{rel}"
                if full in self.scored:
                    weight = layer.weight
                    saved[full] = (layer, weight.data)
                    weight.data = quantize_rtn(weight.detach().float(), self.scheme).dequantize(weight.dtype)
            yield ({full: layer.weight for full, (layer, _) in saved.items()},
                   {full: original for full, (_, original) in saved.items()})
        finally:
            for layer, original in saved.values():
                layer.weight.data = original

    # ---- the three passes ----------------------------------------------------------------------
    def _replay(self, resume: int, desc: str) -> None:
        ctx, session = self.ctx, self.session
        show = ctx.cfg.run.show_progress
        store = ChainRows(ctx.out / "scratch" / self.key, session.activations_on_disk)
        try:
            inputs, side, per_block = self._forward(store, resume, desc, show)
            if resume == self.n_blocks:
                if not ctx.units.done(self.unit(None)):
                    self._head(store, inputs.pop())
                grad = store.wrap(ActivationFile.open(ctx.units.path(self.unit(None)) / GRAD))
                owed: Dict[str, Rows] = {}
            else:
                unit = ctx.units.path(self.unit(resume))
                grad = store.wrap(ActivationFile.open(unit / GRAD))
                owed = _open_owed(store, unit)
            bar = tqdm(reversed(range(resume)), total=resume, desc=f"{desc} replay", unit="block", disable=not show)
            for index in bar:
                grad, owed = self._block_backward(store, index, inputs[index], side, per_block, grad, owed)
                inputs[index] = None
        finally:
            store.close()

    def _forward(self, store: ChainRows, resume: int, desc: str, show: bool
                 ) -> Tuple[List[Any], Dict[str, Rows], List[Dict[str, Any]]]:
        """Each block's input rows up to block `resume`-1 (and the last block's output when resume = all blocks),
        the option's weights in place, without gradients; with the side values blocks hand on."""
        session, adapter = self.session, self.session.adapter
        with session.input_model() as model:
            hidden, per_block, captured = capture_block_inputs(adapter, model, session.blocks(model), self.windows,
                                                               store.scratch, f"{desc} inputs", show)
        x: Rows = store.wrap(hidden)
        side: Dict[str, Rows] = {k: store.wrap(v) for k, v in captured.items()}
        inputs: List[Any] = []
        last = resume if resume < self.n_blocks else self.n_blocks
        for index in tqdm(range(last), desc=f"{desc} forward", unit="block", disable=not show):
            inputs.append(x)
            if index == resume - 1 and resume < self.n_blocks:
                break
            shared, reads = block_inputs(session, per_block, index)
            writes = adapter.side_io(session.hf_config, index)[1]
            with session.block(index) as (name, block), self._option_weights(block, name):
                y = store.new(f"x_{index + 1}", x)
                src = open_block_rows(x, reads, lambda g: side[g])
                made = forward_rows(adapter, block, src, shared, y, writes,
                                    lambda g, *a: store.new_shaped(f"side_{g}", *a))
            side.update(made)
            x = y
            release_freed_memory()
        if resume == self.n_blocks:
            inputs.append(x)  # the last block's output: the head's input
        return inputs, side, per_block

    def _head(self, store: ChainRows, last: Rows) -> None:
        """The mean next-token loss over every predicted token and its gradient with respect to the last block's
        output, one sample at a time, the head applied in row slices; committed as the option's head unit."""
        session = self.session
        n, seqlen = self.windows.shape
        tokens = n * (seqlen - 1)
        scoring = [b for b in batches(n, self.batch)]
        grad = store.new_shaped("grad_head", n, last.row_shape, torch.float32)
        total = 0.0
        release_freed_memory()  # the forward's last temporaries go back before the head's weights arrive
        with session.sliced_head() as head:
            for r in batches(n, 1):
                nll, g = head.nll_and_grad(last.read(r), self.windows[r.start:r.stop, 1:])
                in_batch = len(scoring[r.start // self.batch]) * (seqlen - 1)  # L_b: the mean over its batch
                grad.write(r.start, g / in_batch)
                total += nll
        loss = total / tokens

        def write(tmp: Any) -> Dict[str, Any]:
            publish_rows(grad, tmp / GRAD)
            return {"loss": loss}

        self.ctx.units.commit(self.unit(None), write)
        fault_point("autoscheme.head_committed")
        release_freed_memory()

    def _block_backward(self, store: ChainRows, index: int, x: Rows, side: Dict[str, Rows],
                        per_block: List[Dict[str, Any]], grad_out: Rows, owed: Dict[str, Rows]
                        ) -> Tuple[Rows, Dict[str, Rows]]:
        """Recompute block `index` with autograd on the option's weights; commit its layers' scores, the gradient
        of its input and the gradients still owed to earlier blocks' side values."""
        session, adapter = self.session, self.session.adapter
        shared, reads = block_inputs(session, per_block, index)
        side_reads, writes = adapter.side_io(session.hf_config, index)
        owed = dict(owed)
        grad_in = store.new_shaped(f"grad_{index}", len(x), x.row_shape, torch.float32)
        new_owed: Dict[str, Rows] = {}
        with session.block(index) as (name, block):
            src = open_block_rows(x, reads, lambda g: side[g])
            release_freed_memory()
            with self._option_weights(block, name) as (params, originals):
                scores = {full: 0.0 for full in params}
                for p in params.values():
                    p.requires_grad_(True)
                try:
                    for r in micro_batches(len(x), self.batch):
                        values = src.read(r)
                        h = values[HIDDEN].detach().requires_grad_(True)
                        read_in = {local: values[local].detach().requires_grad_(True) for local in side_reads}
                        out, made = adapter.run_block(block, {**values, HIDDEN: h, **read_in}, shared, tuple(writes))
                        outputs, upstream = [out], [grad_out.read(r).to(out.dtype)]
                        for local, rows_name in writes.items():
                            if rows_name in owed:
                                outputs.append(made[local])
                                upstream.append(owed[rows_name].read(r).to(made[local].dtype))
                        # weight gradients add up in .grad over the micro-batches of one scoring batch
                        torch.autograd.backward(outputs, upstream, inputs=[*params.values(), h, *read_in.values()])
                        del out, made, outputs, upstream
                        if r.stop % self.batch == 0 or r.stop == len(x):  # a scoring batch is complete
                            for full, p in params.items():
                                if p.grad is not None:
                                    change = originals[full].float() - p.data.float()
                                    scores[full] += float(change.mul_(p.grad).abs_().sum(dtype=torch.float64))
                                    p.grad = None
                                    del change
                        grad_in.write(r.start, (h.grad if h.grad is not None else torch.zeros_like(h)).float())
                        for local, rows_name in side_reads.items():
                            g = read_in[local].grad
                            _add_rows(store, new_owed, rows_name, r, g if g is not None else
                                      torch.zeros_like(read_in[local]), len(x))
                        del h, read_in, values
                finally:
                    for p in params.values():
                        p.requires_grad_(False)
                        p.grad = None
            del params, originals
        for rows_name in writes.values():  # paid to the block that wrote them
            owed.pop(rows_name, None)
        for rows_name, rows in new_owed.items():
            if rows_name in owed:  # read by several blocks: the gradients add up
                for r in batches(len(rows), BATCH):
                    rows.write(r.start, rows.read(r) + owed[rows_name].read(r))
            owed[rows_name] = rows
        previous = self.ctx.units.path(self.unit(index + 1 if index + 1 < self.n_blocks else None))

        def write(tmp: Any) -> Dict[str, Any]:
            publish_rows(grad_in, tmp / GRAD)
            if owed:
                (tmp / SIDE_GRADS).mkdir()
            for rows_name, rows in owed.items():
                publish_rows(rows, tmp / SIDE_GRADS / rows_name, keep_original=True)
            return {"block": name, "index": index, "scores": scores}

        self.ctx.units.commit(self.unit(index), write)
        fault_point("autoscheme.block_committed")
        _drop_gradients(previous)  # the committed block's gradient supersedes it
        if index == 0:
            _drop_gradients(self.ctx.units.path(self.unit(0)))
        unit = self.ctx.units.path(self.unit(index))
        x_grad = store.wrap(ActivationFile.open(unit / GRAD)) if index > 0 else grad_in
        release_freed_memory()
        return x_grad, (_open_owed(store, unit) if index > 0 else {})


def micro_batches(n: int, batch: int) -> List[range]:
    """Row ranges of at most BATCH rows that never straddle two scoring batches of `batch` rows."""
    return [r for b in batches(n, batch) for r in (range(b.start + s.start, b.start + s.stop)
                                                   for s in batches(len(b), BATCH))]


def _add_rows(store: ChainRows, into: Dict[str, Rows], rows_name: str, r: range, value: torch.Tensor, n: int) -> None:
    if rows_name not in into:
        into[rows_name] = store.new_shaped(f"owed_{rows_name}_{id(into)}", n, tuple(value.shape[1:]), torch.float32)
    into[rows_name].write(r.start, value.float())


def _open_owed(store: ChainRows, unit: Any) -> Dict[str, Rows]:
    """The side-value gradients a committed block unit holds, by rows name."""
    folder = unit / SIDE_GRADS
    names = sorted(p.name[: -len(".json")] for p in folder.glob("*.json")) if folder.is_dir() else []
    return {name: store.wrap(ActivationFile.open(folder / name)) for name in names}


def _drop_gradients(unit: Any) -> None:
    ActivationFile.remove(unit / GRAD)
    folder = unit / SIDE_GRADS
    if folder.is_dir():
        for p in list(folder.iterdir()):
            p.unlink()
        folder.rmdir()
