"""Tiny random-weight causal LMs of many architectures, built from transformers' own config classes.

Widths are multiples of the tests' group size (32), so every block linear is quantized; each architecture keeps
what makes it differ from Llama (sliding-window layers, logit scaling and soft caps, fused projections, parallel
blocks, MoE experts and routers, multi-head latent attention).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from tiny_models import tiny_tokenizer

H, I = 64, 128  # hidden size, MLP width
ALTERNATING = ["sliding_attention", "full_attention"]

# model type -> config keys besides the common ones (vocab, widths, depth, heads, token ids)
DENSE: Dict[str, Dict[str, Any]] = {
    "phi3": dict(),  # fused qkv_proj and gate_up_proj linears
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16),
    "granite": dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1),
    "olmo2": dict(),  # q/k norms over the whole projection, norms after attention and MLP
    "cohere": dict(logit_scale=0.25),  # attention and MLP in parallel on one layer norm, scaled logits
}
MOE: Dict[str, Dict[str, Any]] = {
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=H,
                      decoder_sparse_step=1, norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=H, shared_expert_intermediate_size=H,
                      decoder_sparse_step=1),  # a shared expert with its own sigmoid gate next to the routed ones
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=H,
                        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=32,
                        qk_rope_head_dim=32, qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=16),
}
ARCHS = (*DENSE, *MOE)


def causal_lm_config(model_type: str, layers: int = 2, vocab: int = 320, **extra: Any) -> Any:
    """The transformers config of a tiny `model_type` model (4 heads, 2 key/value heads)."""
    from transformers import AutoConfig

    keys = {**DENSE.get(model_type, {}), **MOE.get(model_type, {}), **extra}
    if "sliding_window" in keys:
        keys.setdefault("layer_types", (ALTERNATING * layers)[:layers])
    common = dict(vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return AutoConfig.for_model(model_type, **{**common, **keys})


def make_tiny_causal_lm(path: Path, model_type: str, layers: int = 2, seed: int = 0,
                        dtype: torch.dtype = torch.bfloat16, **extra: Any) -> Path:
    """A random-weight `model_type` causal LM saved with save_pretrained, plus the tests' tokenizer."""
    import transformers

    tokenizer = tiny_tokenizer()
    config = causal_lm_config(model_type, layers, len(tokenizer), **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger-than-default weights so quantization error is visible
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                # decisive routers (large logit margins): float16 rounding does not flip expert choices
                p.normal_(0, 2.0 if _is_router(name) else 0.08)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _is_router(name: str) -> bool:
    return name.endswith(("mlp.gate.weight", "mlp.router.weight", "block_sparse_moe.gate.weight"))
