"""Store the inputs every calibration sample shares, per block (rotary tables, masks, positions), once each.

Blocks of one model often receive the very same objects (one rotary table for all layers), or one of a few
(one per attention type: sliding and full layers of Gemma get different tables and masks). The capture stage
records each block's inputs; here equal values are written once (`shared.safetensors`) and every block keeps
a reference to them (`shared.json`). Inputs that differ per sample are not stored here: a block's entry then
names the row file that holds them (`SampleRows`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from qrunner.memory.activations import ValueRows

TENSORS = "shared.safetensors"
LAYOUT = "shared.json"


@dataclass(frozen=True)
class SampleRows:
    """A block input kept per sample: the name of its row file (one row per calibration sample). A tuple of
    tensors (`parts` > 0) is kept in the row files `name.0`, `name.1`, ...; a tensor whose batch dimension is
    not the first (`dim`) is stored with it moved to the front."""

    name: str
    parts: int = 0
    dim: int = 0

    def files(self) -> List[str]:
        return [f"{self.name}.{k}" for k in range(self.parts)] if self.parts else [self.name]

    def open(self, rows_named: Callable[[str], Any]) -> Any:
        """The rows that read this input back, from `rows_named(row file name)`."""
        parts = [rows_named(f) for f in self.files()]
        if not self.parts and not self.dim:
            return parts[0]
        return ValueRows(parts, self.dim, is_tuple=bool(self.parts))


def same_value(a: Any, b: Any) -> bool:
    """Equal block inputs: tensors of the same shape, dtype and values; tuples item by item; plain values."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def tensor_parts(value: Any) -> Optional[List[torch.Tensor]]:
    """The tensors of a block input that is a tensor or a tuple of tensors (what can be stored), else None."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    return None


def _kind(value: Any) -> str:
    if isinstance(value, SampleRows):
        return "rows"
    if tensor_parts(value) is not None:
        return "tensor" if isinstance(value, torch.Tensor) else "tuple"
    if value is None or isinstance(value, (bool, int, float, str)):
        return "value"
    return ""


def save_block_inputs(per_block: List[Dict[str, Any]], folder: Path) -> None:
    """Write every block's shared inputs, each distinct value once."""
    uniques: List[Any] = []
    tensors: Dict[str, torch.Tensor] = {}
    values: Dict[str, Dict[str, Any]] = {}
    blocks: List[Dict[str, Any]] = []

    def ref(value: Any, key: str, index: int) -> Any:
        kind = _kind(value)
        if not kind:
            raise TypeError(f"input {key!r} of block {index} ({type(value).__name__}) cannot be stored; the family "
                            "adapter must drop it or rebuild it in run_block")
        if kind == "rows":
            return {"rows": value.name, "parts": value.parts, "dim": value.dim}
        if kind == "value":
            return {"value": value}
        for vid, seen in enumerate(uniques):
            if same_value(seen, value):
                return {"ref": f"v{vid}"}
        vid = f"v{len(uniques)}"
        uniques.append(value)
        if kind == "tensor":
            tensors[vid] = value.detach().clone().contiguous()
            values[vid] = {"kind": "tensor"}
        else:
            for i, v in enumerate(value):
                tensors[f"{vid}.{i}"] = v.detach().clone().contiguous()
            values[vid] = {"kind": "tuple", "n": len(value)}
        return {"ref": vid}

    for index, inputs in enumerate(per_block):
        blocks.append({key: ref(value, key, index) for key, value in sorted(inputs.items())})
    save_file(tensors, str(folder / TENSORS), metadata={"format": "pt"})
    (folder / LAYOUT).write_text(json.dumps({"values": values, "blocks": blocks}, indent=1, sort_keys=True))


def load_block_inputs(folder: Path, dtype: torch.dtype | None = None) -> List[Dict[str, Any]]:
    """Every block's inputs as saved: shared values (floating tensors cast to `dtype`) and `SampleRows`."""
    tensors = load_file(str(folder / TENSORS))
    layout = json.loads((folder / LAYOUT).read_text())

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    loaded: Dict[str, Any] = {}
    for vid, spec in layout["values"].items():
        if spec["kind"] == "tensor":
            loaded[vid] = cast(tensors[vid])
        else:
            loaded[vid] = tuple(cast(tensors[f"{vid}.{i}"]) for i in range(spec["n"]))

    def value(entry: Dict[str, Any]) -> Any:
        if "ref" in entry:
            return loaded[entry["ref"]]
        if "rows" in entry:
            return SampleRows(entry["rows"], entry.get("parts", 0), entry.get("dim", 0))
        return entry["value"]

    return [{key: value(entry) for key, entry in block.items()} for block in layout["blocks"]]


def split_inputs(inputs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, SampleRows]]:
    """(shared inputs, {input name: its per-sample rows}) of one block."""
    shared = {k: v for k, v in inputs.items() if not isinstance(v, SampleRows)}
    rows = {k: v for k, v in inputs.items() if isinstance(v, SampleRows)}
    return shared, rows
