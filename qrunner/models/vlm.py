"""Vision-language models (`...ForConditionalGeneration` in transformers 5): Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
LLaVA-style and Gemma 3. Only the language model's decoder blocks are quantized; the vision tower, the
multimodal projector and lm_head are copied to the export as they are.

Calibration is text only by default: a text-only forward never calls the vision tower, so no stage reads it
from the shards. With `data.images`, image–text samples go through the model's processor and the capture
stage runs the vision tower once per image sample; what image samples change in the decoder's inputs (Qwen's
M-RoPE positions, Gemma 3's bidirectional image-token masks, Qwen3-VL's deepstack features added between the
first layers) is recorded per sample by the capture stage, like every block input.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from qrunner.errors import UserError
from qrunner.models.adapter import FamilyAdapter, image_prompt_messages

QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QWEN_IMAGE_TOKEN = "<|image_pad|>"
QWEN_IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


class VlmAdapter(FamilyAdapter):
    name = "vlm"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "gemma3")
    block_list_candidates = ("model.language_model.layers",)
    head_modules = ("model.language_model.norm", "lm_head")
    unused_modules = ("model.visual", "model.vision_tower", "model.multi_modal_projector")
    # The decoder layers get their positions as `position_embeddings`; `position_ids` only reaches the attention
    # kernel (flash-attention's packed-sequence check; sdpa and eager ignore it), and Qwen3-VL passes it for text
    # samples but None for image samples, which could not share a mini-batch.
    dropped_block_kwargs = (*FamilyAdapter.dropped_block_kwargs, "position_ids")

    def model_class(self, config: Any) -> Any:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def image_text_encoder(self, model_dir: Path, tokenizer: Any, config: Any, trust_remote_code: bool
                           ) -> Callable[[Any, str], Dict[str, torch.Tensor]]:
        """The model's processor; for Qwen models whose processor cannot be built here (transformers builds it
        with a video processor, which needs torchvision), the same inputs from the image processor and the
        tokenizer: the image placeholder expanded to one token per merged patch, and `mm_token_type_ids`."""
        try:
            return super().image_text_encoder(model_dir, tokenizer, config, trust_remote_code)
        except UserError:
            if getattr(config, "model_type", None) not in QWEN_TYPES:
                raise
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        image_token_id = tokenizer.convert_tokens_to_ids(QWEN_IMAGE_TOKEN)
        if image_token_id != config.image_token_id:
            raise UserError(f"data.images: the tokenizer of {model_dir} maps {QWEN_IMAGE_TOKEN} to {image_token_id}, "
                            f"the model config expects image_token_id={config.image_token_id}.")
        template = _processor_chat_template(model_dir) or getattr(tokenizer, "chat_template", None)
        merge = int(getattr(image_processor, "merge_size", 2))

        def encode(image: Any, prompt: str) -> Dict[str, torch.Tensor]:
            pixels = image_processor(images=[image], return_tensors="pt")
            if template:
                text = tokenizer.apply_chat_template(image_prompt_messages(prompt), chat_template=template,
                                                     tokenize=False)
            else:
                text = QWEN_IMAGE_PLACEHOLDER + prompt
            if QWEN_IMAGE_TOKEN not in text:
                raise UserError(f"data.images: the chat template of {model_dir} does not place {QWEN_IMAGE_TOKEN}.")
            tokens = int(pixels["image_grid_thw"][0].prod()) // merge ** 2
            text = text.replace(QWEN_IMAGE_TOKEN, QWEN_IMAGE_TOKEN * tokens, 1)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            return {"input_ids": ids, "mm_token_type_ids": (ids == image_token_id).long(),
                    **{k: v for k, v in pixels.items() if isinstance(v, torch.Tensor)}}

        return encode


def _processor_chat_template(model_dir: Path) -> Optional[str]:
    """The processor's chat template file of a checkpoint (`chat_template.jinja` or `chat_template.json`)."""
    jinja, js = model_dir / "chat_template.jinja", model_dir / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if js.is_file():
        return json.loads(js.read_text(encoding="utf-8")).get("chat_template")
    return None
