"""Where the quantize stage's time goes, per phase of each block: the target forward, the tuning iterations
(row reads, forward with the loss, backward, sign steps, best-iteration snapshots, scale clamps), the
quantized-chain forward, the RTN-comparison forward, the loss figures and the commit's writes.

Runs ``python -m qrunner recipe=demo memory=high`` once per setting (``--settings demo,128``: the demo's 32
samples and 128 samples of 256 tokens), reads the ``seconds`` record of every block's ``unit.json`` and sums
them over the blocks.

    python benchmarks/tuning_breakdown.py                          # the current tuner, 200 iters
    python benchmarks/tuning_breakdown.py --variant checkpointed   # the tuner before issue 18, for comparison

``--variant checkpointed`` runs the same code with the fake-quantized linears as they were before issue 18:
autograd through ``quant_dequant`` under activation checkpointing (the layer's matmul runs again in the
backward pass), the best iteration re-quantized from its parameters instead of taken from the forward's
codes, glibc's heap trimmed after every big free inside the block's loops, and the RTN-comparison forward on
(``quant.rtn_loss=true``). It is applied by a ``sitecustomize``
module on the children's ``PYTHONPATH`` (``benchmarks/_checkpointed_tuning``), so qrunner's code is unchanged.

Writes ``tuning_breakdown[_<variant>].json`` and ``.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"demo": 32, "128": 128}
TUNING = ("read_rows", "forward", "backward", "sign_step", "snapshot", "clamp", "setup")
STAGE = ("target_forward", "quantized_forward", "rtn_codes", "rtn_forward", "losses", "commit_write")


def run_setting(name: str, nsamples: int, args: argparse.Namespace, root: Path) -> Dict[str, Any]:
    """One qrunner run; the phase seconds of each block from its unit.json."""
    overrides = ["recipe=demo", f"run.root={root}", "run.fresh=true", "run.show_progress=false", "memory=high",
                 f"quant.iters={args.iters}", f"data.nsamples={nsamples}", f"data.seqlen={args.seqlen}",
                 f"scheme={args.scheme}", "eval.nsamples=8", "model.compute_dtype=float32"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    overrides.append(f"quant.rtn_loss={str(args.variant == 'checkpointed').lower()}")  # the default / before
    if args.variant == "checkpointed":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "benchmarks" / "_checkpointed_tuning"),
                                                          env.get("PYTHONPATH")]))
    log = root / "qrunner.log"
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "qrunner", *overrides], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"tuning_breakdown: qrunner failed (exit {done.returncode}); see {log}:\n"
                         + log.read_text(errors="replace")[-3000:])
    report = json.loads(next(root.glob("demo/*/report.json")).read_text())
    stage = next(s for s in report["stages"] if s["name"] == "quantize")
    units = sorted((Path(report["run_dir"]) / "stages" / "quantize" / "units").glob("block_*/unit.json"))
    blocks = [json.loads(u.read_text()) for u in units]
    if args.variant == "checkpointed" and not all(b.get("tuning_variant") == "checkpointed" for b in blocks):
        raise SystemExit("tuning_breakdown: the checkpointed variant was not applied (sitecustomize not loaded)")
    return {"setting": name, "nsamples": nsamples, "quantize_seconds": stage["seconds"],
            "process_seconds": round(time.perf_counter() - started, 2), "blocks": len(blocks),
            "per_block": [b.get("seconds", {}) for b in blocks], "overrides": overrides,
            "load_avg_1min": os.getloadavg()[0]}


def totals(row: Dict[str, Any]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for block in row["per_block"]:
        for phase, seconds in block.items():
            out[phase] = out.get(phase, 0.0) + seconds
    return out


def markdown(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [f"# Quantize stage time by phase ({meta['variant']} tuner)", "",
             f"Model: bundled demo-llama ({rows[0]['blocks']} blocks), {meta['scheme']}, {meta['iters']} iters, "
             f"micro-batch 8, {meta['seqlen']}-token samples, memory=high, fp32, {meta['cpu_count']} CPUs, "
             f"torch {meta['torch_version']}. Seconds summed over the blocks; ms/iter = the tuning phase's time "
             "per iteration per block.", ""]
    header = "| phase | " + " | ".join(f"{r['setting']} ({r['nsamples']} samples) s | share | ms/iter" for r in rows) + " |"
    lines += [header, "|---|" + "---:|---:|---:|" * len(rows)]
    sums = [totals(r) for r in rows]
    phases = ["tune." + t for t in TUNING] + list(STAGE) + ["other"]
    for phase in phases:
        cells = []
        for r, t in zip(rows, sums):
            if phase == "other":
                seconds = max(r["quantize_seconds"] - sum(t.values()), 0.0)
            else:
                seconds = t.get(phase, 0.0)
            per_iter = (f"{1000 * seconds / (meta['iters'] * r['blocks']):.1f}"
                        if phase.startswith("tune.") and meta["iters"] else "")
            cells.append(f"{seconds:.2f} | {100 * seconds / r['quantize_seconds']:.1f}% | {per_iter}")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines.append("| **quantize stage** | " + " | ".join(f"**{r['quantize_seconds']:.2f}** | 100% | "
                                                      f"{1000 * r['quantize_seconds'] / (meta['iters'] * r['blocks']):.1f}"
                                                      for r in rows) + " |")
    lines += ["", "other: the stage's time outside the measured phases (opening rows, side values, unit bookkeeping, "
              "the commit's fsync and rename, freeing memory).",
              f"1-minute load average after each run: {', '.join(format(r['load_avg_1min'], '.1f') for r in rows)} "
              f"on {meta['cpu_count']} CPUs (above the CPU count, other processes competed and timings are noisy).",
              ""]
    return "\n".join(lines)


def main(argv: List[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="demo,128", help="comma-separated: demo (32 samples), 128")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--scheme", default="w4a16")
    p.add_argument("--variant", choices=("current", "checkpointed"), default="current")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--work", type=Path, help="keep the run directories here (default: a temp dir)")
    args = p.parse_args(argv)
    import torch

    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in names if s not in SETTINGS]
    if bad:
        raise SystemExit(f"tuning_breakdown: unknown setting(s) {bad}; choose from {sorted(SETTINGS)}")
    with tempfile.TemporaryDirectory(prefix="tuning_breakdown-") as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        rows = [run_setting(s, SETTINGS[s], args, work / s) for s in names]
    meta = {"variant": args.variant, "iters": args.iters, "seqlen": args.seqlen, "scheme": args.scheme,
            "cpu_count": os.cpu_count(), "torch_version": torch.__version__, "python": platform.python_version()}
    stem = "tuning_breakdown" + ("" if args.variant == "current" else f"_{args.variant}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"settings": meta, "results": rows}, indent=2) + "\n")
    table = markdown(rows, meta)
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
