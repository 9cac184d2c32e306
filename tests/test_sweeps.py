"""Sweeps (`qrunner -m`): the jobs share the stages they have in common (a scheme sweep loads, tokenizes and
captures once), whatever launches them (in turn, joblib workers side by side, submitit processes), and their
exports are the ones the same runs give one by one; a killed sweep finishes when rerun, redoing nothing finished;
an Optuna search ends with its best parameters in sweep.md."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import REPO, run_cli, run_inprocess, tree_bytes
from qrunner.pipeline.lock import StageLock
from qrunner.sweep_job import objective_value

SMALL = ["data.nsamples=8", "data.seqlen=64", "eval.nsamples=4", "eval.seqlen=64"]  # the bundled demo model
GRID = ["scheme=w4a16,w8a16", "quant.iters=2,4"]
JOBS = [["scheme=w4a16", "quant.iters=2"], ["scheme=w4a16", "quant.iters=4"],
        ["scheme=w8a16", "quant.iters=2"], ["scheme=w8a16", "quant.iters=4"]]


def sweep_rows(root: Path) -> Dict[str, dict]:
    """The sweep's rows by their swept overrides ("scheme=w4a16 quant.iters=2")."""
    rows = json.loads((root / "multirun" / "sweep.json").read_text())["jobs"]
    return {" ".join(o for o in r["overrides"] if o.startswith(("scheme=", "quant.iters="))): r for r in rows}


def committed(root: Path, stage: str) -> List[float]:
    """When each run under `root` computed its committed `stage` (a result taken from another run keeps the time
    it was computed)."""
    return [json.loads(m.read_text())["started_at"] for m in sorted(root.glob(f"demo/*/stages/{stage}/manifest.json"))]


def exports(root: Path) -> Dict[str, Dict[str, bytes]]:
    return {key: tree_bytes(Path(row["exports"]["auto_round"])) for key, row in sweep_rows(root).items()}


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("basic")
    res = run_cli(["-m", f"run.root={root}", *SMALL, *GRID])
    assert res.returncode == 0, res.stderr[-3000:]
    return root


def test_a_scheme_sweep_captures_once_and_exports_what_single_runs_export(basic_sweep, tmp_path):
    rows = sweep_rows(basic_sweep)
    assert sorted(rows) == sorted(" ".join(j) for j in JOBS)
    assert all(r["status"] == "done" for r in rows.values())
    # four run directories, one computation of load, data and capture: the others took it
    for stage in ("load", "data", "capture"):
        times = committed(basic_sweep, stage)
        assert len(times) == 4 and len(set(times)) == 1, (stage, times)
    assert len(set(committed(basic_sweep, "quantize"))) == 4
    assert sum("capture" in r["reused"] for r in rows.values()) == 3
    md = (basic_sweep / "multirun" / "sweep.md").read_text()
    assert md.count("\n| ") == 4 + 1 and "Every job: " in md
    # the same four runs one by one give byte-identical checkpoints
    singles = tmp_path / "singles"
    for job in JOBS:  # in this process: the same pipeline as `qrunner ...`, without a process start per run
        run_inprocess([f"run.root={singles}", *SMALL, *job])
    swept = exports(basic_sweep)
    for key, row in rows.items():  # a run's directory is named by its config: the single run's has the same name
        single = singles / "demo" / Path(row["run_dir"]).name / "model"
        assert single.is_dir() and tree_bytes(single) == swept[key], key
    assert len(list(singles.glob("demo/*/model"))) == 4
    w4, w8 = rows["scheme=w4a16 quant.iters=2"], rows["scheme=w8a16 quant.iters=2"]
    assert w4["export_bytes"] < w8["export_bytes"] and w4["bits_per_weight"] < w8["bits_per_weight"]


@pytest.mark.parametrize("launcher,grid", [
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], GRID),
    # submitit starts a process per job before qrunner's own: half the grid keeps the suite's time in bounds
    (["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"], ["scheme=w4a16,w8a16", "quant.iters=2"])],
    ids=["joblib", "submitit_local"])
def test_launched_jobs_share_stages_through_the_lock_and_export_the_same(launcher, grid, basic_sweep, tmp_path):
    res = run_cli(["-m", f"run.root={tmp_path}", *SMALL, *grid, *launcher])
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = len(sweep_rows(tmp_path))
    assert jobs == (4 if grid is GRID else 2)
    for stage in ("data", "capture"):  # jobs started side by side: one computed, the others waited and took it
        times = committed(tmp_path, stage)
        assert len(times) == jobs and len(set(times)) == 1, (stage, times)
    swept, basic = exports(tmp_path), exports(basic_sweep)
    assert swept == {key: basic[key] for key in swept}
    assert (tmp_path / "multirun" / "sweep.md").read_text().count("\n| ") == jobs + 1


def test_a_killed_sweep_finishes_when_rerun_without_redoing_finished_stages(tmp_path):
    grid = ["scheme=w4a16,w8a16", "quant.iters=4"]
    args = [sys.executable, "-m", "qrunner", "-m", f"run.root={tmp_path}", *SMALL, *grid, "run.show_progress=false"]
    proc = subprocess.Popen(args, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("demo/*/stages/evaluate/manifest.json")):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep, the job's supervisor and the job
    proc.wait()
    before = {str(m): json.loads(m.read_text())["started_at"] for m in tmp_path.glob("demo/*/stages/*/manifest.json")}
    assert len(list(tmp_path.glob("demo/*/stages/evaluate/manifest.json"))) == 1  # the second job never finished
    res = run_cli(args[3:-1])
    assert res.returncode == 0, res.stderr[-3000:]
    after = {str(m): json.loads(m.read_text())["started_at"] for m in tmp_path.glob("demo/*/stages/*/manifest.json")}
    assert all(after[m] == t for m, t in before.items())  # nothing finished was computed again
    rows = sweep_rows(tmp_path)
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows.values())
    first = rows["scheme=w4a16 quant.iters=4"]
    assert str(Path(first["run_dir"]) / "stages" / "evaluate" / "manifest.json") in before
    assert {"load", "data", "capture", "quantize", "export", "evaluate"} == set(first["reused"])
    assert len(after) == 12 and len(set(committed(tmp_path, "capture"))) == 1


def test_an_optuna_search_ends_with_its_best_parameters_in_the_sweep_report(tmp_path):
    res = run_cli(["-m", f"run.root={tmp_path}", *SMALL, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
                   "hydra.sweeper.sampler.seed=3", "quant.iters=choice(0,4)", "quant.lr=interval(0.002,0.02)"])
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = json.loads((tmp_path / "multirun" / "sweep.json").read_text())
    rows = sweep["jobs"]
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows)
    best = min(rows, key=lambda r: r["ppl_quantized"])
    found = sweep["search"]
    assert found["best_value"] == pytest.approx(best["ppl_quantized"])
    assert f"quant.iters={found['best_params']['quant.iters']}" in best["overrides"]
    md = (tmp_path / "multirun" / "sweep.md").read_text()
    assert "## Best parameters (optuna)" in md and f"`quant.lr={found['best_params']['quant.lr']}`" in md
    assert len(set(committed(tmp_path, "capture"))) == 1  # the trials share the calibration inputs


def test_the_objective_is_the_quality_loss_or_that_and_the_size():
    text = {"status": "done", "ppl_quantized": 12.5, "export_bytes": 1000}
    assert objective_value(text, "quality") == 12.5
    assert objective_value(text, "quality_and_size") == [12.5, 1000.0]
    assert objective_value({"status": "done", "ppl_quantized": None, "latent_mse": 0.25}, "quality") == 0.25
    assert objective_value({"status": "failed", "error": "x"}, "quality") is None


def test_a_second_job_waits_for_the_stage_the_first_computes(tmp_path):
    first = StageLock(tmp_path, "capture", "f" * 64, tmp_path / "run-a")
    first.acquire(lambda holder: pytest.fail("nobody holds it yet"))
    waited: List[str] = []
    second = StageLock(tmp_path, "capture", "f" * 64, tmp_path / "run-b")
    thread = threading.Thread(target=second.acquire, args=(waited.append,))
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive() and waited == [f"pid {os.getpid()} ({tmp_path / 'run-a'})"]
    first.release()
    thread.join(5)
    assert not thread.is_alive()
    other = StageLock(tmp_path, "capture", "e" * 64, tmp_path / "run-c")  # another result: no wait
    other.acquire(lambda holder: pytest.fail("a different fingerprint must not wait"))
    other.release()
    second.release()
