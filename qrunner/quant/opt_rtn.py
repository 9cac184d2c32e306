"""Optimized RTN for ``iters=0``: importance-weighted per-group search of the quantization scale.

What auto-round 0.16 does (``auto_round/data_type/int.py: search_scales`` /
``quant_tensor_opt_rtn_sym``, ``data_type/neuqi.py``, ``algorithms/quantization/rtn``):
with ``iters=0`` and optimized RTN on (the default for int W2-W4; ``--disable_opt_rtn``
turns it off; W8 and MoE experts default to plain RTN), forward hooks collect an
"imatrix" per linear, ``sum(x**2)`` per input channel divided by the number of samples,
and then per group of the weight it grid-searches the scale minimising
``sum_i imatrix_i * (w_i - w_hat_i)**2``:

* symmetric int: the llama.cpp ``make_qx_quants`` grid. The signed RTN scale
  ``-extreme / nmax`` is replaced by ``-extreme / (nmax - step * k)``; for 2 bits
  ``step = 0.01, k in [-90, 90]`` (scale factor 0.69 .. 1.82 of RTN's), for more bits
  ``step = 0.0075 * nmax, k in [-100, 100]`` (factor 0.57 .. 4.0);
* asymmetric int: a NeUQI search (coarse log grid + fine refinement of the scale with an
  exhaustive search of the integer zero point).

Difference from the plain "shrink the range by 1.0 .. 0.7" idea: the scale may also
*grow* (for symmetric grids this trades rounding error for less clipping on the side that
only reaches ``nmax - 1``; measured on Gaussian weights with skewed importance it lowers
the weighted error a further ~5-10 % at 3-4 bits). qrunner therefore searches a factor
``f`` applied to both ends of the RTN range (``wmin * f``, ``wmax * f``; for ``f <= 1``
exactly ``min_scale = max_scale = f`` of :func:`qrunner.quant.rtn.quantize`), over
AutoRound's range, in two stages like NeUQI (a coarse grid, then a fine grid around each
group's best) to keep the number of passes over the weight small on CPU. For asymmetric
schemes the zero point follows the scaled range (``round(-wmin * f / scale)``) instead of
NeUQI's exhaustive zero-point search. ``f = 1`` (plain RTN) is always a candidate and
only a strictly lower error replaces it, so the weighted error never exceeds RTN's.
Groups whose importance is all zero fall back to uniform weights (AutoRound's
``_imatrix_handle_zero`` fills such channels from the weights instead).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from qrunner.quant.rtn import Q_SCALE_THRESH, QuantizedWeight, group_layout, pad_columns, to_quantized_weight
from qrunner.quant.scheme import QuantScheme

__all__ = [
    "ImportanceCollector",
    "autoround_factor_range",
    "quantize_weighted_rtn",
    "quantize_with_factors",
    "search_scale_factors",
    "weighted_error",
]

_FP16_MAX = float(torch.finfo(torch.float16).max)
_CHUNK_ELEMENTS = 1 << 18  # rows per search chunk so that one candidate's temporaries stay in cache


def autoround_factor_range(bits: int) -> tuple[float, float]:
    """Range of scale factors (relative to RTN's scale) that AutoRound's ``search_scales`` covers."""
    nmax = 2 ** (bits - 1)
    if bits == 2:
        return nmax / (nmax + 0.9), nmax / (nmax - 0.9)
    step = nmax * 0.75 / 200 * 2
    return nmax / (nmax + 100 * step), nmax / (nmax - 100 * step)


def _grouped(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``[out, n_groups, g]``; a shorter last group is zero-padded (no effect on ranges, codes or errors)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    out, in_features = weight.shape
    g, n_groups, pad = group_layout(in_features, scheme)
    return pad_columns(weight.to(torch.float32), pad).reshape(out, n_groups, g)


def _qparams(w: torch.Tensor, scheme: QuantScheme, f: torch.Tensor | float):
    """Scale/zero/clamp bounds for grouped ``w`` ``[r, G, g]`` with the range scaled by ``f``.

    Same arithmetic as ``rtn.quant_dequant`` with ``min_scale = max_scale = f`` (which
    clamps ``f`` to [0, 1]); here ``f`` may exceed 1.
    """
    wmin = torch.clamp(w.amin(dim=-1, keepdim=True), max=0) * f
    wmax = torch.clamp(w.amax(dim=-1, keepdim=True), min=0) * f
    if scheme.sym:
        maxq = 2 ** (scheme.bits - 1)
        wmin_abs = -wmin
        neg_wins = (wmax < wmin_abs).to(torch.float32)
        max_v = (2 * neg_wins - 1) * torch.maximum(wmax, wmin_abs)
        scale16 = (max_v / maxq).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
        scale16 = torch.where(scale16 < 0, scale16.clamp(max=-Q_SCALE_THRESH), scale16.clamp(min=Q_SCALE_THRESH))
        scale = scale16.to(torch.float32)
        zero = torch.zeros_like(scale)
        return scale, zero, -maxq, maxq - 1
    maxq = 2**scheme.bits - 1
    scale16 = ((wmax - wmin) / maxq).clamp(max=_FP16_MAX).to(torch.float16).clamp(min=Q_SCALE_THRESH)
    scale = scale16.to(torch.float32)
    zero = torch.round(-wmin / scale)
    return scale, zero, 0, maxq


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, lo, hi)


def _group_importance(importance: torch.Tensor, in_features: int, n_groups: int, g: int) -> torch.Tensor:
    imp = importance.detach().to(torch.float32).reshape(-1)
    if imp.numel() != in_features:
        raise ValueError(f"importance has {imp.numel()} entries, the weight has {in_features} input channels")
    if not torch.isfinite(imp).all():
        raise ValueError("importance contains NaN or inf")
    # padded channels (weight 0, quantized exactly to 0) get importance 0: they add no error
    imp = pad_columns(imp.clamp(min=0).reshape(1, in_features), n_groups * g - in_features).reshape(1, n_groups, g)
    dead = imp.sum(dim=-1, keepdim=True) <= 0
    return torch.where(dead, torch.ones_like(imp), imp)


def _group_error(w, imp, scheme, f) -> torch.Tensor:
    scale, zero, lo, hi = _qparams(w, scheme, f)
    w_hat = scale * (_codes(w, scale, zero, lo, hi) - zero)
    return ((w_hat - w).square_() * imp).sum(dim=-1)  # [r, G]


def _default_grids(bits: int, coarse: int) -> tuple[torch.Tensor, float]:
    lo, hi = autoround_factor_range(bits)
    grid = torch.exp(torch.linspace(torch.log(torch.tensor(lo)), torch.log(torch.tensor(hi)), coarse))
    ratio = float((hi / lo) ** (1.0 / (coarse - 1)))  # spacing of the coarse log grid
    return grid, ratio


@torch.no_grad()
def search_scale_factors(
    weight: torch.Tensor,
    scheme: QuantScheme,
    importance: torch.Tensor,
    factors: Sequence[float] | None = None,
    coarse: int = 32,
    fine: int = 16,
) -> torch.Tensor:
    """Per ``[out, n_groups]`` factor ``f`` minimising ``sum_i importance_i * (w_i - w_hat_i)**2``.

    ``factors`` given: exactly those candidates (plus 1.0). Otherwise two stages over
    :func:`autoround_factor_range`: ``coarse`` log-spaced candidates, then ``fine``
    candidates around each group's best coarse factor. Ties keep the smaller index, and
    RTN (``f = 1``) is evaluated first, so it is only replaced by a strictly lower error.
    """
    w_all = _grouped(weight, scheme)
    out, n_groups, g = w_all.shape
    imp = _group_importance(importance, weight.shape[1], n_groups, g)
    if factors is not None:
        cands = [float(f) for f in factors]
        if any(not (f > 0) for f in cands):
            raise ValueError("factors must be positive")
        stage1, ratio = torch.tensor(cands, dtype=torch.float32), None
    else:
        if coarse < 2 or fine < 0:
            raise ValueError("coarse must be >= 2 and fine >= 0")
        stage1, ratio = _default_grids(scheme.bits, coarse)
    rows = max(1, _CHUNK_ELEMENTS // (n_groups * g))
    best_f = torch.ones(out, n_groups, dtype=torch.float32)
    for r0 in range(0, out, rows):
        w = w_all[r0 : r0 + rows]
        best_err = _group_error(w, imp, scheme, 1.0)
        f_best = torch.ones_like(best_err)
        for f in stage1.tolist():
            err = _group_error(w, imp, scheme, f)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            f_best = torch.where(better, torch.full_like(f_best, f), f_best)
        if ratio is not None and fine > 0:
            # fine stage: per-group candidates spread over one coarse step either side of the best
            center = f_best.clone()
            offsets = torch.linspace(-1.0, 1.0, fine + 2)[1:-1]
            for t in offsets.tolist():
                f = center * (ratio ** t)
                err = _group_error(w, imp, scheme, f.unsqueeze(-1))
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                f_best = torch.where(better, f, f_best)
        best_f[r0 : r0 + rows] = f_best
    return best_f


@torch.no_grad()
def quantize_with_factors(weight: torch.Tensor, scheme: QuantScheme, factors: torch.Tensor) -> QuantizedWeight:
    """Quantize with the RTN range of every group scaled by ``factors`` ``[out, n_groups]``.

    For factors in (0, 1] this equals ``quantize(weight, scheme, min_scale=f, max_scale=f)``.
    """
    w = _grouped(weight, scheme)
    out, n_groups, g = w.shape
    f = factors.to(torch.float32).reshape(out, n_groups, 1)
    scale, zero, lo, hi = _qparams(w, scheme, f)
    q = _codes(w, scale, zero, lo, hi).reshape(out, n_groups * g)[:, : weight.shape[1]]
    return to_quantized_weight(q, scale.reshape(out, n_groups), zero.reshape(out, n_groups), scheme)


def quantize_weighted_rtn(
    weight: torch.Tensor,
    scheme: QuantScheme,
    importance: torch.Tensor,
    factors: Sequence[float] | None = None,
) -> QuantizedWeight:
    """Optimized RTN: per group, the scale factor with the lowest importance-weighted error.

    Args:
        weight: ``[out, in]``.
        scheme: bits / group_size / sym.
        importance: ``[in]``, the per-input-channel mean of ``x**2`` over calibration data
            (see :class:`ImportanceCollector`).
        factors: explicit candidates (e.g. ``torch.linspace(1.0, 0.7, 20)`` for a plain
            range shrink); default: AutoRound's range, 32 coarse + 16 fine candidates
            (49 passes over the weight, RTN's included).
    """
    best = search_scale_factors(weight, scheme, importance, factors=factors)
    return quantize_with_factors(weight, scheme, best)


def weighted_error(weight: torch.Tensor, w_hat: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """``sum_i importance_i * (w_i - w_hat_i)**2`` per output row (fp32)."""
    diff = weight.to(torch.float32) - w_hat.to(torch.float32)
    return (diff.square() * importance.to(torch.float32).reshape(1, -1)).sum(dim=-1)


class ImportanceCollector:
    """Context manager accumulating the per-input-channel mean of ``x**2`` of given linears.

    ``with ImportanceCollector({"mlp.down_proj": layer, ...}) as col: run(...)`` registers a
    forward pre-hook on each module; every call adds ``sum(x**2)`` over all leading
    dimensions (fp32) and the number of rows. ``col.importance[name]`` is the mean over all
    rows seen (modules never called are absent). Hooks are removed on exit; the statistics
    stay readable.
    """

    def __init__(self, modules: Mapping[str, nn.Module] | Iterable[tuple[str, nn.Module]]) -> None:
        items = list(modules.items()) if isinstance(modules, Mapping) else list(modules)
        for name, module in items:
            if not isinstance(module, nn.Linear):
                raise TypeError(f"{name!r} is a {type(module).__name__}, expected nn.Linear")
        self._modules = items
        self._handles: list = []
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            with torch.no_grad():
                x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                s = x2.square().sum(dim=0)
            if name in self.sums:
                self.sums[name] += s
                self.counts[name] += x2.shape[0]
            else:
                self.sums[name] = s
                self.counts[name] = x2.shape[0]

        return hook

    def __enter__(self) -> "ImportanceCollector":
        for name, module in self._modules:
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def importance(self) -> dict[str, torch.Tensor]:
        return {name: self.sums[name] / max(self.counts[name], 1) for name in self.sums}
