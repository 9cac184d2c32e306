"""Running a block over rows of activations, wherever the rows live (RAM or row files) and wherever the block
runs (the CPU or a GPU: rows travel to the block's device a batch at a time and its outputs come back to the host
before they are written): the block forwards of quantize, evaluate and AutoScheme's scores."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from qrunner.memory.activations import ActivationFile, BlockRows, Rows, TensorRows, batches, to_ram
from qrunner.memory.device import HOST, to_device, to_host
from qrunner.models.adapter import get_module
from qrunner.models.block_io import SampleRows, split_inputs
from qrunner.pipeline.atomic import remove_tree
from qrunner.quant.rtn import QuantizedWeight

BATCH = 8  # rows a block forward takes at a time outside tuning


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (the host for a module without parameters)."""
    return next((p.device for p in module.parameters()), HOST)


def forward_rows(adapter: Any, block: torch.nn.Module, src: BlockRows, shared: Dict[str, Any], dst: Rows,
                 writes: Optional[Dict[str, str]] = None, new_rows: Optional[Callable[..., Rows]] = None
                 ) -> Dict[str, Rows]:
    """dst[i] = block(src[i]) for every row, BATCH rows at a time. The side values the block hands to later blocks
    (`writes`: local name -> rows name) go to rows made by `new_rows(rows name, n, row_shape, dtype)`."""
    writes = writes or {}
    side: Dict[str, Rows] = {}
    device = module_device(block)
    shared = to_device(shared, device)
    with torch.no_grad():
        for r in batches(len(src), BATCH):
            out, values = adapter.run_block(block, to_device(src.read(r), device), shared, tuple(writes))
            dst.write(r.start, to_host(out))
            for local, name in writes.items():
                value = to_host(values[local])
                if name not in side:
                    side[name] = new_rows(name, len(src), tuple(value.shape[1:]), value.dtype)
                side[name].write(r.start, value)
    return side


def mse_rows(a: Rows, b: Rows, part: slice = slice(None)) -> float:
    """Mean squared difference over all elements of two equally shaped row sets (of the tokens `part` only)."""
    total, count = 0.0, 0
    for r in batches(len(a), BATCH):
        x, y = a.read(r)[:, part].float(), b.read(r)[:, part].float()
        total += float(((x - y) ** 2).sum(dtype=torch.float64))
        count += x.numel()
    return total / max(count, 1)


@contextmanager
def fake_quantized(block: torch.nn.Module, block_name: str, weights: Mapping[str, QuantizedWeight],
                   restore: bool = True):
    """The block with its quantized layers holding their dequantized weights; the originals come back after, or,
    with `restore=False` (a streamed block used for nothing else after), are dropped as each layer is replaced:
    no second copy of the block's weights."""
    saved = []
    try:
        for name, qw in weights.items():
            layer = get_module(block, name[len(block_name) + 1:])
            if restore:
                saved.append((layer, layer.weight.data))
            layer.weight.data = qw.to(layer.weight.device).dequantize(layer.weight.dtype)
        yield block
    finally:
        for layer, original in saved:
            layer.weight.data = original


class ChainRows:
    """Where one block's activations live: RAM (high/medium) or row files in a scratch folder (low)."""

    def __init__(self, scratch: Path, on_disk: bool) -> None:
        self.scratch, self.on_disk = scratch, on_disk
        remove_tree(scratch)
        scratch.mkdir(parents=True)

    def new(self, name: str, like: Rows) -> Rows:
        return self.new_shaped(name, len(like), like.row_shape, like.dtype)

    def new_shaped(self, name: str, n: int, row_shape: Tuple[int, ...], dtype: torch.dtype) -> Rows:
        if self.on_disk:
            return ActivationFile.create(self.scratch / name, n, row_shape, dtype)
        return TensorRows.empty(n, row_shape, dtype)

    def open(self, path: Path) -> Rows:
        return self.wrap(ActivationFile.open(path))

    def wrap(self, rows: Rows) -> Rows:
        """Rows as this mode reads them: from their file (low) or from RAM (read whole if on disk)."""
        return rows if self.on_disk else to_ram(rows)

    def reader(self) -> Callable[[Rows], Rows]:
        """`wrap` for one block's use, once per rows object: rows both chains read (the captured inputs) come
        into RAM once (medium), not once per chain."""
        seen: Dict[int, Tuple[Rows, Rows]] = {}

        def wrap(rows: Rows) -> Rows:
            if id(rows) not in seen:
                seen[id(rows)] = (rows, self.wrap(rows))  # the source is kept so that its id stays its own
            return seen[id(rows)][1]

        return wrap

    def drop(self, rows: Rows) -> None:
        if isinstance(rows, ActivationFile):
            rows.unlink()

    def close(self) -> None:
        remove_tree(self.scratch)


def publish_rows(rows: Rows, path: Path, *, keep_original: bool = False) -> None:
    """Put `rows` at `path` as a row file: written from RAM, or moved (linked if still needed) from scratch."""
    if isinstance(rows, TensorRows):
        rows.save(path)
    elif keep_original:
        rows.link_to(path)
    else:
        rows.move_to(path)


def block_inputs(session: Any, per_block: List[Dict[str, Any]], index: int
                 ) -> Tuple[Dict[str, Any], Dict[str, SampleRows]]:
    """Block `index`'s shared inputs and its per-sample inputs (local name -> rows): those captured for it and
    the side values earlier blocks hand to it."""
    shared, reads = split_inputs(per_block[index])
    reads.update({k: SampleRows(g) for k, g in session.adapter.side_io(session.hf_config, index)[0].items()})
    return shared, reads


def open_block_rows(hidden: Rows, reads: Dict[str, SampleRows], rows_named: Callable[[str], Any]) -> BlockRows:
    """A block's per-sample inputs: `hidden` plus the rows `reads` names, found by `rows_named(file name)`."""
    return BlockRows(hidden, {k: spec.open(rows_named) for k, spec in reads.items()})


