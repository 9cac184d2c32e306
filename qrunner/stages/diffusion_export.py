"""family=diffusion, export: the pipeline folder with its transformer quantized (AutoRound format), written beside
export.output_dir and moved into place when complete, as the decoder export is."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from qrunner.config.validate import parse_size
from qrunner.export.auto_round import PACKING_ASYM, PACKING_SYM
from qrunner.export.diffusion_pipeline import write_quantized_pipeline
from qrunner.pipeline.faults import fault_point
from qrunner.pipeline.stage import StageContext, register_stage
from qrunner.stages.diffusion_capture import SAMPLING_KEYS
from qrunner.stages.export import ExportStage
from qrunner.stages.quantize import quantized_layers


@register_stage
class DiffusionExportStage(ExportStage):
    key = "diffusion_export"
    reads = (*ExportStage.reads, *SAMPLING_KEYS)
    description = "quantized pipeline folder"

    def is_previous_export(self, folder: Path) -> bool:
        return (folder / "model_index.json").is_file() and any(folder.glob("*/quantization_config.json"))

    def packing(self, layers: List[Dict[str, Any]]) -> str:
        """GPTQ-style or plain: the AWQ layout is not offered for pipelines (diffusers' CPU path for it is untested)."""
        return PACKING_SYM if all(p["sym"] for p in layers if p["quantize"]) else PACKING_ASYM

    def quantization_config(self, ctx: StageContext) -> Dict[str, Any]:
        qconfig = super().quantization_config(ctx)
        qconfig.pop("seqlen", None)  # a diffusion row is a denoising step, not a token window
        return qconfig

    def write(self, ctx: StageContext, tmp: Path) -> Dict[str, Any]:
        session = ctx.session
        qconfig = self.quantization_config(ctx)
        result = write_quantized_pipeline(session.folder, quantized_layers(ctx.inputs["quantize"]),
                                          qconfig, tmp, parse_size(ctx.cfg.export.max_shard_size))
        fault_point("export.shards_written")
        return {"format": "auto_round", "packing_format": qconfig["packing_format"],
                "quantized_layers": result["quantized_layers"], "shards": result["shards"],
                "side_files": result["copied"]}
