"""Save and load a block's keyword inputs (rotary tables, masks, positions) as safetensors + JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch
from safetensors.torch import load_file, save_file

TENSORS = "shared.safetensors"
LAYOUT = "shared.json"


def save_block_kwargs(kwargs: Dict[str, Any], folder: Path) -> None:
    tensors: Dict[str, torch.Tensor] = {}
    layout: Dict[str, Any] = {}
    for key, value in sorted(kwargs.items()):
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().contiguous()
            layout[key] = {"kind": "tensor"}
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            for i, v in enumerate(value):
                tensors[f"{key}.{i}"] = v.detach().contiguous()
            layout[key] = {"kind": "tuple", "n": len(value)}
        elif value is None or isinstance(value, (bool, int, float, str)):
            layout[key] = {"kind": "value", "value": value}
        else:
            raise TypeError(f"block input {key!r} of type {type(value).__name__} cannot be stored; "
                            "the family adapter must drop or recompute it")
    save_file(tensors, str(folder / TENSORS), metadata={"format": "pt"})
    (folder / LAYOUT).write_text(json.dumps(layout, indent=1, sort_keys=True))


def load_block_kwargs(folder: Path, dtype: torch.dtype | None = None) -> Dict[str, Any]:
    tensors = load_file(str(folder / TENSORS))
    layout = json.loads((folder / LAYOUT).read_text())

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    out: Dict[str, Any] = {}
    for key, spec in layout.items():
        if spec["kind"] == "tensor":
            out[key] = cast(tensors[key])
        elif spec["kind"] == "tuple":
            out[key] = tuple(cast(tensors[f"{key}.{i}"]) for i in range(spec["n"]))
        else:
            out[key] = spec["value"]
    return out
