"""A Hugging Face decoder as llama.cpp's GGUF describes it: architecture and hyperparameter keys, tensor names, the
row order llama.cpp gives Llama's attention projections, and a byte-level BPE tokenizer as vocabulary metadata.

Supported: Llama and Mistral (GGUF architecture `llama`, q/k rows permuted as llama.cpp's converter does), Qwen2
(`qwen2`) and Qwen3 (`qwen3`), with a byte-level BPE tokenizer (`tokenizer.json`: Llama 3, Qwen, GPT-2 style).
Llama 3's rope scaling goes out as llama.cpp's `rope_freqs` tensor. Anything else is refused with what is missing
(`check_gguf_model`), never written half right.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from qrunner.errors import UserError

# HF model_type -> (GGUF architecture, whether llama.cpp permutes the q/k projection rows)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False)}
SKIPPED_TENSORS = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry; llama.cpp computes them


@dataclass
class GgufModel:
    architecture: str
    permute_qk: bool
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float


def rope_parameters(config: Any) -> Dict[str, Any]:
    """The config's rope settings in one dict (transformers 5's `rope_parameters`, older `rope_scaling`)."""
    params: Dict[str, Any] = {}
    for attribute in ("rope_parameters", "rope_scaling"):
        value = getattr(config, attribute, None)
        if isinstance(value, dict):
            params.update(value)
    return params


def _rope_theta(config: Any) -> float:
    """The rope base; rope scaling other than Llama 3's (`llama3`, written as `rope_freqs`) is refused."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default", "llama3") or (rope_type == "llama3" and
                                                        config.model_type not in ("llama", "mistral")):
        raise UserError(f"export.formats=gguf: rope scaling {rope_type!r} is not written to GGUF yet (only Llama 3's "
                        "'llama3'); export auto_round, gptq or compressed_tensors for this model")
    theta = getattr(config, "rope_theta", None) or params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def rope_freqs(config: Any, model: "GgufModel") -> Optional[torch.Tensor]:
    """llama.cpp's `rope_freqs` tensor for Llama 3's rope scaling (`rope_type: llama3`): per rotary frequency, the
    factor its wavelength is divided by (1 for short wavelengths, `factor` for long ones, a smooth blend between),
    as llama.cpp's converter computes it; None without that scaling."""
    params = rope_parameters(config)
    if params.get("rope_type", params.get("type")) != "llama3":
        return None
    dim = model.head_dim
    freqs = 1.0 / (model.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_context = float(params.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelen < old_context / high, torch.ones_like(freqs),
                          torch.where(wavelen > old_context / low, torch.full_like(freqs, factor), blended))
    return factors.to(torch.float32)


def check_gguf_model(config: Any, model_dir: Path) -> GgufModel:
    """The model's GGUF description, or a UserError naming what GGUF export does not cover."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"export.formats=gguf supports model types {', '.join(ARCHITECTURES)}; {model_dir} is "
                        f"{model_type!r}. Export auto_round, gptq or compressed_tensors instead.")
    architecture, permute = ARCHITECTURES[model_type]
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    model = GgufModel(architecture, permute, heads, int(getattr(config, "num_key_value_heads", None) or heads),
                      head_dim, _rope_theta(config))
    byte_level_vocab(model_dir)  # refuses a tokenizer it cannot describe
    return model


def add_hyperparameters(writer: Any, config: Any, model: GgufModel) -> None:
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(model.heads)
    writer.add_head_count_kv(model.kv_heads)
    writer.add_rope_freq_base(model.rope_theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    if model.architecture == "llama":
        writer.add_rope_dimension_count(model.head_dim)
    else:
        writer.add_key_length(model.head_dim)
        writer.add_value_length(model.head_dim)


def tensor_namer(architecture: str, blocks: int) -> Callable[[str], Optional[str]]:
    """Model tensor name (``model.layers.0.self_attn.q_proj.weight``) -> GGUF name (``blk.0.attn_q.weight``); None
    for a tensor llama.cpp does not load (rotary buffers)."""
    import gguf

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
    names = gguf.get_tensor_name_map(arch[architecture], blocks)

    def name(model_name: str) -> Optional[str]:
        if model_name.endswith(SKIPPED_TENSORS):
            return None
        found = names.get_name(model_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise UserError(f"export.formats=gguf: no GGUF name for tensor {model_name!r} in architecture "
                            f"{architecture}; export auto_round, gptq or compressed_tensors for this model")
        return found

    return name


def qk_rows(model_name: str, out_features: int, model: GgufModel) -> Optional[torch.Tensor]:
    """The output-row order llama.cpp stores a Llama q/k projection in (its converter's `permute`), or None."""
    if not model.permute_qk or not model_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                          "self_attn.q_proj.bias", "self_attn.k_proj.bias")):
        return None
    heads = model.heads if ".q_proj." in model_name else model.kv_heads
    index = torch.arange(out_features)
    return index.reshape(heads, 2, out_features // heads // 2).swapaxes(1, 2).reshape(out_features)


def _split_regex(pre: Dict[str, Any]) -> Optional[str]:
    pattern = pre.get("pattern") or {}
    return pattern.get("Regex") if isinstance(pattern, dict) else None


def _pre_tokenizer_name(tokenizer: Dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level pre-tokenizer: GPT-2's regex, or a known split regex."""
    pre = tokenizer.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    splits = [s for s in steps if s.get("type") == "Split"]
    if len(splits) == 1 and any(s.get("type") == "ByteLevel" for s in steps):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = _split_regex(splits[0])
        for name in ("llama-bpe", "qwen2", "tekken", "gpt-4o"):
            if GGUF_PRE_TOKENIZER_SPLITS.get(name) == regex:
                return name
    raise UserError("export.formats=gguf: this tokenizer's pre-tokenizer is not one GGUF names (GPT-2, Llama 3, "
                    "Qwen2, Tekken, GPT-4o byte-level splits); export auto_round, gptq or compressed_tensors")


@dataclass
class ByteLevelVocab:
    tokens: List[str]
    token_types: List[int]
    merges: List[str]
    pre: str
    special_ids: Dict[str, int]
    add_bos: bool


def byte_level_vocab(model_dir: Path, vocab_size: Optional[int] = None) -> ByteLevelVocab:
    """The tokenizer of `model_dir` (tokenizer.json, byte-level BPE) as GGUF's `gpt2` vocabulary."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"export.formats=gguf needs {path} (a byte-level BPE tokenizer); sentencepiece "
                        "tokenizer.model files are not converted yet")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model") or {}
    decoder = tokenizer.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel" or model.get("byte_fallback"):
        raise UserError(f"export.formats=gguf: {path} is not a byte-level BPE tokenizer (model {model.get('type')}, "
                        f"decoder {decoder.get('type')}); sentencepiece-style vocabularies are not converted yet")
    pre = _pre_tokenizer_name(tokenizer)
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tokenizer.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = int(t["id"])
    size = max(vocab_size or 0, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for token, index in vocab.items():
        tokens[index] = token
        t = added.get(token)
        types[index] = int(gguf.TokenType.NORMAL if t is None else gguf.TokenType.CONTROL if t.get("special")
                           else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    special = {}
    for role in ("bos", "eos", "unk", "pad"):
        token = tok_config.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and token in vocab:
            special[role] = vocab[token]
    return ByteLevelVocab(tokens, types, merges, pre, special, bool(tok_config.get("add_bos_token", False)))


def add_vocabulary(writer: Any, vocab: ByteLevelVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
               "pad": writer.add_pad_token_id}
    for role, index in vocab.special_ids.items():
        setters[role](index)
    writer.add_add_bos_token(vocab.add_bos)
