"""Predict each memory mode's peak RSS from the checkpoint and data settings (for memory=auto)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import psutil

INTERPRETER_MB = 600.0  # python + torch + transformers imported
GB = 1024**3


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def predict_high_mb(cfg: Any, hf_config: Any, model_dir: Path) -> float:
    """Whole model in the compute dtype, plus hidden states of every sample (inputs, outputs, targets)."""
    source_dtype = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", "") or "")
    source_bytes_per_param = 4 if "32" in source_dtype else 2
    compute_bytes = 4 if cfg.model.compute_dtype == "float32" else 2
    weights = checkpoint_bytes(model_dir) * compute_bytes / source_bytes_per_param
    hidden = getattr(hf_config, "hidden_size", 4096)
    activations = 3 * cfg.data.nsamples * cfg.data.seqlen * hidden * compute_bytes
    return INTERPRETER_MB + (weights + activations) / 2**20


def choose_mode(cfg: Any, hf_config: Any, model_dir: Path) -> Dict[str, Any]:
    """The fastest supported mode whose predicted peak fits the budget."""
    budget_gb = cfg.memory.budget_gb
    if budget_gb is None:
        budget_gb = 0.8 * psutil.virtual_memory().available / GB
    predicted = {"high": predict_high_mb(cfg, hf_config, model_dir)}
    fits = [m for m in ("high",) if predicted[m] / 1024 <= budget_gb]
    return {"budget_gb": round(budget_gb, 2), "predicted_peak_mb": {k: round(v) for k, v in predicted.items()},
            "mode": fits[0] if fits else None}
