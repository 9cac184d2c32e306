"""Streaming, deterministic safetensors shard writer (Hugging Face checkpoint layout)."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

import torch

__all__ = ["INDEX_FILE", "SINGLE_FILE", "ShardedSafetensorsWriter", "shard_name"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PREFIX = "model"  # transformers' file names; diffusers' models use "diffusion_pytorch_model"


def shard_name(k: int, n: int, prefix: str = PREFIX) -> str:
    """``model-0000k-of-0000n.safetensors`` (1-based ``k``)."""
    return f"{prefix}-{k:05d}-of-{n:05d}.safetensors"


def _partial_name(k: int, prefix: str = PREFIX) -> str:
    return f".{prefix}-{k:05d}.safetensors.partial"


_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_COPY_CHUNK = 16 << 20


class _Spool:
    """The shard being filled: tensor bytes go to a spool file as they come, only their layout stays in RAM."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}  # dtype, shape, offset, size
        self.nbytes = 0

    def add(self, name: str, dtype: torch.dtype, shape: list[int], parts: Iterable[torch.Tensor]) -> int:
        """Append a tensor given as consecutive parts (rows in C order); returns its size in bytes."""
        start = self.nbytes
        for part in parts:
            if part.nbytes:
                self.file.write(part.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            self.nbytes += part.nbytes
        self.entries[name] = (dtype, list(shape), start, self.nbytes - start)
        return self.nbytes - start

    def write_shard(self, path: Path, metadata: Mapping[str, str]) -> None:
        """The safetensors file: header (tensors ordered by alignment, then name), then the data."""
        self.file.close()
        order = sorted(self.entries, key=lambda n: (-_itemsize(self.entries[n][0]), n))
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        offset = 0
        for name in order:
            dtype, shape, _, size = self.entries[name]
            header[name] = {"dtype": _DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as out, open(self.path, "rb") as src:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for name in order:
                _, _, start, size = self.entries[name]
                src.seek(start)
                while size:
                    chunk = src.read(min(size, _COPY_CHUNK))
                    out.write(chunk)
                    size -= len(chunk)
        self.path.unlink()

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class ShardedSafetensorsWriter:
    """Write tensors to shards of at most ``max_shard_bytes`` as they come, holding none of them in RAM.

    Each tensor's bytes go to the running shard's spool file when added; a full shard gets its header and
    is written out from the spool. ``close()`` gives
    the shards their final names: ``model.safetensors`` when there is one, otherwise
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (``prefix`` in place of
    ``model``: ``diffusion_pytorch_model`` for a diffusers model). The same tensors added in the same order give
    byte-identical files. A tensor larger than ``max_shard_bytes`` gets a shard of its own.
    """

    def __init__(
        self, out_dir: str | os.PathLike[str], max_shard_bytes: int, metadata: Mapping[str, str] | None = None,
        prefix: str = PREFIX,
    ) -> None:
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
        meta = {"format": "pt"} if metadata is None else dict(metadata)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("safetensors metadata keys and values must be strings")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stale = sorted(p.name for p in self.out_dir.iterdir() if p.name.startswith((prefix, f".{prefix}")))
        if any(n.endswith((".safetensors", ".partial", ".safetensors.index.json")) for n in stale):
            raise FileExistsError(f"{self.out_dir} already holds checkpoint files: {stale}")
        self.max_shard_bytes = max_shard_bytes
        self.metadata = meta
        self._spool: _Spool | None = None
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
        """Append ``tensor`` under ``name`` to the running shard (written to its spool file at once);
        the running shard is finished first if it would overflow."""
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
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        self.add_parts(name, tensor.dtype, list(tensor.shape), [tensor])

    def add_parts(self, name: str, dtype: torch.dtype, shape: list[int], parts: Iterable[torch.Tensor]) -> None:
        """Append the tensor `name` of `dtype` and `shape` given as consecutive row blocks (`parts`, read one at
        a time: a tensor larger than RAM can be copied); the bytes are those `add` writes for the whole."""
        if self._closed:
            raise RuntimeError("writer is closed")
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        if dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        nbytes = math.prod(shape) * _itemsize(dtype)
        if self._spool is not None and self._spool.nbytes and self._spool.nbytes + nbytes > self.max_shard_bytes:
            self._flush()
        if self._spool is None:
            self._spool = _Spool(self.out_dir / f".{self.prefix}-{len(self._partials) + 1:05d}.spool")
        written = self._spool.add(name, dtype, shape, parts)
        if written != nbytes:
            raise ValueError(f"{name}: parts hold {written} bytes, shape {shape} of {dtype} needs {nbytes}")
        self._names.add(name)
        self._total_size += nbytes

    def _flush(self) -> None:
        if self._spool is None:
            return
        k = len(self._partials) + 1
        path = self.out_dir / _partial_name(k, self.prefix)
        self._spool.write_shard(path, self.metadata)
        for name in self._spool.entries:
            self._shard_of[name] = k
        self._partials.append(path)
        self._spool = None

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
            final = self.out_dir / f"{self.prefix}.safetensors"
            os.replace(self._partials[0], final)
            return [final]
        finals = [self.out_dir / shard_name(k, n, self.prefix) for k in range(1, n + 1)]
        for partial, final in zip(self._partials, finals):
            os.replace(partial, final)
        index = {
            "metadata": {"total_size": self._total_size},
            "weight_map": {name: shard_name(k, n, self.prefix) for name, k in sorted(self._shard_of.items())},
        }
        index_path = self.out_dir / f"{self.prefix}.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return [*finals, index_path]

    def abort(self) -> None:
        """Drop the running shard and delete shards written so far."""
        if self._spool is not None:
            self._spool.discard()
            self._spool = None
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
