"""Faults never lose or corrupt finished work: kills anywhere, out-of-memory, full disks, damaged artifacts,
concurrent runs, config drift. Faults are injected with test-only hooks (QRUNNER_FAULT), never by timing."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, run_inprocess, stage_status, tiny_overrides, tree_bytes
from qrunner.errors import UserError
from qrunner.pipeline.lock import RunLock

ITERS = "quant.iters=4"


def _args(model, root, *extra):
    return tiny_overrides(model, root, ITERS, *extra)


def _run_dir(root: Path) -> Path:
    (run_dir,) = [p for p in (root / "demo").iterdir() if p.is_dir()]
    return run_dir


@pytest.fixture(scope="module")
def clean_export(tiny_llama, tmp_path_factory):
    report = run_inprocess(_args(tiny_llama, tmp_path_factory.mktemp("clean")))
    return tree_bytes(Path(report["export_dir"]))


# every stage boundary, inside a block's tuning, and in the middle of writing an artifact; the default suite
# runs one of each kind (inside tuning, after a block, before a stage publishes, mid-export), the rest with
# `-m slow`
_SLOW = pytest.mark.slow
FAULTS = [
    pytest.param("load.committed", marks=_SLOW), pytest.param("data.before_publish", marks=_SLOW),
    pytest.param("capture.committed", marks=_SLOW), "quantize.tuning:5",
    pytest.param("quantize.unit_written:1", marks=_SLOW), "quantize.block_committed:2", "quantize.before_publish",
    "export.shards_written", pytest.param("export.committed", marks=_SLOW),
    pytest.param("evaluate.before_publish", marks=_SLOW),
]


@pytest.mark.parametrize("fault", FAULTS)
def test_sigkill_anywhere_then_supervised_restart_gives_identical_export(fault, tiny_llama, tmp_path, clean_export):
    """The child is SIGKILLed at the fault; the supervisor restarts it one mode lower, resuming."""
    res = run_cli(_args(tiny_llama, tmp_path, "memory=high"), env={"QRUNNER_FAULT": fault})
    assert res.returncode == 0, res.stderr
    assert "killed (SIGKILL, as by the OOM killer) in memory=high" in res.stderr
    run_dir = _run_dir(tmp_path)
    assert tree_bytes(run_dir / "model") == clean_export
    report = json.loads((run_dir / "report.json").read_text())
    assert report["memory"]["mode"] == "medium"
    assert [r["restart_mode"] for r in report["restarts"]] == ["medium"]
    assert "restarted after killed" in (run_dir / "report.md").read_text()


def test_memory_error_downgrades_until_it_fits_and_the_report_shows_it(tiny_llama, tmp_path, clean_export):
    res = run_cli(_args(tiny_llama, tmp_path, "memory=high"), env={"QRUNNER_FAULT": "quantize.block_committed:1:memory"})
    assert res.returncode == 0, res.stderr
    run_dir = _run_dir(tmp_path)
    report = json.loads((run_dir / "report.json").read_text())
    (restart,) = report["restarts"]
    assert restart["cause"] == "out of memory" and restart["where"] == "stage quantize, block 2/3"
    assert report["memory"]["mode"] == "medium"
    assert "resuming at block 3/3" in res.stderr  # blocks 1-2 were committed before the failure
    assert tree_bytes(run_dir / "model") == clean_export
    assert "out of memory in stage quantize" in (run_dir / "run.log").read_text()


def test_out_of_memory_in_low_stops_with_where_and_what_to_try(tiny_llama, tmp_path):
    res = run_cli(_args(tiny_llama, tmp_path, "memory=low"), env={"QRUNNER_FAULT": "capture.before_publish:0:memory"})
    assert res.returncode == 75
    assert "memory=low at stage capture" in res.stderr and "lower data.nsamples" in res.stderr
    assert "Resume with: qrunner " in res.stderr
    assert not (_run_dir(tmp_path) / "stages" / "capture").exists()


def test_on_oom_fail_passes_the_kill_on(tiny_llama, tmp_path):
    res = run_cli(_args(tiny_llama, tmp_path, "run.on_oom=fail"), env={"QRUNNER_FAULT": "quantize.block_committed"})
    assert res.returncode == -signal.SIGKILL
    last = (_run_dir(tmp_path) / "run.log").read_text().strip().splitlines()[-1]  # the log survived the kill
    assert "quantize: block 1/3 model.layers.0 committed" in last


def test_gpu_out_of_memory_in_a_block_retries_with_a_smaller_micro_batch(tiny_llama, tmp_path):
    report = run_inprocess(_args(tiny_llama, tmp_path, "quant.batch_size=4"))
    import os

    os.environ["QRUNNER_FAULT"] = "quantize.tuning:2:oom"
    try:
        from qrunner.pipeline import faults

        faults._hits.clear()
        retried = run_inprocess(_args(tiny_llama, tmp_path / "retried", "quant.batch_size=4"))
    finally:
        del os.environ["QRUNNER_FAULT"]
    info = json.loads((Path(retried["run_dir"]) / "stages/quantize/units/block_0000/unit.json").read_text())
    assert info["oom_retries"] == [{"micro_batch": 4, "retry_micro_batch": 2}]
    # the retried block saw the same effective batch and the same mini-batches
    assert retried["block_loss"] == pytest.approx(report["block_loss"], rel=2e-2)


def test_disk_space_is_checked_before_a_stage_writes(tiny_llama, tmp_path, monkeypatch):
    import qrunner.pipeline.runner as runner

    real = shutil.disk_usage
    monkeypatch.setattr(runner.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    with pytest.raises(UserError, match=r"stage capture needs about .* GB of disk .* only 0.00 GB are free"):
        run_inprocess(_args(tiny_llama, tmp_path))
    stages = _run_dir(tmp_path) / "stages"
    assert sorted(p.name for p in stages.iterdir()) == ["data", "load"]  # tiny stages fit; capture never started


def test_export_disk_estimate_covers_the_export_and_counts_packed_weights(tiny_llama, tmp_path):
    """The export's disk check: at least what the export writes, and for W4 well under the source's size (a 14B
    model's 10 GB export was refused on a disk with 9 GB free when the source's 28 GB was the estimate)."""
    import logging

    from conftest import compose
    from qrunner.models.registry import get_family
    from qrunner.session import ModelSession
    from qrunner.stages.export import ExportStage

    args = _args(tiny_llama, tmp_path, "quant.iters=0")
    report = run_inprocess(args)
    cfg, _ = compose(args)
    session = ModelSession(cfg, get_family(cfg.family.name), logging.getLogger("qrunner"))
    estimate = ExportStage().estimate_bytes(cfg, session) - (16 << 20)
    written = sum(f.stat().st_size for f in Path(report["export_dir"]).rglob("*") if f.is_file())
    assert written <= estimate + (16 << 20)
    assert estimate < 0.7 * session.checkpoint_bytes()


def test_truncated_artifact_is_detected_named_and_its_stage_rerun(tiny_llama, tmp_path, clean_export):
    first = run_inprocess(_args(tiny_llama, tmp_path))
    run_dir = Path(first["run_dir"])
    shard = run_dir / "stages" / "quantize" / "units" / "block_0001" / "quantized.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    res = run_cli(_args(tiny_llama, tmp_path))
    assert res.returncode == 0, res.stderr
    assert "block_0001/quantized.safetensors" in res.stderr and "expected" in res.stderr
    assert "stage quantize  running: damaged artifact" in res.stderr
    assert tree_bytes(run_dir / "model") == clean_export


def test_damaged_block_checkpoint_in_a_partial_stage_restarts_quantize(tiny_llama, tmp_path, clean_export):
    args = _args(tiny_llama, tmp_path, "run.on_oom=fail")
    killed = run_cli(args, env={"QRUNNER_FAULT": "quantize.block_committed:1"})
    assert killed.returncode == -signal.SIGKILL
    unit = _run_dir(tmp_path) / "stages" / "quantize.partial" / "units" / "block_0000" / "quantized.safetensors"
    unit.write_bytes(b"x" + unit.read_bytes()[1:])  # same size, changed content
    res = run_cli(args)
    assert res.returncode == 0, res.stderr
    assert "block_0000/quantized.safetensors: content changed" in res.stderr
    assert "quantization starts again at block 1" in res.stderr
    assert tree_bytes(_run_dir(tmp_path) / "model") == clean_export


def test_a_second_process_on_the_same_run_directory_exits_and_writes_nothing(tiny_llama, tmp_path):
    first = run_inprocess(_args(tiny_llama, tmp_path))
    run_dir = Path(first["run_dir"])
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    with RunLock(run_dir):  # another qrunner holds the run
        res = run_cli(_args(tiny_llama, tmp_path, "run.fresh=true"))
    assert res.returncode == 2
    assert f"run directory {run_dir} is in use by pid" in res.stderr and "Traceback" not in res.stderr
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_config_drift_names_the_changed_key_and_the_stages_it_reruns(tiny_llama, tmp_path):
    run_inprocess(_args(tiny_llama, tmp_path, "run.dir=" + str(tmp_path / "fixed")))
    res = run_cli(_args(tiny_llama, tmp_path, "run.dir=" + str(tmp_path / "fixed"), "quant.iters=3"))
    assert res.returncode == 0, res.stderr
    assert "resume: reusing load, data, capture; running quantize, export, evaluate" in res.stderr
    assert "stage quantize  running: settings changed (quant.iters: 4 -> 3)" in res.stderr
    assert "stage export    running: settings changed (quant.iters: 4 -> 3)" in res.stderr
    assert "stage evaluate  running: upstream quantize changed" in res.stderr
    report = json.loads((tmp_path / "fixed" / "report.json").read_text())
    assert stage_status(report)["capture"] == "reused"


def test_a_failing_stage_ends_its_message_with_the_resume_command(tiny_llama, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_llama, broken)
    (broken / "tokenizer.json").write_text("{not json")
    res = run_cli(_args(broken, tmp_path / "runs"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("(traceback in run.log") and last.endswith("Resume with: qrunner " + " ".join(
        _args(broken, tmp_path / "runs") + ["run.show_progress=false"]))


def test_sigterm_to_the_supervisor_stops_the_child_at_a_safe_point_and_the_rerun_resumes(tiny_llama, tmp_path):
    """SIGTERM to the `qrunner` process (the supervisor, as `timeout` or a scheduler sends it) reaches the child,
    which stops inside a block's tuning: exit 143, no process left, the lock free, where it stopped and the
    resume command said; the same command then resumes to the uninterrupted run's export, byte for byte."""
    import os
    import subprocess
    import sys
    import time

    import psutil

    from conftest import REPO

    args = tiny_overrides(tiny_llama, tmp_path / "stopped", "quant.iters=200", "memory=low", "run.show_progress=false")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        parent = subprocess.Popen([sys.executable, "-m", "qrunner", *args], cwd=REPO, stderr=err,
                                  stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            units = []
            while not units:  # the first block is committed: the run is inside the second one's tuning
                assert parent.poll() is None and time.monotonic() < deadline, log.read_text()
                units = [p for p in (tmp_path / "stopped").glob("demo/*/stages/quantize*/units/*")
                         if not p.name.startswith(".")]
                time.sleep(0.05)
            children = psutil.Process(parent.pid).children(recursive=True)
            assert children
            os.kill(parent.pid, signal.SIGTERM)
            code = parent.wait(timeout=60)
        finally:
            if parent.poll() is None:
                parent.kill()
    stderr = log.read_text()
    assert code == 128 + signal.SIGTERM, stderr
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive
    assert "stopped by SIGTERM at stage quantize, block" in stderr and "Resume with: qrunner" in stderr
    run_dir = _run_dir(tmp_path / "stopped")
    with RunLock(run_dir):  # free: taking it does not fail
        pass
    done = [p for p in (run_dir / "stages").glob("quantize*/units/*") if not p.name.startswith(".")]
    assert 1 <= len(done) < 3 and not (run_dir / "model").exists()

    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at block" in resumed.stderr
    clean = run_cli(tiny_overrides(tiny_llama, tmp_path / "clean", "quant.iters=200", "memory=low"))
    assert clean.returncode == 0, clean.stderr
    assert tree_bytes(run_dir / "model") == tree_bytes(_run_dir(tmp_path / "clean") / "model")


def test_a_supervisor_dying_with_its_child_leaves_no_temporary_folder(tmp_path):
    """A child killed by a signal other than the OOM killer's takes the supervisor with it (the same signal), and
    the supervisor's folder of status files goes first."""
    code = ("import signal\nfrom qrunner import supervise\n"
            "supervise._run_child = lambda cmd, env: (-signal.SIGTERM, None)\nsupervise.supervise(['recipe=x'])\n")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TMPDIR=str(tmp_path)), timeout=120)
    assert done.returncode == -signal.SIGTERM
    assert not list(tmp_path.glob("qrunner-supervisor-*"))
