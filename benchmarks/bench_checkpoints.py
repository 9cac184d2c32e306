"""Random-weight checkpoints for the benchmarks: a model config at any size and depth, written shard by shard in
bf16 (the builder never holds the model), reused when already built.

`--arch` picks the config (llama, qwen2, gemma4, qwen3_moe); `SHAPES` holds real models' sizes. MoE checkpoints
store their experts one tensor per expert (`mlp.experts.<e>.gate_proj.weight`), as the published Qwen3-MoE
checkpoints do (and transformers' save_pretrained writes), not transformers 5's fused in-memory layout.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "qrunner" / "assets" / "corpus"
SHARD_BYTES = 1_000_000_000  # max shard size (~1 GB)
SMALL_VOCAB = 4096  # up to this size the tests' tiny_tokenizer(vocab_size=V) is reused
MiB = 1024 * 1024
# the MoE checkpoints' experts: how many, how many a token goes to (--intermediate is each expert's width)
MOE_EXPERTS, MOE_EXPERTS_PER_TOKEN = 32, 4

# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------

def _heads(hidden: int, heads: Optional[int], kv_heads: Optional[int]) -> Tuple[int, int]:
    """Attention heads (128 wide unless given) and KV heads (a quarter of them unless given)."""
    heads = heads or max(1, hidden // 128)
    kv = kv_heads or max(1, heads // 4)
    while heads % kv:
        kv -= 1
    return heads, kv


def llama_config(hidden: int, intermediate: int, vocab: int, depth: int, bos: int = 0, eos: int = 0,
                 heads: Optional[int] = None, kv_heads: Optional[int] = None):
    """The LlamaConfig of one benchmark checkpoint: 128-wide heads, grouped KV heads, untied embeddings."""
    import transformers

    heads, kv_heads = _heads(hidden, heads, kv_heads)
    return transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, vocab_size=vocab, num_hidden_layers=depth,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos,
        torch_dtype="bfloat16")


def qwen2_config(hidden: int, intermediate: int, vocab: int, depth: int, bos: int = 0, eos: int = 0,
                 heads: Optional[int] = None, kv_heads: Optional[int] = None):
    """A Qwen2Config (biased q/k/v projections, grouped KV heads, untied embeddings)."""
    import transformers

    heads, kv_heads = _heads(hidden, heads, kv_heads)
    return transformers.Qwen2Config(
        hidden_size=hidden, intermediate_size=intermediate, vocab_size=vocab, num_hidden_layers=depth,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos, torch_dtype="bfloat16")


def gemma4_config(hidden: int, intermediate: int, vocab: int, depth: int, bos: int = 0, eos: int = 0,
                  heads: Optional[int] = None, kv_heads: Optional[int] = None):
    """A Gemma4TextConfig with per-layer inputs (256 per layer) and KV sharing (the last quarter of the layers
    reuse keys/values), sliding and full attention alternating, untied embeddings."""
    import transformers

    heads, kv_heads = _heads(hidden, heads, kv_heads)
    return transformers.Gemma4TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=depth,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        global_head_dim=2 * hidden // heads, sliding_window=128, max_position_embeddings=2048,
        layer_types=["sliding_attention", "full_attention"] * (depth // 2) + ["full_attention"] * (depth % 2),
        hidden_size_per_layer_input=256, vocab_size_per_layer_input=vocab, num_kv_shared_layers=max(2, depth // 4),
        tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, dtype="bfloat16")


def qwen3_moe_config(hidden: int, intermediate: int, vocab: int, depth: int, bos: int = 0, eos: int = 0,
                     heads: Optional[int] = None, kv_heads: Optional[int] = None):
    """A Qwen3MoeConfig with every layer sparse: MOE_EXPERTS experts of width `intermediate`, MOE_EXPERTS_PER_TOKEN
    of them per token, a router per layer, q/k norms, untied embeddings."""
    import transformers

    heads, kv_heads = _heads(hidden, heads, kv_heads)
    return transformers.Qwen3MoeConfig(
        hidden_size=hidden, intermediate_size=4 * intermediate, moe_intermediate_size=intermediate,
        num_experts=MOE_EXPERTS, num_experts_per_tok=MOE_EXPERTS_PER_TOKEN, decoder_sparse_step=1,
        norm_topk_prob=True, vocab_size=vocab, num_hidden_layers=depth, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=hidden // heads, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos, dtype="bfloat16")


ARCHS = {"llama": llama_config, "qwen2": qwen2_config, "gemma4": gemma4_config, "qwen3_moe": qwen3_moe_config}

# real models' shapes (--shape): their configs' sizes, random weights; the depths default to the full model
SHAPES: Dict[str, Dict[str, Any]] = {
    "llama-3.1-8b": dict(arch="llama", hidden=4096, intermediate=14336, vocab=128256, heads=32, kv_heads=8,
                         depths=[8, 32]),
    "qwen2.5-14b": dict(arch="qwen2", hidden=5120, intermediate=13824, vocab=152064, heads=40, kv_heads=8,
                        depths=[48]),
}


def build_tokenizer(vocab: int):
    """A byte-level BPE tokenizer trained on the bundled held-out text.

    For a small `vocab` the tests' `tiny_tokenizer(vocab_size=vocab)` is reused. For a large one the same
    recipe is trained on the whole held-out file; it stops after a few thousand merges, so the tokenizer
    is smaller than `vocab` (the model's embedding still has `vocab` rows; token ids stay below it).
    """
    if vocab <= SMALL_VOCAB:
        sys.path.insert(0, str(REPO / "tests"))
        try:
            from tiny_models import tiny_tokenizer
        finally:
            sys.path.pop(0)
        return tiny_tokenizer(vocab_size=vocab)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([(CORPUS / "heldout.txt").read_text(encoding="utf-8")], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=4096)


def tensor_specs(config) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of every tensor the checkpoint holds, from a meta-device model (nothing allocated).

    `state_dict()` already leaves out non-persistent buffers (rotary `inv_freq`); any remaining
    `inv_freq` is skipped too.
    """
    import accelerate
    from transformers import AutoModelForCausalLM

    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    specs = []
    for name, t in model.state_dict().items():
        if name.endswith("inv_freq"):
            continue
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # stored one tensor per expert
            specs += per_expert_specs(name, tuple(t.shape))
        else:
            specs.append((name, tuple(t.shape)))
    return specs


def per_expert_specs(name: str, shape: Tuple[int, ...]) -> List[Tuple[str, Tuple[int, ...]]]:
    """A fused experts tensor ([E, 2I, H] gate and up, or [E, H, I] down) as the published checkpoints store it:
    `experts.<e>.gate_proj.weight` [I, H], `up_proj` [I, H], `down_proj` [H, I]."""
    module = name.rpartition(".")[0]
    experts, rows, cols = shape
    if name.endswith("gate_up_proj"):
        return [(f"{module}.{e}.{proj}.weight", (rows // 2, cols)) for e in range(experts)
                for proj in ("gate_proj", "up_proj")]
    return [(f"{module}.{e}.down_proj.weight", (rows, cols)) for e in range(experts)]


def plan_shards(specs: Sequence[Tuple[str, Tuple[int, ...]]], max_bytes: int = SHARD_BYTES) -> List[List[str]]:
    """Split the tensor names, in order, into shards of at most `max_bytes` bf16 bytes each."""
    shards: List[List[str]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def random_tensor(name: str, shape: Tuple[int, ...], generator):
    """One bf16 tensor: norm weights are ones, everything else randn * 0.02."""
    import torch

    if name.endswith(("norm.weight", "layer_scalar")):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02).to(torch.bfloat16)


def checkpoint_key(hidden: int, intermediate: int, vocab: int, depth: int, arch: str = "llama",
                   heads: Optional[int] = None, kv_heads: Optional[int] = None) -> str:
    shape = f"-a{heads}-kv{kv_heads}" if heads or kv_heads else ""
    return f"{arch}-h{hidden}-i{intermediate}-v{vocab}{shape}-d{depth}"


def build_checkpoint(models_dir: Path, hidden: int, intermediate: int, vocab: int, depth: int,
                     seed: int = 0, arch: str = "llama", heads: Optional[int] = None,
                     kv_heads: Optional[int] = None) -> Path:
    """Write (or reuse) a random-weight bf16 checkpoint of `arch` (llama, gemma4); returns its folder.

    Tensors are generated and written one shard at a time, so the builder's RAM stays around one shard.
    The folder is written under a temporary name and renamed when complete, so an interrupted build is
    never reused.
    """
    import torch
    from safetensors.torch import save_file

    final = models_dir / checkpoint_key(hidden, intermediate, vocab, depth, arch, heads, kv_heads)
    if (final / "model.safetensors.index.json").is_file() and (final / "config.json").is_file():
        return final
    tmp = models_dir / (final.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = build_tokenizer(vocab)
    eos = tokenizer.eos_token_id
    config = ARCHS[arch](hidden, intermediate, vocab, depth, bos=eos, eos=eos, heads=heads, kv_heads=kv_heads)
    specs = tensor_specs(config)
    shapes = dict(specs)
    shards = plan_shards(specs)
    generator = torch.Generator().manual_seed(seed)
    weight_map: Dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: random_tensor(n, shapes[n], generator) for n in names}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        del tensors
        weight_map.update({n: file for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def checkpoint_info(path: Path) -> Dict[str, Any]:
    """Size (bf16 bytes on disk, MiB) and parameter count of a built checkpoint."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"path": str(path), "size_mb": round(size / MiB, 1),
            "params_m": round(index["metadata"]["total_size"] / 2 / 1e6, 1),
            "shards": len(set(index["weight_map"].values()))}
