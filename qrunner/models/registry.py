"""Family adapters by name."""
from __future__ import annotations

from typing import Dict, List, Optional

from qrunner.models.adapter import FamilyAdapter
from qrunner.models.diffusion_adapter import DiffusionAdapter
from qrunner.models.gemma4 import Gemma4Adapter
from qrunner.models.llm import LlmAdapter
from qrunner.models.vlm import VlmAdapter

_FAMILIES: Dict[str, FamilyAdapter] = {a.name: a for a in (LlmAdapter(), VlmAdapter(), Gemma4Adapter(), DiffusionAdapter())}

def family_names() -> List[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> FamilyAdapter:
    return _FAMILIES[name]


def family_for_model_type(model_type: Optional[str]) -> Optional[str]:
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family.name
    return None
