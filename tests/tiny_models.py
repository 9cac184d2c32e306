"""Tiny local models with random weights and a small trained tokenizer (no hub, no network)."""
from __future__ import annotations

from pathlib import Path

import torch

_TOKENIZER_TEXT = Path(__file__).resolve().parents[1] / "qrunner" / "assets" / "corpus" / "heldout.txt"


def tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = _TOKENIZER_TEXT.read_text(encoding="utf-8")[:60_000]
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=1024)


def make_tiny_llama(path: Path, layers: int = 3, hidden: int = 64, intermediate: int = 128, seed: int = 0,
                    dtype: torch.dtype = torch.bfloat16, model_type: str = "llama", tie: bool = False) -> Path:
    """A random-weight decoder saved with save_pretrained (safetensors) plus a tokenizer."""
    import transformers

    tokenizer = tiny_tokenizer()
    config_cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config,
                  "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[model_type]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, tie_word_embeddings=tie,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if model_type in ("qwen3",):
        config.head_dim = hidden // 4
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger-than-default weights so quantization error is visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
