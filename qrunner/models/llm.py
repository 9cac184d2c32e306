"""Decoder-only language models: any `AutoModelForCausalLM` architecture of the installed transformers (or a
checkpoint's own code with `model.trust_remote_code=true`) whose decoder blocks are one `nn.ModuleList`.

Nothing here lists models. The blocks are found on the meta skeleton (the usual paths first, then the one module
list as long as the config's `num_hidden_layers`); every block input is recorded by parameter name, so rotary
tables, per-layer masks (sliding windows) and position ids need no per-model code. What differs between
architectures is data: the final norm's name, how the model scales its logits, which linears stay in full
precision (MoE routers), and how fused MoE experts are laid out (`models/moe.py`).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

from torch import nn

from qrunner.errors import UserError
from qrunner.models.adapter import FamilyAdapter, _get

# module paths of the decoder block lists in transformers' causal LMs, tried before the search by length
BLOCK_LISTS = ("model.layers", "model.decoder.layers", "transformer.h", "transformer.layers", "transformer.blocks",
               "gpt_neox.layers", "backbone.layers", "model.language_model.layers")
# the final norms that follow the blocks, then the output projection
FINAL_NORMS = ("model.norm", "model.final_layernorm", "model.ln_f", "model.norm_f", "model.decoder.final_layer_norm",
               "transformer.ln_f", "transformer.norm_f", "gpt_neox.final_layer_norm", "backbone.norm_f",
               "model.language_model.norm")
# linears inside a block that pick experts (never quantized: engines keep them in full precision)
ROUTERS = ("mlp.gate", "mlp.router", "block_sparse_moe.gate", "mlp.shared_expert_gate", "router.proj",
           "mlp.router.layer", "feed_forward.router")


def causal_lm_types() -> Sequence[str]:
    """The model types the installed transformers builds with `AutoModelForCausalLM`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return tuple(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def remote_causal_lm(config: Any) -> bool:
    """The checkpoint ships its own causal-LM code (`auto_map` in config.json)."""
    return "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})


class LlmAdapter(FamilyAdapter):
    name = "llm"
    model_types = ()  # names none: it takes what `supports` says, after the families that name their types
    block_list_candidates = BLOCK_LISTS
    head_modules = (*FINAL_NORMS, "lm_head")
    kept_linears = ROUTERS

    def supports(self, model_type: Optional[str]) -> bool:
        return model_type in causal_lm_types()

    def check_config(self, config: Any, model_path: str) -> None:
        from qrunner.models.registry import family_for_model_type

        model_type = getattr(config, "model_type", None)
        other = family_for_model_type(model_type, specific_only=True)
        if other is not None and other != self.name:
            raise UserError(f"family={self.name} does not support model_type={model_type!r} (from "
                            f"{model_path}/config.json): it looks like a '{other}' model: use family={other}.")
        if self.supports(model_type) or remote_causal_lm(config):
            return
        import transformers

        raise UserError(f"family={self.name} does not support model_type={model_type!r} (from {model_path}/"
                        f"config.json): transformers {transformers.__version__} has no causal language model "
                        f"for it and config.json names no code of its own (auto_map). This architecture is not "
                        "supported yet: a newer transformers may know it.")

    def model_class(self, config: Any) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def block_lists(self, model: nn.Module, requested: Sequence[str]) -> List[str]:
        if requested or any(_get(model, n) is not None for n in self.block_list_candidates):
            return super().block_lists(model, requested)
        depth = getattr(self.text_config(model.config), "num_hidden_layers", None)
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        fitting = [n for n, m in lists if len(m) == depth]
        if len(fitting) == 1:
            return fitting
        found = ", ".join(f"{n} ({len(m)})" for n, m in lists) or "none"
        raise UserError(f"could not find the decoder blocks of {type(model).__name__}: no single module list has "
                        f"num_hidden_layers={depth} entries (module lists: {found}). Set "
                        "family.block_names=[path.to.layers].")
