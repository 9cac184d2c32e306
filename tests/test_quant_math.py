"""qrunner.quant.scheme / qrunner.quant.rtn: hand-checked examples, bounds, gradients, AutoRound parity."""

from __future__ import annotations

import pytest
import torch

from qrunner.quant.rtn import Q_SCALE_THRESH, QuantizedWeight, quant_dequant, quantize, quantize_rtn, round_ste
from qrunner.quant.scheme import SUPPORTED_BITS, QuantScheme

FP16_THRESH = float(torch.tensor(Q_SCALE_THRESH, dtype=torch.float16))  # 1.0014e-05


# --- scheme -----------------------------------------------------------------------------


def test_scheme_validation_and_groups():
    assert SUPPORTED_BITS == (2, 3, 4, 8)
    s = QuantScheme(bits=4, group_size=32, sym=True)
    assert s.data_type == "int"
    assert s.n_groups(128) == 4
    assert s.n_groups(100) == 4  # ceil
    assert QuantScheme(8, -1, False).n_groups(4096) == 1
    for bad in (dict(bits=5, group_size=32, sym=True), dict(bits=4, group_size=0, sym=True),
                dict(bits=4, group_size=-2, sym=True), dict(bits=4, group_size=32, sym=True, data_type="fp")):
        with pytest.raises(ValueError):
            QuantScheme(**bad)
    with pytest.raises(Exception):
        s.bits = 8  # frozen


# --- round_ste ----------------------------------------------------------------------------


def test_round_ste_forward_is_round_and_gradient_is_identity():
    x = torch.tensor([-2.5, -1.49, -0.5, 0.2, 0.5, 1.5, 2.51, 3.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    assert y.detach().tolist() == [-2.0, -1.0, -0.0, 0.0, 0.0, 2.0, 3.0, 4.0]  # half to even
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    y.backward(g)
    assert torch.equal(x.grad, g)


# --- hand-computed RTN examples -------------------------------------------------------------


def test_rtn_sym_4bit_negative_extreme_dominates():
    # |min| = 1.0 > max = 0.75 -> scale = +1.0 / 8 = 0.125, -1.0 maps to -8.
    w = torch.tensor([[-1.0, -0.5, -0.3, 0.0, 0.1, 0.44, 0.5, 0.75]])
    qw = quantize_rtn(w, QuantScheme(4, 8, True))
    # signed q = [-8, -4, round(-2.4)=-2, 0, round(0.8)=1, round(3.52)=4, 4, 6]; codes = q + 8
    assert qw.q.dtype == torch.uint8 and qw.q.tolist() == [[0, 4, 6, 8, 9, 12, 12, 14]]
    assert qw.scale.dtype == torch.float16 and qw.scale.tolist() == [[0.125]]
    assert qw.zero.dtype == torch.int32 and qw.zero.tolist() == [[8]]
    assert qw.dequantize().tolist() == [[-1.0, -0.5, -0.25, 0.0, 0.125, 0.5, 0.5, 0.75]]


def test_rtn_sym_4bit_positive_extreme_gives_negative_scale():
    # max = 1.0 > |min| = 0.6 -> scale = -1.0 / 8, so +1.0 maps to -8 (code 0).
    w = torch.tensor([[-0.5, 0.0, 0.25, 1.0, 0.3, -0.6, 0.9, 0.05]])
    qw = quantize_rtn(w, QuantScheme(4, 8, True))
    # w / s = [4, 0, -2, -8, -2.4, 4.8, -7.2, -0.4] -> q = [4, 0, -2, -8, -2, 5, -7, 0]
    assert qw.q.tolist() == [[12, 8, 6, 0, 6, 13, 1, 8]]
    assert qw.scale.tolist() == [[-0.125]]
    assert qw.zero.tolist() == [[8]]
    assert qw.dequantize().tolist() == [[-0.5, 0.0, 0.25, 1.0, 0.25, -0.625, 0.875, 0.0]]


def test_rtn_sym_tie_uses_negative_scale():
    # Equal magnitudes: AutoRound picks the positive extreme (scale < 0); -1.0 then clips to +7.
    qw = quantize_rtn(torch.tensor([[-1.0, 1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]]), QuantScheme(4, 8, True))
    assert qw.scale.tolist() == [[-0.125]]
    assert qw.q.tolist() == [[15, 0, 8, 4, 8, 8, 8, 8]]


def test_rtn_asym_4bit_uses_fp16_rounded_scale():
    w = torch.tensor([[-0.5, -0.25, 0.0, 0.1, 0.25, 0.5, 0.75, 1.0]])
    qw = quantize_rtn(w, QuantScheme(4, 8, False))
    # scale = 1.5 / 15 = 0.1 -> float16 0.0999755859375 (used for q as well)
    assert qw.scale.tolist() == [[0.0999755859375]]
    s = 0.0999755859375
    # zp = round(0.5 / s) = round(5.0012) = 5; q = round(w / s) + 5, e.g. -0.25/s = -2.5006 -> -3
    assert qw.zero.tolist() == [[5]]
    assert qw.q.tolist() == [[0, 2, 5, 6, 8, 10, 13, 15]]
    expected = torch.tensor([[-5, -3, 0, 1, 3, 5, 8, 10]], dtype=torch.float32) * torch.tensor(s)
    assert torch.equal(qw.dequantize(), expected)


@pytest.mark.parametrize("sym", [True, False])
def test_all_zero_groups_are_finite(sym):
    w = torch.zeros(2, 16)
    w[1, 8:] = torch.linspace(-1, 1, 8)  # one real group next to three all-zero ones
    wq, scale, zero, q = quant_dequant(w, QuantScheme(4, 8, sym))
    assert torch.isfinite(wq).all() and torch.isfinite(scale).all() and torch.isfinite(q).all()
    assert scale[0].tolist() == [FP16_THRESH, FP16_THRESH] and scale[1, 0].item() == FP16_THRESH
    assert wq[0].abs().max().item() == 0.0 and wq[1, :8].abs().max().item() == 0.0
    qw = quantize_rtn(w, QuantScheme(4, 8, sym))
    assert qw.q[0].tolist() == qw.zero[0, :1].repeat(16).tolist()  # codes sit at the zero point


# --- a group size that does not divide in_features: a shorter last group --------------------


def _by_hand(qw: QuantizedWeight, g: int) -> torch.Tensor:
    """``scale[j] * (q[i] - zero[j])`` for input channel i in group j = i // g, element by element."""
    out, n = qw.q.shape
    ref = torch.empty(out, n)
    for r in range(out):
        for i in range(n):
            ref[r, i] = float(qw.scale[r, i // g]) * (int(qw.q[r, i]) - int(qw.zero[r, i // g]))
    return ref


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_short_last_group_in_192_group_128(bits, sym):
    torch.manual_seed(bits + 10 * sym)
    w = torch.randn(6, 192) * 0.05
    w[0, 128:] = 0.0  # an all-zero short group stays finite and exact
    qw = quantize_rtn(w, QuantScheme(bits, 128, sym))
    assert qw.q.shape == (6, 192) and qw.scale.shape == qw.zero.shape == (6, 2)  # ceil(192 / 128) groups
    # the full group is what quantizing its 128 columns alone gives, the short one the remaining 64 columns as one group
    full = quantize_rtn(w[:, :128], QuantScheme(bits, 128, sym))
    short = quantize_rtn(w[:, 128:], QuantScheme(bits, -1, sym))
    assert torch.equal(qw.q[:, :128], full.q) and torch.equal(qw.scale[:, :1], full.scale)
    assert torch.equal(qw.q[:, 128:], short.q) and torch.equal(qw.scale[:, 1:], short.scale)
    assert torch.equal(qw.zero, torch.cat([full.zero, short.zero], dim=1))
    assert torch.equal(qw.dequantize(), _by_hand(qw, 128))
    assert torch.equal(qw.dequantize()[0, 128:], torch.zeros(64))
    wq, scale, zero, q = quant_dequant(w, QuantScheme(bits, 128, sym))
    assert wq.shape == q.shape == (6, 192) and scale.shape == (6, 2)
    assert torch.equal(qw.dequantize(), wq)


@pytest.mark.parametrize("sym", [True, False])
def test_group_larger_than_the_row_is_one_group_per_row(sym):
    torch.manual_seed(5)
    w = torch.randn(4, 64)
    qw = quantize_rtn(w, QuantScheme(4, 128, sym))
    per_row = quantize_rtn(w, QuantScheme(4, -1, sym))
    assert qw.scale.shape == (4, 1) and qw.group_size == 128
    assert torch.equal(qw.q, per_row.q) and torch.equal(qw.scale, per_row.scale) and torch.equal(qw.zero, per_row.zero)
    assert torch.equal(qw.dequantize(), _by_hand(qw, 128)) and torch.equal(qw.dequantize(), per_row.dequantize())


def test_short_group_tuning_params_act_on_real_columns_only():
    torch.manual_seed(6)
    w = torch.randn(8, 96)
    s = QuantScheme(4, 64, False)
    v = torch.zeros(8, 96, requires_grad=True)
    mn = torch.ones(8, 2, requires_grad=True)
    mx = torch.ones(8, 2, requires_grad=True)
    wq, scale, _, _ = quant_dequant(w, s, v=v, min_scale=mn, max_scale=mx)
    assert wq.shape == (8, 96) and scale.shape == (8, 2)
    ((wq - w) ** 2).sum().backward()
    assert v.grad.shape == (8, 96) and mn.grad.shape == mx.grad.shape == (8, 2)
    assert (mn.grad[:, 1] != 0).any() and (mx.grad[:, 1] != 0).any()  # the short group's range is tuned too
    # offsets in the short group move only its codes
    shifted = quantize(w, s, v=torch.cat([torch.zeros(8, 64), torch.full((8, 32), 0.49)], dim=1))
    base = quantize_rtn(w, s)
    assert torch.equal(shifted.q[:, :64], base.q[:, :64]) and (shifted.q[:, 64:] != base.q[:, 64:]).any()
    with pytest.raises(ValueError):  # groups that do not fit the row
        QuantizedWeight(base.q, base.scale[:, :1], base.zero[:, :1], 4, 64, False).dequantize()


# --- bounds / consistency ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
def test_rtn_error_bounds(bits, group_size):
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(64, 128) * 0.05
    w[3, :32] = 0.0
    for sym in (True, False):
        qw = quantize_rtn(w, QuantScheme(bits, group_size, sym))
        g = 128 if group_size == -1 else group_size
        s = qw.scale.float().abs().repeat_interleave(g, dim=1)
        err = (w - qw.dequantize()).abs()
        assert qw.q.max().item() <= 2**bits - 1
        if sym:
            # Full-range sym: the grid is [-2**(b-1), 2**(b-1)-1]*scale, so values on the
            # smaller-magnitude side beyond (2**(b-1)-0.5)*|scale| clip to the last level.
            clipped = qw.q.int() == 2**bits - 1
            assert (err[~clipped] <= s[~clipped] * (0.5 + 1e-5)).all()
            assert (err <= s * (1 + 1e-5)).all()
        else:
            # asym: interior values are within scale/2; at the top of the range the fp16
            # rounding of the scale (relative error <= 2**-11) can push wmax up to
            # maxq * 2**-11 levels past the last level, which is then clipped.
            assert (err <= s * (0.5 + (2**bits - 1) * 2.0**-11 + 1e-5)).all()
            top = qw.q.int() == 2**bits - 1
            assert (err[~top] <= s[~top] * (0.5 + 1e-5)).all()


def test_dequantize_equals_quant_dequant_output():
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    for scheme in (QuantScheme(4, 32, True), QuantScheme(3, 32, False), QuantScheme(8, -1, True)):
        wq, scale, zero, q = quant_dequant(w, scheme)
        qw = quantize_rtn(w, scheme)
        assert isinstance(qw, QuantizedWeight)
        assert torch.equal(qw.dequantize(), wq)
        assert torch.equal(qw.scale.float(), scale)  # the scale used was already fp16-exact
        assert qw.dequantize(torch.float16).dtype == torch.float16


def test_quant_dequant_is_differentiable_in_tuning_params():
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    for sym in (True, False):
        v = torch.zeros(16, 64, requires_grad=True)
        mn = torch.ones(16, 2, requires_grad=True)
        mx = torch.ones(16, 2, requires_grad=True)
        wq, *_ = quant_dequant(w, QuantScheme(4, 32, sym), v=v, min_scale=mn, max_scale=mx)
        ((wq - w) ** 2).sum().backward()
        for p in (v, mn, mx):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_tuned_params_change_the_result():
    torch.manual_seed(3)
    w = torch.randn(8, 32)
    s = QuantScheme(4, 32, False)
    base = quantize_rtn(w, s)
    v = torch.full((8, 32), 0.49)
    shifted = quantize(w, s, v=v)
    assert (shifted.q.int() - base.q.int()).min() >= 0 and (shifted.q != base.q).any()
    # min/max_scale > 1 are clamped to 1 (AutoRound's bound), so they change nothing.
    same = quantize(w, s, min_scale=torch.full((8, 1), 1.5), max_scale=torch.full((8, 1), 3.0))
    assert torch.equal(same.q, base.q) and torch.equal(same.scale, base.scale)


# --- parity with AutoRound 0.16's own quantizers (fp32 weights) --------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_matches_auto_round_quant_functions(bits, sym):
    ar_int = pytest.importorskip("auto_round.data_type.int")
    torch.manual_seed(bits + 10 * sym)
    out, inn, g = 24, 64, 32
    w = torch.randn(out, inn) * 0.02
    v = torch.rand(out, inn) - 0.5
    mn = 0.6 + 0.4 * torch.rand(out, inn // g)
    mx = 0.6 + 0.4 * torch.rand(out, inn // g)
    fn = ar_int.quant_tensor_sym if sym else ar_int.quant_tensor_asym
    ref_wq, ref_scale, ref_zp = fn(
        w, bits=bits, group_size=g, v=v.reshape(-1, g), min_scale=mn.reshape(-1), max_scale=mx.reshape(-1),
        scale_dtype=torch.float16, q_scale_thresh=1e-5,
    )
    wq, scale, zero, q = quant_dequant(w, QuantScheme(bits, g, sym), v=v, min_scale=mn, max_scale=mx)
    assert torch.equal(wq, ref_wq)
    assert torch.equal(scale, ref_scale.reshape(out, -1).float())
    if not sym:
        assert torch.equal(zero, ref_zp.reshape(out, -1).float())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("inn", [192, 64], ids=["short-last-group", "group-beyond-row"])
def test_short_groups_match_auto_round_quant_functions(bits, sym, inn):
    """AutoRound pads the last group with zeros (``reshape_pad_tensor_by_group_size``; a row shorter than the
    group is one group), its ``v`` in the padded shape; qrunner's ``v`` covers the real columns only."""
    ar_int = pytest.importorskip("auto_round.data_type.int")
    torch.manual_seed(bits + 10 * sym + inn)
    out, g = 16, 128
    n_groups = -(-inn // g)
    w = torch.randn(out, inn) * 0.02
    v = torch.rand(out, inn) - 0.5
    mn = 0.6 + 0.4 * torch.rand(out, n_groups)
    mx = 0.6 + 0.4 * torch.rand(out, n_groups)
    padded_v = torch.nn.functional.pad(v, (0, n_groups * g - inn)) if inn > g else v
    fn = ar_int.quant_tensor_sym if sym else ar_int.quant_tensor_asym
    ref_wq, ref_scale, ref_zp = fn(
        w, bits=bits, group_size=g, v=padded_v.reshape(out * n_groups, -1), min_scale=mn.reshape(-1),
        max_scale=mx.reshape(-1), scale_dtype=torch.float16, q_scale_thresh=1e-5,
    )
    wq, scale, zero, q = quant_dequant(w, QuantScheme(bits, g, sym), v=v, min_scale=mn, max_scale=mx)
    assert ref_wq.shape == wq.shape == (out, inn)
    assert torch.equal(wq, ref_wq)
    assert torch.equal(scale, ref_scale.reshape(out, -1).float())
    if not sym:
        assert torch.equal(zero, ref_zp.reshape(out, -1).float())
