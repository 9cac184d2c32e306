"""Predict each memory mode's peak RSS from the model skeleton and the data settings (for memory=auto).

The figures are estimates of what is resident at the worst moment of the quantize stage, the one that
dominates every mode:

- every mode: the interpreter with torch and transformers imported, the block being tuned (its linears' weights
  in the checkpoint's dtype while tuned, the rest in the compute dtype; per weight element the fp32 rounding
  offset and the current and best iteration's codes; one layer's dL/dv and the fake-quantization of one chunk of
  its rows in float32), and one mini-batch's forward/backward activations;
- `high`: plus the whole model in the compute dtype, and the four activation sets of the block
  (quantized-chain inputs, original-chain inputs, targets, outputs), each nsamples x seqlen x hidden;
- `medium`: plus the larger of what runs before the blocks (capture: embedding rows, not tables; the vision
  tower for image–text calibration) and the output head as evaluate applies it (its norms and one slice of
  lm_head's rows), and the four activation sets;
- `low`: plus that larger of the two; activations are read from disk per mini-batch.

With scheme=auto the scoring stage can be the larger one: the block being replayed with its weight gradients,
and, in `high` and `medium`, every block's input of the option being scored (blocks x nsamples x seqlen x
hidden; `low` keeps them in row files).
"""
from __future__ import annotations

from typing import Any, Dict

import psutil
import torch

from qrunner.memory.sliced_head import GROUP_BYTES, SLICE_BYTES
from qrunner.quant.fake_quant import CHUNK_ELEMENTS

INTERPRETER_MB = 450.0  # python + torch + transformers + qrunner imported (measured: 420-480 MB)
GB = 1024**3
MB = 1024**2
ORDER = ("high", "medium", "low")  # fastest first


def _numel(model: torch.nn.Module, names) -> int:
    params = dict(model.named_parameters(remove_duplicate=False))
    return sum(params[n].numel() for n in names if n in params)


def _stored_bytes(session: Any, c: int) -> int:
    """Bytes a weight in the checkpoint's dtype (config.json's), when narrower than the compute dtype's `c`: what
    a tuned weight is held in while tuning (memory/narrow.py)."""
    config = session.hf_config
    dtype = None
    for conf in (config, getattr(config, "text_config", None)):
        dtype = dtype or getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None)
    return 2 if str(dtype).replace("torch.", "") in ("bfloat16", "float16") else c


def _block_tuning_bytes(cfg: Any, session: Any, batch_size: int) -> Dict[str, int]:
    """What tuning one block holds wherever it runs: the block's weights (`weights`; its linears held in the
    checkpoint's dtype while tuned), the tuning state (`tuning`: per weight the fp32 rounding offset and the
    current and best iteration's codes; the fused layer's dL/dv of one layer and its fake-quantization of one
    chunk of rows in float32) and one micro-batch's forward/backward activations (`backward`)."""
    c = 4 if cfg.model.compute_dtype == "float32" else 2
    rows, tokens, hidden, inter = session.calibration_shape()
    blocks = session.blocks(session.skeleton)
    block_params = max(sum(p.numel() for p in b.parameters()) for _, b in blocks)
    linear_params = max(sum(p.numel() for p in b.parameters() if p.dim() >= 2) for _, b in blocks)
    largest_layer = max((p.numel() for _, b in blocks for p in b.parameters() if p.dim() >= 2), default=0)
    tuned = int(cfg.quant.iters) > 0
    mb_tokens = min(batch_size, rows or batch_size) * tokens
    held = _stored_bytes(session, c) if tuned else c
    fused = largest_layer * 4 + min(largest_layer, CHUNK_ELEMENTS) * 24
    if tuned:
        return {"weights": (block_params - linear_params) * c + linear_params * held,
                "tuning": block_params * 2 + block_params * 4 + fused,
                "backward": mb_tokens * (10 * hidden + 4 * inter) * 4}
    # round-to-nearest: the quantized forward holds the block twice (its weights and their dequantized copies) and
    # the codes; quantizing one layer takes about 12 bytes a weight of float32 temporaries
    return {"weights": 2 * block_params * c, "tuning": block_params + largest_layer * 12,
            "backward": mb_tokens * (2 * hidden + inter) * 4}


def predict_device_peak_mb(cfg: Any, session: Any, batch_size: int = 0) -> float:
    """The device's peak while quantize runs a block there (device=cuda): the block, its tuning state and one
    micro-batch (`batch_size`, default quant.batch_size), plus a mini-batch of rows in flight; the rows
    themselves stay on the host. The CUDA context (a few hundred MB) is not counted."""
    parts = _block_tuning_bytes(cfg, session, batch_size or int(cfg.quant.batch_size))
    _, tokens, hidden, _ = session.calibration_shape()
    in_flight = 3 * 8 * tokens * hidden * 4  # forward_rows' batch of 8 rows: input, output, targets
    return (sum(parts.values()) + in_flight) / MB


def _edge_elements(cfg: Any, session: Any, c: int) -> int:
    """What the streaming modes hold besides a block, in compute-dtype elements: the larger of the modules before
    the blocks (the vision tower too for image–text calibration; embedding tables are read by rows, not whole)
    and the output head as applied (its norms, one slice of the projection's rows, the logits of a slice)."""
    model, adapter = session.skeleton, session.adapter
    tables = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    inputs = [n for n in adapter.input_tensor_names(model, session.block_lists, bool(cfg.data.images))
              if n not in tables]
    heads = adapter.heads(model)
    if not heads:
        return _numel(model, inputs)
    names = adapter.head_tensor_names(model)
    projection = [n for n in names if n.startswith(f"{heads[-1]}.")]
    norms = [n for n in names if n not in projection]
    rows = int(cfg.eval.nsamples) * (int(cfg.eval.seqlen) + 1) * session.hidden_size * 4 or GROUP_BYTES
    # a slice read in the stored dtype and cast, and its logits; the normed rows of one group
    head = _numel(model, norms) * c + 3 * min(SLICE_BYTES, _numel(model, projection) * c) + min(GROUP_BYTES, rows)
    return max(_numel(model, inputs), head // c)


def predict_peaks_mb(cfg: Any, session: Any) -> Dict[str, float]:
    model = session.skeleton
    c = 4 if cfg.model.compute_dtype == "float32" else 2
    rows, tokens, hidden, inter = session.calibration_shape()
    blocks = session.blocks(model)
    block_params = max(sum(p.numel() for p in b.parameters()) for _, b in blocks)
    total = sum(p.numel() for p in model.parameters())
    edge = _edge_elements(cfg, session, c)

    parts = _block_tuning_bytes(cfg, session, int(cfg.quant.batch_size))
    activations = 4 * rows * tokens * hidden * c
    common = INTERPRETER_MB * MB + sum(parts.values())  # the block being tuned included
    peaks = {
        "high": common + (total - block_params) * c + activations,
        "medium": common + edge * c + activations,
        "low": common + edge * c,
    }
    if cfg.scheme.name == "auto":
        a = cfg.scheme.auto
        kept = len(blocks) * int(a.nsamples) * int(a.seqlen) * hidden * c
        replay = (INTERPRETER_MB * MB + block_params * (c + 8)
                  + min(int(a.batch_size), 8) * int(a.seqlen) * (10 * hidden + 4 * inter) * 4)
        scoring = {"high": replay + total * c + kept, "medium": replay + (block_params + edge) * c + kept,
                   "low": replay + (block_params + edge) * c}
        peaks = {mode: max(peaks[mode], scoring[mode]) for mode in peaks}
    return {mode: value / MB for mode, value in peaks.items()}


def choose_mode(cfg: Any, session: Any) -> Dict[str, Any]:
    """The fastest mode whose predicted peak fits `memory.budget_gb` (default: 80 % of the RAM available now)."""
    budget_gb = cfg.memory.budget_gb
    if budget_gb is None:
        budget_gb = 0.8 * psutil.virtual_memory().available / GB
    predicted = predict_peaks_mb(cfg, session)
    fits = [m for m in ORDER if predicted[m] / 1024 <= budget_gb]
    return {"budget_gb": round(budget_gb, 2), "predicted_peak_mb": {k: round(v) for k, v in predicted.items()},
            "mode": fits[0] if fits else None}
