"""The report's parts for family=diffusion: image quality (latent MSE, PSNR, SSIM), the per-stream block losses
and the original | quantized images."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

IMAGE_KEYS = ("latent_mse", "psnr_db", "ssim", "prompts")
STREAM_NAMES = {"hidden_states": "image", "encoder_hidden_states": "text"}


def image_quality_table(quality: Dict[str, Any]) -> List[str]:
    if "latent_mse" not in quality:
        return []
    lines = ["", f"| quantized vs original ({quality.get('prompts', '?')} prompts, same noise) | value |", "|---|---:|",
             f"| final-latent MSE | {quality['latent_mse']:.4g} |"]
    if "psnr_db" in quality:
        lines += [f"| PSNR (dB) | {quality['psnr_db']:.2f} |", f"| SSIM | {quality['ssim']:.4f} |"]
    return lines


def stream_loss_table(parts: Optional[Dict[str, Dict[str, List[Optional[float]]]]]) -> List[str]:
    """Per block, each stream's output error with round-to-nearest and after tuning."""
    if not parts:
        return []
    streams = sorted(parts, key=lambda k: STREAM_NAMES.get(k, k))
    head = " | ".join(f"{STREAM_NAMES.get(k, k)} RTN | {STREAM_NAMES.get(k, k)} tuned" for k in streams)
    lines = ["", f"| block | {head} |", "|---:|" + "---:|" * (2 * len(streams))]
    fmt = lambda v: "" if v is None else f"{v:.3e}"  # noqa: E731
    for i in range(len(parts[streams[0]]["tuned"])):
        cells = " | ".join(f"{fmt(parts[k]['rtn'][i])} | {fmt(parts[k]['tuned'][i])}" for k in streams)
        lines.append(f"| {i} | {cells} |")
    return lines


def copy_images(report: Dict[str, Any], run_dir: Path) -> Optional[Path]:
    """The evaluate stage's original | quantized grid, copied beside the report."""
    name = report.get("quality", {}).get("images")
    source = run_dir / "stages" / "evaluate" / str(name) if name else None
    if source is None or not source.is_file():
        return None
    target = run_dir / "images.png"
    shutil.copyfile(source, target)
    return target


def summary_text(quality: Dict[str, Any]) -> Optional[str]:
    if "latent_mse" not in quality:
        return None
    text = f"images vs original: final-latent MSE {quality['latent_mse']:.4g}"
    if "psnr_db" in quality:
        text += f", PSNR {quality['psnr_db']:.2f} dB, SSIM {quality['ssim']:.4f}"
    return text
