"""Fingerprints: what a stage's result depends on, hashed."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from qrunner.errors import UserError


def stable_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def select_keys(cfg: DictConfig, keys: Iterable[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key in keys:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        if isinstance(value, DictConfig) or OmegaConf.is_list(value):
            value = OmegaConf.to_container(value, resolve=True, enum_to_str=True)
        elif hasattr(value, "value"):  # Enum
            value = value.value
        out[key] = value
    return out


def drop_keys(tree: Dict[str, Any], dotted_keys: Iterable[str]) -> Dict[str, Any]:
    tree = json.loads(json.dumps(tree, default=str))
    for dotted in dotted_keys:
        node = tree
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return tree


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file, after checking that the file is complete."""
    size = path.stat().st_size

    def damaged(why: str) -> UserError:
        return UserError(f"the safetensors shard {path} is damaged or incomplete ({why}); re-download or "
                         "re-save the checkpoint")

    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise damaged(f"{size} bytes, shorter than a header")
        (length,) = struct.unpack("<Q", prefix)
        if not 2 <= length <= size - 8:
            raise damaged(f"header length {length} does not fit a file of {size} bytes")
        header = f.read(length)
    try:
        entries = json.loads(header)
        end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise damaged("unreadable header") from None
    if 8 + length + end != size:
        raise damaged(f"the header describes {8 + length + end} bytes, the file has {size}")
    return header


def model_identity(model_dir: Path) -> str:
    """Hash of config.json, the shard index and every shard's header (names, dtypes, shapes, offsets).

    The weights' bytes are not read: a checkpoint is identified by its structure, which changes when it is
    replaced, at a cost that does not grow with model size.
    """
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        file = model_dir / name
        if file.is_file():
            h.update(name.encode())
            h.update(file.read_bytes())
    for shard in sorted(model_dir.glob("*.safetensors")):
        h.update(shard.name.encode())
        h.update(str(shard.stat().st_size).encode())
        h.update(safetensors_header(shard))
    return h.hexdigest()


def stage_fingerprint(name: str, version: int, reads: Mapping[str, Any], upstream: Mapping[str, str],
                      model_id: str) -> str:
    return stable_hash({"stage": name, "version": version, "reads": dict(reads),
                        "upstream": dict(sorted(upstream.items())), "model": model_id})
