"""A block's tuned weights held in their checkpoint's narrower dtype while AutoRound tunes them.

Blocks run in `model.compute_dtype` (float32 by default) and a bf16 checkpoint's weights are widened to it when
read. Tuning keeps the block's weights resident next to the float32 rounding offsets (4 bytes a weight), the
codes (2) and the activations: on an 8B model's block, 872 MB of float32 weights whose values are bf16 anyway.
`narrowed` holds each listed linear's weight in bfloat16 or float16 where that is exact (every value survives
the round trip, checked), so 2 bytes a weight instead of 4; the fused fake-quantized layer widens a chunk of rows
at a time for its arithmetic (qrunner/quant/fake_quant.py), so the numbers are the same. On exit the weights are
widened back (exact). A weight that is not exactly representable stays as it is.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Sequence, Tuple

import torch
from torch import nn

NARROWER = (torch.bfloat16, torch.float16)


def _exact_narrow(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` in the first of NARROWER that holds every value exactly, or None."""
    for dtype in NARROWER:
        if dtype.itemsize >= weight.dtype.itemsize:
            continue
        narrow = weight.to(dtype)
        if torch.equal(narrow.to(weight.dtype), weight):
            return narrow
        del narrow
    return None


@contextmanager
def narrowed(layers: Sequence[nn.Module]) -> Iterator[int]:
    """While open, the weights of `layers` are held in a narrower dtype where exact; yields the bytes saved."""
    changed: List[Tuple[nn.Module, torch.dtype]] = []
    saved = 0
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.weight.data
                narrow = _exact_narrow(weight) if weight.is_floating_point() else None
                if narrow is not None:
                    changed.append((layer, weight.dtype))
                    saved += weight.numel() * (weight.element_size() - narrow.element_size())
                    layer.weight.data = narrow
                del weight, narrow
        yield saved
    finally:
        with torch.no_grad():
            for layer, dtype in changed:
                layer.weight.data = layer.weight.data.to(dtype)
