"""Where a run is, for the supervising parent: a small JSON file the child rewrites as it goes.

The parent (run.on_oom=downgrade) sets QRUNNER_STATUS to a file path; the child records its memory mode,
run directory, stage and block there. When the child dies, the parent reads the last record to decide the
restart and to say where the run stopped. Without the variable the record stays in the process.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

ENV = "QRUNNER_STATUS"
_state: Dict[str, Any] = {}


def report_status(**fields: Any) -> None:
    """Record where the run is (kept in this process, and written to QRUNNER_STATUS when set)."""
    _state.update(fields)
    path = os.environ.get(ENV)
    if not path:
        return
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(_state, default=str))
    os.replace(tmp, path)


def current_status() -> Dict[str, Any]:
    return dict(_state)


def read_status(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
