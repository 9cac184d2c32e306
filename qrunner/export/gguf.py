"""GGUF tensor encodings (llama.cpp): qrunner's codes written exactly as Q4_0 / Q8_0 blocks; no file I/O.

llama.cpp's Q4_0 block holds 32 weights of one row: a float16 scale ``d`` then 16 bytes, byte ``j`` carrying
weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble; the weight is ``d * (q - 8)``. Q8_0 holds
``d`` then 32 signed bytes, the weight ``d * q``. qrunner's symmetric codes are ``w = scale * (q - 2^(bits-1))``,
so a symmetric 4-bit (8-bit) layer whose group size is a multiple of 32 (or one group per row of a multiple of 32)
maps onto Q4_0 (Q8_0) with no rounding at all: each group's scale is repeated for its 32-blocks and the codes are
kept. Anything else (2/3-bit, asymmetric, groups that do not tile 32-blocks) has no exact GGUF encoding here and
is refused by `gguf_type`'s caller rather than re-quantized.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from qrunner.export.auto_round import checkpoint_group_size, checkpoint_groups
from qrunner.quant.rtn import QuantizedWeight

BLOCK = 32  # weights per Q4_0 / Q8_0 block
Q4_0, Q8_0 = "Q4_0", "Q8_0"
BLOCK_BYTES = {Q4_0: 2 + BLOCK // 2, Q8_0: 2 + BLOCK}


def gguf_type(qw_bits: int, sym: bool, group_size: int, in_features: int) -> Optional[str]:
    """The exact GGUF block type for a layer's scheme (as written: `checkpoint_group_size`), or None."""
    group = checkpoint_group_size(in_features, group_size)
    group = in_features if group <= 0 else group
    if not sym or in_features % BLOCK or group % BLOCK:
        return None
    return {4: Q4_0, 8: Q8_0}.get(qw_bits)


def _block_scales(qw: QuantizedWeight) -> torch.Tensor:
    """float16 ``[out, in / 32]``: each 32-block's scale (its group's)."""
    scale, _ = checkpoint_groups(qw)
    return scale.to(torch.float16).repeat_interleave(qw.in_features // scale.shape[1] // BLOCK, dim=1)


def encode_layer(qw: QuantizedWeight, rows: Optional[torch.Tensor] = None) -> np.ndarray:
    """The layer's GGUF bytes, ``uint8 [out, in / 32 * block bytes]``; `rows` reorders the output rows (llama.cpp's
    q/k permutation), which moves whole blocks and changes no value."""
    kind = gguf_type(qw.bits, qw.sym, qw.group_size, qw.in_features)
    if kind is None:
        raise ValueError(f"{qw.bits}-bit {'sym' if qw.sym else 'asym'} group {qw.group_size} over {qw.in_features} "
                         "inputs has no exact GGUF block type")
    out_f, n_blocks = qw.out_features, qw.in_features // BLOCK
    if bool((qw.zero != 2 ** (qw.bits - 1)).any()):
        raise ValueError("a symmetric layer's zero points must all be 2^(bits-1)")
    codes = qw.q.reshape(out_f, n_blocks, BLOCK)
    scales = _block_scales(qw)
    if rows is not None:
        codes, scales = codes[rows], scales[rows]
    d = scales.contiguous().view(torch.uint8).reshape(out_f, n_blocks, 2)
    if kind == Q4_0:
        q = codes.to(torch.uint8)
        body = q[:, :, :BLOCK // 2] | (q[:, :, BLOCK // 2:] << 4)
    else:
        body = (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
    blocks = torch.cat([d, body], dim=2)  # [out, blocks, block bytes]
    return blocks.reshape(out_f, n_blocks * BLOCK_BYTES[kind]).numpy()
