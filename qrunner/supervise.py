"""run.on_oom=downgrade: run the pipeline in a child process and restart it one memory mode lower when it
dies of memory.

The parent does no work of its own: it starts `python -m qrunner ARGS` with QRUNNER_CHILD set, and waits.
A child killed by SIGKILL (what the kernel's OOM killer sends) or exiting with EXIT_OOM (it caught a
`MemoryError` or a torch out-of-memory error) is restarted with `memory=` one step lower (high -> medium ->
low); the run directory is the same, so the restart resumes from the committed artifacts. The child's
last status record (QRUNNER_STATUS) says which mode it ran in and where it was. When `low` fails too, the
parent stops with a report of where and what to try. With run.on_oom=fail the child's exit is passed on.

SIGTERM, SIGINT and SIGHUP to the parent are passed on to the child, which stops at its next safe point
(pipeline/stopping.py); the parent then exits with 128 + the signal number and restarts nothing.

The child inherits THP_MEM_ALLOC_ENABLE=1 from the entry point (qrunner.memory.trim.prefer_huge_pages). No
MALLOC_MMAP_THRESHOLD_: fixed, it made the tuning loop 34 % slower here (every activation page faulted in anew);
qrunner calls `malloc_trim` after each block instead.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from qrunner.pipeline.faults import ENV as FAULT_ENV
from qrunner.pipeline.status import ENV as STATUS_ENV
from qrunner.pipeline.status import read_status
from qrunner.pipeline.stopping import SIGNALS as STOP_SIGNALS

CHILD_ENV = "QRUNNER_CHILD"
RESTARTS_ENV = "QRUNNER_RESTARTS"
ARGV_ENV = "QRUNNER_ARGV"
EXIT_OOM = 75  # the child ran out of memory (EX_TEMPFAIL)
LOWER = {"high": "medium", "medium": "low"}
_MULTIRUN_FLAGS = ("-m", "--multirun")
_INFO_FLAGS = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc")


def should_supervise(argv: List[str]) -> bool:
    """A single run is supervised here; a multirun is not: each of its jobs runs supervised (`sweep_job`)."""
    return not os.environ.get(CHILD_ENV) and not any(a.split("=")[0] in _INFO_FLAGS + _MULTIRUN_FLAGS for a in argv)


def resume_command() -> str:
    """The command that resumes this run: what the user typed (as the supervisor got it)."""
    return resume_command_for(json.loads(os.environ.get(ARGV_ENV, "null")) or sys.argv[1:])


def restarts() -> List[Dict[str, object]]:
    return json.loads(os.environ.get(RESTARTS_ENV, "[]"))


def _with_memory(argv: List[str], mode: Optional[str]) -> List[str]:
    if mode is None:
        return list(argv)
    return [a for a in argv if not a.lstrip("+~").startswith("memory=")] + [f"memory={mode}"]


def supervise(argv: List[str], extra_env: Optional[Dict[str, str]] = None, relay_signals: bool = True) -> int:
    """Run `qrunner ARGV` in a child until it succeeds, fails for another reason than memory, or fails in
    memory=low; returns its exit code. A child killed by another signal kills this process with it, unless
    `relay_signals` is False (a sweep's job: the code is returned, negative)."""
    with tempfile.TemporaryDirectory(prefix="qrunner-supervisor-") as tmp:
        code = _supervise(argv, Path(tmp), extra_env)
    if code < 0 and relay_signals:  # pass a deadly signal on as such (the temporary folder is gone by now)
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _supervise(argv: List[str], tmp: Path, extra_env: Optional[Dict[str, str]]) -> int:
    """The attempts of `supervise`, their status files in `tmp`; a child killed by a signal returns its negative
    code."""
    attempts: List[Dict[str, object]] = []
    mode: Optional[str] = None
    while True:
        status_file = Path(tmp) / f"status-{len(attempts)}.json"
        env = dict(os.environ, **{CHILD_ENV: "1", STATUS_ENV: str(status_file), ARGV_ENV: json.dumps(argv),
                                  RESTARTS_ENV: json.dumps(attempts)}, **(extra_env or {}))
        if attempts:
            env.pop(FAULT_ENV, None)  # an injected fault hits the first attempt only
        code, stop_signal = _run_child([sys.executable, "-m", "qrunner", *_with_memory(argv, mode)], env)
        if stop_signal is not None:  # asked to stop: the child stopped at a safe point (or died of it)
            return 128 + stop_signal
        if code == 0:
            return 0
        status = read_status(status_file)
        died_of_memory = code in (-signal.SIGKILL, EXIT_OOM)
        if not died_of_memory or status.get("on_oom") != "downgrade":
            return code
        where = describe_where(status)
        cause = "killed (SIGKILL, as by the OOM killer)" if code < 0 else "out of memory"
        current = status.get("mode") or "high"
        lower = LOWER.get(str(current))
        attempts.append({"mode": current, "cause": cause, "where": where, "peak_rss_mb": status.get("peak_rss_mb"),
                         "restart_mode": lower})
        if lower is None:
            print(f"qrunner: {cause} in memory={current} at {where} (peak RSS "
                  f"{status.get('peak_rss_mb', '?')} MB), the lowest memory mode; nothing finished is lost. "
                  "Try: lower data.nsamples, data.seqlen or quant.batch_size, close other programs, or use a "
                  f"machine with more RAM. Resume with: {resume_command_for(argv)}", file=sys.stderr)
            return EXIT_OOM
        print(f"qrunner: {cause} in memory={current} at {where}; restarting in memory={lower}, resuming from "
              "the committed artifacts", file=sys.stderr)
        mode = lower


def _run_child(cmd: List[str], env: Dict[str, str]) -> Tuple[int, Optional[int]]:
    """Run the child to its end; SIGTERM, SIGINT and SIGHUP sent to this process are passed on to it (it stops
    at its next safe point). Returns its exit code and the first stop signal this process received, if any."""
    child = subprocess.Popen(cmd, env=env)
    received: List[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code, (received[0] if received else None)


def resume_command_for(argv: List[str]) -> str:
    return "qrunner " + shlex.join(argv) if argv else "qrunner"


def describe_where(status: Dict[str, object]) -> str:
    """Where a run was, from its status record: 'stage quantize, block 3/32' or 'stage export'."""
    stage = status.get("stage") or "start-up"
    if status.get("block") is not None and stage == "quantize":
        return f"stage quantize, block {int(status['block']) + 1}/{status.get('blocks', '?')}"
    return f"stage {stage}"
