"""qrunner.quant.fake_quant: the fused fake-quantized linear gives autograd's gradients, keeps no weight-sized
tensor for its backward pass, runs each matmul once, and its codes are the quantized weight bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrunner.quant.autoround import TuneSettings, tune_block
from qrunner.quant.fake_quant import TunedLinear, fake_quant_linear
from qrunner.quant.rtn import quant_dequant, quantize
from qrunner.quant.scheme import QuantScheme
from test_autoround_tuner import _mlp


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _autograd_linear(x, weight, bias, scheme, v, min_scale, max_scale):
    """The reference: plain autograd through quant_dequant."""
    return F.linear(x, quant_dequant(weight, scheme, v, min_scale, max_scale)[0], bias)


def _params(out_f, in_f, scheme, seed, minmax=True):
    g = torch.Generator().manual_seed(seed)
    n_groups = scheme.n_groups(in_f)
    v = (torch.rand(out_f, in_f, generator=g) - 0.5).mul_(0.6).requires_grad_()
    if not minmax:
        return v, None, None
    # some coefficients outside [0, 1]: the clamp's identity gradient is part of the contract
    lo = (0.7 + 0.4 * torch.rand(out_f, n_groups, generator=g)).requires_grad_()
    hi = (0.7 + 0.4 * torch.rand(out_f, n_groups, generator=g)).requires_grad_()
    return v, lo, hi


def _grads(fn, x, weight, bias, scheme, v, lo, hi, grad_out):
    tensors = [t for t in (x, v, lo, hi) if t is not None and t.requires_grad]
    for t in tensors:
        t.grad = None
    out = fn(x, weight, bias, scheme, v, lo, hi)
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits,group_size,in_f", [(4, 32, 96), (2, 64, 96), (3, -1, 80), (8, 32, 64)])
@pytest.mark.parametrize("minmax", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_output_and_gradients_equal_autograd_through_quant_dequant(sym, bits, group_size, in_f, minmax, chunked,
                                                                    monkeypatch):
    """In one chunk: bit for bit. In chunks of 5 output rows (the last one shorter; a large layer's case): the same
    codes and dL/dv elements, dL/dx summed over the chunks (float rounding only)."""
    import qrunner.quant.fake_quant as fq

    scheme = QuantScheme(bits, group_size, sym)
    grouped = torch.Size((48, scheme.n_groups(in_f), scheme.effective_group_size(in_f)))
    if chunked:
        monkeypatch.setattr(fq, "CHUNK_ELEMENTS", 5 * grouped[1] * grouped[2])
    torch.manual_seed(0)
    weight = torch.randn(48, in_f) * 0.1
    weight[3, :] = 0.0  # an all-zero row: scales at the threshold, ties in the symmetric maximum
    bias = torch.randn(48)
    x = torch.randn(2, 5, in_f, requires_grad=True)
    grad_out = torch.randn(2, 5, 48)
    v, lo, hi = _params(48, in_f, scheme, seed=1, minmax=minmax)
    ref_out, ref = _grads(_autograd_linear, x, weight, bias, scheme, v, lo, hi, grad_out)
    out, got = _grads(fake_quant_linear, x, weight, bias, scheme, v, lo, hi, grad_out)
    assert len(fq._row_chunks(grouped)) == (10 if chunked else 1)
    assert torch.allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    if not chunked:
        assert torch.equal(out, ref_out)
    for name, a, b in zip(("x", "v", "min_scale", "max_scale"), got, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 if chunked else 1e-7), name
        if name == "v" or (name == "x" and not chunked):
            assert torch.equal(a, b), name  # the same operations in the same order: bit for bit


def test_bfloat16_weight_matches_autograd_and_input_without_gradient_gets_none():
    torch.manual_seed(0)
    scheme = QuantScheme(4, 32, True)
    weight = (torch.randn(32, 64) * 0.1).to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)  # no gradient wanted: the matmul for it is skipped
    grad_out = torch.randn(4, 32, dtype=torch.bfloat16)
    v, lo, hi = _params(32, 64, scheme, seed=2)
    ref_out, ref = _grads(_autograd_linear, x, weight, None, scheme, v, lo, hi, grad_out)
    out, got = _grads(fake_quant_linear, x, weight, None, scheme, v, lo, hi, grad_out)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref_out)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    assert x.grad is None


def test_backward_keeps_no_weight_sized_tensor_and_runs_each_matmul_once():
    torch.manual_seed(0)
    scheme = QuantScheme(4, 32, True)
    linear = nn.Linear(256, 128)
    x = torch.randn(8, 256, requires_grad=True)
    v, lo, hi = _params(128, 256, scheme, seed=3)
    own = {t.data_ptr() for t in (x, linear.weight, linear.bias, v)}
    saved_new = []

    def pack(t):
        if t.data_ptr() not in own and t.numel() >= linear.weight.numel():
            saved_new.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fake_quant_linear(x, linear.weight.detach(), linear.bias.detach(), scheme, v, lo, hi)
    assert saved_new == []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ref = _autograd_linear(x, linear.weight.detach(), linear.bias.detach(), scheme, v, lo, hi)
    assert len(saved_new) >= 3  # plain autograd keeps w_hat and two more weight-sized intermediates

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.sum().backward()
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("aten::mm", 0) == 2  # dL/dx and dL/dw_hat; activation checkpointing ran a third (the forward)
    del ref


@pytest.mark.parametrize("sym", [True, False])
def test_codes_written_by_the_forward_are_the_quantized_weight(sym):
    torch.manual_seed(0)
    scheme = QuantScheme(2, 64, sym)
    lin = nn.Linear(96, 40)  # a short last group
    wrapped = TunedLinear(lin, scheme, minmax_tuning=True)
    with torch.no_grad():
        wrapped.v.uniform_(-0.5, 0.5)
        wrapped.min_scale.uniform_(0.6, 1.0)
        wrapped.max_scale.uniform_(0.6, 1.0)
    wrapped(torch.randn(3, 96)).sum().backward()
    got, want = wrapped.quantized_from_codes(), quantize(lin.weight, scheme, wrapped.v, wrapped.min_scale,
                                                         wrapped.max_scale)
    for field in ("q", "scale", "zero"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    with torch.no_grad():
        wrapped(torch.randn(3, 96))  # a forward without gradients writes no codes
    assert not wrapped.codes_valid


@pytest.mark.parametrize("sym", [True, False])
def test_tuning_with_the_fused_layer_equals_tuning_through_autograd(monkeypatch, sym):
    """The whole tuner, fused layer vs autograd reference: the same losses and the same quantized weights."""
    block = _mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, 64, generator=g)
    with torch.no_grad():
        y = block(x)
    layers = {"0": QuantScheme(2, 32, sym), "2": QuantScheme(4, 64, sym)}
    settings = TuneSettings(iters=40, batch_size=4)
    fused = tune_block(block, layers, x, y, lambda b, t: b(t), settings, torch.Generator().manual_seed(0))

    def reference_forward(self, t):
        return _autograd_linear(t, self.linear.weight, self.linear.bias, self.scheme, self.v, self.min_scale,
                                self.max_scale)

    monkeypatch.setattr(TunedLinear, "forward", reference_forward)
    ref = tune_block(block, layers, x, y, lambda b, t: b(t), settings, torch.Generator().manual_seed(0))
    assert fused.best_iter == ref.best_iter
    assert fused.losses == pytest.approx(ref.losses, rel=1e-5)
    for name in layers:
        assert torch.equal(fused.weights[name].q, ref.weights[name].q), name
        assert torch.equal(fused.weights[name].scale, ref.weights[name].scale), name


def test_a_weight_held_in_bfloat16_under_float32_activations_gives_the_float32_weights_results():
    """memory/narrow.py holds a bf16 checkpoint's tuned weights in bf16: the fused layer widens them per chunk, so
    outputs, codes and gradients are the float32 weight's, bit for bit; the no-gradient forward too."""
    torch.manual_seed(0)
    scheme = QuantScheme(4, 32, True)
    weight = (torch.randn(40, 96) * 0.1).to(torch.bfloat16).float()  # bf16 values held in float32
    results = []
    for held in (weight, weight.to(torch.bfloat16)):
        x = torch.randn(3, 96, generator=torch.Generator().manual_seed(1), requires_grad=True)
        v, lo, hi = _params(40, 96, scheme, seed=4)
        codes = torch.empty(40, 96, dtype=torch.uint8)
        out = fake_quant_linear(x, held, None, scheme, v, lo, hi, codes_out=codes)
        assert out.dtype == torch.float32
        out.backward(torch.ones_like(out))
        with torch.no_grad():
            plain = fake_quant_linear(x, held, None, scheme, v, lo, hi)
        results.append((out.detach(), codes, x.grad, v.grad, lo.grad, hi.grad, plain))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_narrowed_holds_exact_weights_narrower_and_gives_them_back():
    from qrunner.memory.narrow import narrowed

    exact = nn.Linear(64, 32)
    with torch.no_grad():
        exact.weight.copy_(exact.weight.to(torch.bfloat16).float())
    inexact = nn.Linear(64, 32)  # float32 values: kept as they are
    before = [exact.weight.detach().clone(), inexact.weight.detach().clone()]
    with narrowed([exact, inexact]) as saved:
        assert exact.weight.dtype == torch.bfloat16 and inexact.weight.dtype == torch.float32
        assert saved == 64 * 32 * 2
    assert exact.weight.dtype == torch.float32 and torch.equal(exact.weight, before[0])
    assert torch.equal(inexact.weight, before[1])
