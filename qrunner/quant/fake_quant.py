"""A linear layer that runs on its fake-quantized weight while AutoRound tunes it, with a hand-written backward.

``FakeQuantLinear`` computes ``F.linear(x, w_hat, bias)`` with ``w_hat = scale * (q - zero)``,
``q = clamp(round(w / scale + v) + zero, lo, hi)`` (:func:`qrunner.quant.rtn.quant_dequant`'s arithmetic,
straight-through rounding). Autograd would keep ``w_hat`` and every weight-sized intermediate of the
fake-quantization for the backward pass (three tensors of 4 bytes a weight per layer, all layers of the
block at once); activation
checkpointing avoids that but runs the layer's matmul a second time. This function keeps only what already
exists (the input, the weight, ``v``, the per-group scale and zero point) and recomputes the cheap
element-wise part in its backward pass, one layer at a time: the memory of checkpointing at the matmul count
of plain autograd (three per layer, two for a layer whose input needs no gradient).

The gradients are those autograd gives for ``quant_dequant`` (same formulas, same order of operations):

* ``dL/dw_hat = G^T x``; ``dL/dq = dL/dw_hat * scale``, passed where ``round(x) + zero`` lies inside
  ``[lo, hi]`` (the clamp's mask); that is ``dL/dv``.
* ``dL/dscale = sum_g(dL/dw_hat * (q - zero)) + sum_g(-dL/dv * ((w / scale) / scale))``,
  ``dL/dzero = sum_g(dL/dv) - sum_g(dL/dw_hat * scale)``, both per group; autograd carries them on through
  the (small, per-group) graph from ``min_scale`` / ``max_scale`` to ``scale`` and ``zero``
  (:func:`qrunner.quant.rtn.scale_and_zero`).

While it runs, the layer can also write its integer codes (unsigned, 1 byte a weight) to a buffer: the
tuner keeps the codes of the best iteration from that buffer instead of quantizing the weight again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qrunner.quant.rtn import QuantizedWeight, group_extremes, pad_columns, quantize, scale_and_zero
from qrunner.quant.scheme import QuantScheme

__all__ = ["TunedLinear", "fake_quant_linear"]


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, v: torch.Tensor, lo: int, hi: int,
           sym: bool) -> torch.Tensor:
    """``q = clamp(round(w / scale + v) + zero, lo, hi)`` on ``[out, n_groups, g]`` (float32, no graph)."""
    q = w / scale
    q += v
    q.round_()
    if not sym:
        q += zero
    return q.clamp_(lo, hi)


def _dequantize_(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, sym: bool) -> torch.Tensor:
    """``scale * (q - zero)``, in place of ``q``."""
    return q.mul_(scale) if sym else q.sub_(zero).mul_(scale)


def _grouped(weight: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The weight in float32 as ``[out, n_groups, g]`` (a view for a float32 weight whose groups divide its rows;
    otherwise a transient copy, so that no weight-sized float32 copy outlives a pass)."""
    return pad_columns(weight.to(torch.float32), shape[1] * shape[2] - weight.shape[1]).reshape(shape)


def _to_matrix(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """``[out, n_groups, g]`` -> ``[out, in]`` (the padding columns cut off)."""
    t = t.reshape(t.shape[0], -1)
    return t[:, :in_features] if t.shape[1] != in_features else t


# weight elements fake-quantized at a time (a layer's rows in chunks of about this): float32 tensors of 36 MiB,
# above glibc's largest dynamic mmap threshold (32 MiB), so each one goes back to the OS when freed instead of
# leaving heap slack; a layer up to this size is one chunk, as before chunking
CHUNK_ELEMENTS = 9 << 20


def _row_chunks(shape: torch.Size) -> list[slice]:
    """The output rows of a ``[out, n_groups, g]`` weight in chunks of about CHUNK_ELEMENTS elements (one chunk
    for a layer up to that size)."""
    rows = max(1, CHUNK_ELEMENTS // (shape[1] * shape[2]))
    return [slice(r, min(shape[0], r + rows)) for r in range(0, shape[0], rows)]


class _FakeQuantLinearFn(torch.autograd.Function):
    """Both passes work in place where they can and go through the layer's output rows in chunks of about
    CHUNK_ELEMENTS weights: the transient memory is 13-17 bytes a weight of one chunk (the scaled weight, the
    codes, the clamp's mask and dL/dw_hat, plus w_hat during the matmuls), and the backward pass's dL/dv
    (4 bytes a weight of the layer), one layer at a time. Each element's arithmetic is the same for any chunk
    size; the matmuls are split by output rows (the forward's dot products are unchanged; dL/dx sums the chunks'
    products)."""

    @staticmethod
    def forward(ctx, x, weight, v, scale, zero, bias, lo, hi, sym, shape, codes_out):
        # w_hat in the compute dtype: a weight held narrower (bf16 under float32 activations) is widened per chunk
        in_features, weight_dtype = weight.shape[1], torch.promote_types(weight.dtype, x.dtype)
        parts = []
        with torch.no_grad():
            for rows in _row_chunks(shape):
                part = torch.Size((rows.stop - rows.start, shape[1], shape[2]))
                q = _codes(_grouped(weight[rows], part), scale[rows], zero[rows], v[rows], lo, hi, sym)
                if codes_out is not None:  # unsigned codes: sym shifts by 2**(bits-1), asym codes are already unsigned
                    if sym:
                        q -= lo  # small integers: exact both ways
                    codes_out[rows].copy_(_to_matrix(q, in_features))
                    if sym:
                        q += lo
                w_hat = _to_matrix(_dequantize_(q, scale[rows], zero[rows], sym), in_features).to(weight_dtype)
                del q
                parts.append(F.linear(x, w_hat, None if bias is None else bias[rows]))
                del w_hat
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            del parts
        ctx.save_for_backward(x, weight, v, scale, zero, bias)
        ctx.grid = (lo, hi, sym, shape)
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, v, scale, zero, bias = ctx.saved_tensors
        lo, hi, sym, shape = ctx.grid
        needs_x, _, needs_v, needs_scale, needs_zero, needs_bias = ctx.needs_input_grad[:6]
        chunks = _row_chunks(shape)
        whole = len(chunks) == 1
        grad_x = grad_v = grad_scale = grad_zero = None
        with torch.no_grad():
            if not whole:
                grad_v = torch.empty(shape, dtype=torch.float32, device=v.device) if needs_v else None
                grad_scale = torch.empty_like(scale) if needs_scale else None
                grad_zero = torch.empty_like(scale) if needs_zero and not sym else None
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            for rows in chunks:
                part = torch.Size((rows.stop - rows.start, shape[1], shape[2]))
                gx, gv, gs, gz = _FakeQuantLinearFn._rows_backward(
                    ctx, x2, weight[rows], v[rows], scale[rows], zero[rows], grad_out[..., rows], g2[:, rows],
                    lo, hi, sym, part, needs_x, needs_v, needs_scale, needs_zero)
                if gx is not None:
                    grad_x = gx if grad_x is None else grad_x.add_(gx)
                if whole:
                    grad_v, grad_scale, grad_zero = gv, gs, gz
                    continue
                for total, value in ((grad_v, gv), (grad_scale, gs), (grad_zero, gz)):
                    if total is not None:
                        total[rows] = value
            grad_bias = g2.sum(0).to(bias.dtype) if needs_bias and bias is not None else None
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return grad_x, None, grad_v, grad_scale, grad_zero, grad_bias, None, None, None, None, None

    @staticmethod
    def _rows_backward(ctx, x2, weight, v, scale, zero, grad_out, g2, lo, hi, sym, shape, needs_x, needs_v,
                       needs_scale, needs_zero):
        """dL/dx (this chunk's share), dL/dv, dL/dscale and dL/dzero of one chunk of output rows."""
        in_features, weight_dtype = weight.shape[1], torch.promote_types(weight.dtype, x2.dtype)
        device_type, autocast_on, autocast_dtype = ctx.autocast
        ws = _grouped(weight, shape) / scale
        q = ws + v
        q.round_()
        if not sym:
            q += zero
        inside = (q >= lo) & (q <= hi)  # where the clamp passes the gradient
        q.clamp_(lo, hi)
        w_hat = _to_matrix(_dequantize_(q.clone(), scale, zero, sym), in_features).to(weight_dtype)
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            grad_x = grad_out.matmul(w_hat) if needs_x else None
            grad_w_hat = g2.t().mm(x2)
        del w_hat
        grad_w_hat = _grouped(grad_w_hat, shape)
        grad_scale = grad_zero = grad_q_sum = None
        if needs_scale:  # dL/dscale through w_hat = scale * (q - zero)
            grad_scale = (q if sym else q.sub_(zero)).mul_(grad_w_hat).sum(-1, keepdim=True)
        del q
        grad_t = grad_w_hat.mul_(scale)  # dL/dq, then (masked) dL/dv
        if needs_zero and not sym:
            grad_q_sum = grad_t.sum(-1, keepdim=True)
        grad_t.masked_fill_(inside.logical_not_(), 0.0)
        del inside
        if grad_q_sum is not None:  # zero enters q (through the clamp) and w_hat (directly)
            grad_zero = grad_t.sum(-1, keepdim=True) - grad_q_sum
        if needs_scale:  # ... and through w / scale: -dL/dv * (w / scale) / scale
            grad_scale -= ws.div_(scale).mul_(grad_t).sum(-1, keepdim=True)
        del ws
        return grad_x, (grad_t if needs_v else None), grad_scale, grad_zero


def fake_quant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scheme: QuantScheme,
                      v: torch.Tensor, min_scale: torch.Tensor | None, max_scale: torch.Tensor | None,
                      extremes: tuple[torch.Tensor, torch.Tensor] | None = None,
                      codes_out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, quant_dequant(weight, scheme, v, min_scale, max_scale)[0], bias)``, differentiable in ``x``,
    ``v``, ``min_scale`` and ``max_scale`` with the memory of activation checkpointing and no second matmul.
    ``extremes``: ``(amin, amax)`` of :func:`group_extremes` of ``weight``, when the caller keeps them;
    ``codes_out``: a uint8 ``[out, in]`` buffer that receives the unsigned codes."""
    if extremes is None:
        extremes = group_extremes(weight.detach(), scheme)[1:3]
    amin, amax = extremes
    scale, zero, lo, hi = scale_and_zero(amin, amax, scheme, min_scale, max_scale)
    shape = torch.Size((amin.shape[0], amin.shape[1], scheme.effective_group_size(weight.shape[1])))
    v3 = _grouped(v, shape)
    return _FakeQuantLinearFn.apply(x, weight.detach(), v3, scale, zero, bias, lo, hi, scheme.sym, shape, codes_out)


class TunedLinear(nn.Module):
    """Stands in for an ``nn.Linear`` during tuning: fake-quantized weight, same bias, and the tuned parameters
    ``v`` (``[out, in]``, zeros) and ``min_scale`` / ``max_scale`` (``[out, n_groups]``, ones; ``None`` without
    min/max tuning), all float32.

    With gradients enabled the layer runs through :func:`fake_quant_linear` and writes its codes to ``codes``;
    :meth:`quantized_from_codes` turns the codes of the last forward into a :class:`QuantizedWeight` without
    quantizing again."""

    def __init__(self, linear: nn.Linear, scheme: QuantScheme, minmax_tuning: bool) -> None:
        super().__init__()
        self.linear = linear
        self.scheme = scheme
        weight = linear.weight.detach()
        out_features, in_features = weight.shape
        n_groups = scheme.n_groups(in_features)  # ceil: a group size not dividing in leaves a shorter last group
        # v covers the real weight only: quant_dequant pads it with zeros where it pads the weight
        self.v = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.float32, device=weight.device))
        if minmax_tuning:
            ones = torch.ones(out_features, n_groups, dtype=torch.float32, device=weight.device)
            self.min_scale: nn.Parameter | None = nn.Parameter(ones.clone())
            self.max_scale: nn.Parameter | None = nn.Parameter(ones)
        else:
            self.min_scale = None
            self.max_scale = None
        # the weight does not change while tuning: its group extremes are found once
        self.extremes = group_extremes(weight, scheme)[1:3]
        self.codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=weight.device)
        self.codes_valid = False

    def clamp_scales_(self) -> None:
        with torch.no_grad():
            if self.min_scale is not None:
                self.min_scale.clamp_(0.0, 1.0)
                self.max_scale.clamp_(0.0, 1.0)

    def params(self) -> dict[str, torch.Tensor | None]:
        """Copies of the current ``v`` / ``min_scale`` / ``max_scale``."""
        return {
            "v": self.v.detach().clone(),
            "min_scale": None if self.min_scale is None else self.min_scale.detach().clone(),
            "max_scale": None if self.max_scale is None else self.max_scale.detach().clone(),
        }

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        """The layer quantized with the current parameters (1 byte a weight: the best-iteration snapshot)."""
        return quantize(self.linear.weight, self.scheme, self.v, self.min_scale, self.max_scale)

    @torch.no_grad()
    def quantized_from_codes(self) -> QuantizedWeight:
        """What :meth:`quantized` returns, from the codes the last forward wrote (the parameters unchanged since:
        the tuner calls it between the forward and the optimizer step)."""
        if not self.codes_valid:
            return self.quantized()
        amin, amax = self.extremes
        scale, zero, lo, _ = scale_and_zero(amin, amax, self.scheme, self.min_scale, self.max_scale)
        out = scale.shape[0]
        zero = torch.full_like(scale, -lo) if self.scheme.sym else zero
        return QuantizedWeight(q=self.codes.clone(), scale=scale.reshape(out, -1).to(torch.float16),
                               zero=zero.reshape(out, -1).round().to(torch.int32), bits=self.scheme.bits,
                               group_size=self.scheme.group_size, sym=self.scheme.sym)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            self.codes_valid = False
            return fake_quant_linear(x, self.linear.weight, self.linear.bias, self.scheme, self.v, self.min_scale,
                                     self.max_scale, self.extremes)
        self.codes_valid = True
        return fake_quant_linear(x, self.linear.weight, self.linear.bias, self.scheme, self.v, self.min_scale,
                                 self.max_scale, self.extremes, self.codes)
