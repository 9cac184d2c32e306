"""The comparison at the end of a multirun (`qrunner -m ...`): one row per job in `sweep.json` / `sweep.md`, the
best job per size, and `sweep.png` (perplexity against the export's size, the Pareto front marked).

Each job writes its row (`job.json`) into its Hydra job folder as it ends, failed jobs included (their error in
the row); `SweepReport.on_multirun_end`, a Hydra callback, gathers the rows. Rerunning the same `-m` command
resumes unfinished jobs (their run directories resume) and rewrites the comparison.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from hydra.experimental.callback import Callback

from qrunner.quant.bit_budget import layer_cost_bits

JOB_RECORD = "job.json"
OPTUNA_RESULTS = "optimization_results.yaml"  # Hydra's Optuna sweeper writes the best trial here


def bits_per_weight(plan: Iterable[Any]) -> Optional[float]:
    """Storage bits per weight of the block linears (codes, scales and zero points; layers left in full precision
    at 16), AutoScheme's accounting."""
    bits = weights = 0
    for p in plan:
        numel = p.in_features * p.out_features
        weights += numel
        bits += layer_cost_bits(p.in_features, p.out_features, p.bits, p.group_size, p.sym) if p.quantize \
            else 16 * numel
    return round(bits / weights, 4) if weights else None


def job_row(report: Dict[str, Any]) -> Dict[str, Any]:
    """The sweep's row for a finished job, from its report."""
    quality = report.get("quality") or {}
    quantize = next((s for s in report["stages"] if s["name"] == "quantize"), None)
    return {
        "status": "done", "error": None, "run_dir": report["run_dir"], "exports": report.get("exports") or {},
        "export_bytes": next((b for f, b in (report.get("export_bytes") or {}).items()
                              if report["exports"].get(f) == report.get("export_dir")), None),
        "bits_per_weight": report.get("bits_per_weight"),
        **{k: quality.get(k) for k in ("ppl_quantized", "ppl_original", "ppl_ratio", "latent_mse", "psnr_db")},
        "quantize_seconds": quantize["seconds"] if quantize and "seconds" in quantize else None,
        "wall_seconds": report.get("wall_seconds"), "peak_rss_mb": report.get("peak_rss_mb"),
        "reused": [s["name"] for s in report["stages"] if s["status"] == "reused"],
    }


def write_job_record(job_dir: Path, number: int, overrides: List[str], row: Dict[str, Any]) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / f".{JOB_RECORD}.tmp"
    tmp.write_text(json.dumps({"job": number, "overrides": overrides, **row}, indent=1, default=str))
    tmp.replace(job_dir / JOB_RECORD)


def comparable(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The finished jobs with a perplexity and an export size (the ones the front and the plot compare)."""
    return [r for r in rows if r["status"] == "done" and r.get("ppl_quantized") is not None and r.get("export_bytes")]


SAME_SIZE = 1e-3  # exports within 0.1 % of each other are the same size (a config file's few bytes differ)


def _beats(o: Dict[str, Any], r: Dict[str, Any]) -> bool:
    """Whether job `o` is at least as small and as good as `r`, and better in one of the two."""
    size_o, size_r, ppl_o, ppl_r = o["export_bytes"], r["export_bytes"], o["ppl_quantized"], r["ppl_quantized"]
    no_larger = size_o <= size_r * (1 + SAME_SIZE)
    return no_larger and ppl_o <= ppl_r and (ppl_o < ppl_r or size_o < size_r * (1 - SAME_SIZE))


def pareto(rows: List[Dict[str, Any]]) -> List[int]:
    """Jobs no other job beats on both size and perplexity (smaller is better in both)."""
    done = comparable(rows)
    return sorted(r["job"] for r in done if not any(_beats(o, r) for o in done))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def search_markdown(found: Optional[Dict[str, Any]]) -> List[str]:
    """The best parameters a search (Optuna) found, as lines of sweep.md."""
    if not found:
        return []
    lines = ["", f"## Best parameters ({found.get('name', 'search')})", ""]
    if "best_params" in found:
        lines += [f"- `{k}={v}`" for k, v in found["best_params"].items()]
        lines += [f"- objective: {_cell(found.get('best_value'))}"]
    for solution in found.get("solutions", []):  # a two-objective study: its Pareto solutions
        lines += [f"- {' '.join(f'`{k}={v}`' for k, v in solution['params'].items())}: objectives "
                  f"{', '.join(_cell(v) for v in solution['values'])}"]
    return lines


def sweep_markdown(rows: List[Dict[str, Any]], front: List[int], plot: Optional[str],
                   found: Optional[Dict[str, Any]] = None) -> str:
    common = [o for o in rows[0]["overrides"] if all(o in r["overrides"] for r in rows)] if len(rows) > 1 else []
    lines = ["# qrunner sweep", "", f"{len(rows)} jobs, {sum(r['status'] == 'done' for r in rows)} done; "
             f"Pareto front (size vs perplexity): jobs {', '.join(map(str, front)) or 'none'}.", ""]
    if common:
        lines += ["Every job: " + " ".join(f"`{o}`" for o in common), ""]
    cols = ("job", "overrides", "status", "ppl_quantized", "ppl_ratio", "export_bytes", "bits_per_weight",
            "quantize_seconds", "peak_rss_mb", "reused")
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if c == "overrides":
                v = " ".join(f"`{o}`" for o in v if o not in common)
            elif c == "reused":
                v = ", ".join(v or [])
            elif c == "status" and r["status"] != "done":
                v = f"failed: {r.get('error')}"
            elif c == "job" and r["job"] in front:
                v = f"**{v}**"
            cells.append(_cell(v) if c not in ("overrides", "reused", "status") else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines += search_markdown(found)
    if plot:
        lines += ["", f"![perplexity vs size]({plot})"]
    return "\n".join(lines) + "\n"


def plot_front(rows: List[Dict[str, Any]], front: List[int], path: Path) -> Optional[str]:
    done = comparable(rows)
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["export_bytes"] / 1e6 for r in done], [r["ppl_quantized"] for r in done], color="tab:blue")
    for r in done:
        ax.annotate(str(r["job"]), (r["export_bytes"] / 1e6, r["ppl_quantized"]), fontsize=8)
    best = sorted((r for r in done if r["job"] in front), key=lambda r: r["export_bytes"])
    ax.plot([r["export_bytes"] / 1e6 for r in best], [r["ppl_quantized"] for r in best], color="tab:red",
            label="Pareto front")
    ax.set_xlabel("export size (MB)")
    ax.set_ylabel("perplexity")
    ppl = [r["ppl_quantized"] for r in done]
    if min(ppl) > 0 and max(ppl) / min(ppl) > 10:  # 2-bit jobs next to 8-bit ones
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def write_sweep(sweep_dir: Path) -> List[Dict[str, Any]]:
    rows = sorted((json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{JOB_RECORD}")), key=lambda r: r["job"])
    front = pareto(rows)
    plot = plot_front(rows, front, sweep_dir / "sweep.png")
    found = _search_results(sweep_dir / OPTUNA_RESULTS)
    (sweep_dir / "sweep.json").write_text(json.dumps({"jobs": rows, "pareto": front, "search": found}, indent=1,
                                                     default=str))
    (sweep_dir / "sweep.md").write_text(sweep_markdown(rows, front, plot, found))
    return rows


def _search_results(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    import yaml

    return yaml.safe_load(path.read_text())


class SweepReport(Callback):
    """Hydra callback: the sweep's comparison when a multirun ends; a non-zero exit when a job failed."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        """Rows of an earlier sweep in the same folder go: this sweep's jobs write theirs again (the finished ones
        in seconds, their stages reused)."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        for stale in [*sweep_dir.glob(f"*/{JOB_RECORD}"), sweep_dir / OPTUNA_RESULTS]:
            stale.unlink(missing_ok=True)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = write_sweep(sweep_dir)
        failed = [r for r in rows if r["status"] != "done"]
        print(f"qrunner: sweep of {len(rows)} jobs -> {sweep_dir / 'sweep.md'}", file=sys.stderr)
        if failed:
            print(f"qrunner: {len(failed)} of {len(rows)} jobs failed (their rows say why); rerun the same command "
                  "to retry them, the finished ones are reused", file=sys.stderr)
            sys.exit(1)
