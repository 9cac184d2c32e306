"""Checkpoint tensor names vs the model's own parameter names.

transformers 5 keeps some models' checkpoints in an older layout (a Qwen2.5-VL checkpoint stores
`model.layers.0...` for the module `model.language_model.layers.0...`; LLaVA and Gemma 3 store
`language_model.model.layers...`) and renames the keys while loading. qrunner streams tensors straight from
the shards, so it applies the same renaming rules (transformers' own conversion mapping of the model class)
to map each checkpoint key to the parameter it fills. Conversions that change tensors (fusing, splitting,
permuting) cannot be streamed one tensor at a time and are refused with a clear message.
"""
from __future__ import annotations

from typing import Dict, Iterable

from torch import nn

from qrunner.errors import UserError


def checkpoint_key_map(model: nn.Module, checkpoint_keys: Iterable[str]) -> Dict[str, str]:
    """{model tensor name: checkpoint key} for every checkpoint key whose name differs from the model's."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # pragma: no cover - older transformers: checkpoints use the model's names
        return {}
    transforms = get_model_conversion_mapping(model)
    if not transforms:
        return {}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = dict(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None)
    mapping: Dict[str, str] = {}
    for key in checkpoint_keys:
        renamed, converter = rename_source_key(key, renamings, converters, prefix, meta_state)
        if converter is not None:
            raise UserError(f"checkpoint tensor {key!r} must be converted ({converter}) before it fits "
                            f"{type(model).__name__}; qrunner streams tensors as stored and cannot do that. "
                            "Re-save the checkpoint with transformers' save_pretrained(save_original_format=False).")
        if renamed != key:
            mapping[renamed] = key
    return mapping
