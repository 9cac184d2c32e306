"""export_gguf: the committed quantize stage as one GGUF file for llama.cpp / Ollama (`<run dir>/model-gguf/model.gguf`).

Quantized layers go out as Q4_0 (symmetric 4-bit) or Q8_0 (symmetric 8-bit) blocks carrying the tuned codes and
scales exactly (`qrunner.export.gguf`); layers left in full precision, embeddings and the head keep the source's
dtype (float32 / float16 / bfloat16), norms go out as float32, as llama.cpp's converter writes them. The file is
written in two passes over the checkpoint: every tensor's name, shape and type from the shard headers first (the
GGUF header lists them all), then the tensors one at a time. A layer or a model GGUF cannot carry exactly stops the
run before anything is tuned (`preflight`), naming it: nothing is re-quantized.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from qrunner.errors import UserError
from qrunner.export.gguf import BLOCK, BLOCK_BYTES, encode_layer, gguf_type
from qrunner.export.stream import source_shards
from qrunner.models.gguf_arch import (GgufModel, add_hyperparameters, add_vocabulary, byte_level_vocab,
                                      check_gguf_model, qk_rows, rope_freqs, tensor_namer)
from qrunner.pipeline.faults import fault_point
from qrunner.pipeline.stage import StageContext, register_stage
from qrunner.stages.export import ExportStage
from qrunner.stages.quantize import quantized_layers

GGUF_FILE = "model.gguf"
FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass
class Planned:
    stored: str  # the checkpoint's tensor name
    name: str  # its GGUF name
    kind: str  # Q4_0, Q8_0, F32, F16, BF16
    shape: List[int]  # torch order
    layer: Optional[str] = None  # the quantized layer whose weight this is
    value: Optional[torch.Tensor] = None  # a tensor made here, not read from the checkpoint (rope_freqs)


def unrepresentable(layers: List[Dict[str, Any]]) -> List[str]:
    """Planned quantized layers with no exact GGUF block type, as `name (bits-bit sym/asym group G)`."""
    return [f"{p['name']} ({p['bits']}-bit {'sym' if p['sym'] else 'asym'} group {p['group_size']})" for p in layers
            if p["quantize"] and gguf_type(p["bits"], p["sym"], p["group_size"], p["in_features"]) is None]


def refuse_unrepresentable(layers: List[Dict[str, Any]]) -> None:
    bad = unrepresentable(layers)
    if bad:
        raise UserError(f"export.formats=gguf: {len(bad)} layers have no exact GGUF encoding (Q4_0: symmetric "
                        f"4-bit, Q8_0: symmetric 8-bit, groups a multiple of {BLOCK}), e.g. {', '.join(bad[:3])}; "
                        "nothing is re-quantized. Use such schemes, or export auto_round, gptq or compressed_tensors.")


@register_stage
class GgufExportStage(ExportStage):
    name = "export_gguf"
    format = "gguf"
    folder = "model-gguf"
    quant_method = "gguf"
    description = "GGUF file (llama.cpp)"

    def preflight(self, cfg: Any, session: Any) -> None:
        import importlib.util

        if importlib.util.find_spec("gguf") is None:
            raise UserError("export.formats=gguf needs the gguf package (llama.cpp's writer): pip install "
                            "'qrunner[gguf]' (or pip install gguf)")
        check_gguf_model(session.hf_config, session.model_dir)
        refuse_unrepresentable([p.__dict__ for p in session.layer_plan])

    def is_previous_export(self, folder: Path) -> bool:
        return (folder / GGUF_FILE).is_file() and all(p.name == GGUF_FILE for p in folder.iterdir())

    def plan(self, session: Any, layers: Any, model: GgufModel) -> List[Planned]:
        reader, config = session.reader, session.hf_config
        namer = tensor_namer(model.architecture, int(config.num_hidden_layers))
        by_shard: Dict[Path, List[str]] = {}
        for key, shard in reader.shard_of.items():
            by_shard.setdefault(shard, []).append(key)
        planned = []
        for shard in source_shards(session.model_dir):
            for stored in sorted(by_shard.get(shard, [])):
                model_name = reader.model_name(stored)
                gguf_name = namer(model_name)
                if gguf_name is None:
                    continue
                dtype, shape = reader.stored_meta(stored)
                module, _, leaf = model_name.rpartition(".")
                if module in layers and leaf == "weight":
                    bits, group, sym = layers.scheme(module)
                    kind = gguf_type(bits, sym, group, shape[1])
                    if kind is None:
                        refuse_unrepresentable([{"name": module, "quantize": True, "bits": bits, "sym": sym,
                                                 "group_size": group, "in_features": shape[1]}])
                    planned.append(Planned(stored, gguf_name, kind, list(shape), module))
                elif dtype not in FLOAT_TYPES:
                    raise UserError(f"export.formats=gguf: tensor {stored} is {dtype}, which GGUF export does not "
                                    "carry")
                else:  # norms and biases in float32; matrices in their own dtype
                    planned.append(Planned(stored, gguf_name, "F32" if len(shape) == 1 else FLOAT_TYPES[dtype],
                                           list(shape)))
        factors = rope_freqs(config, model)
        if factors is not None:  # Llama 3's rope scaling, as llama.cpp reads it
            planned.append(Planned("", "rope_freqs.weight", "F32", list(factors.shape), value=factors))
        return planned

    def tensor_bytes(self, item: Planned, session: Any, layers: Any, model: GgufModel) -> np.ndarray:
        if item.value is not None:
            return item.value.contiguous().numpy()
        rows = qk_rows(session.reader.model_name(item.stored), item.shape[0], model)
        if item.layer is not None:
            return encode_layer(layers[item.layer], rows)
        tensor = session.reader.read_stored(item.stored)
        if rows is not None:
            tensor = tensor[rows]
        tensor = tensor.to(torch.float32) if item.kind == "F32" else tensor
        return tensor.contiguous().view(torch.uint8).numpy().reshape(*item.shape[:-1], -1) if item.kind == "BF16" \
            else tensor.contiguous().numpy()

    def write(self, ctx: StageContext, tmp: Path) -> Dict[str, Any]:
        import gguf

        session = ctx.session
        config = session.hf_config
        model = check_gguf_model(config, session.model_dir)
        layers = quantized_layers(ctx.inputs["quantize"])
        planned = self.plan(session, layers, model)
        writer = gguf.GGUFWriter(tmp / GGUF_FILE, model.architecture)
        writer.add_name(session.model_dir.name)
        writer.add_quantized_by("qrunner (AutoRound)")
        add_hyperparameters(writer, config, model)
        add_vocabulary(writer, byte_level_vocab(session.model_dir, int(config.vocab_size)))
        kinds = [p.kind for p in planned if p.layer is not None]
        writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0 if kinds and kinds.count("Q8_0") > len(kinds) / 2
                                 else gguf.LlamaFileType.MOSTLY_Q4_0))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for p in planned:
            if p.kind in BLOCK_BYTES:
                byte_shape = [p.shape[0], p.shape[1] // BLOCK * BLOCK_BYTES[p.kind]]
                writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                       getattr(gguf.GGMLQuantizationType, p.kind))
            elif p.kind == "BF16":
                byte_shape = [*p.shape[:-1], p.shape[-1] * 2]
                writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                       gguf.GGMLQuantizationType.BF16)
            else:
                dtype = np.dtype(np.float32 if p.kind == "F32" else np.float16)
                writer.add_tensor_info(p.name, p.shape, dtype, int(np.prod(p.shape)) * dtype.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in planned:  # one tensor in RAM at a time
            writer.write_tensor_data(self.tensor_bytes(p, session, layers, model))
        writer.close()
        fault_point("export.shards_written")
        return {"format": self.format, "quant_method": "gguf", "quantized_layers": len(kinds), "shards": 1,
                "side_files": [], "tensors": len(planned), "types": {k: kinds.count(k) for k in sorted(set(kinds))}}
