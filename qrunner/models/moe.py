"""Mixture-of-experts blocks whose experts transformers stores fused: one 3-D tensor per projection for all experts.

qrunner tunes and quantizes each expert's projections on their own, so while a block is in use its fused experts
module is replaced by `UnfusedExperts`: one `nn.Linear` per expert and projection (`<e>.gate_proj`, `<e>.up_proj`,
`<e>.down_proj`), whose weights are views of the fused tensors (no copy), computing what the fused module's eager
loop computes. The export writes the experts under those per-expert names, the layout AutoRound's loader builds
for them (it unfuses the same modules before loading a quantized checkpoint).

Two layouts exist in transformers 5 (model knowledge, as data):
- standard (Qwen2/3-MoE, Mixtral, DeepSeek-V2/V3, OLMoE, GLM-4 MoE, Gemma 4, ...): `gate_up_proj` [E, 2I, H] with
  the gate's rows first, `down_proj` [E, H, I], no biases, `act_fn(gate) * up`;
- GPT-OSS: `gate_up_proj` [E, H, 2I] (x @ W) with gate and up interleaved along the last axis, biases
  `gate_up_proj_bias` [E, 2I] and `down_proj_bias` [E, H], `down_proj` [E, I, H], a clamped SwiGLU. Its
  "gate_proj" and "up_proj" are the first and second half of the 2I axis as stored (each holding interleaved
  gate and up columns): AutoRound's loader (0.16) unfuses GPT-OSS experts that way and computes the activation on
  the two halves concatenated, so that is the layout which reloads correctly. (AutoRound's own exporter writes the
  de-interleaved gate and up under those names instead, which its loader then computes wrongly.)

An experts module with 3-D `gate_up_proj` / `down_proj` tensors and neither layout stops the run with its class
named, rather than being computed wrongly.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from qrunner.errors import UserError

GATE_UP, DOWN = "gate_up_proj", "down_proj"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
FUSED_TENSORS = (GATE_UP, DOWN, GATE_UP + "_bias", DOWN + "_bias")
# the per-expert linears each fused tensor holds, in the order of its rows (gate before up)
PART_NAMES = {GATE_UP: ("gate_proj", "up_proj"), DOWN: ("down_proj",)}


@dataclass(frozen=True)
class ExpertLayout:
    """How one architecture stores its fused experts."""

    name: str
    transposed: bool = False  # weights stored [E, in, out] (x @ W) instead of [E, out, in]
    bias: bool = False  # `<tensor>_bias` [E, out] next to each fused weight
    interleaved_glu: bool = False  # the activation takes gate and up alternating along the 2I axis

    def gate_up(self, gate_up: torch.Tensor, e: int) -> Dict[str, torch.Tensor]:
        """Expert `e`'s gate and up projections as [out, in] weights (or [out] biases): views, no copy."""
        gu = gate_up[e].t() if self.transposed and gate_up.dim() == 3 else gate_up[e]
        half = gu.shape[0] // 2
        return {"gate_proj": gu[:half], "up_proj": gu[half:]}

    def down(self, down: torch.Tensor, e: int) -> torch.Tensor:
        """Expert `e`'s down projection as an [out, in] weight (or [out] bias): a view."""
        return down[e].t() if self.transposed and down.dim() == 3 else down[e]


STANDARD = ExpertLayout("standard")
GPT_OSS = ExpertLayout("gpt_oss", transposed=True, bias=True, interleaved_glu=True)
LAYOUTS_BY_CLASS = {"GptOssExperts": GPT_OSS}
# the standard layout is recognized from the experts' own forward: these lines are what computes it
_STANDARD_SOURCE = ("nn.functional.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)",
                    "self.act_fn(gate) * up")


def is_fused_experts(module: nn.Module) -> bool:
    return (isinstance(getattr(module, GATE_UP, None), torch.Tensor) and getattr(module, GATE_UP).dim() == 3
            and isinstance(getattr(module, DOWN, None), torch.Tensor) and getattr(module, DOWN).dim() == 3)


def expert_layout(module: nn.Module) -> ExpertLayout:
    """The layout of a fused experts module; a UserError for one qrunner does not know."""
    layout = _layout_of_class(type(module))
    if layout is not None:
        return layout
    cls = type(module)
    raise UserError(f"{cls.__module__}.{cls.__name__} stores its experts fused ({GATE_UP} "
                    f"{list(getattr(module, GATE_UP).shape)}, {DOWN} {list(getattr(module, DOWN).shape)}) in a way "
                    "qrunner does not know, so it cannot quantize them one expert at a time. Describe its layout in "
                    "qrunner/models/moe.py (LAYOUTS_BY_CLASS), or keep the experts in full precision with "
                    "quant.ignore_layers.")


@lru_cache(maxsize=None)
def _layout_of_class(cls: type) -> Optional[ExpertLayout]:
    if cls.__name__ in LAYOUTS_BY_CLASS:
        return LAYOUTS_BY_CLASS[cls.__name__]
    try:
        source = inspect.getsource(inspect.unwrap(cls.forward))
    except (OSError, TypeError):
        return None
    return STANDARD if all(line in source for line in _STANDARD_SOURCE) else None


def _gpt_oss_glu(fused: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """GPT-OSS's clamped SwiGLU on the outputs of its two halves (gate and up interleaved across them)."""
    limit, alpha = fused.limit, fused.alpha

    def glu(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        both = torch.cat([first, second], dim=-1)
        gate, up = both[..., 0::2], both[..., 1::2]
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return glu


class UnfusedExperts(nn.ModuleList):
    """A fused experts module as one `nn.Linear` per expert and projection, weights (and biases) viewing the fused
    tensors; computes what the fused module's eager loop computes. `tokens[e]` counts the token rows routed to
    expert `e` by the forwards run since the last `reset_counts()`."""

    def __init__(self, fused: nn.Module, layout: ExpertLayout) -> None:
        gate_up, down = getattr(fused, GATE_UP), getattr(fused, DOWN)
        experts = []
        for e in range(gate_up.shape[0]):
            expert = nn.Module()
            weights = {**layout.gate_up(gate_up, e), "down_proj": layout.down(down, e)}
            biases = {**layout.gate_up(getattr(fused, GATE_UP + "_bias"), e),
                      "down_proj": layout.down(getattr(fused, DOWN + "_bias"), e)} if layout.bias else {}
            for name in PROJECTIONS:
                weight = weights[name]
                layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
                layer.weight = nn.Parameter(weight, requires_grad=False)
                if name in biases:
                    layer.bias = nn.Parameter(biases[name], requires_grad=False)
                setattr(expert, name, layer)
            experts.append(expert)
        super().__init__(experts)
        self.glu = _gpt_oss_glu(fused) if layout.interleaved_glu else (lambda gate, up: fused.act_fn(gate) * up)
        self.register_buffer("tokens", torch.zeros(len(experts), dtype=torch.long), persistent=False)

    def reset_counts(self) -> None:
        self.tokens.zero_()

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
            self.tokens[e] += len(token_idx)
            expert = self[e]
            state = hidden_states[token_idx]
            out = expert.down_proj(self.glu(expert.gate_proj(state), expert.up_proj(state)))
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def fused_experts_modules(block: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The fused experts modules inside a block, by name."""
    return [(n, m) for n, m in block.named_modules() if not isinstance(m, UnfusedExperts) and is_fused_experts(m)]


def unfuse(block: nn.Module) -> List[Tuple[nn.Module, str, nn.Module]]:
    """Replace every fused experts module of `block` by its `UnfusedExperts`; returns (parent, attribute, fused)
    for `refuse` to put them back."""
    swapped = []
    for name, fused in fused_experts_modules(block):
        parent_name, _, attr = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, attr, UnfusedExperts(fused, expert_layout(fused)))
        swapped.append((parent, attr, fused))
    return swapped


def refuse(swapped: List[Tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, attr, fused in reversed(swapped):
        setattr(parent, attr, fused)


def expert_token_counts(block: nn.Module) -> Dict[str, List[int]]:
    """{experts module name: tokens routed to each expert} for the unfused experts of a block in view."""
    return {n: m.tokens.tolist() for n, m in block.named_modules() if isinstance(m, UnfusedExperts)}


def reset_expert_counts(block: nn.Module) -> None:
    for m in block.modules():
        if isinstance(m, UnfusedExperts):
            m.reset_counts()


def split_fused_tensor(name: str, tensor: torch.Tensor, layout: ExpertLayout) -> Optional[Dict[str, torch.Tensor]]:
    """A fused experts tensor of the checkpoint (`<experts>.gate_up_proj`, `.down_proj` or their `_bias`) as
    per-expert tensors named as `UnfusedExperts` names them (views); None for any other tensor."""
    module, _, leaf = name.rpartition(".")
    is_bias = leaf.endswith("_bias")
    base = leaf[: -len("_bias")] if is_bias else leaf
    if base not in (GATE_UP, DOWN) or tensor.dim() != (2 if is_bias else 3):
        return None
    suffix = "bias" if is_bias else "weight"
    out = {}
    for e in range(tensor.shape[0]):
        parts = layout.gate_up(tensor, e) if base == GATE_UP else {PART_NAMES[DOWN][0]: layout.down(tensor, e)}
        for proj, part in parts.items():
            out[f"{module}.{e}.{proj}.{suffix}"] = part
    return out
