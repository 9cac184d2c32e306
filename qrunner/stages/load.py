"""load: read the model's config (and tokenizer, or pipeline index), build the meta skeleton, plan which layers to quantize."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any, Dict

from qrunner.pipeline.stage import Stage, StageContext, register_stage


@register_stage
class LoadStage(Stage):
    name = "load"
    reads = ("model.path", "model.trust_remote_code", "family.name", "family.block_names",
             "scheme.bits", "scheme.group_size", "scheme.sym", "quant.ignore_layers", "quant.layer_overrides")
    version = 1
    description = "config, tokenizer, meta skeleton, layer plan"

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        session = ctx.session
        session.preflight()
        plan = session.layer_plan
        blocks = session.blocks(session.skeleton)
        info = {
            **session.model_info(),
            "block_lists": session.block_lists,
            "blocks": [name for name, _ in blocks],
            "layers": [p.__dict__ for p in plan],
        }
        (ctx.out / "model_info.json").write_text(json.dumps(info, indent=1))
        skipped = Counter(p.reason for p in plan if not p.quantize)
        for reason, n in skipped.items():
            ctx.log.info("load: %d layer(s) stay in full precision: %s", n, reason)
        return {"blocks": len(blocks), "layers_quantized": sum(p.quantize for p in plan),
                "layers_skipped": sum(not p.quantize for p in plan)}


def read_model_info(ctx: StageContext) -> Dict[str, Any]:
    return json.loads((ctx.inputs["load"] / "model_info.json").read_text())
