"""The artifact store: one folder per stage, published atomically with its manifest.

    <run>/stages/<name>/            committed: complete, `manifest.json` inside
    <run>/stages/<name>.partial/    in progress: `fingerprint` + units committed so far (survives a kill)

A stage is done exactly when `stages/<name>/manifest.json` exists with the expected fingerprint. The
partial folder becomes the committed one in a single rename, after every file in it was fsynced.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from qrunner.pipeline.atomic import publish_dir, remove_tree, write_bytes_atomic, write_json_atomic
from qrunner.pipeline.faults import fault_point
from qrunner.pipeline.stopping import stop_point
from qrunner.pipeline.integrity import first_problem, records

MANIFEST = "manifest.json"
FINGERPRINT = "fingerprint"


class ArtifactStore:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.stages_dir = run_dir / "stages"

    def final(self, name: str) -> Path:
        return self.stages_dir / name

    def partial(self, name: str) -> Path:
        return self.stages_dir / f"{name}.partial"

    def manifest(self, name: str) -> Optional[Dict[str, Any]]:
        file = self.final(name) / MANIFEST
        try:
            return json.loads(file.read_text())
        except (OSError, ValueError):
            return None

    def is_complete(self, name: str, fingerprint: str) -> bool:
        manifest = self.manifest(name)
        return manifest is not None and manifest.get("fingerprint") == fingerprint

    def begin(self, name: str, fingerprint: str) -> Path:
        """The folder a stage writes into. Work saved by an earlier, killed attempt with the same
        fingerprint is kept (its units resume); anything else there is discarded."""
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        partial = self.partial(name)
        marker = partial / FINGERPRINT
        if partial.exists() and not (marker.is_file() and marker.read_text().strip() == fingerprint):
            remove_tree(partial)
        if not partial.exists():
            partial.mkdir()
            write_bytes_atomic(marker, fingerprint.encode())
        return partial

    def commit(self, name: str, manifest: Dict[str, Any]) -> None:
        partial = self.partial(name)
        (partial / FINGERPRINT).unlink(missing_ok=True)
        manifest = dict(manifest)
        manifest["files"] = records(partial, [str(p.relative_to(partial)) for p in sorted(partial.rglob("*"))
                                              if p.is_file() and p.name != MANIFEST])
        write_json_atomic(partial / MANIFEST, manifest)
        fault_point(f"{name}.before_publish")
        publish_dir(partial, self.final(name))
        fault_point(f"{name}.committed")
        stop_point()

    def damaged(self, name: str) -> Optional[str]:
        """'FILE: why' when a file of the committed stage is missing, truncated or changed; else None."""
        manifest = self.manifest(name) or {}
        return first_problem(self.final(name), manifest.get("files", {}))

    def adopt(self, name: str, fingerprint: str, other: "ArtifactStore") -> bool:
        """Take `other`'s committed result of stage `name` when its fingerprint is `fingerprint` and its files are
        intact: its folder copied here as hard links (a copy where links fail), published atomically."""
        if not other.is_complete(name, fingerprint) or other.damaged(name):
            return False
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.stages_dir / f".tmp-{name}-adopted"
        remove_tree(tmp)
        shutil.copytree(other.final(name), tmp, copy_function=_link_or_copy)
        copied = json.loads((tmp / MANIFEST).read_text())
        if copied.get("fingerprint") != fingerprint or first_problem(tmp, copied.get("files", {})):
            remove_tree(tmp)  # the other run replaced it while it was copied
            return False
        remove_tree(self.partial(name))
        publish_dir(tmp, self.final(name))
        return True

    def invalidate(self, name: str) -> None:
        remove_tree(self.final(name))
        remove_tree(self.partial(name))

    def clean_temporaries(self) -> None:
        if self.stages_dir.is_dir():
            for p in self.stages_dir.iterdir():
                if p.name.startswith(".tmp-") or p.name.startswith(".trash-"):
                    remove_tree(p)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
