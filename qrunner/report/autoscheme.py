"""The scheme=auto part of a run's report: the option table, the bits-per-layer plot, the console line and the
table of budgets when several ran. Reads only ``report["autoscheme"]`` (the autoscheme stage's plan.json without
its "layers") and ``report["budgets"]``."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional

FULL_PRECISION_BITS = {"bf16": 16, "fp16": 16}


def option_bits(option: str) -> Optional[int]:
    """The weight bits of an option name: ``w<bits>a16...`` gives bits, bf16/fp16 give 16, anything else None."""
    text = str(option).strip().lower()
    if text in FULL_PRECISION_BITS:
        return FULL_PRECISION_BITS[text]
    match = re.match(r"w(\d+)", text)
    return int(match.group(1)) if match else None


def block_of(layer: str) -> str:
    """The block a layer belongs to: its name up to and including the first all-digit part
    ("model.layers.3.mlp.down_proj" -> "model.layers.3"); a name without one is its own block."""
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return layer


def _loss_text(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4f}"


def headline(auto: Dict[str, Any]) -> str:
    counted = "ignored" if auto.get("ignore_scale_zp_bits") else "counted"
    return (f"AutoScheme: {auto['avg_bits']:.4f} average bits for a {auto['avg_bits_target']:g} budget "
            f"(scales and zero points {counted}), estimated loss increase {auto['estimated_loss_increase']:.4f}")


def autoscheme_table(auto: Optional[Dict[str, Any]]) -> List[str]:
    """Markdown lines: the headline and a table with one row per option; [] when there is no autoscheme."""
    if not auto:
        return []
    layers, shares = auto.get("layers_per_option", {}), auto.get("weight_share_per_option", {})
    losses = auto.get("option_loss", {})
    lines = ["", headline(auto), "",
             "| option | layers | share of weights | loss with the option everywhere |", "|---|---:|---:|---:|"]
    for option in auto["options"]:
        lines.append(f"| {option} | {layers.get(option, 0)} | {100 * shares.get(option, 0.0):.2f} % "
                     f"| {_loss_text(losses.get(option))} |")
    return lines


def budgets_table(budgets: Optional[List[Dict[str, Any]]]) -> List[str]:
    """Markdown lines for ``report["budgets"]`` (one plan and export per budget); [] when there is none."""
    if not budgets:
        return []
    lines = ["", "| budget | average bits | perplexity | export |", "|---:|---:|---:|---|"]
    for b in budgets:
        avg = "" if b.get("avg_bits") is None else f"{b['avg_bits']:.4f}"
        lines.append(f"| {b['avg_bits_target']:g} | {avg} | {_loss_text(b.get('ppl_quantized'))} "
                     f"| `{b.get('export_dir')}` |")
    return lines


def summary_line(auto: Dict[str, Any]) -> str:
    """One console line: achieved vs target bits, layers per option and the estimated loss increase."""
    per_option = ", ".join(f"{o} {n}" for o, n in auto.get("layers_per_option", {}).items())
    ignored = " (scales and zero points ignored)" if auto.get("ignore_scale_zp_bits") else ""
    return (f"autoscheme: {auto['avg_bits']:.4f} average bits for a {auto['avg_bits_target']:g} budget{ignored}; "
            f"layers {per_option}; estimated loss increase {auto['estimated_loss_increase']:.4f}")


def plot_autoscheme(report: Dict[str, Any], file: Path) -> Optional[Path]:
    """Bits per layer along the depth (model order), one colour per option, a dashed line between blocks."""
    auto = report.get("autoscheme")
    if not auto or not auto.get("option_of_layer"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(auto["option_of_layer"])
    chosen = [auto["option_of_layer"][n] for n in names]
    options = list(auto.get("options") or []) + sorted(set(chosen) - set(auto.get("options") or []))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.12 * len(names) + 4)), 3.2))
    for k, option in enumerate(options):
        xs = [i for i, c in enumerate(chosen) if c == option]
        if xs:
            bits = option_bits(option)
            ax.scatter(xs, [bits if bits is not None else float("nan")] * len(xs), s=18, color=colours(k % 10),
                       label=f"{option} ({len(xs)})", zorder=3)
    blocks = [block_of(n) for n in names]
    starts = [0] + [i for i in range(1, len(names)) if blocks[i] != blocks[i - 1]]
    for i in starts[1:]:
        ax.axvline(i - 0.5, color="grey", lw=0.6, ls="--", zorder=1)
    step = max(1, len(starts) // 24)
    ax.set_xticks(starts[::step])
    ax.set_xticklabels([blocks[i].rsplit(".", 1)[-1] for i in starts[::step]], fontsize=7)
    ax.set_xlim(-0.5, len(names) - 0.5)
    levels = sorted({b for b in map(option_bits, options) if b is not None})
    if levels:
        ax.set_yticks(levels)
        ax.set_ylim(0, max(levels) + 1)
    ax.set_xlabel("layer (model order; ticks at block starts)")
    ax.set_ylabel("weight bits")
    ax.set_title(f"bits per layer along the depth: {auto['avg_bits']:.4f} average bits "
                 f"(target {auto['avg_bits_target']:g})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return file
