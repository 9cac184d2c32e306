"""Streaming, deterministic safetensors shard writer (Hugging Face checkpoint layout)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import save_file

__all__ = ["INDEX_FILE", "SINGLE_FILE", "ShardedSafetensorsWriter", "shard_name"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def shard_name(k: int, n: int) -> str:
    """``model-0000k-of-0000n.safetensors`` (1-based ``k``)."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def _partial_name(k: int) -> str:
    return f".model-{k:05d}.safetensors.partial"


class ShardedSafetensorsWriter:
    """Buffer tensors and write them to shards of at most ``max_shard_bytes`` as they fill.

    A full shard is written to disk and dropped from memory immediately. ``close()`` gives
    the shards their final names: ``model.safetensors`` when there is one, otherwise
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``. The same
    tensors added in the same order give byte-identical files. A tensor larger than
    ``max_shard_bytes`` gets a shard of its own.
    """

    def __init__(
        self, out_dir: str | os.PathLike[str], max_shard_bytes: int, metadata: Mapping[str, str] | None = None
    ) -> None:
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
        meta = {"format": "pt"} if metadata is None else dict(metadata)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("safetensors metadata keys and values must be strings")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stale = sorted(p.name for p in self.out_dir.iterdir() if p.name.startswith(("model", ".model")))
        if any(n.endswith((".safetensors", ".partial", INDEX_FILE)) for n in stale):
            raise FileExistsError(f"{self.out_dir} already holds checkpoint files: {stale}")
        self.max_shard_bytes = max_shard_bytes
        self.metadata = meta
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._names: set[str] = set()
        self._shard_of: dict[str, int] = {}  # tensor name -> shard number (1-based)
        self._partials: list[Path] = []
        self._total_size = 0
        self._closed = False

    @property
    def total_size(self) -> int:
        """Bytes of tensor data added so far."""
        return self._total_size

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name``; writes the running shard first if it would overflow."""
        if self._closed:
            raise RuntimeError("writer is closed")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cpu":
            raise ValueError(f"{name}: tensors must be on CPU, got {tensor.device}")
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a view into a larger buffer: store only its own bytes
        nbytes = tensor.nbytes
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._buffer[name] = tensor
        self._buffer_bytes += nbytes
        self._total_size += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        k = len(self._partials) + 1
        path = self.out_dir / _partial_name(k)
        seen: set[int] = set()
        tensors = {}
        for name, t in self._buffer.items():  # safetensors refuses tensors sharing memory
            ptr = t.untyped_storage().data_ptr()
            tensors[name] = t.clone() if t.nbytes and ptr in seen else t
            seen.add(ptr)
        save_file(tensors, str(path), metadata=self.metadata)
        for name in self._buffer:
            self._shard_of[name] = k
        self._partials.append(path)
        self._buffer = {}
        self._buffer_bytes = 0

    def close(self) -> list[Path]:
        """Write the last shard, name the files; returns the shard paths, then the index if any."""
        if self._closed:
            raise RuntimeError("writer is already closed")
        self._flush()
        self._closed = True
        n = len(self._partials)
        if n == 0:
            raise ValueError("no tensors were added")
        if n == 1:
            final = self.out_dir / SINGLE_FILE
            os.replace(self._partials[0], final)
            return [final]
        finals = [self.out_dir / shard_name(k, n) for k in range(1, n + 1)]
        for partial, final in zip(self._partials, finals):
            os.replace(partial, final)
        index = {
            "metadata": {"total_size": self._total_size},
            "weight_map": {name: shard_name(k, n) for name, k in sorted(self._shard_of.items())},
        }
        index_path = self.out_dir / INDEX_FILE
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return [*finals, index_path]

    def abort(self) -> None:
        """Drop buffered tensors and delete shards written so far."""
        self._buffer = {}
        for p in self._partials:
            p.unlink(missing_ok=True)
        self._partials = []
        self._closed = True

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()
