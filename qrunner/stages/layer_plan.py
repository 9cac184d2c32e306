"""The layer plan the quantize and export stages follow: the load stage's (one scheme for all, with the
config's overrides), or under scheme=auto the plan the autoscheme stage chose."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from qrunner.models.adapter import LayerPlan
from qrunner.pipeline.stage import StageContext

AUTOSCHEME = "autoscheme"  # the stage that writes a per-layer plan
PLAN = "plan.json"


def write_plan(folder: Path, layers: List[LayerPlan], summary: Dict[str, Any]) -> None:
    (folder / PLAN).write_text(json.dumps({**summary, "layers": [p.__dict__ for p in layers]}, indent=1))


def read_plan(folder: Path) -> Dict[str, Any]:
    return json.loads((folder / PLAN).read_text())


def planned_layers(ctx: StageContext) -> List[LayerPlan]:
    """Every block linear's plan for this run (the stage must list AUTOSCHEME in its `uses`)."""
    if AUTOSCHEME in ctx.inputs:
        return [LayerPlan(**p) for p in read_plan(ctx.inputs[AUTOSCHEME])["layers"]]
    return list(ctx.session.layer_plan)
