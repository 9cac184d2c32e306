"""export_gptq, export_compressed_tensors: the committed quantize stage written in the formats engines serve.

Each is its own stage, in the pipeline when `export.formats` lists its format, writing `<run dir>/model-<format>/`
(or export.output_dir with one format) exactly as the `auto_round` export does: streamed shard by shard from the
source checkpoint, under a temporary name, renamed into place when complete. The codes and scales are the
quantize stage's in every format; only their packing differs.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional

import torch
from torch import nn

from qrunner.errors import UserError
from qrunner.export.compressed_tensors import ct_config, pack_ct_layer
from qrunner.export.gptq import QUANTIZE_CONFIG_FILE, gptq_config, pack_gptq_layer
from qrunner.pipeline.stage import StageContext, register_stage
from qrunner.stages.export import ExportStage
from qrunner.stages.layer_plan import planned_layers
from qrunner.stages.load import read_model_info
from qrunner.stages.quantize import scheme_of


@register_stage
class GptqExportStage(ExportStage):
    name = "export_gptq"
    format = "gptq"
    folder = "model-gptq"
    quant_method = "gptq"
    sort_keys = False  # `dynamic` rules apply in order (first match wins): the skips must stay first
    description = "GPTQ v1 checkpoint"

    def pack_layer(self, qw: Any, bias: Optional[torch.Tensor], qconfig: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        return pack_gptq_layer(qw, bias)

    def config_file(self) -> Optional[str]:
        return QUANTIZE_CONFIG_FILE

    def quantization_config(self, ctx: StageContext) -> Dict[str, Any]:
        layers = [p.__dict__ for p in planned_layers(ctx)]
        asym = [p["name"] for p in layers if p["quantize"] and not p["sym"]]
        if asym:
            raise UserError(f"export.formats: gptq carries symmetric schemes only, and {len(asym)} layers are "
                            f"asymmetric (e.g. {asym[0]}); export them as compressed_tensors or auto_round.")
        return gptq_config(scheme_of(ctx.cfg), read_model_info(ctx)["block_lists"], layers,
                           int(ctx.cfg.quant.iters))


@register_stage
class CompressedTensorsExportStage(ExportStage):
    name = "export_compressed_tensors"
    format = "compressed_tensors"
    folder = "model-compressed_tensors"
    quant_method = "compressed-tensors"
    description = "compressed-tensors (pack-quantized) checkpoint"
    LINEAR_TYPES: ClassVar[tuple] = (nn.Linear,)

    def preflight(self, cfg: Any, session: Any) -> None:
        fused = session.adapter.fused_experts(session.skeleton, session.block_lists)
        if fused:
            raise UserError(f"export.formats=compressed_tensors: {session.model_dir} stores its MoE experts fused "
                            f"({len(fused)} experts modules, e.g. {fused[0]}); transformers' compressed-tensors loader "
                            "keeps them fused and cannot load them quantized one expert at a time. Export auto_round "
                            "or gptq instead: transformers + auto-round unfuse the experts and load them.")

    def pack_layer(self, qw: Any, bias: Optional[torch.Tensor], qconfig: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        return pack_ct_layer(qw, bias)

    def config_file(self) -> Optional[str]:
        return None  # compressed-tensors reads config.json only

    def quantization_config(self, ctx: StageContext) -> Dict[str, Any]:
        linears = [n for n, m in ctx.session.skeleton.named_modules() if isinstance(m, self.LINEAR_TYPES)]
        return ct_config([p.__dict__ for p in planned_layers(ctx)], linears)
