"""Tiny random-weight diffusion transformers (Flux, SD3, SD3.5) saved as diffusers pipeline folders.

Every linear width of the transformers is a multiple of 128 (the default group size), so packing is exercised
for real. `make_tiny_pipeline(..., full=False)` writes only the denoiser and the scheduler (`model_index.json`
still names a VAE, as a real one does); `full=True` adds random tiny text encoders with tokenizers built here
(character-level CLIP BPE and T5 unigram vocabularies, no download) and a tiny VAE, so that diffusers'
`DiffusionPipeline.from_pretrained` loads the folder and generates.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Dict

import torch

DIFFUSION_KINDS = ("flux", "sd3", "sd35")
_CHARS = [c for c in string.printable if not c.isspace()]

_CONFIGS: Dict[str, Dict[str, Any]] = {
    "flux": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
                 num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=False,
                 axes_dims_rope=(16, 24, 24)),
    "sd3": dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64,
                num_attention_heads=2, joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=128,
                out_channels=16, pos_embed_max_size=16),
    "sd35": dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64,
                 num_attention_heads=2, joint_attention_dim=128, caption_projection_dim=128,
                 pooled_projection_dim=128, out_channels=16, pos_embed_max_size=16, dual_attention_layers=(0, 1),
                 qk_norm="rms_norm"),
}
_PIPELINES = {"flux": ("FluxPipeline", "FluxTransformer2DModel"),
              "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
              "sd35": ("StableDiffusion3Pipeline", "SD3Transformer2DModel")}


def make_tiny_transformer(kind: str, seed: int = 0) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(seed)
    cls = getattr(diffusers, _PIPELINES[kind][1])
    model = cls(**_CONFIGS[kind]).eval()
    with torch.no_grad():  # adaLN and output projections start at zero in some classes: give every weight a value
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def _clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> Any:
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip(hidden: int, projection: bool, seed: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(_clip_tokenizer()), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(d_model: int, seed: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(_t5_tokenizer()), d_model=d_model, d_kv=32, d_ff=2 * d_model, num_layers=2,
                      num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, seed: int) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = 4  # a scale of 2 ** 3 = 8, as the real ones
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                         block_out_channels=(8,) * blocks, layers_per_block=1, norm_num_groups=4,
                         scaling_factor=0.36, shift_factor=0.12, use_quant_conv=False,
                         use_post_quant_conv=False).eval()


def flux_text_parts(pooled_dim: int, joint_dim: int, seed: int = 0) -> Dict[str, Any]:
    """A Flux pipeline's text side: CLIP gives the pooled vector, T5 the sequence, each with its tokenizer; and
    a VAE."""
    return {"text_encoder": _clip(pooled_dim, False, seed + 1), "tokenizer": _clip_tokenizer(),
            "text_encoder_2": _t5(joint_dim, seed + 2), "tokenizer_2": _t5_tokenizer(), "vae": _vae(16, seed + 4)}


def save_components(folder: Path, parts: Dict[str, Any], index: Dict[str, Any]) -> None:
    """Save each part in its sub-folder and name it in the model_index entries `index`."""
    for name, part in parts.items():
        part.save_pretrained(folder / name)
        index[name] = ["diffusers" if name == "vae" else "transformers", type(part).__name__]


def make_tiny_pipeline(kind: str, folder: Path, seed: int = 0, full: bool = False) -> Path:
    """A pipeline folder with the tiny transformer (safetensors) and a flow-matching scheduler; with `full`, the
    text encoders, their tokenizers and a VAE too."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    transformer = make_tiny_transformer(kind, seed)
    transformer.save_pretrained(folder / "transformer")
    FlowMatchEulerDiscreteScheduler().save_pretrained(folder / "scheduler")
    pipeline, denoiser = _PIPELINES[kind]
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", denoiser], "vae": ["diffusers", "AutoencoderKL"]}
    if full:
        cfg = _CONFIGS[kind]
        if kind == "flux":
            parts = flux_text_parts(cfg["pooled_projection_dim"], cfg["joint_attention_dim"], seed)
        else:  # two CLIPs (hidden states side by side, pooled vectors joined) and T5
            half = cfg["pooled_projection_dim"] // 2
            parts = {"text_encoder": _clip(half, True, seed + 1), "tokenizer": _clip_tokenizer(),
                     "text_encoder_2": _clip(half, True, seed + 2), "tokenizer_2": _clip_tokenizer(),
                     "text_encoder_3": _t5(cfg["joint_attention_dim"], seed + 3), "tokenizer_3": _t5_tokenizer(),
                     "vae": _vae(16, seed + 4)}
        save_components(folder, parts, index)
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def tiny_inputs(kind: str, batch: int = 2, text_tokens: int = 8, seed: int = 1) -> Dict[str, torch.Tensor]:
    """A forward's inputs for the tiny transformer of `kind`: latents, text embeddings, pooled text, timesteps."""
    g = torch.Generator().manual_seed(seed)
    cfg = _CONFIGS[kind]
    text = torch.randn(batch, text_tokens, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=g)
    if kind == "flux":
        side = 4  # a 4 x 4 grid of packed latent patches
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] = torch.arange(side)[:, None]
        img_ids[..., 2] = torch.arange(side)[None, :]
        return {"hidden_states": torch.randn(batch, side * side, cfg["in_channels"], generator=g),
                "encoder_hidden_states": text, "pooled_projections": pooled,
                "timestep": torch.rand(batch, generator=g), "img_ids": img_ids.reshape(-1, 3),
                "txt_ids": torch.zeros(text_tokens, 3)}
    return {"hidden_states": torch.randn(batch, cfg["in_channels"], 8, 8, generator=g),
            "encoder_hidden_states": text, "pooled_projections": pooled,
            "timestep": torch.rand(batch, generator=g) * 1000}
