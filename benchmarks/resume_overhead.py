"""What checkpointing costs, and what a kill costs: `python benchmarks/resume_overhead.py`.

1. Overhead: an uninterrupted run of the demo recipe; the time spent committing checkpoints (every
   block's quantized tensors and next inputs, written, fsynced and renamed into place, plus every stage's
   publication) as a share of the run's wall time. Target: at most 5 %.
2. Work redone: the same run killed (SIGKILL, test-only fault hook) in the middle of block k's tuning, then
   the same command again. Counted from the resumed run's log: the blocks it quantized beyond those that
   were not committed yet. Target: 0, i.e. only the block that was in flight is redone.

Writes resume_overhead.json and resume_overhead.md into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List


def run_qrunner(args: List[str], env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "qrunner", *args, "run.show_progress=false"], env=full_env,
                          capture_output=True, text=True)


def report_of(root: Path) -> Dict[str, Any]:
    (file,) = root.glob("**/report.json")
    return json.loads(file.read_text())


def overhead(common: List[str], root: Path) -> Dict[str, Any]:
    started = time.time()
    res = run_qrunner([*common, f"run.root={root}"])
    wall = time.time() - started
    if res.returncode:
        raise SystemExit(f"qrunner failed:\n{res.stderr[-3000:]}")
    report = report_of(root)
    quantize = next(s for s in report["stages"] if s["name"] == "quantize")
    units = quantize["metrics"]["checkpoint_seconds"]
    stages = sum(s.get("commit_seconds", 0.0) for s in report["stages"])
    return {"wall_seconds": round(wall, 2), "pipeline_seconds": round(report["wall_seconds"], 2),
            "block_checkpoint_seconds": units, "stage_commit_seconds": round(stages, 3),
            "overhead_share": round((units + stages) / report["wall_seconds"], 4),
            "blocks": quantize["metrics"]["blocks"]}


def redone_after_kill(common: List[str], root: Path, kill_block: int, iters: int) -> Dict[str, Any]:
    # the fault fires at tuning iteration iters//2 of block kill_block (hits count over all blocks)
    fault = f"quantize.tuning:{kill_block * iters + iters // 2}"
    args = [*common, f"run.root={root}", "run.on_oom=fail"]
    killed = run_qrunner(args, env={"QRUNNER_FAULT": fault})
    if killed.returncode != -signal.SIGKILL:
        raise SystemExit(f"the run was not killed as planned (rc {killed.returncode}):\n{killed.stderr[-3000:]}")
    committed = len(re.findall(r"quantize: block \d+/\d+ \S+ committed", killed.stderr))
    started = time.time()
    resumed = run_qrunner(args)
    if resumed.returncode:
        raise SystemExit(f"the resumed run failed:\n{resumed.stderr[-3000:]}")
    report = report_of(root)
    blocks = next(s for s in report["stages"] if s["name"] == "quantize")["metrics"]["blocks"]
    recomputed = len(re.findall(r"quantize: block \d+/\d+ \S+ committed", resumed.stderr))
    return {"killed_in_block": kill_block + 1, "blocks_committed_before_kill": committed,
            "blocks_quantized_after_resume": recomputed, "blocks_redone": recomputed - (blocks - committed),
            "resume_wall_seconds": round(time.time() - started, 2)}


def markdown(result: Dict[str, Any]) -> str:
    o, k = result["overhead"], result["kill"]
    ok_overhead = o["overhead_share"] <= 0.05
    ok_redone = k["blocks_redone"] == 0
    return "\n".join([
        f"# Resume overhead ({result['settings']})", "",
        "| measure | value | target |", "|---|---:|---|",
        f"| run wall time (pipeline) | {o['pipeline_seconds']:.1f} s | |",
        f"| block checkpoints (write + fsync + rename, {o['blocks']} blocks) | {o['block_checkpoint_seconds']:.3f} s | |",
        f"| stage publications | {o['stage_commit_seconds']:.3f} s | |",
        f"| checkpointing share of the run | {100 * o['overhead_share']:.2f} % | <= 5 % "
        f"{'PASS' if ok_overhead else 'FAIL'} |",
        f"| killed in block | {k['killed_in_block']} (after {k['blocks_committed_before_kill']} committed) | |",
        f"| blocks quantized by the resumed run | {k['blocks_quantized_after_resume']} | |",
        f"| committed blocks quantized again | {k['blocks_redone']} | 0: only the block in flight is redone "
        f"{'PASS' if ok_redone else 'FAIL'} |",
        f"| resumed run wall time | {k['resume_wall_seconds']:.1f} s | |", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50, help="tuning iterations per block")
    parser.add_argument("--kill-block", type=int, default=2, help="0-based block to kill in")
    parser.add_argument("--memory", default="high")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    opts = parser.parse_args()
    common = [f"quant.iters={opts.iters}", f"memory={opts.memory}", "eval.enabled=false"]
    with tempfile.TemporaryDirectory(prefix="qrunner-resume-bench-") as tmp:
        result = {"settings": f"demo recipe, iters {opts.iters}, memory={opts.memory}",
                  "overhead": overhead(common, Path(tmp) / "clean"),
                  "kill": redone_after_kill(common, Path(tmp) / "killed", opts.kill_block, opts.iters)}
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "resume_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (opts.out / "resume_overhead.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
