#!/usr/bin/env python
"""Build qrunner's built-in text corpora and train the small demo Llama model.

Everything here is deterministic (fixed seeds, sorted file lists, hash-based
splits) and uses only text that every Python installation has: the standard
library's own ``.py`` sources.

Outputs (defaults, relative to the repository root):

* ``qrunner/assets/corpus/calibration.txt`` (~400 KB) -- calibration text
* ``qrunner/assets/corpus/heldout.txt`` (~150 KB)      -- held-out evaluation text
* ``qrunner/assets/corpus/README.md``
* ``qrunner/assets/demo-llama/`` -- bf16 ``LlamaForCausalLM`` + tokenizer + model card

Usage::

    python scripts/train_demo_model.py              # full run (~12 min on 2 CPU cores)
    python scripts/train_demo_model.py --steps 5 \\
        --out-dir /tmp/demo --corpus-dir /tmp/corpus  # quick smoke / step-time measurement
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS_DIR = REPO_ROOT / "qrunner" / "assets" / "corpus"
DEFAULT_OUT_DIR = REPO_ROOT / "qrunner" / "assets" / "demo-llama"

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages"}
MAX_FILE_BYTES = 200_000
HELDOUT_TARGET = 150_000
CALIB_TARGET = 400_000
FILE_SEP = "\n\n"  # files are joined with a blank line between them

EOT = "<|endoftext|>"
PAD = "<|pad|>"
VOCAB_SIZE = 2048
SEQ_LEN = 256
MAX_EVAL_WINDOWS = 64


# ----------------------------------------------------------------------------
# corpus
# ----------------------------------------------------------------------------
def collect_stdlib_files() -> tuple[Path, list[str]]:
    """Sorted relative paths (posix) of the stdlib's .py files we use."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and d != "__pycache__")
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            rel = path.relative_to(root).as_posix()
            if any(part in SKIP_DIRS for part in rel.split("/")):
                continue
            rels.append(rel)
    rels.sort()
    return root, rels


def read_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    return text.strip("\n") + "\n"


def path_hash(rel: str) -> str:
    return hashlib.sha256(rel.encode("utf-8")).hexdigest()


def split_files(texts: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """Deterministic disjoint split by sha256 of the relative path.

    Files are visited in hash order; the first ones fill the held-out set up to
    ~HELDOUT_TARGET bytes, the next ones the calibration set up to
    ~CALIB_TARGET bytes, and all others are training-only. Returns
    (heldout, calibration, train_only), each sorted by path.
    """
    order = sorted(texts, key=path_hash)
    heldout: list[str] = []
    calib: list[str] = []
    rest: list[str] = []
    h_size = c_size = 0
    for rel in order:
        n = len(texts[rel].encode("utf-8"))
        if h_size < HELDOUT_TARGET and h_size + n <= HELDOUT_TARGET * 1.05:
            heldout.append(rel)
            h_size += n
        elif c_size < CALIB_TARGET and c_size + n <= CALIB_TARGET * 1.05:
            calib.append(rel)
            c_size += n
        else:
            rest.append(rel)
    return sorted(heldout), sorted(calib), sorted(rest)


def join_files(texts: dict[str, str], rels: list[str]) -> str:
    return FILE_SEP.join(texts[r].rstrip("\n") for r in rels) + "\n"


def write_corpus(corpus_dir: Path, texts, heldout, calib, train, stdlib_root: Path) -> tuple[str, str]:
    corpus_dir.mkdir(parents=True, exist_ok=True)
    calib_text = join_files(texts, calib)
    heldout_text = join_files(texts, heldout)
    (corpus_dir / "calibration.txt").write_text(calib_text, encoding="utf-8", newline="\n")
    (corpus_dir / "heldout.txt").write_text(heldout_text, encoding="utf-8", newline="\n")
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"

    def listing(rels):
        return "\n".join(f"- `{r}`" for r in rels)

    readme = f"""# Built-in text corpora

Plain-text corpora that ship with qrunner so that calibration and evaluation
work offline, with no dataset download.

| file | size | files | use |
|---|---|---|---|
| `calibration.txt` | {len(calib_text.encode())} bytes | {len(calib)} | calibration data for quantization |
| `heldout.txt` | {len(heldout_text.encode())} bytes | {len(heldout)} | held-out evaluation (perplexity) |

## Source

The text is the source code of the **CPython {pyver} standard library**
(the `.py` files under `sysconfig.get_paths()["stdlib"]`), Copyright (c)
Python Software Foundation, distributed under the
[PSF License Agreement](https://docs.python.org/3/license.html).
The files are reproduced unmodified except that leading/trailing blank lines
of each file are stripped and invalid UTF-8 (none expected) would be replaced.

## How it was made

`python scripts/train_demo_model.py` (see that script; it is deterministic):

1. Collect every `.py` file under the stdlib directory, skipping the `test/`,
   `tests/`, `idlelib/`, `lib2to3/` and `site-packages` directories and files
   larger than {MAX_FILE_BYTES} bytes; sort the relative paths
   ({len(texts)} files in total).
2. Order the files by the SHA-256 of their relative path. Walking that order,
   files go to the held-out set until it holds ~{HELDOUT_TARGET // 1000} KB, then
   to the calibration set until it holds ~{CALIB_TARGET // 1000} KB; all other
   files ({len(train) - len(calib)}) are training-only. The sets are disjoint by
   module file.
3. Each corpus is the concatenation of its files' contents, in sorted path
   order, separated by one blank line.

The demo model in `qrunner/assets/demo-llama/` was trained on the calibration
files plus the training-only files, and **never** saw the held-out files.

## Held-out files

{listing(heldout)}

## Calibration files

{listing(calib)}
"""
    (corpus_dir / "README.md").write_text(readme, encoding="utf-8", newline="\n")
    return calib_text, heldout_text


# ----------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------
def train_tokenizer(train_docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer, length=len(train_docs))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=None,
        pad_token=PAD,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def encode_docs(tokenizer, docs: list[str]) -> torch.Tensor:
    """One token stream: doc tokens followed by <|endoftext|>, for each doc."""
    eos = tokenizer.eos_token_id
    enc = tokenizer._tokenizer.encode_batch(docs, add_special_tokens=False)
    ids: list[int] = []
    for e in enc:
        ids.extend(e.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------
# model / training / eval
# ----------------------------------------------------------------------------
def make_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            assert mod.in_features % 128 == 0 and mod.out_features % 128 == 0, name
    return model


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    n = min(max_windows, tokens.numel() // seq_len)
    return tokens[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    model.eval()
    total_nll = 0.0
    total_tok = 0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tok += x[:, 1:].numel()
    return math.exp(total_nll / total_tok)


def unigram_perplexity(train_tokens: torch.Tensor, windows: torch.Tensor) -> float:
    counts = torch.bincount(train_tokens, minlength=VOCAB_SIZE).double() + 1.0  # add-one
    logp = (counts / counts.sum()).log()
    targets = windows[:, 1:].reshape(-1)
    return math.exp(-logp[targets].mean().item())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (default: ~12 min at ~1.2 s/step on 2 idle CPU cores)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps, >= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    p.add_argument("--corpus-dir", type=Path, default=DEFAULT_CORPUS_DIR)
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "scripts/train_demo_model.py", *argv_used])

    t_start = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    # ---- corpus ----
    stdlib_root, rels = collect_stdlib_files()
    texts = {r: read_text(stdlib_root / r) for r in rels}
    heldout, calib, train_only = split_files(texts)
    train = sorted(calib + train_only)
    assert not set(heldout) & set(train)
    _, heldout_text = write_corpus(args.corpus_dir, texts, heldout, calib, train, stdlib_root)
    print(
        f"[corpus] {len(rels)} files from {stdlib_root}: heldout={len(heldout)} calib={len(calib)} "
        f"train={len(train)} ({sum(len(texts[r].encode()) for r in train)} bytes)",
        flush=True,
    )

    # ---- tokenizer ----
    train_docs = [texts[r] for r in train]
    t0 = time.time()
    tokenizer = train_tokenizer(train_docs)
    train_tokens = encode_docs(tokenizer, train_docs)
    heldout_tokens = encode_docs(tokenizer, [heldout_text])[:-1]  # eval on heldout.txt as written
    print(
        f"[tokenizer] vocab={len(tokenizer)} train_tokens={train_tokens.numel()} "
        f"heldout_tokens={heldout_tokens.numel()} ({time.time() - t0:.1f}s)",
        flush=True,
    )

    # ---- data ----
    n_seq = train_tokens.numel() // SEQ_LEN
    train_seqs = train_tokens[: n_seq * SEQ_LEN].view(n_seq, SEQ_LEN)
    eval_w = eval_windows(heldout_tokens, SEQ_LEN, MAX_EVAL_WINDOWS)
    gen = torch.Generator().manual_seed(args.seed)

    # ---- model ----
    torch.manual_seed(args.seed)
    model = make_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[model] params={n_params} ({n_params / 1e6:.2f} M)", flush=True)

    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (decay if prm.ndim >= 2 else no_decay).append(prm)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    warmup = args.warmup if args.warmup is not None else max(1, round(0.05 * args.steps))

    # ---- train ----
    model.train()
    t_train = time.time()
    perm = torch.randperm(n_seq, generator=gen)
    cursor = 0
    loss_ema = None
    for step in range(args.steps):
        if cursor + args.batch_size > n_seq:
            perm = torch.randperm(n_seq, generator=gen)
            cursor = 0
        x = train_seqs[perm[cursor : cursor + args.batch_size]]
        cursor += args.batch_size
        lr = lr_at(step, args.steps, args.lr, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(
                f"[train] step {step + 1}/{args.steps} loss={loss.item():.4f} ema={loss_ema:.4f} "
                f"lr={lr:.2e} elapsed={el:.0f}s ({el / (step + 1):.2f}s/step)",
                flush=True,
            )
    train_secs = time.time() - t_train
    epochs = args.steps * args.batch_size / n_seq
    print(f"[train] done in {train_secs:.0f}s ({epochs:.2f} epochs over {n_seq} sequences)", flush=True)

    # ---- eval ----
    ppl_unigram = unigram_perplexity(train_tokens, eval_w)
    ppl_fp32 = perplexity(model, eval_w)
    model = model.to(torch.bfloat16)
    ppl_bf16 = perplexity(model, eval_w)
    print(
        f"[eval] heldout windows={eval_w.shape[0]}x{SEQ_LEN}: ppl fp32={ppl_fp32:.3f} "
        f"bf16={ppl_bf16:.3f} unigram-baseline={ppl_unigram:.3f}",
        flush=True,
    )

    # ---- save ----
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 5 records its internal class name; the public alias also loads in 4.x.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name != "README.md")
    stats = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": SEQ_LEN,
        "lr": args.lr,
        "warmup": warmup,
        "train_seconds": round(train_secs, 1),
        "train_tokens": int(train_tokens.numel()),
        "epochs": round(epochs, 3),
        "heldout_eval_tokens": int(eval_w.numel()),
        "ppl_fp32": round(ppl_fp32, 3),
        "ppl_bf16": round(ppl_bf16, 3),
        "ppl_unigram": round(ppl_unigram, 3),
    }
    write_model_card(out, command, stats, n_params, size, len(train), len(heldout))
    print(f"[save] {out} ({size / 1e6:.2f} MB) total {time.time() - t_start:.0f}s", flush=True)
    print("[stats] " + json.dumps(stats), flush=True)
    return 0


def write_model_card(out: Path, command: str, s: dict, n_params: int, size: int, n_train: int, n_heldout: int):
    import tokenizers
    import transformers

    card = f"""# demo-llama

A tiny `LlamaForCausalLM` trained from scratch on Python source code. It ships
with qrunner so that the demo, the tests and the benchmarks run offline on any
machine, on a model whose weights are *trained* (so quantization error shows up
as a real perplexity change, unlike random weights).

## Architecture

| | |
|---|---|
| class | `LlamaForCausalLM` |
| parameters | {n_params:,} ({n_params / 1e6:.2f} M) |
| vocab_size | 2048 (byte-level BPE) |
| hidden_size | 256 |
| intermediate_size | 768 |
| num_hidden_layers | 4 |
| num_attention_heads / num_key_value_heads | 4 / 2 (head_dim 64) |
| max_position_embeddings | 1024 |
| rope | default, theta 10000 |
| tie_word_embeddings | true |
| dtype on disk | bfloat16 ({size / 1e6:.2f} MB in this folder) |

Every linear layer's in/out features are multiples of 128, so group sizes 32,
64 and 128 all divide them.

## Tokenizer

Byte-level BPE (`tokenizers` {tokenizers.__version__}) trained on the same
training text; vocabulary 2048 including the special tokens `<|endoftext|>`
(id 0, used as both BOS and EOS) and `<|pad|>` (id 1). Loaded as
`PreTrainedTokenizerFast`, `model_max_length` 1024. No BOS is added
automatically.

## Data

Python standard library sources (CPython {sys.version_info.major}.{sys.version_info.minor},
PSF license); see `qrunner/assets/corpus/README.md`. The files are split by
module file (SHA-256 of the relative path) into held-out ({n_heldout} files,
`heldout.txt`), calibration (`calibration.txt`) and training-only sets. The model
was trained on calibration + training-only files ({n_train} files,
{s['train_tokens']:,} tokens); it never saw the held-out files.

## Training

- {s['steps']} AdamW steps (betas 0.9/0.95, weight decay 0.1, grad clip 1.0),
  batch {s['batch_size']} x {s['seq_len']} tokens, peak lr {s['lr']:g}, {s['warmup']} warmup
  steps then cosine decay to 10 % ({s['epochs']} epochs)
- fp32 on CPU, `torch.manual_seed(0)`, `torch.set_num_threads(2)`;
  {s['train_seconds']:.0f} s of training on 2 CPU cores
- torch {torch.__version__}, transformers {transformers.__version__}

## Held-out perplexity

On `heldout.txt`, {s['heldout_eval_tokens'] // s['seq_len']} non-overlapping windows of {s['seq_len']} tokens
(per BPE token):

| weights | perplexity |
|---|---|
| fp32 (as trained) | {s['ppl_fp32']:.3f} |
| bf16 (as saved, bf16 compute) | {s['ppl_bf16']:.3f} |
| unigram baseline (add-one, training counts) | {s['ppl_unigram']:.3f} |

## Reproduce

```
{command}
```

The script is deterministic up to floating-point differences between torch
versions / CPUs; it also rewrites `qrunner/assets/corpus/`.
"""
    (out / "README.md").write_text(card, encoding="utf-8", newline="\n")


if __name__ == "__main__":
    raise SystemExit(main())
