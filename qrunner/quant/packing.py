"""GPTQ-style packing of unsigned integer codes into int32 words.

Layout (identical to GPTQ / AutoRound ``qweight`` / ``qzeros``): along the packed
dimension the codes form one little-endian bit stream; value ``i`` occupies bits
``[i*bits, (i+1)*bits)`` of the stream, word ``k`` holds stream bits ``[32k, 32k+32)``.
For 2/4/8 bits this is ``32 // bits`` values per word, value ``j`` of a word at bit
``j*bits``; for 3 bits, 32 values fill 3 words and values 10 and 21 straddle word
boundaries exactly as in AutoGPTQ's / AutoRound's ``pack_3bits``. Words are stored as
int32 (two's complement of the unsigned 32-bit pattern).
"""

from __future__ import annotations

import math

import torch

__all__ = ["pack_cols", "pack_rows", "packed_size", "unpack_cols", "unpack_rows"]

_MASK32 = 0xFFFFFFFF


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")


def _block(bits: int) -> int:
    """Smallest number of values that fills whole int32 words."""
    return 32 // math.gcd(32, bits)


def packed_size(n_values: int, bits: int) -> int:
    """Number of int32 words holding ``n_values`` codes; raises if they do not fill whole words."""
    _check_bits(bits)
    if n_values % _block(bits) != 0:
        raise ValueError(f"cannot pack {n_values} values of {bits} bits: need a multiple of {_block(bits)}")
    return n_values * bits // 32


def _pack_dim0(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if codes.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    n, m = codes.shape
    n_words = packed_size(n, bits)
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi > 2**bits - 1:
            raise ValueError(f"codes out of range for {bits} bits: [{lo}, {hi}]")
    block = _block(bits)  # values per block; a block fills exactly `wpb` words
    wpb = block * bits // 32
    vals = codes.reshape(n // block, block, m)  # widened to int64 one slice at a time
    words = torch.zeros(n // block, wpb, m, dtype=torch.int64, device=codes.device)
    for j in range(block):  # loop over bit positions inside a block, not over elements
        word, off = divmod(j * bits, 32)
        x = vals[:, j].to(torch.int64)
        words[:, word] |= (x << off) & _MASK32
        if off + bits > 32:  # straddles into the next word
            words[:, word + 1] |= x >> (32 - off)
    words = words.reshape(n_words, m)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_dim0(packed: torch.Tensor, bits: int, n_values: int | None = None) -> torch.Tensor:
    if packed.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(packed.shape)}")
    if packed.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {packed.dtype}")
    _check_bits(bits)
    n_words, m = packed.shape
    block = _block(bits)
    wpb = block * bits // 32
    if n_words % wpb != 0:
        raise ValueError(f"{n_words} words of {bits}-bit codes do not form whole blocks of {wpb} words")
    n = n_words * 32 // bits
    if n_values is not None and n_values != n:
        raise ValueError(f"expected {n_values} values, the words hold {n}")
    words = (packed.to(torch.int64) & _MASK32).reshape(n_words // wpb, wpb, m)
    mask = 2**bits - 1
    out = torch.empty(n // block, block, m, dtype=torch.int32, device=packed.device)
    for j in range(block):
        word, off = divmod(j * bits, 32)
        val = words[:, word] >> off
        if off + bits > 32:
            val = val | (words[:, word + 1] << (32 - off))
        out[:, j] = (val & mask).to(torch.int32)
    return out.reshape(n, m)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[n, m]`` along dim 0 into int32 ``[n*bits/32, m]`` (GPTQ ``qweight``)."""
    return _pack_dim0(codes, bits).contiguous()


def unpack_rows(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[n*bits/32, m]`` -> int32 codes ``[n, m]``."""
    return _unpack_dim0(packed, bits, n).contiguous()


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[n, m]`` along dim 1 into int32 ``[n, m*bits/32]`` (GPTQ ``qzeros``)."""
    if codes.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(codes.shape)}")
    return _pack_dim0(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, m: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_cols`: int32 ``[n, m*bits/32]`` -> int32 codes ``[n, m]``."""
    if packed.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(packed.shape)}")
    return _unpack_dim0(packed.t(), bits, m).t().contiguous()
