"""What a sweep's shared stages save: `python benchmarks/sweep_demo.py`.

The same grid of jobs on the bundled demo model (default: scheme=w2a16,w3a16,w4a16 x quant.iters=0,50, the demo
recipe's 32 x 256 calibration tokens and full evaluation), three ways:

1. `shared`: `qrunner -m GRID` with Hydra's basic launcher (one job after another, stages shared under run.root);
2. `parallel`: the same under `hydra/launcher=joblib hydra.launcher.n_jobs=2` (two jobs at a time, each with
   OMP_NUM_THREADS=cores/2; jobs that need the same missing stage wait on its lock);
3. `isolated`: every job as its own `qrunner` command in a run.root of its own (nothing shared: what running the
   jobs from scratch costs).

Per way: wall time, how many times `load`, `data` and `capture` were computed (distinct computations among the
jobs' committed manifests), the seconds those stages ran, and whether every job's checkpoint is byte-identical to
the isolated run's. The `shared` sweep's sweep.md / sweep.png are copied to `<out>/sweep_demo/` (the README's
example). Writes sweep_demo.json and sweep_demo.md into --out.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

SHARED_STAGES = ("load", "data", "capture")


def qrunner(args: List[str], env: Dict[str, str] | None = None) -> float:
    started = time.time()
    res = subprocess.run([sys.executable, "-m", "qrunner", *args, "run.show_progress=false"],
                         env=dict(os.environ, **(env or {})), capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"qrunner {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return round(time.time() - started, 2)


def checkpoint_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            digest.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return digest.hexdigest()


def stage_costs(reports: List[Dict[str, Any]], manifests: List[Path]) -> Dict[str, Any]:
    """How many distinct computations of the shared stages the runs hold, and the seconds the jobs spent on them."""
    computed = {s: len({json.loads(m.read_text())["started_at"] for m in manifests if m.parent.name == s})
                for s in SHARED_STAGES}
    seconds = sum(st["seconds"] for r in reports for st in r["stages"]
                  if st["name"] in SHARED_STAGES and st["status"] == "ran")
    return {"computed": computed, "shared_stage_seconds": round(seconds, 2)}


def sweep(root: Path, grid: List[str], extra: List[str], env: Dict[str, str] | None = None) -> Dict[str, Any]:
    wall = qrunner(["-m", f"run.root={root}", *grid, *extra], env)
    rows = json.loads((root / "multirun" / "sweep.json").read_text())["jobs"]
    reports = [json.loads((Path(r["run_dir"]) / "report.json").read_text()) for r in rows]
    result = {"wall_seconds": wall, **stage_costs(reports, list(root.glob("*/*/stages/*/manifest.json")))}
    result["checkpoints"] = {Path(r["run_dir"]).name: checkpoint_digest(Path(r["exports"]["auto_round"]))
                             for r in rows}
    return result


def isolated(root: Path, grid: List[str]) -> Dict[str, Any]:
    """Every job of the grid alone, in its own run.root."""
    axes = [[f"{g.split('=')[0]}={v}" for v in g.split("=", 1)[1].split(",")] for g in grid]
    wall, reports, manifests = 0.0, [], []
    for i, job in enumerate(itertools.product(*axes)):
        wall += qrunner([f"run.root={root / str(i)}", *job])
        (report,) = (root / str(i)).glob("*/*/report.json")
        reports.append(json.loads(report.read_text()))
        manifests += list((root / str(i)).glob("*/*/stages/*/manifest.json"))
    result = {"wall_seconds": round(wall, 2), "jobs": len(reports), **stage_costs(reports, manifests)}
    result["checkpoints"] = {Path(r["run_dir"]).name: checkpoint_digest(Path(r["exports"]["auto_round"]))
                             for r in reports}
    return result


def markdown(result: Dict[str, Any]) -> str:
    base = result["isolated"]
    lines = [f"# Sweep: what shared stages save ({result['settings']})", "",
             "| way | wall time | vs isolated | load / data / capture computed | seconds in them | "
             "checkpoints = isolated runs' |", "|---|---:|---:|---|---:|---|"]
    for way in ("isolated", "shared", "parallel"):
        r = result[way]
        same = "yes" if r["checkpoints"] == base["checkpoints"] else "NO"
        c = r["computed"]
        lines.append(f"| {way} | {r['wall_seconds']:.1f} s | {r['wall_seconds'] / base['wall_seconds']:.2f} x | "
                     f"{c['load']} / {c['data']} / {c['capture']} | {r['shared_stage_seconds']:.1f} s | {same} |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="scheme=w2a16,w3a16,w4a16 quant.iters=0,50",
                        help="the swept overrides, space-separated")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    opts = parser.parse_args()
    grid = opts.grid.split()
    half = str(max(1, (os.cpu_count() or 2) // 2))
    with tempfile.TemporaryDirectory(prefix="qrunner-sweep-bench-") as tmp:
        work = Path(tmp)
        result: Dict[str, Any] = {"settings": f"demo recipe, {' x '.join(grid)}, {os.cpu_count()} cores"}
        result["isolated"] = isolated(work / "isolated", grid)
        result["shared"] = sweep(work / "shared", grid, [])
        result["parallel"] = sweep(work / "parallel", grid, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                   {"OMP_NUM_THREADS": half})
        example = opts.out / "sweep_demo"
        example.mkdir(parents=True, exist_ok=True)
        for name in ("sweep.md", "sweep.png", "sweep.json"):
            text = work / "shared" / "multirun" / name
            shutil.copyfile(text, example / name)
    # the example's paths name a temporary folder: keep them readable
    for name in ("sweep.md", "sweep.json"):
        file = example / name
        file.write_text(file.read_text().replace(str(work / "shared"), "outputs"))
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "sweep_demo.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (opts.out / "sweep_demo.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
