"""Gemma 4 (`Gemma4ForConditionalGeneration`, `Gemma4ForCausalLM`): the text decoder's blocks are quantized.

What a Gemma 4 block is given, and how qrunner gives it the same in isolation:
- sliding-window and full-attention layers get their own rotary table and mask: recorded per block by the
  capture stage (each distinct table or mask is stored once, so a model has two of each, not one per block);
- per-layer inputs (`hidden_size_per_layer_input` > 0): block i's slice `[S, P]` of the per-layer input
  embeddings differs per sample and is a row file per block (`per_layer_input.<i>`), read per mini-batch;
- KV sharing (`num_kv_shared_layers` > 0): the last non-shared layer of each attention type ("store") hands its
  keys and values to the later "reuse" layers of that type. qrunner runs the store block with an empty
  `KVSharingDict`, keeps what it wrote as per-sample side rows (`kv.<type>.k` / `.v`, one set per chain:
  the quantized chain's from the quantized store block) and fills the dict of each reuse block from them.

MoE blocks (`enable_moe_block`): the experts are stored fused, `experts.gate_up_proj` `[E, 2I, H]` and
`experts.down_proj` `[E, H, I]` (the standard layout of models/moe.py): each expert is tuned and quantized on its
own, and the export writes them as `experts.<e>.gate_proj` / `up_proj` / `down_proj`, the layout AutoRound's
loader builds for Gemma 4 experts.

Left in full precision: the router (`router.proj`), norms, `layer_scalar`, the per-layer embedding tables and
projection, the vision/audio towers and their embedders, `lm_head`.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import torch
from torch import nn

from qrunner.models.adapter import HIDDEN, FamilyAdapter

KV_KEY, KV_VALUE = "kv.k", "kv.v"


class Gemma4Adapter(FamilyAdapter):
    name = "gemma4"
    model_types = ("gemma4", "gemma4_text")
    block_list_candidates = ("model.language_model.layers", "model.layers")
    head_modules = ("model.language_model.norm", "model.norm", "lm_head")
    # modules a text-only forward never calls: never read from the shards
    unused_modules = ("model.vision_tower", "model.audio_tower", "model.embed_vision", "model.embed_audio")
    per_sample_inputs = ("per_layer_input",)
    dropped_block_kwargs = FamilyAdapter.dropped_block_kwargs + ("shared_kv_states",)
    kept_linears = ("router.proj",)

    def model_class(self, config: Any) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM  # gemma4 -> Gemma4ForConditionalGeneration, gemma4_text -> Gemma4ForCausalLM

    def side_io(self, config: Any, index: int) -> Tuple[Dict[str, str], Dict[str, str]]:
        text = self.text_config(config)
        if not getattr(text, "num_kv_shared_layers", 0):
            return {}, {}
        modes, types = text.kv_sharing_modes, text.layer_types
        kind = types[index]
        names = {KV_KEY: f"kv.{kind}.k", KV_VALUE: f"kv.{kind}.v"}
        if modes[index] == "reuse":
            return names, {}
        reused = any(m == "reuse" and t == kind for m, t in zip(modes, types))
        if modes[index] == "store" and reused:
            return {}, names
        return {}, {}

    def run_block(self, block: nn.Module, inputs: Dict[str, torch.Tensor], shared: Dict[str, Any],
                  writes: Sequence[str] = ()) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        from transformers.cache_utils import KVSharingDict

        kind = block.self_attn.layer_type
        shared_kv = KVSharingDict()
        if KV_KEY in inputs:
            shared_kv[kind] = (inputs[KV_KEY], inputs[KV_VALUE])
        kwargs = {k: v for k, v in inputs.items() if k not in (HIDDEN, KV_KEY, KV_VALUE)}
        out = block(inputs[HIDDEN], shared_kv_states=shared_kv, **shared, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        side = {}
        if writes:
            key, value = shared_kv[kind]
            side = {KV_KEY: key, KV_VALUE: value}
        return out, side
