"""Integer weight quantization math (AutoRound 0.16 conventions). Pure tensors, no I/O.

Conventions (weight ``w`` of shape ``[out, in]``, groups of ``g`` input channels):

* Symmetric ("full range"): per group, the extreme with the larger magnitude sets
  ``scale = ±|extreme| / 2**(bits-1)``, the sign chosen so that this extreme maps to
  ``-2**(bits-1)``; ``q = clamp(round(w/scale + v), -2**(bits-1), 2**(bits-1)-1)``,
  ``w_hat = scale * q``. Scales may therefore be negative.
* Asymmetric: ``scale = (wmax - wmin) / (2**bits - 1)``, ``zp = round(-wmin/scale)``,
  ``q = clamp(round(w/scale + v) + zp, 0, 2**bits-1)``, ``w_hat = scale * (q - zp)``.

``wmin = min(w, 0) * min_scale`` and ``wmax = max(w, 0) * max_scale``, both ranges include 0.

A group size that does not divide ``in`` leaves a shorter last group (``ceil(in / g)`` groups,
as AutoRound's ``reshape_pad_tensor_by_group_size``): the input dimension is zero-padded to a
multiple of ``g`` and the padding sliced off again. Since every range includes 0, the padding
changes no group's ``wmin``/``wmax``; padded positions get ``v = 0`` and never reach the result
(nor, through it, any gradient). A dividing group size takes exactly the unpadded path.

The scale is rounded to float16 *before* ``q`` is computed (as AutoRound does with
``scale_dtype=float16``), so the float16 scale stored in a checkpoint reproduces
exactly the values used here and ``QuantizedWeight.dequantize()`` equals ``w_hat``.
Scales whose magnitude is below ``Q_SCALE_THRESH`` (e.g. all-zero groups) are clamped
to it, so nothing divides by zero.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qrunner.quant.scheme import QuantScheme

__all__ = [
    "Q_SCALE_THRESH",
    "QuantizedWeight",
    "group_extremes",
    "group_layout",
    "pad_columns",
    "quant_dequant",
    "quantize",
    "quantize_rtn",
    "round_ste",
    "scale_and_zero",
    "to_quantized_weight",
]

Q_SCALE_THRESH = 1e-5  # AutoRound's q_scale_thresh for float16 scales
_FP16_MAX = float(torch.finfo(torch.float16).max)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with a straight-through (identity) gradient."""
    return (torch.round(x) - x).detach() + x


def _clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clamp in the forward pass, identity gradient (AutoRound clamps ``.data`` in place)."""
    return (x.clamp(lo, hi) - x).detach() + x


@dataclass
class QuantizedWeight:
    """A quantized ``[out, in]`` weight in unsigned form: ``w = scale * (q - zero)`` per group."""

    q: torch.Tensor  # uint8 [out, in], codes in [0, 2**bits - 1]
    scale: torch.Tensor  # float16 [out, n_groups] (may be negative for sym)
    zero: torch.Tensor  # int32 [out, n_groups], unsigned zero point
    bits: int
    group_size: int  # as in the scheme: -1 = one group per row
    sym: bool

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.q.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.scale.shape[1])

    def to(self, device: torch.device) -> "QuantizedWeight":
        """The same weight with its tensors on ``device`` (itself when they are there already)."""
        if self.q.device == device:
            return self
        return dataclasses.replace(self, q=self.q.to(device), scale=self.scale.to(device), zero=self.zero.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scale * (q - zero)`` per group, computed in float32 from the fp16 scale, then cast.

        Input channel ``i`` belongs to group ``i // group_size`` (the last group may be shorter).
        """
        n_in, n_groups = self.in_features, self.n_groups
        g = n_in // n_groups if self.group_size <= 0 else self.group_size
        if -(-n_in // g) != n_groups:
            raise ValueError(f"{n_groups} groups do not fit in_features={n_in} with group_size={self.group_size}")
        scale, zero = self.scale.to(torch.float32), self.zero.to(torch.float32)
        if n_in == g * n_groups:
            scale, zero = scale.repeat_interleave(g, dim=1), zero.repeat_interleave(g, dim=1)
        else:  # a shorter last group
            index = torch.arange(n_in, device=scale.device) // g
            scale, zero = scale[:, index], zero[:, index]
        return (scale * (self.q.to(torch.float32) - zero)).to(dtype)


def group_layout(in_features: int, scheme: QuantScheme) -> tuple[int, int, int]:
    """``(g, n_groups, pad)``: group size, ``ceil(in / g)`` groups, zero columns padding ``in`` to ``g * n_groups``."""
    if in_features <= 0:
        raise ValueError(f"in_features must be positive, got {in_features}")
    g = scheme.effective_group_size(in_features)
    n_groups = -(-in_features // g)
    return g, n_groups, n_groups * g - in_features


def pad_columns(x: torch.Tensor, pad: int) -> torch.Tensor:
    """``x`` ``[out, in]`` with ``pad`` zero columns appended (``x`` itself when ``pad`` is 0)."""
    return F.pad(x, (0, pad)) if pad else x


def _per_group(x: torch.Tensor | float | None, default: float, out: int, n_groups: int) -> torch.Tensor | float:
    """min/max_scale as a ``[out, n_groups, 1]`` tensor (or a float), clamped to [0, 1] (STE)."""
    if x is None:
        return default
    if not isinstance(x, torch.Tensor):
        return min(max(float(x), 0.0), 1.0)
    x = _clamp_ste(x.to(torch.float32), 0.0, 1.0)
    if x.dim() == 0:
        return x
    return x.reshape(out, n_groups, 1)


def quant_dequant(
    weight: torch.Tensor,
    scheme: QuantScheme,
    v: torch.Tensor | None = None,
    min_scale: torch.Tensor | float | None = None,
    max_scale: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake-quantize ``weight`` ``[out, in]``; differentiable in ``v``, ``min_scale``, ``max_scale``.

    Args:
        weight: 2-D float weight ``[out, in]``; math runs in float32.
        scheme: bits / group_size / sym.
        v: rounding offsets, shape ``[out, in]`` (or a scalar); ``None`` = 0.
        min_scale, max_scale: range coefficients, shape ``[out, n_groups]`` with
            ``n_groups = ceil(in / group_size)`` (or scalars),
            clamped to [0, 1] in the forward pass with an identity gradient; ``None`` = 1.

    Returns:
        ``(w_hat, scale, zero, q)``: ``w_hat`` ``[out, in]`` in ``weight.dtype``;
        ``scale`` ``[out, n_groups]`` float32 holding float16-representable values;
        ``zero`` ``[out, n_groups]`` float32 (0 for sym, unsigned zero point for asym);
        ``q`` ``[out, in]`` float32 integer grid (signed for sym, unsigned for asym),
        so that ``w_hat == scale * (q - zero)`` per group.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    out, in_features = weight.shape
    w, amin, amax, pad = group_extremes(weight, scheme)
    scale, zero, lo, hi = scale_and_zero(amin, amax, scheme, min_scale, max_scale)
    x = w / scale
    if v is not None:
        v = v.to(torch.float32)
        x = x + (pad_columns(v, pad).reshape(w.shape) if v.dim() > 0 else v)
    q = torch.clamp(round_ste(x) + zero, lo, hi)
    w_hat = scale * (q - zero)
    n = w.shape[1] * w.shape[2]
    w_hat, q = w_hat.reshape(out, n), q.reshape(out, n)
    if pad:
        w_hat, q = w_hat[:, :in_features], q[:, :in_features]
    return (
        w_hat.to(weight.dtype),
        scale.reshape(out, -1),
        zero.reshape(out, -1),
        q,
    )


def group_extremes(weight: torch.Tensor, scheme: QuantScheme
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(w, amin, amax, pad)``: the weight in float32 as ``[out, n_groups, g]`` (zero-padded by ``pad`` columns),
    and per group ``min(w, 0)`` and ``max(w, 0)`` as ``[out, n_groups, 1]`` (constant while only ``v`` and the
    range coefficients are tuned)."""
    out, in_features = weight.shape
    g, n_groups, pad = group_layout(in_features, scheme)
    w = pad_columns(weight.to(torch.float32), pad).reshape(out, n_groups, g)
    amin = torch.clamp(w.amin(dim=-1, keepdim=True), max=0)
    amax = torch.clamp(w.amax(dim=-1, keepdim=True), min=0)
    return w, amin, amax, pad


def scale_and_zero(
    amin: torch.Tensor,
    amax: torch.Tensor,
    scheme: QuantScheme,
    min_scale: torch.Tensor | float | None = None,
    max_scale: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Per-group ``(scale, zero, lo, hi)`` from the group extremes (``[out, n_groups, 1]``) and the range
    coefficients; differentiable in ``min_scale`` / ``max_scale``. ``scale`` holds float16-representable values,
    ``zero`` is 0 (sym) or the unsigned zero point, ``[lo, hi]`` is the integer grid."""
    out, n_groups = amin.shape[0], amin.shape[1]
    wmin = amin * _per_group(min_scale, 1.0, out, n_groups)
    wmax = amax * _per_group(max_scale, 1.0, out, n_groups)
    if scheme.sym:
        maxq = 2 ** (scheme.bits - 1)
        wmin_abs = -wmin
        neg_wins = (wmax < wmin_abs).to(torch.float32)  # larger magnitude on the negative side
        max_v = (2 * neg_wins - 1) * torch.maximum(wmax, wmin_abs)
        scale16 = (max_v / maxq).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
        scale16 = torch.where(
            scale16 < 0, scale16.clamp(max=-Q_SCALE_THRESH), scale16.clamp(min=Q_SCALE_THRESH)
        )
        scale = scale16.to(torch.float32)
        return scale, torch.zeros_like(scale), -maxq, maxq - 1
    maxq = 2**scheme.bits - 1
    scale16 = ((wmax - wmin) / maxq).clamp(max=_FP16_MAX).to(torch.float16).clamp(min=Q_SCALE_THRESH)
    scale = scale16.to(torch.float32)
    return scale, round_ste(-wmin / scale), 0, maxq


def to_quantized_weight(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme
) -> QuantizedWeight:
    """Convert ``quant_dequant``'s ``(scale, zero, q)`` to unsigned codes (sym: shift by 2**(bits-1))."""
    q, scale, zero = q.detach(), scale.detach(), zero.detach()
    if scheme.sym:
        offset = 2 ** (scheme.bits - 1)
        codes = q + offset
        zero = torch.full_like(zero, offset)
    else:
        codes = q
    return QuantizedWeight(
        q=codes.round().to(torch.uint8).contiguous(),
        scale=scale.to(torch.float16).contiguous(),
        zero=zero.round().to(torch.int32).contiguous(),
        bits=scheme.bits,
        group_size=scheme.group_size,
        sym=scheme.sym,
    )


@torch.no_grad()
def quantize(
    weight: torch.Tensor,
    scheme: QuantScheme,
    v: torch.Tensor | None = None,
    min_scale: torch.Tensor | float | None = None,
    max_scale: torch.Tensor | float | None = None,
) -> QuantizedWeight:
    """Final (no-grad) quantization with optional tuned ``v`` / ``min_scale`` / ``max_scale``."""
    _, scale, zero, q = quant_dequant(weight, scheme, v=v, min_scale=min_scale, max_scale=max_scale)
    return to_quantized_weight(q, scale, zero, scheme)


def quantize_rtn(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Round-to-nearest quantization (``quant_dequant`` with ``v = 0``)."""
    return quantize(weight, scheme)
