"""The layer plan the quantize and export stages follow: the session's (one scheme for all, with the config's
overrides), or under scheme=auto the plan the autoscheme stage chose."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from qrunner.models.adapter import LayerPlan
from qrunner.pipeline.stage import StageContext

AUTOSCHEME = "autoscheme"  # the stage that writes a per-layer plan
PLAN = "plan.json"
# the settings the session's layer plan follows: a stage that reads the plan reads these keys, so the stages
# upstream of it (load, data, capture) stay the same across the schemes of a sweep and are computed once
PLAN_KEYS = ("scheme.bits", "scheme.group_size", "scheme.sym", "quant.ignore_layers", "quant.layer_overrides")


def write_plan(folder: Path, layers: List[LayerPlan], summary: Dict[str, Any]) -> None:
    (folder / PLAN).write_text(json.dumps({**summary, "layers": [p.__dict__ for p in layers]}, indent=1))


def read_plan(folder: Path) -> Dict[str, Any]:
    return json.loads((folder / PLAN).read_text())


def plan_layers(plan: Dict[str, Any]) -> List[LayerPlan]:
    """The layers of a plan read with `read_plan`."""
    return [LayerPlan(**p) for p in plan["layers"]]


def planned_layers(ctx: StageContext) -> List[LayerPlan]:
    """Every block linear's plan for this run (the stage must list AUTOSCHEME in its `uses`)."""
    if AUTOSCHEME in ctx.inputs:
        return plan_layers(read_plan(ctx.inputs[AUTOSCHEME]))
    return list(ctx.session.layer_plan)


def scheme_is_auto(cfg: Any) -> bool:
    """Whether the AutoScheme stages are in the pipeline (scheme=auto)."""
    return cfg.scheme.name == "auto"
