"""Tuning on a GPU against tuning on the CPU: `python benchmarks/device_compare.py` (on a machine with CUDA).

1. The bundled demo model, W4A16, `quant.iters` (default 200), memory=high and memory=low: device=cpu and
   device=cuda. Per run: quantize time, host peak RSS (the qrunner process's ru_maxrss, as `/usr/bin/time -v`
   reports it), peak VRAM (allocated / reserved), held-out perplexity; the GPU/CPU ratios.
2. A random 1B-class Llama of a few blocks (hidden 2048, MLP 5632, random weights built here) with device=cuda in
   memory=high and memory=low: host peak RSS and peak VRAM (no CPU run: it would take long).

Writes device_compare.json and device_compare.md into --out. gpu_check.sh runs it after the `cuda` tests.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ram_vs_depth import build_checkpoint, measure  # noqa: E402


def run(model: str, device: str, memory: str, root: Path, extra: List[str]) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "qrunner", f"device={device}", f"memory={memory}", f"run.root={root}",
           "run.show_progress=false", "run.on_oom=fail", *([f"model.path={model}"] if model else []), *extra]
    measured = measure(cmd, root / "qrunner.log", Path.cwd(), timeout=1800)
    row = {"device": device, "memory": memory, "returncode": measured["returncode"],
           "host_peak_rss_mb": measured["peak_rss_mb"], "wall_s": measured["wall_s"]}
    reports = list(root.glob("*/*/report.json"))
    if measured["returncode"] or not reports:
        row["error"] = "\n".join(measured["output_tail"])
        return row
    report = json.loads(reports[0].read_text())
    quantize = next(s for s in report["stages"] if s["name"] == "quantize")
    row.update(quantize_s=quantize["seconds"], peak_vram_mb=report.get("peak_vram_mb"),
               ppl=report["quality"].get("ppl_quantized"))
    return row


def markdown(result: Dict[str, Any]) -> str:
    lines = [f"# Tuning on the GPU vs the CPU ({result['settings']})", "",
             "| model | memory | device | quantize (s) | host peak RSS (MB) | peak VRAM alloc / reserved (MB) | "
             "perplexity |", "|---|---|---|---:|---:|---|---:|"]
    for name, rows in result["runs"].items():
        for r in rows:
            vram = r.get("peak_vram_mb") or {}
            lines.append(f"| {name} | {r['memory']} | {r['device']} | {r.get('quantize_s', 'failed')} | "
                         f"{r['host_peak_rss_mb']} | {vram.get('allocated_mb', '')} / {vram.get('reserved_mb', '')} | "
                         f"{r.get('ppl', '')} |")
    for memory, ratio in result.get("ratios", {}).items():
        lines.append(f"\nmemory={memory}: GPU/CPU quantize time x{ratio['time']:.3f}, host peak RSS "
                     f"x{ratio['rss']:.3f}, perplexity x{ratio['ppl']:.5f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=4, help="blocks of the random 1B-class Llama")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    opts = parser.parse_args()
    result: Dict[str, Any] = {"settings": f"W4A16, {opts.iters} iterations", "runs": {}}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="qrunner-device-") as tmp:
        work = Path(tmp)
        demo = []
        for memory in ("high", "low"):
            for device in ("cpu", "cuda"):
                demo.append(run("", device, memory, work / f"demo-{memory}-{device}", [f"quant.iters={opts.iters}"]))
        result["runs"]["demo"] = demo
        ok = {(r["memory"], r["device"]): r for r in demo if "quantize_s" in r}
        result["ratios"] = {m: {"time": ok[(m, "cuda")]["quantize_s"] / ok[(m, "cpu")]["quantize_s"],
                                "rss": ok[(m, "cuda")]["host_peak_rss_mb"] / ok[(m, "cpu")]["host_peak_rss_mb"],
                                "ppl": ok[(m, "cuda")]["ppl"] / ok[(m, "cpu")]["ppl"]}
                            for m in ("high", "low") if (m, "cpu") in ok and (m, "cuda") in ok}
        big = build_checkpoint(work / "models", 2048, 5632, 32000, opts.blocks)
        result["runs"]["llama-1b-class"] = [
            run(str(big), "cuda", memory, work / f"big-{memory}",
                [f"quant.iters={opts.iters}", "data.nsamples=128", "data.seqlen=512", "eval.nsamples=16",
                 "scheme.group_size=128"]) for memory in ("high", "low")]
    result["wall_s"] = round(time.time() - started, 1)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "device_compare.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (opts.out / "device_compare.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
