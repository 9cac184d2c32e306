"""report.json, report.md and the memory-over-time plot of a run."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

from qrunner.memory.monitor import MemoryMonitor, process_peak_mb
from qrunner.pipeline.runner import StageResult
from qrunner.report.autoscheme import autoscheme_table, budgets_table, plot_autoscheme, summary_line
from qrunner.report.experts import coverage_text
from qrunner.report.diffusion import IMAGE_KEYS, copy_images, image_quality_table, stream_loss_table, summary_text


def build_report(cfg_plain: Dict[str, Any], run_dir: Path, results: List[StageResult], monitor: MemoryMonitor,
                 memory_choice: Dict[str, Any], wall_seconds: float) -> Dict[str, Any]:
    by_name = {r.name: r for r in results}
    evaluation = by_name.get("evaluate")
    quantize = by_name.get("quantize")
    written = [r.metrics for r in results if r.name.startswith("export") and "output_dir" in r.metrics]
    exports = {m["format"]: m["output_dir"] for m in written}
    tasks = by_name.get("tasks")
    return {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run_dir": str(run_dir),
        "recipe": cfg_plain.get("_recipe"),
        "model": cfg_plain["model"]["path"],
        "scheme": cfg_plain["scheme"],
        "quant": cfg_plain["quant"],
        "memory": memory_choice,
        "wall_seconds": round(wall_seconds, 2),
        "peak_rss_mb": round(max([process_peak_mb()] + [r.peak_rss_mb for r in results if r.status == "ran"]), 1),
        "stages": [asdict(r) for r in results],
        "quality": {k: v for k, v in (evaluation.metrics if evaluation else {}).items()
                    if k.startswith("ppl") or k in IMAGE_KEYS or k == "images"},
        "tasks": tasks.metrics.get("tasks", {}) if tasks else {},
        "block_loss": quantize.metrics.get("block_loss", []) if quantize else [],
        "block_loss_rtn": quantize.metrics.get("block_loss_rtn", []) if quantize else [],
        "block_loss_parts": quantize.metrics.get("block_loss_parts", {}) if quantize else {},
        "experts": {k: v for k, v in (quantize.metrics if quantize else {}).items() if "expert" in k},
        "export_dir": exports.get("auto_round", next(iter(exports.values()), None)),
        "exports": exports,
        "export_bytes": {m["format"]: m.get("bytes") for m in written},  # as each export stage recorded its files
        "memory_timeline": monitor.timeline(),
    }


def plot_memory(report: Dict[str, Any], file: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["memory_timeline"]["samples"]
    if len(samples) < 2:
        return None
    t = [s[0] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(t, [s[1] for s in samples], label="RSS", color="tab:blue")
    ax.plot(t, [s[2] for s in samples], label="RssAnon", color="tab:orange", alpha=0.8)
    vram = report["memory_timeline"].get("vram")
    if vram:  # the GPU's allocated memory on the same clock
        ax.plot([v[0] for v in vram], [v[1] for v in vram], label="VRAM allocated", color="tab:green")
    for when, name in report["memory_timeline"]["marks"]:
        ax.axvline(when, color="grey", lw=0.8, ls="--")
        ax.text(when, ax.get_ylim()[1] * 0.98, f" {name}", rotation=90, va="top", fontsize=7, color="grey")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MB")
    ax.set_title(f"memory over time (peak {report['peak_rss_mb']:.0f} MB)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return file


def plot_block_loss(report: Dict[str, Any], file: Path) -> Optional[Path]:
    losses = report["block_loss"]
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import numpy as np

    rtn = report.get("block_loss_rtn")  # measured on request (quant.rtn_loss) or when the weights are RTN's
    x = np.arange(len(losses))
    fig, ax = plt.subplots(figsize=(7, 3))
    if rtn:
        ax.bar(x - 0.2, rtn, width=0.4, color="tab:grey", label="before tuning (RTN)")
    ax.bar(x + 0.2 if rtn else x, losses, width=0.4, color="tab:green", label="after tuning")
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("output MSE vs original")
    ax.set_title("per-block loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return file


def markdown(report: Dict[str, Any], images: List[Path]) -> str:
    s = report["scheme"]
    lines = [
        f"# qrunner report: {report['recipe']}",
        "",
        f"- model: `{report['model']}`",
        f"- scheme: {s['name']} (bits {s['bits']}, group {s['group_size']}, {'sym' if s['sym'] else 'asym'}), "
        f"iters {report['quant']['iters']}",
        f"- memory mode: {report['memory'].get('mode')} (budget {report['memory'].get('budget_gb')} GB), "
        f"blocks on {report.get('device', 'cpu')}",
        *(f"- export ({fmt}): `{path}`" for fmt, path in (report.get("exports") or {"": report["export_dir"]}).items()),
        f"- wall time {report['wall_seconds']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MB"
        + _predicted(report),
        *(f"- restarted after {r['cause']} in memory={r['mode']} at {r['where']} (peak RSS {r['peak_rss_mb']} MB) "
          f"-> memory={r['restart_mode']}" for r in report.get("restarts", [])),
        *([f"- {full_precision_text(report['full_precision_layers'])}"] if _kept_count(report) else []),
        *([f"- {coverage_text(report['experts'])}"] if report.get("experts") else []),
        "",
        "| stage | status | time (s) | peak RSS (MB) |" + (" peak VRAM (MB) |" if _vram(report) else ""),
        "|---|---|---:|---:|" + ("---:|" if _vram(report) else ""),
    ]
    for st in report["stages"]:
        status = f"reused, taken from `{st['source']}`" if st.get("source") else st["status"]
        lines.append(f"| {st['name']} | {status} | {st['seconds']:.2f} | {st['peak_rss_mb']:.0f} |"
                     + (f" {_vram_cell(st)} |" if _vram(report) else ""))
    q = report["quality"]
    if any(k.startswith("ppl") for k in q):
        lines += ["", "| perplexity | value |", "|---|---:|"]
        for key in ("ppl_original", "ppl_quantized", "ppl_ratio"):
            if key in q:
                lines.append(f"| {key.replace('ppl_', '')} | {q[key]:.4f} |")
    lines += image_quality_table(q)
    lines += autoscheme_table(report.get("autoscheme")) + budgets_table(report.get("budgets"))
    lines += task_table(report.get("tasks") or {})
    if report["block_loss"]:
        rtn = report.get("block_loss_rtn")
        if rtn:
            lines += ["", "| block | loss before tuning (RTN) | loss after |", "|---:|---:|---:|"]
            lines += [f"| {i} | {b:.3e} | {a:.3e} |" for i, (b, a) in enumerate(zip(rtn, report["block_loss"]))]
        else:  # the RTN-comparison forward is on request (quant.rtn_loss=true)
            lines += ["", "| block | loss |", "|---:|---:|"]
            lines += [f"| {i} | {a:.3e} |" for i, a in enumerate(report["block_loss"])]
    lines += stream_loss_table(report.get("block_loss_parts"))
    for image in images:
        lines += ["", f"![{image.stem}]({image.name})"]
    return "\n".join(lines) + "\n"


def _kept_count(report: Dict[str, Any]) -> int:
    return int((report.get("full_precision_layers") or {}).get("count", 0))


def full_precision_text(kept: Dict[str, Any], shown: int = 5) -> str:
    """One line on the block linears left in full precision (``report["full_precision_layers"]``)."""
    names = ", ".join(kept["names"][:shown]) + (f" and {kept['count'] - shown} more" if kept["count"] > shown else "")
    reasons = "; ".join(f"{reason}: {n}" for reason, n in kept["reasons"].items())
    return (f"full precision: {kept['count']} layer(s), {100 * kept['share_of_weights']:.2f} % of the block linear "
            f"weights ({reasons}): {names}")


def task_rows(tasks: Dict[str, Any]) -> List[List[str]]:
    """[task, metric, original, quantized, difference] for every lm-eval task score."""
    rows = []
    for name, metrics in tasks.get("quantized", {}).items():
        for metric, value in metrics.items():
            base = tasks.get("original", {}).get(name, {}).get(metric)
            rows.append([name, metric, "" if base is None else f"{base:.4f}", f"{value:.4f}",
                         "" if base is None else f"{value - base:+.4f}"])
    return rows


def task_table(tasks: Dict[str, Any]) -> List[str]:
    rows = task_rows(tasks)
    if not rows:
        return []
    samples = tasks.get("samples", {})
    lines = ["", "| task | examples | metric | original | quantized | change |", "|---|---:|---|---:|---:|---:|"]
    return lines + [f"| {r[0]} | {samples.get(r[0], '')} | {' | '.join(r[1:])} |" for r in rows]


def write_report(report: Dict[str, Any], run_dir: Path) -> Path:
    images = [p for p in (plot_memory(report, run_dir / "memory.png"),
                          plot_block_loss(report, run_dir / "block_loss.png"),
                          plot_autoscheme(report, run_dir / "bits_per_layer.png"), copy_images(report, run_dir)) if p]
    (run_dir / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = run_dir / "report.md"
    md.write_text(markdown(report, images))
    return md


def _predicted(report: Dict[str, Any]) -> str:
    """' (predicted N MB)': memory=auto's prediction for the mode that ran, when it was made."""
    mode = report["memory"].get("mode")
    value = (report["memory"].get("predicted_peak_mb") or {}).get(mode)
    return f" (predicted {value:.0f} MB for memory={mode})" if value else ""


def _vram(report: Dict[str, Any]) -> bool:
    """Whether a stage of the run used a GPU (its peak memory there is then shown)."""
    return any(st.get("peak_vram_mb") for st in report["stages"])


def _vram_cell(stage: Dict[str, Any]) -> str:
    v = stage.get("peak_vram_mb")
    return f"{v['allocated_mb']:.0f} ({v['reserved_mb']:.0f} reserved)" if v else ""


def print_summary(report: Dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"qrunner: {report['recipe']} -> {report['export_dir']}")
    vram = _vram(report)
    for col in ("stage", "status", "time (s)", "peak RSS (MB)", *(["peak VRAM (MB)"] if vram else [])):
        table.add_column(col, justify="right" if "(" in col else "left")
    for st in report["stages"]:
        status = f"taken from {Path(st['source']).name}" if st.get("source") else st["status"]
        table.add_row(st["name"], status, f"{st['seconds']:.2f}", f"{st['peak_rss_mb']:.0f}",
                      *([_vram_cell(st)] if vram else []))
    console = Console(stderr=False)
    console.print(table)
    q = report["quality"]
    if "ppl_quantized" in q:
        text = f"perplexity: quantized {q['ppl_quantized']:.4f}"
        if "ppl_original" in q:
            text = f"perplexity: original {q['ppl_original']:.4f}, {text[12:]} (x{q['ppl_ratio']:.4f})"
        console.print(text)
    if summary_text(q):
        console.print(summary_text(q))
    if report.get("autoscheme"):
        console.print(summary_line(report["autoscheme"]))
    tuned, rtn = report["block_loss"], report.get("block_loss_rtn")
    if tuned and rtn and report["quant"]["iters"]:
        before, after = sum(rtn) / len(rtn), sum(tuned) / len(tuned)
        console.print(f"tuning: mean block output loss {before:.3e} with round-to-nearest -> {after:.3e} after "
                      f"{report['quant']['iters']} iterations ({100 * (after / before - 1):+.0f} %)")
    for name, metric, base, value, change in task_rows(report.get("tasks") or {}):
        console.print(f"{name} {metric}: " + (f"original {base}, quantized {value} ({change})" if base
                                               else f"quantized {value}"))
    if _kept_count(report):
        console.print(full_precision_text(report["full_precision_layers"]))
    console.print(f"peak RSS {report['peak_rss_mb']:.0f} MB, wall {report['wall_seconds']:.1f} s; "
                  f"report: {report['run_dir']}/report.md")
