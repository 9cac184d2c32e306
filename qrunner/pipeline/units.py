"""Checkpoints inside a stage: each unit (e.g. one quantized block) is committed atomically on its own."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from qrunner.pipeline.atomic import publish_dir, remove_tree, write_json_atomic
from qrunner.pipeline.faults import fault_point

UNIT_MANIFEST = "unit.json"


class UnitStore:
    """Units live in `<stage folder>/units/<key>/`; a unit with its `unit.json` is complete."""

    def __init__(self, root: Path, stage_name: str) -> None:
        self.root = root
        self.stage_name = stage_name

    def path(self, key: str) -> Path:
        return self.root / key

    def done(self, key: str) -> bool:
        return (self.root / key / UNIT_MANIFEST).is_file()

    def info(self, key: str) -> Dict[str, Any]:
        import json

        return json.loads((self.root / key / UNIT_MANIFEST).read_text())

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
        info["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json_atomic(tmp / UNIT_MANIFEST, info)
        publish_dir(tmp, self.root / key)
        fault_point(f"{self.stage_name}.unit_committed")
        return info

    def clean_temporaries(self) -> None:
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".tmp-") or p.name.startswith(".trash-"):
                    remove_tree(p)
