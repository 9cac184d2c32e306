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
                    dtype: torch.dtype = torch.bfloat16, model_type: str = "llama", tie: bool = False,
                    kv_heads: int = 2, **config_extra) -> Path:
    """A random-weight decoder saved with save_pretrained (safetensors) plus a tokenizer (4 attention heads,
    `kv_heads` key/value heads; `config_extra`: more config keys)."""
    import transformers

    tokenizer = tiny_tokenizer()
    config_cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config,
                  "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[model_type]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                        max_position_embeddings=512, tie_word_embeddings=tie,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config_extra)
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


GEMMA4_KINDS = ("dense", "ple_kv", "moe")


def gemma4_text_config(kind: str = "dense", layers: int = 4, hidden: int = 64, vocab: int = 512, **extra):
    """A tiny Gemma4TextConfig of one of the three kinds of Gemma 4 text stack.

    dense: sliding-window and full-attention layers (own head sizes, rotary tables, masks);
    ple_kv: per-layer inputs (hidden_size_per_layer_input > 0) and KV sharing (the last 2 layers reuse the
            keys/values of the last non-shared layer of their type);
    moe: a router and fused 3-D experts next to the dense MLP (and keys used as values on full layers).
    """
    import transformers

    if kind not in GEMMA4_KINDS:
        raise ValueError(f"kind must be one of {GEMMA4_KINDS}")
    if kind == "ple_kv" and layers < 4:
        raise ValueError("ple_kv needs at least 4 layers (2 of each type before the 2 shared ones)")
    types = ["sliding_attention", "full_attention"] * (layers // 2) + ["full_attention"] * (layers % 2)
    config = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, global_head_dim=hidden // 2,
                  sliding_window=16, max_position_embeddings=1024, layer_types=types,
                  hidden_size_per_layer_input=0, vocab_size_per_layer_input=vocab, final_logit_softcapping=30.0,
                  pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if kind == "ple_kv":
        config.update(hidden_size_per_layer_input=32, num_kv_shared_layers=2)
    if kind == "moe":
        config.update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=hidden,
                      attention_k_eq_v=True, num_global_key_value_heads=1)
    config.update(extra)
    return transformers.Gemma4TextConfig(**config)


def make_tiny_gemma4(path: Path, kind: str = "dense", layers: int = 4, hidden: int = 64, multimodal: bool = False,
                     seed: int = 0, dtype: torch.dtype = torch.bfloat16, **extra) -> Path:
    """A random-weight Gemma 4 saved with save_pretrained: Gemma4ForCausalLM, or with `multimodal`
    Gemma4ForConditionalGeneration with a one-layer vision tower."""
    import transformers

    tokenizer = tiny_tokenizer()
    text = gemma4_text_config(kind, layers, hidden, **extra)
    text.bos_token_id = text.eos_token_id = text.pad_token_id = tokenizer.eos_token_id
    if multimodal:
        vision = transformers.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                                 patch_size=4, pooling_kernel_size=2, position_embedding_size=64)
        v = text.vocab_size
        config = transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=None,
                                           image_token_id=v - 7, video_token_id=v - 6, audio_token_id=v - 5,
                                           boi_token_id=v - 4, eoi_token_id=v - 3, boa_token_id=v - 2,
                                           eoa_token_index=v - 1)
        model_cls = transformers.Gemma4ForConditionalGeneration
    else:
        config, model_cls = text, transformers.Gemma4ForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # larger-than-default weights so quantization error is visible
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                # a decisive router (large logit margins): float16 rounding does not flip expert choices
                p.normal_(0, 2.0 if "router.proj" in name else 0.08)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# image placeholder tokens of the tiny VLMs' tokenizer (Qwen's and LLaVA's)
_VLM_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<image>")
VLM_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "gemma3")


def make_tiny_vlm(path: Path, kind: str = "qwen2_5_vl", layers: int = 2, hidden: int = 64, seed: int = 0,
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random-weight vision-language model (`...ForConditionalGeneration`) with a one-layer vision tower,
    saved with save_pretrained (transformers writes the checkpoints' own, legacy tensor names), plus a
    tokenizer with a chat template and the image processor's config."""
    import transformers

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(_VLM_SPECIALS)})
    token = {t: tokenizer.convert_tokens_to_ids(t) for t in _VLM_SPECIALS}
    placeholder = "<image>" if kind == "llava" else "<|vision_start|><|image_pad|><|vision_end|>"
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + placeholder + "{% else %}{{ c['text'] }}"
        "{% endif %}{% endfor %}{% endif %}\n{% endfor %}")
    v = 512
    text = dict(vocab_size=v, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.eos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    ids = dict(image_token_id=token["<|image_pad|>"], video_token_id=token["<|video_pad|>"],
               vision_start_token_id=token["<|vision_start|>"], vision_end_token_id=token["<|vision_end|>"])
    qwen_pixels = dict(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
    if kind == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        config = transformers.Qwen2VLConfig(
            text_config=text, vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                                                 patch_size=14, spatial_merge_size=2), **ids)
        processor = transformers.Qwen2VLImageProcessorPil(**qwen_pixels)
    elif kind == "qwen3_vl":
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        config = transformers.Qwen3VLConfig(
            text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                                 out_hidden_size=hidden, deepstack_visual_indexes=[0],
                                                 num_position_embeddings=16, patch_size=14), **ids)
        processor = transformers.Qwen2VLImageProcessorPil(**qwen_pixels)
    elif kind == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        config = transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                                 out_hidden_size=hidden, fullatt_block_indexes=[0], window_size=112),
            **ids)
        processor = transformers.Qwen2VLImageProcessorPil(**qwen_pixels)
    elif kind == "llava":
        vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=28, patch_size=14)
        config = transformers.LlavaConfig(text_config=transformers.LlamaConfig(**text), vision_config=vision,
                                          image_token_index=token["<image>"], image_seq_length=4)
        processor = transformers.LlavaProcessor(
            image_processor=transformers.CLIPImageProcessorPil(size={"shortest_edge": 28},
                                                               crop_size={"height": 28, "width": 28}),
            tokenizer=tokenizer, chat_template=tokenizer.chat_template, patch_size=14,
            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    elif kind == "gemma3":
        vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14)
        gemma_text = transformers.Gemma3TextConfig(**text, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                                                   layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                                                   + ["full_attention"] * (layers % 2))
        config = transformers.Gemma3Config(text_config=gemma_text, vision_config=vision, mm_tokens_per_image=4,
                                           image_token_index=v - 1, boi_token_index=v - 2, eoi_token_index=v - 3)
        processor = transformers.Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    else:
        raise ValueError(f"kind must be one of {VLM_KINDS}")
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():  # larger-than-default weights so quantization error is visible
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.08)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def write_images(folder: Path, sizes=((56, 84), (112, 56), (84, 84)), prompts=("What is in this picture?", None,
                 "Describe the colours.")) -> Path:
    """Random-noise PNG images of the given (width, height) sizes; an image with a prompt gets a same-named .txt
    (the folder layout `data.images` reads)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(len(sizes))
    for i, ((w, h), prompt) in enumerate(zip(sizes, prompts)):
        pixels = (torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"image{i}.png")
        if prompt:
            (folder / f"image{i}.txt").write_text(prompt)
    return folder
