"""The demo Flux pipeline's model card: README.md with its architecture, data, training and evaluation figures,
and samples.png (a grid of generated digits). Called by ``train_demo_flux.py`` once the folder is written."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from demo_flux_spec import (EVAL_TEMPLATE, GROUP, IMAGE_SIZE, LATENT_CHANNELS, MAX_SEQUENCE_LENGTH,
                            STEPS_AT_INFERENCE, TEMPLATES, TEXT_DIM, TRANSFORMER, VAE_CHANNELS)


def save_grid(images: torch.Tensor, path: Path, columns: int) -> None:
    """images [10, n, 3, H, W] in [0, 1] -> a 16-level gray PNG, one row per class, `columns` samples each."""
    from PIL import Image

    rows, _, _, h, w = images.shape
    grid = np.ones((rows * (h + 1) - 1, columns * (w + 1) - 1), dtype=np.uint8) * 255
    for r in range(rows):
        for c in range(columns):
            tile = (images[r, c].mean(dim=0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = tile
    image = Image.fromarray((grid.astype(np.int32) * 15 + 127) // 255).convert("L")  # 16 gray levels, 4-bit PNG
    image = Image.fromarray(np.asarray(image), mode="P")
    image.putpalette([17 * i for i in range(16) for _ in range(3)])
    image.save(path, optimize=True, bits=4)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def disk_dtypes(folder: Path) -> str:
    """The dtypes of the tensors stored in a component folder's safetensors files."""
    from safetensors import safe_open

    found = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            found.update(str(f.get_slice(k).get_dtype()) for k in f.keys())
    names = {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}
    return "/".join(sorted(names.get(d, d) for d in found))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())



def write_readme(folder: Path, s: Dict[str, Any]) -> None:
    size = folder_bytes(folder) + 6000  # the README itself, roughly
    c, ev, v, fl = s["counts"], s["eval"], s["vae"], s["flux"]
    per_class = " | ".join(f"{a * 100:.0f}" for a in ev["per_class"])
    every = max(1, len(s["flux_history"]) // 10)
    flux_curve = ", ".join(f"{step}: {loss:.3f}" for i, (step, loss) in enumerate(s["flux_history"])
                           if i % every == every - 1 or i == len(s["flux_history"]) - 1)
    others = "".join(f"| generated digits, prompt class = predicted class, {name} | {acc * 100:.1f} % |\n"
                     for name, acc in s["others"].items())
    a = s["args"]
    ver = s["versions"]
    text = f"""# demo-flux

A tiny `diffusers.FluxPipeline` whose transformer and VAE are *trained*: it draws 32x32 handwritten digits
from prompts such as "a handwritten digit seven". It ships with qrunner so that the diffusion path (Flux
transformer, text encoders, VAE, flow-matching scheduler) runs offline on any machine on a model where
quantization error shows up as a real change in the images, unlike random weights.

```python
import torch
from diffusers import FluxPipeline

pipe = FluxPipeline.from_pretrained("qrunner/assets/demo-flux", dtype=torch.float32)
image = pipe("a handwritten digit seven", height={IMAGE_SIZE}, width={IMAGE_SIZE}, num_inference_steps={STEPS_AT_INFERENCE},
             max_sequence_length={MAX_SEQUENCE_LENGTH}, generator=torch.Generator().manual_seed(0)).images[0]
```

Call it with `max_sequence_length={MAX_SEQUENCE_LENGTH}` (the T5 prompt is padded to that length and the padding
tokens are attended, so another length changes the conditioning the transformer was trained on),
`height=width={IMAGE_SIZE}` and `num_inference_steps={STEPS_AT_INFERENCE}` (what was evaluated). There are no guidance embeddings
(`guidance_embeds=False`), so `guidance_scale` has no effect. The transformer is stored in bfloat16, the other
parts in float32; `from_pretrained` without a dtype loads every part in float32 (as does `dtype=torch.float32`).

![samples](samples.png)

`samples.png`: one row per digit 0-9, prompt "{EVAL_TEMPLATE.format(word='<word>')}", 8 steps, the first images of
the evaluation below (same seeds), 16 gray levels.

## Architecture

| component | class | parameters | details |
|---|---|---|---|
| transformer | `FluxTransformer2DModel` | {c['transformer']:,} | inner dim 128 (2 heads x 64), {TRANSFORMER['num_layers']} double-stream + {TRANSFORMER['num_single_layers']} single-stream blocks, `in_channels` {TRANSFORMER['in_channels']}, `joint_attention_dim` {TEXT_DIM}, `pooled_projection_dim` {TEXT_DIM}, `axes_dims_rope` {tuple(TRANSFORMER['axes_dims_rope'])}, `guidance_embeds` false; {s['dtypes']['transformer']} on disk |
| vae | `AutoencoderKL` | {c['vae']:,} | `block_out_channels` {VAE_CHANNELS} (scale factor 2), `latent_channels` {LATENT_CHANNELS}, 1 layer per block, `scaling_factor` {v['scaling_factor']}, `shift_factor` {v['shift_factor']}, no quant convs; {s['dtypes']['vae']} |
| text_encoder | `CLIPTextModel` | {c['text_encoder']:,} | hidden 128, 2 layers, 2 heads, 77 positions; random (seeded), frozen; {s['dtypes']['text_encoder']} |
| text_encoder_2 | `T5EncoderModel` | {c['text_encoder_2']:,} | d_model 128, 2 layers, 2 heads x 32, d_ff 256; random (seeded), frozen; {s['dtypes']['text_encoder_2']} |
| tokenizer | `CLIPTokenizer` | | character-level BPE vocabulary (no merges), written by the script |
| tokenizer_2 | `T5TokenizerFast` | | unigram vocabulary of single characters and word-initial letters, written by the script (`model_index.json` names it `T5Tokenizer`, transformers 5's name for the same class) |
| scheduler | `FlowMatchEulerDiscreteScheduler` | | FLUX.1's configuration (dynamic shifting, base/max shift 0.5/1.15) |

| | |
|---|---|
| image | {IMAGE_SIZE} x {IMAGE_SIZE} RGB (gray repeated), pixel range [-1, 1] |
| latents | {LATENT_CHANNELS} x {IMAGE_SIZE // 2} x {IMAGE_SIZE // 2}, packed 2 x 2 into {(IMAGE_SIZE // 4) ** 2} tokens of {TRANSFORMER['in_channels']} features |
| text | {MAX_SEQUENCE_LENGTH} T5 tokens (`max_sequence_length`) + the pooled CLIP vector |
| folder size | {size / 1e6:.2f} MB |

Every `nn.Linear` inside `transformer_blocks` and `single_transformer_blocks` ({s['n_block_linears']} of them) has
in and out features that are multiples of {GROUP}, the quantizer's default group size (the script asserts it).
The layers outside the blocks (`x_embedder` {TRANSFORMER['in_channels']} -> 128, `proj_out` 128 -> {TRANSFORMER['in_channels']}, the embedders) are not.

The text encoders are random-initialised (seeded) and frozen: they only have to give each prompt a distinct,
deterministic embedding, and the transformer learns to read them.

## Data

scikit-learn's bundled `sklearn.datasets.load_digits()` (1797 8x8 grayscale digits, 0-16; a copy of the test
part of the UCI "Optical Recognition of Handwritten Digits" data set, Alpaydin & Kaynak 1998; scikit-learn is
BSD-3-Clause licensed, the UCI data set CC BY 4.0). Each digit is upscaled bilinearly to 32x32, its gray repeated
to 3 channels, scaled to [-1, 1]. Prompts, {len(TEMPLATES)} phrasings per class ({s['n_prompts']} prompts, at most
{s['max_prompt_tokens']} T5 tokens): {", ".join('"' + t.format(word='seven', digit=7) + '"' for t in TEMPLATES)}. All of them are in
`prompts.txt`, one a line (what `qrunner recipe=flux_demo` calibrates and evaluates on).

## Training

```
{s['command']}
```

torch {ver['torch']}, diffusers {ver['diffusers']}, transformers {ver['transformers']}, scikit-learn {ver['scikit-learn']};
fp32 on CPU, `torch.set_num_threads({s['threads']})`, seed {s['seed']}; {s['train_seconds']:.0f} s of training in all.

- VAE: {a['vae_steps']} AdamW steps, batch {a['vae_batch']}, lr {a['vae_lr']} (warmup then cosine to 10 %), loss = MSE
  + {a['vae_kl']} x KL (per element), {v['seconds']:.0f} s. Final training MSE {v['mse']:.4f}, KL {v['kl']:.3f};
  reconstruction MSE over all digits {v['recon_mse']:.4f} (pixels in [-1, 1]). `shift_factor` / `scaling_factor`
  are the mean and 1 / std of sampled latents, so the transformer works on latents of mean 0, std 1.
- Transformer: rectified flow as Flux: x_s = (1 - s) x0 + s noise, target noise - x0, the transformer's
  timestep input s (the pipeline passes `timestep / 1000`); s logit-normal (sigmoid of a standard normal), a
  quarter of them uniform. Latents sampled from the VAE posterior and packed by `FluxPipeline._pack_latents`,
  `_prepare_latent_image_ids` positions, zero text ids, prompt embeddings from the pipeline's `encode_prompt`
  (computed once). {a['steps']} AdamW steps, batch {a['batch']}, lr {a['lr']} ({a['warmup']} warmup steps then cosine to
  10 %), weight decay 0.01, grad clip 1.0, {fl['seconds']:.0f} s; the saved weights are an EMA (decay {a['ema']}).
  Loss (mean of each {a['log_every']} steps): {flux_curve}.

## Evaluation

The saved folder loaded afresh with `FluxPipeline.from_pretrained`, {ev['n'] // 10} images per class with the prompt
"{EVAL_TEMPLATE.format(word='<word>')}", `num_inference_steps={STEPS_AT_INFERENCE}`, {IMAGE_SIZE}x{IMAGE_SIZE},
`max_sequence_length={MAX_SEQUENCE_LENGTH}`, generator `torch.Generator().manual_seed({s['seed'] + 1000} + digit)`. Each image is
reduced to gray and area-averaged to 8x8 (0-16), then classified by scikit-learn's `StandardScaler` + `LogisticRegression` fitted
on the real digits (upscaled to 32x32 and reduced back the same way).

| | accuracy |
|---|---|
| generated digits, prompt class = predicted class | **{ev['accuracy'] * 100:.1f} %** ({ev['n']} images; chance 10 %) |
{others}| VAE reconstructions of all 1797 digits | {v['judge_on_recon'] * 100:.1f} % |
| the classifier on held-out real digits (75/25 split) | {s['judge_heldout'] * 100:.1f} % |

Per class (0-9, %): {per_class}.
"""
    (folder / "README.md").write_text(text)
