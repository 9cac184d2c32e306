"""Checkpoints inside a stage: each unit (e.g. one quantized block) is committed atomically on its own."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from qrunner.pipeline.atomic import publish_dir, remove_tree, write_json_atomic
from qrunner.pipeline.faults import fault_point
from qrunner.pipeline.stopping import stop_point
from qrunner.pipeline.integrity import first_problem, records

UNIT_MANIFEST = "unit.json"


class UnitStore:
    """Units live in `<stage folder>/units/<key>/`; a unit with its `unit.json` is complete."""

    def __init__(self, root: Path, stage_name: str) -> None:
        self.root = root
        self.stage_name = stage_name
        self.commit_seconds = 0.0  # time spent checkpointing units (write, fsync, publish) in this process

    def path(self, key: str) -> Path:
        return self.root / key

    def done(self, key: str) -> bool:
        return (self.root / key / UNIT_MANIFEST).is_file()

    def info(self, key: str) -> Dict[str, Any]:
        import json

        return json.loads((self.root / key / UNIT_MANIFEST).read_text())

    def damaged(self, key: str, may_be_removed: Sequence[str] = ()) -> Optional[str]:
        """'FILE: why' when a file of committed unit `key` is missing, truncated or changed; else None.
        Files named in `may_be_removed` may be gone (a stage deletes what it no longer needs)."""
        return first_problem(self.path(key), self.info(key).get("files", {}), may_be_removed)

    def clear(self) -> None:
        remove_tree(self.root)

    def completed(self) -> List[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and self.done(p.name))

    def commit(self, key: str, write: Callable[[Path], Optional[Dict[str, Any]]]) -> Dict[str, Any]:
        """Call write(tmp_dir) to fill a temporary folder, then publish it as unit `key`."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key}-{os.getpid()}"
        remove_tree(tmp)
        tmp.mkdir()
        started = time.time()
        info = dict(write(tmp) or {})
        info.setdefault("committed_at", time.time())
        info.setdefault("seconds", round(time.time() - started, 3))
        info["files"] = records(tmp, [str(p.relative_to(tmp)) for p in sorted(tmp.rglob("*")) if p.is_file()])
        fault_point(f"{self.stage_name}.unit_written")
        write_json_atomic(tmp / UNIT_MANIFEST, info)
        publish_dir(tmp, self.root / key)
        self.commit_seconds += time.time() - started
        fault_point(f"{self.stage_name}.unit_committed")
        stop_point()
        return info

    def clean_temporaries(self) -> None:
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".tmp-") or p.name.startswith(".trash-"):
                    remove_tree(p)
