#!/usr/bin/env python3
"""Peak RSS vs model depth for each qrunner memory mode.

One command builds random-weight Llama checkpoints of growing depth (bf16, sharded safetensors, written
tensor by tensor so the builder never holds the model in RAM), runs `python -m qrunner` on each of them
once per memory mode as a separate process, measures each process's peak RSS (`/usr/bin/time -v`'s
"Maximum resident set size", else `getrusage(RUSAGE_CHILDREN)`), and writes into `--out`:

- `ram_vs_depth.json`: every run (peak RSS, wall time, per-stage seconds and peak RSS from the run's
  report.json), the baseline, the checkpoints and the derived metrics and targets;
- `ram_vs_depth.md`: the tables and the PASS/FAIL of each target;
- `ram_vs_depth.png`: peak RSS vs depth, one line per mode, plus the bf16 checkpoint size and the baseline
  (the RSS of a process that only imports torch, transformers and qrunner).

With `--with-autoround` (and auto-round importable) the same checkpoints are also quantized by
auto-round with its low-memory setting (`low_cpu_mem_usage=True`), measured the same way.

Example (a reduced configuration for a small CPU machine):

    python3 benchmarks/ram_vs_depth.py --hidden 1024 --intermediate 2816 --vocab 32000 \
        --depths 4,8,16,32 --iters 1 --nsamples 8 --seqlen 128

Results are rewritten after every run, so a partial sweep leaves readable files.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoints import (ARCHS, CORPUS, MOE_EXPERTS, MOE_EXPERTS_PER_TOKEN, SHAPES, build_checkpoint,  # noqa: E402,F401
                               checkpoint_info)
from real_scale import check_export, find_export, repredict, shape_targets  # noqa: E402
MiB = 1024 * 1024

# targets stated in the issue
TARGET_LOW_GROWTH_PCT = 10.0
TARGET_LOW_PEAK_VS_CKPT = 0.30
TARGET_LOW_WALL_VS_HIGH = 1.15

BASELINE_CODE = "import torch, transformers, qrunner.cli, qrunner.stages"


# --------------------------------------------------------------------------------------------------
# measuring a child process
# --------------------------------------------------------------------------------------------------

def time_binary() -> Optional[str]:
    return "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def child_env() -> Dict[str, str]:
    """The child's environment: this checkout first on PYTHONPATH; no hub access."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    return env


def parse_time_v(text: str) -> Optional[float]:
    """Peak RSS in MiB from `/usr/bin/time -v` output ("Maximum resident set size (kbytes): N")."""
    for line in text.splitlines():
        if "Maximum resident set size (kbytes)" in line:
            return int(line.rsplit(":", 1)[1]) / 1024
    return None


def measure(cmd: List[str], log_file: Path, cwd: Path, timeout: float) -> Dict[str, Any]:
    """Run `cmd` as a child process; returns its peak RSS (MiB), wall seconds, exit code and output tail.

    The child's stdout and stderr go to `log_file`; `/usr/bin/time -v` writes its report to a side file.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    timer = time_binary()
    time_out = log_file.with_suffix(".time")
    full = [timer, "-v", "-o", str(time_out)] + cmd if timer else cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.monotonic()
    with open(log_file, "w") as log:
        try:
            rc = subprocess.run(full, cwd=cwd, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.monotonic() - start
    peak = parse_time_v(time_out.read_text()) if timer and time_out.is_file() else None
    method = "/usr/bin/time -v"
    if peak is None:  # RUSAGE_CHILDREN is a max over all children so far: valid only if this one set it
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        peak = after / 1024 if after > before else None
        method = "getrusage(RUSAGE_CHILDREN)"
    text = log_file.read_text(errors="replace")
    lines = text.splitlines()
    return {"cmd": shlex.join(cmd), "returncode": rc, "peak_rss_mb": None if peak is None else round(peak, 1),
            "rss_method": method, "wall_s": round(wall, 2), "log": str(log_file),
            "output_head": lines[:30] if rc else [], "output_tail": lines[-30:] if rc else []}


def measure_baseline(work: Path, timeout: float) -> Dict[str, Any]:
    """Peak RSS of a process that only imports torch, transformers and qrunner's CLI and stages."""
    return measure([sys.executable, "-c", BASELINE_CODE], work / "logs" / "baseline.log", work, timeout)


def qrunner_command(ckpt: Path, mode: str, run_root: Path, args: argparse.Namespace) -> List[str]:
    return [sys.executable, "-m", "qrunner", f"model.path={ckpt}", f"memory={mode}", f"run.root={run_root}",
            "run.fresh=true", "run.show_progress=false", f"quant.iters={args.iters}",
            f"data.nsamples={args.nsamples}", f"data.seqlen={args.seqlen}", "scheme.group_size=128",
            "eval.enabled=true", f"eval.nsamples={args.eval_nsamples}", f"eval.seqlen={args.eval_seqlen}",
            *([f"family={args.arch}"] if getattr(args, "arch", "llama") == "gemma4" else []), *args.set]


def read_report(run_root: Path) -> Optional[Dict[str, Any]]:
    """The run's report.json (`<run.root>/<recipe>/<hash>/report.json`), found by glob."""
    found = sorted(glob.glob(str(run_root / "**" / "report.json"), recursive=True))
    if not found:
        return None
    report = json.loads(Path(found[0]).read_text())
    return {"report": found[0], "report_peak_rss_mb": report.get("peak_rss_mb"),
            "report_wall_s": report.get("wall_seconds"), "memory": report.get("memory"),
            "quality": report.get("quality"),
            "stages": {s["name"]: {"status": s.get("status"), "seconds": round(s.get("seconds", 0.0), 2),
                                   "peak_rss_mb": s.get("peak_rss_mb")} for s in report.get("stages", [])}}


def run_qrunner(ckpt: Path, mode: str, depth: int, args: argparse.Namespace) -> Dict[str, Any]:
    """One qrunner run in its own process; run outputs are deleted afterwards (the log is kept)."""
    work = Path(args.work_dir)
    run_root = work / "runs" / f"{mode}-d{depth}"
    shutil.rmtree(run_root, ignore_errors=True)
    run_root.mkdir(parents=True)
    result = measure(qrunner_command(ckpt, mode, run_root, args), work / "logs" / f"{mode}-d{depth}.log",
                     run_root, args.timeout)
    result.update(mode=mode, depth=depth, tool="qrunner")
    result.update(read_report(run_root) or {})
    export = find_export(run_root)
    if args.shape and result["returncode"] == 0 and export is not None:
        result["export_check"] = check_export(ckpt, export, depth)
    if not args.keep_runs:
        shutil.rmtree(run_root, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------------
# auto-round (optional)
# --------------------------------------------------------------------------------------------------

def autoround_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("auto_round") is not None
    except (ImportError, ValueError):
        return False


def autoround_child(ckpt: str, out_dir: str, iters: int, nsamples: int, seqlen: int) -> None:
    """Inside the child: quantize `ckpt` with auto-round's low-CPU-memory setting and save it.

    Calibration data is local: the bundled calibration text, tokenized, concatenated and cut into
    `nsamples` windows of `seqlen` tokens (a list of [1, seqlen] tensors; auto-round downloads nothing).
    """
    import torch
    from transformers import AutoTokenizer

    from auto_round import AutoRound

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ids = tokenizer((CORPUS / "calibration.txt").read_text(encoding="utf-8"))["input_ids"]
    windows = [torch.tensor(ids[i * seqlen:(i + 1) * seqlen]).unsqueeze(0) for i in range(nsamples)
               if (i + 1) * seqlen <= len(ids)]
    ar = AutoRound(ckpt, tokenizer, bits=4, group_size=128, sym=True, iters=iters, nsamples=len(windows),
                   seqlen=seqlen, batch_size=min(8, len(windows)), dataset=windows, low_cpu_mem_usage=True,
                   device_map="cpu")
    ar.quantize_and_save(out_dir, format="auto_round")


def run_autoround(ckpt: Path, depth: int, args: argparse.Namespace) -> Dict[str, Any]:
    """auto-round on one checkpoint in its own process (this script re-invoked with --autoround-child)."""
    work = Path(args.work_dir)
    out_dir = work / "runs" / f"autoround-d{depth}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    # killed (SIGKILL) shortly before the run's timeout, so that /usr/bin/time still reports its peak RSS
    cap = ["timeout", "--signal=KILL", str(max(60, int(args.timeout) - 60))] if shutil.which("timeout") else []
    cmd = [*cap, sys.executable, str(Path(__file__).resolve()), "--autoround-child", str(ckpt),
           "--iters", str(args.iters), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--out", str(out_dir / "model")]
    result = measure(cmd, work / "logs" / f"autoround-d{depth}.log", out_dir, args.timeout)
    result.update(mode="autoround", depth=depth, tool="auto-round")
    if not args.keep_runs:
        shutil.rmtree(out_dir, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------------
# metrics, targets, outputs
# --------------------------------------------------------------------------------------------------

def peaks(runs: List[Dict[str, Any]], mode: str) -> Dict[int, float]:
    return {r["depth"]: r["peak_rss_mb"] for r in runs
            if r["mode"] == mode and r["returncode"] == 0 and r.get("peak_rss_mb") is not None}


def walls(runs: List[Dict[str, Any]], mode: str) -> Dict[int, float]:
    return {r["depth"]: r["wall_s"] for r in runs if r["mode"] == mode and r["returncode"] == 0}


def summarize(runs: List[Dict[str, Any]], baseline_mb: float, ckpts: Dict[int, Dict[str, Any]],
              modes: Sequence[str], depths: Sequence[int]) -> Dict[str, Any]:
    """Per mode: peak and peak - baseline per depth, growth smallest -> largest depth, ratios to the
    checkpoint size at the largest depth; per depth: low wall / high wall."""
    lo_d, hi_d = min(depths), max(depths)
    per_mode: Dict[str, Any] = {}
    for mode in modes:
        p = peaks(runs, mode)
        above = {d: round(v - baseline_mb, 1) for d, v in p.items()}
        entry: Dict[str, Any] = {"peak_mb": p, "above_baseline_mb": above, "wall_s": walls(runs, mode)}
        if lo_d in above and hi_d in above and above[lo_d] > 0:
            entry["growth_above_baseline_pct"] = round(100.0 * (above[hi_d] - above[lo_d]) / above[lo_d], 1)
        if hi_d in p and hi_d in ckpts:
            size = ckpts[hi_d]["size_mb"]
            entry["peak_vs_ckpt_at_max_depth"] = round(p[hi_d] / size, 3)
            entry["above_baseline_vs_ckpt_at_max_depth"] = round(above[hi_d] / size, 3)
        per_mode[mode] = entry
    wl, wh = walls(runs, "low"), walls(runs, "high")
    wall_ratio = {d: round(wl[d] / wh[d], 3) for d in depths if d in wl and d in wh and wh[d] > 0}
    return {"per_mode": per_mode, "low_wall_over_high": wall_ratio, "smallest_depth": lo_d, "largest_depth": hi_d}


def verdict(ok: Optional[bool]) -> str:
    return "n/a (missing runs)" if ok is None else ("PASS" if ok else "FAIL")


def evaluate_targets(summary: Dict[str, Any], ckpts: Dict[int, Dict[str, Any]], depths: Sequence[int]
                     ) -> List[Dict[str, Any]]:
    """The issue's four targets, each with its measured value and PASS/FAIL (n/a when runs are missing)."""
    pm = summary["per_mode"]
    hi_d = summary["largest_depth"]
    low, med, high = pm.get("low", {}), pm.get("medium", {}), pm.get("high", {})
    targets = []
    g = low.get("growth_above_baseline_pct")
    targets.append({"target": f"low: (peak - baseline) grows <= {TARGET_LOW_GROWTH_PCT:g} % from depth "
                              f"{summary['smallest_depth']} to {hi_d}",
                    "value": None if g is None else f"{g:+.1f} %",
                    "pass": None if g is None else g <= TARGET_LOW_GROWTH_PCT})
    r = low.get("peak_vs_ckpt_at_max_depth")
    size = ckpts.get(hi_d, {}).get("size_mb")
    targets.append({"target": f"low: peak at depth {hi_d} <= {TARGET_LOW_PEAK_VS_CKPT:.2f} x bf16 checkpoint "
                              f"({size} MiB)",
                    "value": None if r is None else f"{r:.3f} x ({low['peak_mb'][hi_d]:.0f} MiB)",
                    "pass": None if r is None else r <= TARGET_LOW_PEAK_VS_CKPT})
    mp, hp = med.get("peak_mb", {}), high.get("peak_mb", {})
    common = [d for d in depths if d in mp and d in hp]
    targets.append({"target": "medium: peak <= high's peak (every depth)",
                    "value": ", ".join(f"d{d}: {mp[d]:.0f} vs {hp[d]:.0f}" for d in common) or None,
                    "pass": None if not common else all(mp[d] <= hp[d] for d in common)})
    wr = summary["low_wall_over_high"]
    targets.append({"target": f"low: wall <= {TARGET_LOW_WALL_VS_HIGH:.2f} x high's wall (every depth)",
                    "value": ", ".join(f"d{d}: {v:.2f}x" for d, v in sorted(wr.items())) or None,
                    "pass": None if not wr else all(v <= TARGET_LOW_WALL_VS_HIGH for v in wr.values())})
    return targets


def fmt(v: Optional[float], spec: str = ".0f", suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def markdown(data: Dict[str, Any]) -> str:
    """The Markdown report: setup, the peak-RSS table, per-mode metrics, targets, per-run details."""
    a = data["args"]
    depths, modes = a["depths"], data["modes_measured"]
    ckpts = {int(k): v for k, v in data["checkpoints"].items()}
    base = data["baseline"]["peak_rss_mb"]
    summary = data["summary"]
    runs = data["runs"]
    by = {(r["mode"], r["depth"]): r for r in runs}
    lines = [
        "# qrunner: peak RSS vs model depth",
        "",
        f"- command: `{data['command']}`",
        f"- model: random-weight {a.get('arch', 'llama')}"
        + (f" with {a['shape']}'s shape (heads {a.get('heads')}, KV heads {a.get('kv_heads')})" if a.get("shape") else "")
        + f", hidden {a['hidden']}, intermediate {a['intermediate']}, vocab {a['vocab']}"
        + (f" ({MOE_EXPERTS} experts of width {a['intermediate']} a layer, {MOE_EXPERTS_PER_TOKEN} a token, stored "
           "one tensor per expert)" if a.get("arch") == "qwen3_moe" else "") + ", "
        f"bf16 safetensors (shards <= 1 GB); depths {', '.join(map(str, depths))}",
        f"- qrunner: W4A16 group 128, quant.iters={a['iters']}, data.nsamples={a['nsamples']}, "
        f"data.seqlen={a['seqlen']}, eval on (eval.nsamples={a['eval_nsamples']}, eval.seqlen={a['eval_seqlen']})"
        + (f", {' '.join(a.get('set') or [])}" if a.get("set") else ""),
        f"- peak RSS: each run's child process, {data['rss_method']}; MiB",
        f"- baseline (`python -c \"{BASELINE_CODE}\"`): **{base:.0f} MiB**",
        f"- machine: {data['machine']}; finished {data['finished_at']}",
        "",
        "## Peak RSS (MiB) per depth",
        "",
        "| depth | params (M) | bf16 checkpoint | " + " | ".join(f"{m}" for m in modes) + " | "
        + " | ".join(f"{m} − baseline" for m in modes) + " |",
        "|---:|---:|---:|" + "---:|" * (2 * len(modes)),
    ]
    for d in depths:
        c = ckpts.get(d, {})
        row = [str(d), fmt(c.get("params_m"), ".1f"), fmt(c.get("size_mb"))]
        for m in modes:
            r = by.get((m, d))
            row.append("crashed" if r and r["returncode"] else fmt(r and r.get("peak_rss_mb")))
        for m in modes:
            row.append(fmt(summary["per_mode"].get(m, {}).get("above_baseline_mb", {}).get(d)))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Per mode", "",
              f"| mode | growth of (peak − baseline), d{summary['smallest_depth']}→d{summary['largest_depth']} | "
              f"peak / checkpoint at d{summary['largest_depth']} | (peak − baseline) / checkpoint at "
              f"d{summary['largest_depth']} |", "|---|---:|---:|---:|"]
    for m in modes:
        e = summary["per_mode"].get(m, {})
        lines.append(f"| {m} | {fmt(e.get('growth_above_baseline_pct'), '+.1f', ' %')} | "
                     f"{fmt(e.get('peak_vs_ckpt_at_max_depth'), '.3f')} | "
                     f"{fmt(e.get('above_baseline_vs_ckpt_at_max_depth'), '.3f')} |")
    lines += ["", "## Wall time (s) per run", "",
              "| depth | " + " | ".join(modes) + " | low / high |", "|---:|" + "---:|" * (len(modes) + 1)]
    for d in depths:
        row = [str(d)] + [fmt(by[(m, d)]["wall_s"], ".1f") if (m, d) in by else "—" for m in modes]
        row.append(fmt(summary["low_wall_over_high"].get(d), ".2f", "x"))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    for t in data["targets"]:
        lines.append(f"| {t['target']} | {t['value'] or '—'} | **{verdict(t['pass'])}** |")
    stage_names: List[str] = []
    for r in runs:
        for s in (r.get("stages") or {}):
            if s not in stage_names:
                stage_names.append(s)
    if stage_names:
        lines += ["", "## Per-stage seconds / peak RSS (MiB) from each run's report.json", "",
                  "| mode | depth | wall (s) | " + " | ".join(stage_names) + " | report peak |",
                  "|---|---:|---:|" + "---:|" * (len(stage_names) + 1)]
        for r in runs:
            st = r.get("stages") or {}
            cells = [f"{st[s]['seconds']:.1f} s / {st[s]['peak_rss_mb']:.0f}" if s in st else "—"
                     for s in stage_names]
            lines.append(f"| {r['mode']} | {r['depth']} | {r['wall_s']:.1f} | " + " | ".join(cells)
                         + f" | {fmt(r.get('report_peak_rss_mb'))} |")
    checks = [r for r in runs if r.get("export_check")]
    if checks:
        lines += ["", "## Export against the source (dequantized AutoRound layers vs the bf16 weights)", "",
                  "| run | layer | shape | max error (quantization steps) | relative RMS error |",
                  "|---|---|---|---:|---:|"]
        for r in checks:
            for x in r["export_check"]["layers"]:
                lines.append(f"| {r['mode']} d{r['depth']} | {x['layer']} | {x['shape'][0]}x{x['shape'][1]} | "
                             f"{x['max_error_in_steps']:.3f} | {x['rel_rms_error']:.4f} |")
    predicted = [r for r in runs if ((r.get("memory") or {}).get("predicted_peak_mb") or {}).get(r["mode"])]
    if predicted:
        lines += ["", "## memory=auto's predicted peaks vs measured (MiB)", "",
                  "| run | predicted high | predicted medium | predicted low | measured | error of the run's mode |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in predicted:
            pm = r["memory"]["predicted_peak_mb"]
            off = 100.0 * (pm[r["mode"]] - r["peak_rss_mb"]) / r["peak_rss_mb"] if r.get("peak_rss_mb") else None
            lines.append(f"| {r['mode']} d{r['depth']} | {fmt(pm.get('high'))} | {fmt(pm.get('medium'))} | "
                         f"{fmt(pm.get('low'))} | {fmt(r.get('peak_rss_mb'))} | {fmt(off, '+.1f', ' %')} |")
    failed = [r for r in runs if r["returncode"]]
    if failed:
        lines += ["", "## Failed runs", ""]
        for r in failed:
            lines += [f"### {r['mode']} depth {r['depth']} (exit {r['returncode']})", "", f"`{r['cmd']}`", "",
                      "```", *r["output_head"], "...", *r["output_tail"], "```", ""]
    if data.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    lines += ["", "![peak RSS vs depth](ram_vs_depth.png)"]
    return "\n".join(lines) + "\n"


def plot(data: Dict[str, Any], file: Path) -> None:
    """Peak RSS vs depth: one line per mode, the bf16 checkpoint size, 0.30 x that size, the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    depths = data["args"]["depths"]
    ckpts = {int(k): v for k, v in data["checkpoints"].items()}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = {"high": "o", "medium": "s", "low": "^", "autoround": "D"}
    for mode in data["modes_measured"]:
        p = {int(k): v for k, v in data["summary"]["per_mode"].get(mode, {}).get("peak_mb", {}).items()}
        xs = [d for d in depths if d in p]
        if xs:
            label = "auto-round (low_cpu_mem_usage)" if mode == "autoround" else f"memory={mode}"
            ax.plot(xs, [p[d] for d in xs], marker=markers.get(mode, "x"), label=label)
    xs = [d for d in depths if d in ckpts]
    if xs:
        ax.plot(xs, [ckpts[d]["size_mb"] for d in xs], color="black", ls="--", label="bf16 checkpoint size")
        ax.plot(xs, [TARGET_LOW_PEAK_VS_CKPT * ckpts[d]["size_mb"] for d in xs], color="tab:olive", ls=":",
                label=f"{TARGET_LOW_PEAK_VS_CKPT:.2f} x checkpoint")
    ax.axhline(data["baseline"]["peak_rss_mb"], color="tab:gray", ls="-.", lw=1,
               label="baseline (imports only)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticklabels([str(d) for d in depths])
    ax.set_xlabel("decoder layers (depth)")
    ax.set_ylabel("peak RSS (MiB)")
    a = data["args"]
    ax.set_title(f"qrunner peak RSS vs depth (hidden {a['hidden']}, inter {a['intermediate']}, vocab {a['vocab']})",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def write_outputs(data: Dict[str, Any], out: Path) -> None:
    """Recompute the summary and targets, then write the JSON, the Markdown and the plot."""
    ckpts = {int(k): v for k, v in data["checkpoints"].items()}
    data["summary"] = summarize(data["runs"], data["baseline"]["peak_rss_mb"], ckpts, data["modes_measured"],
                                data["args"]["depths"])
    data["targets"] = (shape_targets(data) if data["args"].get("shape")
                       else evaluate_targets(data["summary"], ckpts, data["args"]["depths"]))
    data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ram_vs_depth.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / "ram_vs_depth.md").write_text(markdown(data))
    plot(data, out / "ram_vs_depth.png")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def int_list(text: str) -> List[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES),
                   help="a real model's sizes (sets --arch, --hidden, --intermediate, --vocab, the heads and, "
                        "unless given, --depths)")
    p.add_argument("--heads", type=int, help="attention heads (default hidden / 128)")
    p.add_argument("--kv-heads", type=int, help="KV heads (default a quarter of the heads)")
    p.add_argument("--arch", choices=sorted(ARCHS), default="llama",
                   help="gemma4: per-layer inputs + KV sharing (run with family=gemma4); qwen3_moe: every layer a "
                        "mixture of 32 experts, 4 a token, stored one tensor per expert")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int,
                   help="MLP width (default 5632; for qwen3_moe each expert's width, default 768)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--depths", type=int_list, help="comma-separated (default 4,8,16,32, or the --shape's)")
    p.add_argument("--modes", type=lambda s: [m for m in s.split(",") if m], default=["high", "medium", "low"],
                   help="comma-separated qrunner memory modes")
    p.add_argument("--iters", type=int, default=2, help="quant.iters")
    p.add_argument("--nsamples", type=int, default=16, help="data.nsamples")
    p.add_argument("--seqlen", type=int, default=256, help="data.seqlen")
    p.add_argument("--eval-nsamples", type=int, default=4, help="eval.nsamples")
    p.add_argument("--eval-seqlen", type=int, default=256, help="eval.seqlen")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra qrunner override for every run (repeatable), e.g. model.compute_dtype=bfloat16")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--models-dir", default="/tmp/qrunner-bench-models")
    p.add_argument("--work-dir", default="/tmp/qrunner-bench-runs", help="run roots and per-run logs")
    p.add_argument("--with-autoround", action="store_true",
                   help="also run auto-round (low_cpu_mem_usage=True) on the same checkpoints")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's output folder")
    p.add_argument("--repredict", action="store_true",
                   help="recompute memory=auto's predictions of the runs in --out's ram_vs_depth.json with the current "
                        "model (nothing is run) and rewrite the results")
    p.add_argument("--autoround-child", metavar="CKPT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repredict:
        return args
    if args.shape:
        shape = SHAPES[args.shape]
        for key in ("arch", "hidden", "intermediate", "vocab", "heads", "kv_heads"):
            setattr(args, key, shape[key])
        args.depths = args.depths or shape["depths"]
    args.depths = args.depths or [4, 8, 16, 32]
    args.intermediate = args.intermediate or (768 if args.arch == "qwen3_moe" else 5632)
    return args


def machine() -> str:
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        mem = "RAM unknown"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {mem}, Python {platform.python_version()}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.autoround_child:
        autoround_child(args.autoround_child, args.out, args.iters, args.nsamples, args.seqlen)
        return 0
    out, work, models = Path(args.out), Path(args.work_dir), Path(args.models_dir)
    if args.repredict:
        sys.path.insert(0, str(REPO))
        data = json.loads((out / "ram_vs_depth.json").read_text())
        repredict(data)
        write_outputs(data, out)
        for t in data["targets"]:
            print(f"[bench] {verdict(t['pass'])}: {t['target']} ({t['value']})")
        return 0
    work.mkdir(parents=True, exist_ok=True)
    modes = list(args.modes)
    notes: List[str] = []
    if args.with_autoround:
        if autoround_available():
            modes.append("autoround")
        else:
            notes.append("--with-autoround given but auto_round is not importable: skipped")
    data: Dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(list(argv)),
        "args": {k: v for k, v in vars(args).items() if k != "autoround_child"},
        "modes_measured": modes, "machine": machine(), "rss_method": "",
        "checkpoints": {}, "runs": [], "notes": notes}
    print(f"[bench] baseline: {BASELINE_CODE}", flush=True)
    data["baseline"] = measure_baseline(work, args.timeout)
    data["rss_method"] = data["baseline"]["rss_method"]
    print(f"[bench] baseline peak RSS {data['baseline']['peak_rss_mb']} MiB", flush=True)
    for depth in args.depths:
        t0 = time.monotonic()
        ckpt = build_checkpoint(models, args.hidden, args.intermediate, args.vocab, depth, arch=args.arch,
                                heads=args.heads, kv_heads=args.kv_heads)
        data["checkpoints"][depth] = checkpoint_info(ckpt)
        print(f"[bench] checkpoint d{depth}: {data['checkpoints'][depth]} ({time.monotonic() - t0:.1f} s)",
              flush=True)
        for mode in modes:
            print(f"[bench] run {mode} d{depth} ...", flush=True)
            run = run_autoround(ckpt, depth, args) if mode == "autoround" else run_qrunner(ckpt, mode, depth, args)
            data["runs"].append(run)
            print(f"[bench]   exit {run['returncode']}, peak {run['peak_rss_mb']} MiB, wall {run['wall_s']} s"
                  + (f"  (log: {run['log']})" if run["returncode"] else ""), flush=True)
            write_outputs(data, out)
    write_outputs(data, out)
    print(f"[bench] wrote {out / 'ram_vs_depth.json'}, {out / 'ram_vs_depth.md'}, {out / 'ram_vs_depth.png'}")
    for t in data["targets"]:
        print(f"[bench] {verdict(t['pass'])}: {t['target']} ({t['value']})")
    return 0 if all(r["returncode"] == 0 for r in data["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
