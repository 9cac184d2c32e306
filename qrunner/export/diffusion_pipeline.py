"""A quantized diffusers pipeline folder: the layout `DiffusionPipeline.from_pretrained` reads.

- `model_index.json` and every component but the denoiser (text encoders, tokenizers, VAE, scheduler) are copied
  file by file, never loaded and saved again (hard links where the file system allows, else copies);
- the denoiser's folder gets `config.json` with the AutoRound `quantization_config` (what diffusers' AutoRound
  quantizer reads, the same keys as for transformers), `quantization_config.json` beside it, and its weights as
  `diffusion_pytorch_model*.safetensors` (+ index), streamed from the source shards with the quantized layers
  packed (`qrunner.export.stream`).

The caller writes into an empty folder and moves it into place when this returns (nothing half-written is ever
at the final path).
"""
from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Mapping

from qrunner.export.auto_round import QUANTIZATION_CONFIG_FILE, pack_layer
from qrunner.export.shards import ShardedSafetensorsWriter
from qrunner.export.stream import write_quantized_tensors
from qrunner.memory.streaming import INDEXES, CheckpointReader
from qrunner.models.diffusion import PipelineFolder

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_components(folder: PipelineFolder, out: Path) -> List[str]:
    """Everything of the pipeline folder but the denoiser's folder, file by file; returns the relative paths."""
    copied = []
    for src in sorted(folder.path.rglob("*")):
        rel = src.relative_to(folder.path)
        if rel.parts[0] == folder.denoiser or rel.parts[0].startswith(".") or not src.is_file():
            continue
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(src, dst)
        copied.append(str(rel))
    return copied


def write_quantized_pipeline(folder: PipelineFolder, layers: Mapping[str, Any], qconfig: Dict[str, Any], out: Path,
                             max_shard_bytes: int) -> Dict[str, Any]:
    """Write the pipeline with its denoiser quantized (`layers`: model names -> QuantizedWeight) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    copied = copy_components(folder, out)
    denoiser_out = out / folder.denoiser
    writer = ShardedSafetensorsWriter(denoiser_out, max_shard_bytes, prefix=DIFFUSERS_WEIGHTS)
    try:
        pack = partial(pack_layer, packing=qconfig["packing_format"])
        packed = write_quantized_tensors(CheckpointReader(folder.denoiser_dir), folder.denoiser_dir, layers, writer,
                                         pack_layer=pack)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    config = json.loads((folder.denoiser_dir / "config.json").read_text())
    config["quantization_config"] = qconfig
    (denoiser_out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (denoiser_out / QUANTIZATION_CONFIG_FILE).write_text(json.dumps(qconfig, indent=2, sort_keys=True) + "\n")
    skip = {"config.json", *INDEXES}
    for src in sorted(folder.denoiser_dir.iterdir()):  # anything else the denoiser folder holds
        if src.is_file() and src.suffix != ".safetensors" and src.name not in skip and not src.name.startswith("."):
            _link_or_copy(src, denoiser_out / src.name)
    return {"quantized_layers": len(packed), "shards": len(shards), "copied": copied}
