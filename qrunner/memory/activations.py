"""Block inputs and outputs as rows: in RAM (`TensorRows`) or in a raw file read per mini-batch (`ActivationFile`).

Both hold `n` rows of one shape and dtype (one row = one calibration sample's hidden states) and offer the
same three calls: `read(indices)`, `write(start, rows)` and `len()`. The quantize and evaluate stages work on
this interface only, so `memory=low` (rows on disk) runs exactly the same arithmetic as `high`/`medium`
(rows in RAM) and gives byte-identical results.

On disk a row file is `NAME.bin` (the rows, C order, native byte order) plus `NAME.json` (shape, dtype).
Reads use plain positioned file reads, not a memory map, so pages of the file do not stay resident in the
process after a mini-batch is consumed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch

_DTYPES = {str(d).replace("torch.", ""): d
           for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool)}
Indices = Union[torch.Tensor, Sequence[int], range]


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise TypeError(f"unsupported activation dtype {dtype}")
    return name


class TensorRows:
    """Rows held in RAM."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    @classmethod
    def empty(cls, n: int, row_shape: Tuple[int, ...], dtype: torch.dtype) -> "TensorRows":
        return cls(torch.empty((n, *row_shape), dtype=dtype))

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    @property
    def row_shape(self) -> Tuple[int, ...]:
        return tuple(self.tensor.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def read(self, indices: Indices) -> torch.Tensor:
        if isinstance(indices, range) and indices.step == 1:
            return self.tensor[indices.start:indices.stop]
        return self.tensor.index_select(0, torch.as_tensor(list(indices) if isinstance(indices, range) else indices,
                                                           dtype=torch.long))

    def write(self, start: int, rows: torch.Tensor) -> None:
        self.tensor[start:start + rows.shape[0]] = rows

    def save(self, path: Path) -> "ActivationFile":
        """Write these rows as a row file at `path` (.bin/.json)."""
        out = ActivationFile.create(path, len(self), self.row_shape, self.dtype)
        out.write(0, self.tensor)
        return out


class ActivationFile:
    """Rows in a raw file on disk, read and written by row."""

    def __init__(self, path: Path, n: int, row_shape: Tuple[int, ...], dtype: torch.dtype) -> None:
        self.path = Path(path)
        self.n = int(n)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype = dtype
        self.row_bytes = int(torch.Size(self.row_shape).numel()) * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def data_file(path: Path) -> Path:
        return Path(str(path) + ".bin")

    @staticmethod
    def header_file(path: Path) -> Path:
        return Path(str(path) + ".json")

    @classmethod
    def paths(cls, path: Path) -> Tuple[Path, Path]:
        """The data and header files of the row file at `path`."""
        return cls.data_file(path), cls.header_file(path)

    @classmethod
    def remove(cls, path: Path) -> None:
        """Delete the row file at `path` (both files), if present."""
        for file in cls.paths(path):
            file.unlink(missing_ok=True)

    @classmethod
    def create(cls, path: Path, n: int, row_shape: Tuple[int, ...], dtype: torch.dtype) -> "ActivationFile":
        rows = cls(path, n, row_shape, dtype)
        cls.header_file(path).write_text(json.dumps({"n": rows.n, "row_shape": list(rows.row_shape),
                                                     "dtype": _dtype_name(dtype)}))
        with open(cls.data_file(path), "wb") as f:
            f.truncate(rows.n * rows.row_bytes)
        return rows

    @classmethod
    def open(cls, path: Path) -> "ActivationFile":
        header = json.loads(cls.header_file(path).read_text())
        rows = cls(path, header["n"], tuple(header["row_shape"]), _DTYPES[header["dtype"]])
        size = cls.data_file(path).stat().st_size
        if size != rows.n * rows.row_bytes:
            raise ValueError(f"{cls.data_file(path)} holds {size} bytes, expected {rows.n * rows.row_bytes} "
                             f"({rows.n} rows of {rows.row_shape} {header['dtype']}); the file is damaged")
        return rows

    @classmethod
    def exists(cls, path: Path) -> bool:
        return cls.header_file(path).is_file() and cls.data_file(path).is_file()

    def files(self) -> Tuple[Path, Path]:
        return self.paths(self.path)

    def __len__(self) -> int:
        return self.n

    def _runs(self, indices: Indices) -> Iterator[Tuple[int, int]]:
        """Consecutive index runs as (first, count), in the order given."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        i = 0
        while i < len(idx):
            j = i + 1
            while j < len(idx) and idx[j] == idx[j - 1] + 1:
                j += 1
            if idx[i] < 0 or idx[j - 1] >= self.n:
                raise IndexError(f"rows {idx[i]}..{idx[j - 1]} out of range for {self.n} rows")
            yield idx[i], j - i
            i = j

    def read(self, indices: Indices) -> torch.Tensor:
        parts = []
        with open(self.data_file(self.path), "rb", buffering=0) as f:
            for first, count in self._runs(indices):
                buffer = bytearray(count * self.row_bytes)
                f.seek(first * self.row_bytes)
                if f.readinto(buffer) != len(buffer):
                    raise ValueError(f"{self.data_file(self.path)} is shorter than its header says")
                parts.append(torch.frombuffer(buffer, dtype=self.dtype).view(count, *self.row_shape))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def read_all(self) -> torch.Tensor:
        return self.read(range(self.n))

    def write(self, start: int, rows: torch.Tensor) -> None:
        if tuple(rows.shape[1:]) != self.row_shape or rows.dtype != self.dtype:
            raise ValueError(f"rows of {tuple(rows.shape[1:])} {rows.dtype} do not fit {self.path} "
                             f"({self.row_shape} {self.dtype})")
        if start < 0 or start + rows.shape[0] > self.n:
            raise IndexError(f"rows {start}..{start + rows.shape[0] - 1} out of range for {self.n} rows")
        data = rows.detach().contiguous().view(torch.uint8).numpy().tobytes()
        with open(self.data_file(self.path), "r+b", buffering=0) as f:
            f.seek(start * self.row_bytes)
            f.write(data)

    def fsync(self) -> None:
        for file in self.files():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def move_to(self, path: Path) -> "ActivationFile":
        """Rename both files (same file system) and return the moved rows."""
        for src, dst in zip(self.files(), (self.data_file(path), self.header_file(path))):
            os.replace(src, dst)
        return ActivationFile(path, self.n, self.row_shape, self.dtype)

    def link_to(self, path: Path) -> "ActivationFile":
        """A second name for the same rows (hard link, or a copy where links are not possible)."""
        import shutil

        for src, dst in zip(self.files(), (self.data_file(path), self.header_file(path))):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        return ActivationFile(path, self.n, self.row_shape, self.dtype)

    def unlink(self) -> None:
        self.remove(self.path)


Rows = Union[TensorRows, ActivationFile]


class ValueRows:
    """A per-sample block input that is not a plain batch-first tensor, over row files that are: a tuple of
    tensors (one row file per item), each with its batch dimension at `dim` (stored moved to the front)."""

    def __init__(self, parts: Sequence[Rows], dim: int = 0, is_tuple: bool = False) -> None:
        self.parts, self.dim, self.is_tuple = list(parts), int(dim), bool(is_tuple)

    def __len__(self) -> int:
        return len(self.parts[0])

    def read(self, indices: Indices) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        values = tuple(p.read(indices).movedim(0, self.dim) for p in self.parts)
        return values if self.is_tuple else values[0]


class TokenSlice:
    """Rows read through a slice of each row's first axis (its tokens): the part of a block's output a loss
    compares when it leaves the rest out."""

    def __init__(self, rows: Any, part: slice) -> None:
        self.rows, self.part = rows, part

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, indices: Indices) -> torch.Tensor:
        return self.rows.read(indices)[:, self.part]


# per-sample input added to a block's hidden states before it runs (what the model adds between blocks)
ADDED = "added_to_hidden_states"


class BlockRows:
    """One block's per-sample inputs read together: ``hidden_states`` plus named side rows (per-layer inputs,
    keys/values shared from an earlier block, positions of image samples). ``read`` returns a dict of mini-batch
    values by name; rows named `ADDED` are added to the hidden states instead."""

    def __init__(self, hidden: Rows, side: Optional[Dict[str, Union[Rows, ValueRows]]] = None,
                 hidden_name: str = "hidden_states") -> None:
        self.hidden, self.side, self.hidden_name = hidden, dict(side or {}), hidden_name
        for name, rows in self.side.items():
            if len(rows) != len(hidden):
                raise ValueError(f"side rows {name!r} hold {len(rows)} samples, hidden states {len(hidden)}")

    def __len__(self) -> int:
        return len(self.hidden)

    def read(self, indices: Indices) -> Dict[str, Any]:
        values = {k: r.read(indices) for k, r in self.side.items()}
        hidden = self.hidden.read(indices)
        if ADDED in values:
            hidden = hidden + values.pop(ADDED).to(hidden.dtype)
        return {self.hidden_name: hidden, **values}


def batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def to_ram(rows: Rows) -> TensorRows:
    return rows if isinstance(rows, TensorRows) else TensorRows(rows.read_all())
