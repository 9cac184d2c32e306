"""Vision-language models (`...ForConditionalGeneration` in transformers 5): Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
LLaVA-style and Gemma 3. Only the language model's decoder blocks are quantized; the vision tower, the
multimodal projector and lm_head are copied to the export as they are.

Calibration is text only: a text-only forward never calls the vision tower, so no stage reads it from the
shards. Inputs that differ between decoder layers (Gemma 3's sliding-window vs full-attention rotary tables
and masks) are recorded per block by the capture stage, like every block input.
"""
from __future__ import annotations

from typing import Any

from qrunner.models.adapter import FamilyAdapter


class VlmAdapter(FamilyAdapter):
    name = "vlm"
    stages = ("load", "data", "capture", "quantize", "export", "evaluate")
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "gemma3")
    block_list_candidates = ("model.language_model.layers",)
    head_modules = ("model.language_model.norm", "lm_head")
    unused_modules = ("model.visual", "model.vision_tower", "model.multi_modal_projector")

    def model_class(self, config: Any) -> Any:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
