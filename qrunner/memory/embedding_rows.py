"""Embedding tables read by rows: a lookup reads only the rows of the token ids it is given.

In the streaming modes the capture and evaluate stages run the model up to its first block. Its embedding
tables can be the largest tensors of the checkpoint (Gemma's 262k-token vocabulary; Gemma 4's per-layer
embeddings, `vocab x (layers x 256)`, which grow with depth), yet a calibration sample touches a few hundred
rows. While `rows_on_demand` is open, each `nn.Embedding` listed has no weight in RAM: on every forward it
reads the rows of the ids it was given (one `safe_open` slice per run of consecutive ids), runs its own
forward on that small table with the ids renumbered, and drops the rows again. Code that indexes the weight
directly (`embed_tokens.weight[pad_id, :]`) gets those rows read the same way.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, List, Sequence

import torch
from torch import nn


class StoredRows:
    """Stands in for an embedding weight that stays in the checkpoint: indexing it by rows reads those rows."""

    def __init__(self, reader: Any, key: str, shape: torch.Size, dtype: torch.dtype) -> None:
        self.reader, self.key, self.shape, self.dtype = reader, key, torch.Size(shape), dtype
        self.device, self.ndim = torch.device("cpu"), len(shape)

    def rows(self, ids: Sequence[int]) -> torch.Tensor:
        """Rows `ids` (ascending, distinct) in the compute dtype."""
        table = self.reader.read_rows(self.key, list(ids))
        return table.to(self.dtype) if table.is_floating_point() else table

    def __getitem__(self, index: Any) -> torch.Tensor:
        row, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(row, int) or (isinstance(row, torch.Tensor) and row.dim() == 0):
            out = self.rows([int(row) % self.shape[0]])[0]
        elif isinstance(row, (torch.Tensor, list)):
            ids = torch.as_tensor(row, dtype=torch.long) % self.shape[0]
            unique, inverse = torch.unique(ids, return_inverse=True)
            out = self.rows(unique.tolist())[inverse]
        else:
            raise TypeError(f"{self.key} stays in the checkpoint during streaming; it can be indexed by row ids, "
                            f"not by {type(row).__name__}")
        return out[(slice(None),) * (out.dim() - self.ndim + 1) + tuple(rest)] if rest else out


def _rows_forward(module: nn.Embedding, stored: StoredRows):
    forward = type(module).forward

    def rows_forward(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        unique, inverse = torch.unique(input_ids, return_inverse=True)
        module.__dict__["weight"] = stored.rows(unique.tolist())
        try:
            return forward(module, inverse.reshape(input_ids.shape), *args, **kwargs)
        finally:
            module.__dict__["weight"] = stored

    return rows_forward


@contextmanager
def rows_on_demand(model: nn.Module, module_names: Sequence[str], reader: Any, dtype: torch.dtype) -> Iterator[None]:
    """While open, the embeddings `module_names` of `model` (weights on the meta device) read their rows per
    lookup from the checkpoint through `reader`."""
    patched: List[tuple] = []
    try:
        for name in module_names:
            module = model.get_submodule(name)
            meta = module._parameters.pop("weight")
            stored = StoredRows(reader, f"{name}.weight", meta.shape, dtype)
            module.__dict__["weight"] = stored
            module.forward = _rows_forward(module, stored)
            patched.append((module, meta))
        yield
    finally:
        for module, meta in patched:
            del module.forward
            module.__dict__.pop("weight", None)
            module._parameters["weight"] = meta
