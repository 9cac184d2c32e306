"""The run directory: derived from the semantic config, so the same command finds (and resumes) its run."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from qrunner.config.schema import RUN_DIR_EXCLUDED_KEYS
from qrunner.pipeline.atomic import remove_tree, write_bytes_atomic
from qrunner.pipeline.fingerprint import drop_keys, stable_hash


def run_dir_for(cfg_plain: Dict[str, Any], recipe: str) -> Path:
    if cfg_plain["run"]["dir"]:
        return Path(cfg_plain["run"]["dir"]).expanduser().resolve()
    digest = stable_hash(drop_keys(cfg_plain, RUN_DIR_EXCLUDED_KEYS))[:12]
    return (Path(cfg_plain["run"]["root"]).expanduser() / recipe / digest).resolve()


def run_dirs_under(root: Path, run_dir: Path) -> List[Path]:
    """The run directories whose committed stages a run may take: those beside `run_dir` first (the same recipe's),
    then every other one under run.root (`<root>/<recipe>/<hash>`), `run_dir` itself left out."""
    seen, found = {run_dir.resolve()}, []
    for candidate in [*sorted(run_dir.parent.glob("*/stages")), *sorted(Path(root).expanduser().glob("*/*/stages"))]:
        run = candidate.parent.resolve()
        if run not in seen and candidate.is_dir():
            seen.add(run)
            found.append(run)
    return found


def clear_run_dir(run_dir: Path) -> None:
    """run.fresh=true: remove everything but the lock we hold."""
    for entry in run_dir.iterdir():
        if entry.name != ".lock":
            remove_tree(entry)


def save_config(run_dir: Path, cfg_yaml: str, overrides: Sequence[str]) -> None:
    """qrunner's own copy of the resolved config (Hydra's .hydra/ is overwritten by every rerun)."""
    write_bytes_atomic(run_dir / "config.yaml", cfg_yaml.encode())
    with open(run_dir / "invocations.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid(),
                            "argv": sys.argv[1:], "overrides": list(overrides)}) + "\n")


class _BriefFormatter(logging.Formatter):
    """Console lines without tracebacks: those go to run.log only."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info = record.exc_text = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text = saved


def setup_logging(run_dir: Path) -> logging.Logger:
    log = logging.getLogger("qrunner")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.disabled = False  # Hydra re-configures logging for every job of a sweep
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_BriefFormatter("[qrunner] %(message)s"))
    file = logging.FileHandler(run_dir / "run.log")  # flushed after every record: a killed run keeps its log
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(console)
    log.addHandler(file)
    return log
