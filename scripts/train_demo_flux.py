#!/usr/bin/env python
"""Train the small demo Flux pipeline (``qrunner/assets/demo-flux``): handwritten digits from text prompts.

A real ``diffusers.FluxPipeline`` folder, every component built here without any download:

* data: scikit-learn's bundled ``load_digits()`` (1797 8x8 grayscale digits, classes 0-9), upscaled bilinearly to
  32x32, the gray channel repeated to RGB, scaled to [-1, 1]; prompts such as "a handwritten digit seven";
* tokenizers: a character-level CLIP BPE vocabulary and a T5 unigram vocabulary, written here;
* text encoders: tiny ``CLIPTextModel`` (pooled vector) and ``T5EncoderModel`` (sequence), random-initialised
  (seeded) and frozen: the transformer learns to read their outputs;
* VAE: a tiny ``AutoencoderKL`` (scale factor 2: 32x32 images <-> 4 x 16 x 16 latents) trained as an autoencoder
  (reconstruction + small KL); its ``scaling_factor`` / ``shift_factor`` are set from the latents' statistics,
  as Flux's VAE has them, so that the pipeline's own normalisation applies;
* transformer: a tiny ``FluxTransformer2DModel`` (inner dim 128, 2 double-stream + 4 single-stream blocks, every
  linear width in the blocks a multiple of 128) trained by rectified flow as Flux is: x_s = (1 - s) x0 + s noise,
  target noise - x0, timestep input s in [0, 1] (the pipeline passes timestep / 1000);
* scheduler: ``FlowMatchEulerDiscreteScheduler`` with FLUX.1's configuration (dynamic shifting).

The script ends by loading the saved folder afresh with ``FluxPipeline.from_pretrained``, generating digits at
``num_inference_steps=8`` and classifying them (downsampled to 8x8) with a logistic regression fitted on the real
digits; the figures go into the folder's README.md together with a grid of samples (samples.png).

Usage::

    python scripts/train_demo_flux.py --out qrunner/assets/demo-flux      # full run (~9 min, 1 CPU thread)
    python scripts/train_demo_flux.py --out /tmp/f --vae-steps 5 --steps 5  # smoke test

Deterministic (fixed seeds, one CPU thread) up to floating-point differences between torch versions / CPUs.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import shutil
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_flux_card import disk_dtypes, folder_bytes, parameter_count, save_grid, write_readme  # noqa: E402
from demo_flux_spec import (EVAL_TEMPLATE, GROUP, IMAGE_SIZE, LATENT_CHANNELS, MAX_SEQUENCE_LENGTH,  # noqa: E402
                            SCHEDULER, STEPS_AT_INFERENCE, TEMPLATES, TEXT_DIM, TRANSFORMER, VAE_CHANNELS, WORDS)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "qrunner" / "assets" / "demo-flux"

_CHARS = [c for c in string.printable if not c.isspace()]


def prompt_for(template: str, label: int) -> str:
    return template.format(word=WORDS[label], digit=label)


def trained_prompts() -> str:
    """Every prompt the transformer was trained on, one a line: the folder's prompts.txt (qrunner's
    `recipe=flux_demo` calibrates and evaluates on it)."""
    return "".join(prompt_for(t, label) + "\n" for t in TEMPLATES for label in range(len(WORDS)))


# ----------------------------------------------------------------------------
# data and the judge
# ----------------------------------------------------------------------------
def load_images() -> Tuple[torch.Tensor, torch.Tensor]:
    """The sklearn digits as [N, 3, 32, 32] in [-1, 1] (bilinear upscaling, gray repeated) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return (x * 2 - 1).repeat(1, 3, 1, 1), torch.tensor(digits.target, dtype=torch.long)


def features(images01: torch.Tensor) -> np.ndarray:
    """[N, C, 32, 32] images in [0, 1] -> the 64 features of sklearn's digits (8x8 area average of gray, 0..16)."""
    gray = images01.float().mean(dim=1, keepdim=True)
    return (F.adaptive_avg_pool2d(gray, 8) * 16.0).reshape(len(gray), -1).numpy()


def make_judge(images: torch.Tensor, labels: torch.Tensor, seed: int) -> Tuple[Any, float]:
    """A logistic regression on the real digits (as they come back from 32x32); also its held-out accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def classifier() -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))

    x, y = features((images + 1) / 2), labels.numpy()
    xa, xb, ya, yb = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    heldout = classifier().fit(xa, ya).score(xb, yb)
    return classifier().fit(x, y), float(heldout)


# ----------------------------------------------------------------------------
# tokenizers and text encoders (random, frozen), as tests/tiny_diffusion.py builds them
# ----------------------------------------------------------------------------
def clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> Any:
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def clip_encoder(vocab_size: int, seed: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=TEXT_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config).eval().requires_grad_(False)


def t5_encoder(vocab_size: int, seed: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=32, d_ff=2 * TEXT_DIM, num_layers=2,
                      num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval().requires_grad_(False)


# ----------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------
def make_vae(seed: int) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(VAE_CHANNELS)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=VAE_CHANNELS, layers_per_block=1, norm_num_groups=8,
                         sample_size=IMAGE_SIZE, scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False,
                         use_post_quant_conv=False)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae: Any, images: torch.Tensor, args: argparse.Namespace, log: List[str]) -> Dict[str, float]:
    g = torch.Generator().manual_seed(args.seed + 10)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    vae.train()
    rec_sum = kl_sum = 0.0
    history = []
    t0 = time.time()
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 20)
        x = images[torch.randint(len(images), (args.vae_batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = rec + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        rec_sum += rec.item()
        kl_sum += kl.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.vae_steps:
            n = (step % args.log_every) + 1
            history.append((step + 1, rec_sum / n, kl_sum / n))
            line = f"vae step {step + 1:5d}  mse {rec_sum / n:.5f}  kl {kl_sum / n:.4f}  {time.time() - t0:6.1f}s"
            print(line, flush=True)
            log.append(line)
            rec_sum = kl_sum = 0.0
    vae.eval().requires_grad_(False)
    return {"seconds": time.time() - t0, "mse": history[-1][1], "kl": history[-1][2], "history": history}


@torch.no_grad()
def encode_all(vae: Any, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in images.split(256):
        posterior = vae.encode(chunk).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------
# transformer
# ----------------------------------------------------------------------------
def make_transformer(seed: int) -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TRANSFORMER)
    check_group_widths(model)
    with torch.no_grad():  # adaLN-Zero as in DiT: every block starts as the identity, the output at zero
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and (name.endswith(("norm1.linear", "norm1_context.linear",
                                                                       ".norm.linear"))
                                                        or name in ("norm_out.linear", "proj_out")):
                module.weight.zero_()
                module.bias.zero_()
    return model


def check_group_widths(model: torch.nn.Module) -> int:
    """Every nn.Linear in the double- and single-stream blocks has in/out features divisible by GROUP."""
    n = 0
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        for name, module in blocks.named_modules():
            if isinstance(module, torch.nn.Linear):
                assert module.in_features % GROUP == 0 and module.out_features % GROUP == 0, (
                    f"{name}: {module.in_features} -> {module.out_features} is not a multiple of {GROUP}")
                n += 1
    assert n > 0
    return n


def train_transformer(model: Any, latents: Tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor,
                      text: torch.Tensor, pooled: torch.Tensor, args: argparse.Namespace,
                      log: List[str]) -> Dict[str, Any]:
    """Rectified flow on the VAE's (normalised) latents: predict noise - x0 at x_s = (1 - s) x0 + s noise."""
    from diffusers import FluxPipeline

    mean, std = latents
    g = torch.Generator().manual_seed(args.seed + 20)
    n_templates = len(TEMPLATES)
    b, c, h, w = args.batch, LATENT_CHANNELS, mean.shape[2], mean.shape[3]
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(text.shape[1], 3)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    loss_sum = 0.0
    history = []
    t0 = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        idx = torch.randint(len(mean), (b,), generator=g)
        z = mean[idx] + std[idx] * torch.randn((b, c, h, w), generator=g)
        x0 = FluxPipeline._pack_latents(z, b, c, h, w)
        noise = torch.randn(x0.shape, generator=g)
        # timesteps: logit-normal (as SD3 / Flux train), a quarter uniform so that both ends are seen too
        s = torch.sigmoid(torch.randn(b, generator=g))
        uniform = torch.rand(b, generator=g)
        s = torch.where(torch.rand(b, generator=g) < 0.25, uniform, s)
        xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
        prompt = labels[idx] * n_templates + torch.randint(n_templates, (b,), generator=g)
        pred = model(hidden_states=xs, timestep=s, guidance=None, pooled_projections=pooled[prompt],
                     encoder_hidden_states=text[prompt], txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        loss_sum += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = (step % args.log_every) + 1
            history.append((step + 1, loss_sum / n))
            line = f"flux step {step + 1:5d}  loss {loss_sum / n:.4f}  {time.time() - t0:6.1f}s"
            print(line, flush=True)
            log.append(line)
            loss_sum = 0.0
    return {"seconds": time.time() - t0, "loss": history[-1][1], "history": history, "ema": ema}


# ----------------------------------------------------------------------------
# evaluation from the saved folder
# ----------------------------------------------------------------------------
@torch.no_grad()
def evaluate(pipe: Any, judge: Any, per_class: int, seed: int, template: str = EVAL_TEMPLATE,
             max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> Dict[str, Any]:
    images, predicted = [], []
    t0 = time.time()
    for label in range(10):
        out = pipe(prompt_for(template, label), height=IMAGE_SIZE, width=IMAGE_SIZE,
                   num_inference_steps=STEPS_AT_INFERENCE, max_sequence_length=max_sequence_length,
                   num_images_per_prompt=per_class, generator=torch.Generator().manual_seed(seed + label),
                   output_type="pt").images  # [n, 3, 32, 32] in [0, 1]
        images.append(out)
        predicted.append(judge.predict(features(out)))
    seconds = time.time() - t0
    predicted = np.stack(predicted)  # [10, per_class]
    truth = np.arange(10)[:, None]
    per_class_acc = (predicted == truth).mean(axis=1)
    confusion = np.zeros((10, 10), dtype=int)
    for label in range(10):
        for p in predicted[label]:
            confusion[label, p] += 1
    return {"accuracy": float((predicted == truth).mean()), "per_class": per_class_acc.tolist(),
            "confusion": confusion.tolist(), "images": torch.stack(images), "seconds": seconds,
            "n": int(predicted.size)}


def make_readable(folder: Path) -> None:
    """mkdtemp's 0700 and the 0600 of some writers -> 0755 folders, 0644 files."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------
def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the pipeline folder to write (replaced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=200)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--vae-kl", type=float, default=1e-2, help="weight of the per-element KL term")
    ap.add_argument("--steps", type=int, default=900, help="transformer steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--eval-per-class", type=int, default=20)
    ap.add_argument("--eval-other-lengths", type=int, nargs="*", default=[256],
                    help="max_sequence_length values also evaluated (for the README; 256 is FluxPipeline's default)")
    ap.add_argument("--grid-columns", type=int, default=5)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import diffusers
    import sklearn
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    start = time.time()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd())] + sys.argv[1:])
    log: List[str] = []
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        images, labels = load_images()
        judge, judge_heldout = make_judge(images, labels, args.seed)

        # --- text side: tokenizers and frozen random encoders
        tok, tok2 = clip_tokenizer(), t5_tokenizer()
        text_encoder, text_encoder_2 = clip_encoder(len(tok), args.seed + 1), t5_encoder(len(tok2), args.seed + 2)

        # --- VAE
        vae = make_vae(args.seed + 4)
        vae_stats = train_vae(vae, images, args, log)
        mean, std = encode_all(vae, images)
        with torch.no_grad():
            recon = vae.decode(mean).sample
        recon_mse = float(F.mse_loss(recon, images))
        recon_acc = float((judge.predict(features((recon.clamp(-1, 1) + 1) / 2)) == labels.numpy()).mean())
        g = torch.Generator().manual_seed(args.seed + 5)
        sample = mean + std * torch.randn(mean.shape, generator=g)
        shift_factor, scaling_factor = float(sample.mean()), float(1.0 / sample.std())
        vae.register_to_config(scaling_factor=round(scaling_factor, 4), shift_factor=round(shift_factor, 4))
        shift_factor, scaling_factor = vae.config.shift_factor, vae.config.scaling_factor
        mean, std = (mean - shift_factor) * scaling_factor, std * scaling_factor
        print(f"vae: reconstruction mse {recon_mse:.5f}, judge on reconstructions {recon_acc:.3f}, "
              f"shift {shift_factor} scale {scaling_factor}", flush=True)

        # --- prompts through the pipeline's own encode_prompt, once
        transformer = make_transformer(args.seed + 3)
        scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                            text_encoder_2=text_encoder_2, tokenizer_2=tok2, transformer=transformer)
        prompts = [prompt_for(t, label) for label in range(10) for t in TEMPLATES]
        n_tokens = max(len(tok2(p).input_ids) for p in prompts)
        assert n_tokens <= MAX_SEQUENCE_LENGTH, (n_tokens, MAX_SEQUENCE_LENGTH)
        with torch.no_grad():
            text, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                                 max_sequence_length=MAX_SEQUENCE_LENGTH)

        # --- transformer
        flux_stats = train_transformer(transformer, (mean, std), labels, text.float(), pooled.float(), args, log)
        ema = flux_stats.pop("ema")
        transformer.load_state_dict(ema.state_dict())
        transformer.eval().requires_grad_(False)
        train_seconds = vae_stats["seconds"] + flux_stats["seconds"]

        # --- save (transformer in bfloat16, the rest in float32), then judge a fresh load
        transformer.to(torch.bfloat16)
        pipe.save_pretrained(str(tmp))
        (tmp / "prompts.txt").write_text(trained_prompts(), encoding="utf-8")
        del pipe, transformer, ema
        fresh = FluxPipeline.from_pretrained(str(tmp), dtype=torch.float32)
        fresh.set_progress_bar_config(disable=True)
        result = evaluate(fresh, judge, args.eval_per_class, args.seed + 1000)
        print(f"generated digits: judge accuracy {result['accuracy']:.3f} on {result['n']} images "
              f"({result['seconds']:.1f}s)", flush=True)
        save_grid(result["images"], tmp / "samples.png", min(args.grid_columns, args.eval_per_class))
        others = {}  # for the README: the other trained phrasing, and a max_sequence_length it was not trained for
        for template in TEMPLATES[1:]:
            others[f'"{template.format(word="<word>", digit="<digit>")}"'] = evaluate(
                fresh, judge, args.eval_per_class, args.seed + 1000, template=template)["accuracy"]
        for length in args.eval_other_lengths:
            others[f"`max_sequence_length={length}` (not trained for)"] = evaluate(
                fresh, judge, args.eval_per_class, args.seed + 1000, max_sequence_length=length)["accuracy"]
        print(f"other settings: {others}", flush=True)
        del fresh

        loaded = FluxPipeline.from_pretrained(str(tmp))  # parameter counts and the width check, from disk
        counts = {name: parameter_count(getattr(loaded, name))
                  for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
        n_linear = check_group_widths(loaded.transformer)
        dtypes = {name: disk_dtypes(tmp / name) for name in counts}
        del loaded
        summary = {
            "command": command, "seed": args.seed, "threads": args.threads,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "scikit-learn": sklearn.__version__,
                         "python": platform.python_version()},
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "vae": {k: v for k, v in vae_stats.items() if k != "history"} | {
                "recon_mse": recon_mse, "judge_on_recon": recon_acc, "scaling_factor": scaling_factor,
                "shift_factor": shift_factor},
            "flux": {k: v for k, v in flux_stats.items() if k != "history"},
            "flux_history": flux_stats["history"], "vae_history": vae_stats["history"],
            "train_seconds": train_seconds, "judge_heldout": judge_heldout,
            "eval": {k: v for k, v in result.items() if k != "images"}, "counts": counts, "dtypes": dtypes,
            "n_block_linears": n_linear, "others": others, "n_prompts": len(prompts), "max_prompt_tokens": n_tokens,
        }
        write_readme(tmp, summary)
        make_readable(tmp)
        summary["size_bytes"] = folder_bytes(tmp)
        summary["total_seconds"] = time.time() - start

        # --- into place: the old folder aside, the new one renamed in, the old one removed
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(json.dumps({k: summary[k] for k in ("train_seconds", "total_seconds", "size_bytes", "counts")}))
    print(f"wrote {out} ({summary['size_bytes'] / 1e6:.2f} MB) in {summary['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
