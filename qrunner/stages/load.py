"""load: read the model's config (and tokenizer, or pipeline index), build the meta skeleton, list the blocks.

The layer plan (which layers are quantized, at which scheme) is not part of load's output: it follows the scheme,
and load (with data and capture after it) is what the runs of a scheme sweep share."""
from __future__ import annotations

import json
from typing import Any, Dict

from qrunner.pipeline.stage import Stage, StageContext, register_stage


@register_stage
class LoadStage(Stage):
    name = "load"
    reads = ("model.path", "model.trust_remote_code", "family.name", "family.block_names")
    version = 2
    description = "config, tokenizer, meta skeleton, blocks"

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        session = ctx.session
        session.preflight()
        blocks = session.blocks(session.skeleton)
        info = {**session.model_info(), "block_lists": session.block_lists, "blocks": [name for name, _ in blocks]}
        (ctx.out / "model_info.json").write_text(json.dumps(info, indent=1))
        return {"blocks": len(blocks)}


def read_model_info(ctx: StageContext) -> Dict[str, Any]:
    return json.loads((ctx.inputs["load"] / "model_info.json").read_text())
