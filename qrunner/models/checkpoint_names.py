"""Checkpoint tensor names vs the model's own parameter names.

transformers 5 keeps some models' checkpoints in an older layout (a Qwen2.5-VL checkpoint stores
`model.layers.0...` for the module `model.language_model.layers.0...`; LLaVA and Gemma 3 store
`language_model.model.layers...`; Mixtral stores `block_sparse_moe` for `mlp`) and renames the keys while
loading. qrunner streams tensors straight from the shards, so it applies the same renaming rules (transformers'
own conversion mapping of the model class) to map each checkpoint key to the parameter it fills.

MoE checkpoints store one tensor per expert (`mlp.experts.3.gate_proj.weight`, Mixtral's `experts.3.w1.weight`)
where transformers 5's model has one fused tensor (`mlp.experts.gate_up_proj` [E, 2I, H]); its converters stack
the experts (MergeModulelist) and concatenate gate and up (Concatenate). qrunner reads such a fused tensor from
its pieces (`CheckpointReader.assemble`) and names each piece as the per-expert linear it becomes in the block's
view (`mlp.experts.3.gate_proj.weight`, models/moe.py). Any other conversion that changes tensors cannot be
streamed one tensor at a time and is refused with a clear message.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Tuple

from torch import nn

from qrunner.errors import UserError
from qrunner.models.moe import DOWN, GATE_UP, PART_NAMES

# the converter operations qrunner applies itself: (operation class name, its dim)
STREAMABLE_OPERATIONS = (("MergeModulelist", 0), ("Concatenate", 1))
Assemblies = Dict[str, List[List[str]]]


def checkpoint_key_map(model: nn.Module, checkpoint_keys: Iterable[str]
                       ) -> Tuple[Dict[str, str], Assemblies, Dict[str, str]]:
    """({model tensor name: checkpoint key} for every key whose name differs from the model's, {fused model
    tensor: its checkpoint keys [part][expert]}, {checkpoint key of a piece: its per-expert model name})."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # pragma: no cover - older transformers: checkpoints use the model's names
        return {}, {}, {}
    transforms = get_model_conversion_mapping(model)
    if not transforms:
        return {}, {}, {}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = dict(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None)
    mapping: Dict[str, str] = {}
    pieces: Dict[str, Dict[Tuple[int, int], str]] = {}
    part_names: Dict[str, str] = {}
    for key in checkpoint_keys:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if pattern is not None:
            converter = next(c for c in converters if pattern in c.source_patterns)
            part, expert = _piece(key, renamed, pattern, converter, model)
            pieces.setdefault(renamed, {})[(part, expert)] = key
            module, _, leaf = renamed.rpartition(".")
            part_names[key] = f"{module}.{expert}.{PART_NAMES[leaf][part]}.weight"
        elif renamed != key:
            mapping[renamed] = key
    assembled = {}
    for name, found in pieces.items():
        parts, experts = 1 + max(p for p, _ in found), 1 + max(e for _, e in found)
        missing = [(p, e) for p in range(parts) for e in range(experts) if (p, e) not in found]
        if missing:
            raise UserError(f"the checkpoint lacks {len(missing)} piece(s) of {name} (e.g. part {missing[0][0]} of "
                            f"expert {missing[0][1]}); it is incomplete: re-download it")
        assembled[name] = [[found[(p, e)] for e in range(experts)] for p in range(parts)]
    return mapping, assembled, part_names


def _piece(key: str, target: str, pattern: str, converter: object, model: nn.Module) -> Tuple[int, int]:
    """(part, expert) of checkpoint key `key`, one piece of the fused `target`; refuses conversions qrunner
    cannot stream."""
    operations = tuple((type(op).__name__, getattr(op, "dim", None)) for op in converter.operations)
    leaf = target.rpartition(".")[2]
    expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    if (leaf not in (GATE_UP, DOWN) or expert is None or operations != STREAMABLE_OPERATIONS[:len(operations)]
            or len(converter.source_patterns) != len(PART_NAMES[leaf])):
        raise UserError(f"checkpoint tensor {key!r} must be converted ({', '.join(converter.source_patterns)} -> "
                        f"{', '.join(converter.target_patterns)}: {', '.join(n for n, _ in operations)}) before it "
                        f"fits {type(model).__name__}; qrunner streams tensors as stored and cannot do that. Re-save "
                        "the checkpoint with transformers' save_pretrained(save_original_format=False).")
    return converter.source_patterns.index(pattern), int(expert.group(1))
