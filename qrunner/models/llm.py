"""Decoder-only language models from transformers: Llama, Mistral, Qwen2, Qwen3."""
from __future__ import annotations

from typing import Any

from qrunner.models.adapter import FamilyAdapter


class LlmAdapter(FamilyAdapter):
    name = "llm"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    block_list_candidates = ("model.layers",)
    head_modules = ("model.norm", "lm_head")

    def model_class(self, config: Any) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM
