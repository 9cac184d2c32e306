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


def family_for_model_type(model_type: Optional[str], specific_only: bool = False) -> Optional[str]:
    """The family for a model type: a family that names it (gemma4, vlm, ...) first, then `llm` for any other
    causal language model of the installed transformers (unless `specific_only`)."""
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family.name
    llm = _FAMILIES["llm"]
    return llm.name if not specific_only and llm.supports(model_type) else None
