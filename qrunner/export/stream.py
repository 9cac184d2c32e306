"""A checkpoint's tensors streamed into a shard writer with the quantized layers packed: one tensor (or one row
block of a large one) in RAM at a time.

Tensors keep the checkpoint's own names and come in the source's shard order; a quantized layer's weight is
replaced by its packed tensors (its bias goes with them), every other tensor is copied byte for byte. Shared by
the LLM export and the diffusion pipeline export.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from qrunner.export.auto_round import pack_layer as pack_auto_round
from qrunner.export.shards import ShardedSafetensorsWriter
from qrunner.memory.streaming import INDEXES, CheckpointReader

COPY_PART_BYTES = 64 << 20  # unquantized tensors are copied in row blocks of this size
# (model tensor name, read a model tensor by name, quantized layers) -> tensors to write instead, or None
SplitSource = Callable[[str, Callable[[str], torch.Tensor], Any], Optional[Dict[str, torch.Tensor]]]
# (QuantizedWeight, bias or None) -> the layer's tensors in the export format, by suffix ("qweight", ...)
PackLayer = Callable[[Any, Optional[torch.Tensor]], Dict[str, torch.Tensor]]


def source_shards(model_dir: Path) -> List[Path]:
    """The checkpoint's shards in order (from its index, else sorted by name)."""
    for name in INDEXES:
        index = model_dir / name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [model_dir / f for f in sorted(set(weight_map.values()))]
    return sorted(model_dir.glob("*.safetensors"))


def write_quantized_tensors(reader: CheckpointReader, model_dir: Path, layers: Dict[str, Any],
                            writer: ShardedSafetensorsWriter, split: Optional[SplitSource] = None,
                            pack_layer: PackLayer = pack_auto_round) -> set:
    """Every tensor of the checkpoint into `writer`, the layers of `layers` (model names -> QuantizedWeight)
    packed by `pack_layer` (the format's tensors, by suffix); `split` may write a source tensor under other names
    (fused experts per expert). Returns the packed layers' names; stops when a quantized layer has no weight in
    the checkpoint."""
    packed: set = set()
    by_shard: Dict[Path, List[str]] = {}
    for key, shard in reader.shard_of.items():
        by_shard.setdefault(shard, []).append(key)
    for shard in source_shards(model_dir):
        for stored in sorted(by_shard.get(shard, [])):
            # tensors keep the checkpoint's own names; quantized layers are found by the model's names
            name = reader.model_name(stored)
            module, _, leaf = name.rpartition(".")
            # a quantized piece of a fused tensor (one expert's weight) goes out under its per-expert name, as
            # AutoRound's loader (which unfuses the experts) reads it; pieces left as they are keep their own names
            stored_module = module if reader.is_assembled_part(stored) else stored.rpartition(".")[0]
            if module in layers:
                if leaf == "weight":
                    bias = reader.read(f"{module}.bias") if reader.source_key(f"{module}.bias") else None
                    for suffix, tensor in pack_layer(layers[module], bias).items():
                        writer.add(f"{stored_module}.{suffix}", tensor)
                    packed.add(module)
                elif leaf != "bias":
                    writer.add(stored, reader.read_stored(stored))
                continue
            parts = split(name, reader.read, layers) if split is not None else None
            if parts is None:  # copied as stored; a large tensor in row blocks, never whole in RAM
                dtype, shape = reader.stored_meta(stored)
                writer.add_parts(stored, dtype, shape, reader.stored_row_parts(stored, COPY_PART_BYTES)
                                 if len(shape) >= 1 else [reader.read_stored(stored)])
                continue
            for part_name, part in parts.items():  # e.g. fused experts written per expert
                part_module, _, part_leaf = part_name.rpartition(".")
                stored_part = stored_module + part_name[len(module):]
                if part_module in layers:  # a quantized part: its packed tensors, its bias with them
                    if part_leaf == "weight":
                        bias = parts.get(f"{part_module}.bias")
                        for suffix, packed_tensor in pack_layer(layers[part_module], bias).items():
                            writer.add(f"{stored_part.rpartition('.')[0]}.{suffix}", packed_tensor)
                        packed.add(part_module)
                else:
                    writer.add(stored_part, part.contiguous())
    missing = sorted(set(layers) - packed)
    if missing:
        raise RuntimeError(f"export: {len(missing)} quantized layers have no weight in the source checkpoint "
                           f"(e.g. {missing[:3]}); the checkpoint and the model skeleton disagree")
    return packed
