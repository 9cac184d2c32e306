"""What a committed artifact must look like: each file's size and a hash of its first and last MiB.

Hashing the ends instead of the whole file keeps the check cheap for multi-GB artifacts while catching what
actually happens to them: truncation (a killed copy, a full disk), a file replaced by another, a damaged
header. A record made before this check existed (a bare size) is checked by size only.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

END_BYTES = 1 << 20


def file_record(path: Path) -> Dict[str, Any]:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(END_BYTES))
        if size > END_BYTES:
            f.seek(max(END_BYTES, size - END_BYTES))
            h.update(f.read(END_BYTES))
    return {"size": size, "sha256_ends": h.hexdigest()}


def records(root: Path, names: Iterable[str]) -> Dict[str, Dict[str, Any]]:
    return {name: file_record(root / name) for name in names}


def problem(path: Path, record: Any) -> Optional[str]:
    """Why `path` does not match its record, or None when it does."""
    if not path.is_file():
        return "missing"
    expected = record if isinstance(record, int) else record["size"]
    size = path.stat().st_size
    if size != expected:
        return f"{size} bytes, expected {expected}"
    if isinstance(record, dict) and file_record(path)["sha256_ends"] != record["sha256_ends"]:
        return "content changed"
    return None


def first_problem(root: Path, files: Dict[str, Any], may_be_removed: Iterable[str] = ()) -> Optional[str]:
    """'FILE: why' for the first file under `root` that does not match its record, or None."""
    optional = set(may_be_removed)
    for name, record in sorted(files.items()):
        path = root / name
        if name in optional and not path.exists():
            continue
        why = problem(path, record)
        if why:
            return f"{path}: {why}"
    return None
