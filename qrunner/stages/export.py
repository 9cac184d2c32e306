"""export: write the quantized checkpoint in one of export.formats, at <run dir>/model (or export.output_dir).

Tensors are streamed shard by shard from the source checkpoint: non-quantized tensors are copied byte for
byte, each quantized layer's weight is replaced by its packed tensors. The checkpoint is written under a
temporary name beside the output folder and renamed into place when complete.
"""
from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

import torch
from omegaconf import DictConfig

from qrunner.config.validate import parse_size
from qrunner.errors import UserError
from qrunner.export.auto_round import (PACKING_ASYM, QUANTIZATION_CONFIG_FILE, checkpoint_group_size,
                                      model_packing, quantization_config)
from qrunner.export.auto_round import pack_layer as pack_auto_round
from qrunner.export.shards import ShardedSafetensorsWriter
from qrunner.export.stream import write_quantized_tensors
from qrunner.pipeline.atomic import fsync_tree, remove_tree
from qrunner.pipeline.faults import fault_point
from qrunner.pipeline.integrity import first_problem, records
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.stages.layer_plan import AUTOSCHEME, planned_layers
from qrunner.stages.load import read_model_info
from qrunner.stages.quantize import quantized_layers, scheme_of

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
RECORD = "export.json"


def export_formats(cfg: DictConfig) -> List[str]:
    return [str(getattr(f, "value", f)) for f in cfg.export.formats]


@register_stage
class ExportStage(Stage):
    """The `auto_round` export; the other formats are subclasses (`export_formats.py`), each its own stage reading
    the one quantize stage, so adding a format to a finished run writes only that format."""
    name = "export"
    format: ClassVar[str] = "auto_round"
    quant_method: ClassVar[str] = "auto-round"  # config.json's quantization_config.quant_method
    sort_keys: ClassVar[bool] = True  # config files with sorted keys; False where the order means something
    folder: ClassVar[str] = "model"  # in the run directory, unless export.output_dir names one
    needs = ("load", "quantize")
    uses = (AUTOSCHEME,)
    shareable = False  # the checkpoint is written at export.output_dir, outside the stage folder
    reads = ("export.output_dir", "export.max_shard_size", "scheme.bits", "scheme.group_size",
             "scheme.sym", "scheme.data_type", "quant.iters", "quant.lr", "quant.minmax_lr", "quant.batch_size",
             "quant.grad_accum", "quant.minmax_tuning", "quant.quantized_inputs", "data.nsamples", "data.seqlen")
    version = 2
    description = "quantized checkpoint"

    @classmethod
    def in_pipeline(cls, cfg: DictConfig) -> bool:
        return cls.format in export_formats(cfg)

    def output_dir(self, cfg: DictConfig, run_dir: Path) -> Path:
        return Path(cfg.export.output_dir).expanduser().resolve() if cfg.export.output_dir else run_dir / self.folder

    def estimate_bytes(self, cfg: Any, session: Any) -> int:
        """The source's size less what quantizing saves: each quantized weight (its stored bytes, from the shard
        header) becomes bits/8 bytes a weight plus an fp16 scale and a zero point per group (8 bits for
        scheme=auto, whose plan is not made yet); 5 % and 16 MiB over for headers and config files. (The source's
        whole size, the bound used before, refused a 14B model's 10 GB export on a disk with 9 GB free.)"""
        auto = str(cfg.scheme.name) == "auto"
        saved = 0
        for plan in session.layer_plan:
            source = session.reader.source_key(f"{plan.name}.weight") if plan.quantize else None
            if source is None:
                continue
            dtype, _ = session.reader.stored_meta(source)
            bits = 8 if auto else int(plan.bits)
            weights = plan.out_features * plan.in_features
            groups = -(-plan.in_features // plan.group_size) if plan.group_size > 0 else 1
            saved += weights * dtype.itemsize - (weights * bits // 8 + plan.out_features * groups * 3)
        return int(max(0, session.checkpoint_bytes() - saved) * 1.05) + (16 << 20)

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        final = self.output_dir(ctx.cfg, ctx.run_dir)
        if final.exists() and any(final.iterdir()) and not self.is_previous_export(final):
            raise UserError(f"export.output_dir={str(final)!r} exists and is not a checkpoint qrunner wrote; "
                            "choose an empty or new folder, or remove it.")
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".tmp-{final.name}-*"):  # left by a killed export
            remove_tree(stale)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
        tmp.mkdir()
        metrics = self.write(ctx, tmp)
        fsync_tree(tmp)
        remove_tree(final)
        os.replace(tmp, final)
        files = records(final, [str(p.relative_to(final)) for p in sorted(final.rglob("*")) if p.is_file()])
        (ctx.out / RECORD).write_text(json.dumps({"output_dir": str(final), "files": files}, indent=1))
        ctx.log.info("export %s: %d quantized layers, %d shard(s) -> %s", self.format, metrics["quantized_layers"],
                     metrics["shards"], final)
        return {"output_dir": str(final), **metrics, "bytes": sum(f["size"] for f in files.values())}

    def is_previous_export(self, folder: Path) -> bool:
        """A folder an earlier export of this format wrote (replaced), not someone else's."""
        try:
            qconfig = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
        except (OSError, ValueError):
            return False
        return qconfig.get("quant_method") == self.quant_method and (
            self.config_file() is None or (folder / self.config_file()).is_file())

    def packing(self, layers: List[Dict[str, Any]]) -> str:
        """The checkpoint's `packing_format`: AWQ's layout when every quantized layer is 4-bit asymmetric (vLLM and
        SGLang reject plain `auto_round` packing), GPTQ-style when all are symmetric."""
        return model_packing(layers)

    def quantization_config(self, ctx: StageContext) -> Dict[str, Any]:
        scheme = scheme_of(ctx.cfg)
        layers = [p.__dict__ for p in planned_layers(ctx)]
        return quantization_config(scheme, read_model_info(ctx)["block_lists"], int(ctx.cfg.quant.iters),
                                   extra_config(layers, scheme), packing=self.packing(layers),
                                   **tuning_record(ctx.cfg))

    def pack_layer(self, qw: Any, bias: Optional[torch.Tensor], qconfig: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """One quantized layer's tensors in this format, by suffix (`qconfig`: the checkpoint's config)."""
        return pack_auto_round(qw, bias, qconfig["packing_format"])

    def config_file(self) -> Optional[str]:
        """The file the quantization config is also written to on its own (as the format's own tools do)."""
        return QUANTIZATION_CONFIG_FILE

    def write(self, ctx: StageContext, tmp: Path) -> Dict[str, Any]:
        """Write the checkpoint into the empty folder `tmp` (moved into place after); returns its metrics."""
        cfg, session = ctx.cfg, ctx.session
        layers = quantized_layers(ctx.inputs["quantize"])
        qconfig = self.quantization_config(ctx)  # first: a format that cannot carry the layers stops here
        writer = ShardedSafetensorsWriter(tmp, parse_size(cfg.export.max_shard_size))
        packed = write_quantized_tensors(session.reader, session.model_dir, layers, writer,
                                         partial(session.adapter.split_source_tensor, model=session.skeleton),
                                         partial(self.pack_layer, qconfig=qconfig))
        shards = writer.close()
        fault_point("export.shards_written")

        config = json.loads((session.model_dir / "config.json").read_text())
        config["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=self.sort_keys) + "\n")
        if self.config_file():
            (tmp / self.config_file()).write_text(json.dumps(qconfig, indent=2, sort_keys=self.sort_keys) + "\n")
        copied = _copy_side_files(session.model_dir, tmp)
        if qconfig.get("packing_format") == PACKING_ASYM:
            ctx.log.warning("export: asymmetric weights that are not all 4-bit go out with packing_format %r, which "
                            "transformers + auto-round load but vLLM and SGLang reject; for them add "
                            "compressed_tensors to export.formats", PACKING_ASYM)
        return {"format": self.format, "quant_method": qconfig["quant_method"], "quantized_layers": len(packed),
                "shards": len(shards), "side_files": copied,
                **({"packing_format": qconfig["packing_format"]} if "packing_format" in qconfig else {})}

    def still_valid(self, cfg: DictConfig, stage_dir: Path, manifest: Dict[str, Any]) -> Optional[str]:
        try:
            record = json.loads((stage_dir / RECORD).read_text())
        except (OSError, ValueError):
            return "its record is missing"
        damaged = first_problem(Path(record["output_dir"]), record["files"])
        return f"exported file {damaged}" if damaged else None


def extra_config(layers: List[Dict[str, Any]], scheme: Any) -> Dict[str, Dict[str, Any]]:
    """Per-layer keys that differ from the scheme; {"bits": 16} for layers left in full precision. A layer's
    group size is the one it is written with (a shorter last group is written as smaller groups)."""
    extra: Dict[str, Dict[str, Any]] = {}
    for p in layers:
        if not p["quantize"]:
            extra[p["name"]] = {"bits": 16}
            continue
        written = {**p, "group_size": checkpoint_group_size(p["in_features"], p["group_size"])}
        diff = {k: written[k] for k in ("bits", "group_size", "sym") if written[k] != getattr(scheme, k)}
        if diff:
            extra[p["name"]] = diff
    return extra


def tuning_record(cfg: DictConfig) -> Dict[str, Any]:
    """The tuning settings AutoRound records in quantization_config (written where they differ from its defaults)."""
    q = cfg.quant
    iters = int(q.iters)
    lr = q.lr if q.lr is not None else (1.0 / iters if iters else None)
    return {"lr": lr, "minmax_lr": q.minmax_lr if q.minmax_lr is not None else lr,
            "batch_size": int(q.batch_size), "gradient_accumulate_steps": int(q.grad_accum),
            "enable_minmax_tuning": bool(q.minmax_tuning), "enable_quanted_input": bool(q.quantized_inputs),
            "nsamples": int(cfg.data.nsamples), "seqlen": int(cfg.data.seqlen)}


def _copy_side_files(src: Path, dst: Path) -> List[str]:
    """Tokenizer, processor, generation config, chat template: every plain file but weights and config."""
    copied = []
    skip = set()
    for pattern in WEIGHT_FILES:
        skip.update(p.name for p in src.glob(pattern))
    for file in sorted(src.iterdir()):
        if file.is_file() and file.name not in skip and file.name != "config.json" and not file.name.startswith("."):
            shutil.copy2(file, dst / file.name)
            copied.append(file.name)
    return copied
