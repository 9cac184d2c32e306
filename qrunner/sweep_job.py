"""One job of a multirun (`qrunner -m ...`), in a process of its own under qrunner's supervisor.

Whatever launches the job (Hydra's basic launcher in the sweep's process, a joblib worker, a submitit process on
a SLURM node) calls the task function, which starts `python -m qrunner <the job's overrides>` supervised exactly
as a single run is: killed by the OOM killer, it restarts one memory mode lower and resumes from its committed
stages. The child writes its sweep row to the file named by RESULT_ENV; the launched function turns it into the
job's record (`job.json`, read by the sweep report) and returns the value a sweeper minimises. A job process is
also what makes each row's peak RSS the job's own.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

RESULT_ENV = "QRUNNER_SWEEP_RESULT"  # set for the child: where it writes its row
RESULT = ".result.json"


def in_sweep() -> bool:
    """Whether this process runs a job of a sweep."""
    return bool(os.environ.get(RESULT_ENV))


def write_result(row: Dict[str, Any]) -> None:
    """In the child: the row for the launching process, when it asked for one."""
    target = os.environ.get(RESULT_ENV)
    if target:
        tmp = Path(target).with_suffix(".tmp")
        tmp.write_text(json.dumps(row, default=str))
        tmp.replace(target)


def run_job_process(job_dir: Path, number: int, overrides: List[str], objective: str
                    ) -> Union[None, float, List[float]]:
    """Run one job of the sweep in a supervised child process; returns the job's objective (None if it failed)."""
    from qrunner.report.sweep import write_job_record
    from qrunner.pipeline.stopping import SIGNALS as STOP_SIGNALS
    from qrunner.supervise import EXIT_OOM, supervise

    job_dir.mkdir(parents=True, exist_ok=True)
    result = job_dir / RESULT
    result.unlink(missing_ok=True)
    code = supervise(list(overrides), {RESULT_ENV: str(result)}, relay_signals=False)
    if code - 128 in STOP_SIGNALS:  # the sweep was asked to stop: this job stopped at a safe point; no more jobs
        print(f"qrunner: sweep stopped by {signal.Signals(code - 128).name} in job {number}; rerun the same "
              "command to resume (finished jobs and committed stages are reused)", file=sys.stderr)
        sys.exit(code)
    row = _read(result)
    if row is None:
        why = (f"was killed by {signal.Signals(-code).name}" if code < 0 else
               "ran out of memory (in memory=low, or with run.on_oom=fail)" if code == EXIT_OOM else
               f"exited with code {code}")
        row = {"status": "failed", "error": f"the job's process {why} before it reported"}
    write_job_record(job_dir, number, overrides, row)
    result.unlink(missing_ok=True)
    return objective_value(row, objective)


def objective_value(row: Dict[str, Any], objective: str) -> Union[None, float, List[float]]:
    """What a sweeper (Optuna) minimises: the quality loss (perplexity; the latent MSE of a diffusion model), or
    that and the export's size in bytes (`run.objective=quality_and_size`, for a two-objective study)."""
    if row.get("status") != "done":
        return None
    loss = row.get("ppl_quantized") if row.get("ppl_quantized") is not None else row.get("latent_mse")
    if loss is None:
        return None
    if objective == "quality_and_size":
        return [float(loss), float(row.get("export_bytes") or 0)]
    return float(loss)


def _read(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
