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
`experts.down_proj` `[E, H, I]`. While a block is in use qrunner sees them as one `nn.Linear` per expert and
projection (`experts.<e>.gate_proj` / `up_proj` / `down_proj`, views of the fused tensors, no copy), so each
expert is tuned and quantized on its own; the export writes them under those names, the layout AutoRound's
loader builds for Gemma 4 experts.

Left in full precision: the router (`router.proj`), norms, `layer_scalar`, the per-layer embedding tables and
projection, the vision/audio towers and their embedders, `lm_head`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from qrunner.models.adapter import HIDDEN, FamilyAdapter

KV_KEY, KV_VALUE = "kv.k", "kv.v"
FUSED_GATE_UP, FUSED_DOWN = "experts.gate_up_proj", "experts.down_proj"


class UnfusedExperts(nn.ModuleList):
    """Gemma 4's fused experts as one `nn.Linear` per expert and projection (`<e>.gate_proj`, `<e>.up_proj`,
    `<e>.down_proj`) whose weights are views of the fused tensors; computes what the eager loop of
    `Gemma4TextExperts` computes."""

    def __init__(self, fused: nn.Module) -> None:
        num_experts, two_i, hidden = fused.gate_up_proj.shape
        inter = two_i // 2
        experts = []
        for e in range(num_experts):
            expert = nn.Module()
            for name, weight in (("gate_proj", fused.gate_up_proj[e, :inter]), ("up_proj", fused.gate_up_proj[e, inter:]),
                                 ("down_proj", fused.down_proj[e])):
                layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
                layer.weight = nn.Parameter(weight, requires_grad=False)
                setattr(expert, name, layer)
            experts.append(expert)
        super().__init__(experts)
        self.act_fn = fused.act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=len(self) + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == len(self):
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            expert = self[e]
            state = hidden_states[token_idx]
            out = expert.down_proj(self.act_fn(expert.gate_proj(state)) * expert.up_proj(state))
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


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

    # ---- MoE experts as per-expert linears ---------------------------------------------------
    def linears(self, block: nn.Module) -> List[Tuple[str, nn.Linear]]:
        with self.block_view(block) as view:
            return super().linears(view)

    @contextmanager
    def block_view(self, block: nn.Module) -> Iterator[nn.Module]:
        fused = getattr(block, "experts", None)
        if fused is None or isinstance(fused, UnfusedExperts) or not hasattr(fused, "gate_up_proj"):
            yield block
            return
        block.experts = UnfusedExperts(fused)
        try:
            yield block
        finally:
            block.experts = fused

    def split_source_tensor(self, key: str, read: Callable[[], torch.Tensor], quantized: Any
                            ) -> Optional[Dict[str, torch.Tensor]]:
        """A fused expert tensor of the checkpoint as per-expert weights, when those experts are quantized."""
        if not key.endswith((FUSED_GATE_UP, FUSED_DOWN)):
            return None
        prefix = key[: -len(FUSED_GATE_UP if key.endswith(FUSED_GATE_UP) else FUSED_DOWN)] + "experts"
        if not any(name.startswith(prefix + ".") for name in quantized):
            return None
        tensor = read()
        if key.endswith(FUSED_DOWN):
            return {f"{prefix}.{e}.down_proj.weight": tensor[e] for e in range(tensor.shape[0])}
        inter = tensor.shape[1] // 2
        out = {}
        for e in range(tensor.shape[0]):
            out[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :inter]
            out[f"{prefix}.{e}.up_proj.weight"] = tensor[e, inter:]
        return out

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
