"""qrunner.quant.autoround (tune one block) and qrunner.quant.opt_rtn (importance-weighted RTN)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from qrunner.quant.autoround import TuneSettings, _IndexSampler, default_lr, tune_block
from qrunner.quant.fake_quant import TunedLinear
from qrunner.quant.opt_rtn import (
    ImportanceCollector,
    autoround_factor_range,
    quantize_weighted_rtn,
    quantize_with_factors,
    search_scale_factors,
    weighted_error,
)
from qrunner.quant.rtn import quantize, quantize_rtn
from qrunner.quant.scheme import QuantScheme


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block(x)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    block = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64))
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return block.eval()


def _data(block: nn.Module, n: int = 32, seq: int = 16, seed: int = 1, forward=_forward):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seq, 64, generator=g)
    with torch.no_grad():
        y = forward(block, x)
    return x, y


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _full_mse(block, weights, x, y, forward=_forward) -> float:
    """Output MSE on all samples with the given quantized weights plugged in (fp32)."""
    b = copy.deepcopy(block)
    with torch.no_grad():
        for name, qw in weights.items():
            b.get_submodule(name).weight.copy_(qw.dequantize())
        return float(torch.mean((forward(b, x).float() - y.float()) ** 2))


def _rtn(block, layers):
    return {name: quantize_rtn(block.get_submodule(name).weight, s) for name, s in layers.items()}


def _assert_qw_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].q, b[name].q), name
        assert torch.equal(a[name].scale, b[name].scale), name
        assert torch.equal(a[name].zero, b[name].zero), name


# --- gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("sym", [True, False])
def test_straight_through_gradient_reaches_v_and_min_max_scale(sym):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.normal_(0, 0.1)
    wrapped = TunedLinear(lin, QuantScheme(2, 32, sym), minmax_tuning=True)
    x = torch.randn(16, 64)
    loss = ((wrapped(x) - lin(x).detach()) ** 2).mean()
    loss.backward()
    assert wrapped.v.grad.shape == (32, 64)
    assert wrapped.min_scale.grad.shape == wrapped.max_scale.grad.shape == (32, 2)
    assert (wrapped.v.grad != 0).float().mean() > 0.9  # STE: (almost) every element gets a gradient
    g_min, g_max = wrapped.min_scale.grad != 0, wrapped.max_scale.grad != 0
    if sym:  # only the side with the larger magnitude sets a symmetric scale
        assert (g_min | g_max).float().mean() > 0.9
        assert g_min.any() and g_max.any()
    else:
        assert g_min.float().mean() > 0.9 and g_max.float().mean() > 0.9


# --- best-iteration selection ------------------------------------------------------------


def test_best_iteration_is_the_lowest_loss_and_its_parameters_are_returned():
    block = _mlp()
    x, y = _data(block, n=16)
    layers = {"0": QuantScheme(2, 32, True), "2": QuantScheme(2, 32, True)}
    iters = 40
    res = tune_block(block, layers, x, y, _forward, TuneSettings(iters=iters, lr=0.02, batch_size=4, keep_params=True), _gen(0))
    assert len(res.losses) == iters and res.first_loss == res.losses[0]
    assert res.best_loss == min(res.losses)
    assert res.best_iter == res.losses.index(min(res.losses))
    assert 0 < res.best_iter < iters - 1  # a mid-run winner: mini-batch losses are noisy
    # replay the sampler (the generator drives nothing else) to get best_iter's mini-batch; the
    # returned weights must reproduce the loss recorded there, i.e. the snapshot holds the
    # parameters evaluated at best_iter (taken before that iteration's optimizer step)
    sampler = _IndexSampler(16, 4, _gen(0))
    batches = [sampler.next_batch() for _ in range(iters)]
    idx = batches[res.best_iter]
    assert _full_mse(block, res.weights, x[idx], y[idx]) == pytest.approx(res.best_loss, rel=1e-5)
    # ... and the same weights do not reproduce the neighbouring iterations' losses on their batches
    for j in (res.best_iter - 1, res.best_iter + 1):
        other = _full_mse(block, res.weights, x[batches[j]], y[batches[j]])
        assert other != pytest.approx(res.losses[j], rel=1e-3)
    # the returned weights are quantize() of the returned parameters
    for name, s in layers.items():
        qw = quantize(block.get_submodule(name).weight, s, **res.params[name])
        _assert_qw_equal({name: qw}, {name: res.weights[name]})

    # full batch (shuffled) every iteration: the full-data loss of the result is the best loss
    full = tune_block(block, layers, x, y, _forward, TuneSettings(iters=30, lr=0.5, batch_size=16), _gen(3))
    assert full.best_iter == full.losses.index(min(full.losses))
    assert _full_mse(block, full.weights, x, y) == pytest.approx(full.best_loss, rel=1e-5)


def test_iteration_zero_wins_when_tuning_only_hurts_and_equals_rtn_bit_for_bit():
    block = _mlp()
    x, y = _data(block, n=16)
    layers = {"0": QuantScheme(4, 32, True), "2": QuantScheme(2, 32, False)}
    res = tune_block(block, layers, x, y, _forward, TuneSettings(iters=10, lr=5.0, minmax_lr=5.0, batch_size=8),
                     _gen(0))
    assert res.best_iter == 0
    assert res.best_loss == res.first_loss == res.losses[0]
    assert min(res.losses[1:]) > 2 * res.losses[0]
    _assert_qw_equal(res.weights, _rtn(block, layers))


def test_iters_zero_returns_rtn_without_optimizing():
    block = _mlp()
    x, y = _data(block, n=8)
    layers = {"0": QuantScheme(4, 32, True), "2": QuantScheme(3, 64, False)}
    res = tune_block(block, layers, x, y, _forward, TuneSettings(iters=0), _gen(0))
    assert res.losses == [] and res.best_iter == 0 and math.isnan(res.first_loss)
    _assert_qw_equal(res.weights, _rtn(block, layers))


# --- quality -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4])
def test_tuning_beats_rtn_on_a_small_mlp(bits):
    block = _mlp()
    x, y = _data(block, n=32)
    layers = {"0": QuantScheme(bits, 32, True), "2": QuantScheme(bits, 32, True)}
    res = tune_block(block, layers, x, y, _forward, TuneSettings(iters=200), _gen(0))
    ratio = _full_mse(block, res.weights, x, y) / _full_mse(block, _rtn(block, layers), x, y)
    print(f"MLP {bits}-bit g32 sym: tuned/RTN output MSE = {ratio:.3f}")
    assert ratio < 0.8
    assert res.best_loss < res.first_loss


def _llama_layer():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=1, vocab_size=32, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    seq = 16
    pos = torch.arange(seq).unsqueeze(0)
    cos_sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, seq, 64), pos)

    def forward(block, xb):  # shared kwargs closed over, as a family adapter would
        return block(xb, position_embeddings=cos_sin, position_ids=pos)

    return layer, forward


@pytest.mark.parametrize("bits,sym", [(2, True), (4, True), (4, False)])
def test_tuning_beats_rtn_on_a_tiny_llama_decoder_layer(bits, sym):
    layer, forward = _llama_layer()
    x, y = _data(layer, n=16, forward=forward)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    layers = {n: QuantScheme(bits, 32, sym) for n in names}
    res = tune_block(layer, layers, x, y, forward, TuneSettings(iters=150, batch_size=4), _gen(0))
    ratio = _full_mse(layer, res.weights, x, y, forward) / _full_mse(layer, _rtn(layer, layers), x, y, forward)
    print(f"Llama layer {bits}-bit g32 sym={sym}: tuned/RTN output MSE = {ratio:.3f}")
    assert ratio < 0.9


def test_mixed_per_layer_schemes_and_grad_accum():
    layer, forward = _llama_layer()
    x, y = _data(layer, n=16, forward=forward)
    layers = {"self_attn.q_proj": QuantScheme(2, 32, True), "self_attn.o_proj": QuantScheme(3, 64, False),
              "mlp.down_proj": QuantScheme(4, 128, True), "mlp.up_proj": QuantScheme(8, -1, False)}
    res = tune_block(layer, layers, x, y, forward, TuneSettings(iters=60, batch_size=2, grad_accum=4), _gen(0))
    for name, s in layers.items():
        qw = res.weights[name]
        assert (qw.bits, qw.group_size, qw.sym) == (s.bits, s.group_size, s.sym)
        assert qw.n_groups == s.n_groups(layer.get_submodule(name).in_features)
    assert _full_mse(layer, res.weights, x, y, forward) < _full_mse(layer, _rtn(layer, layers), x, y, forward)


# --- determinism, block restoration --------------------------------------------------------


def test_same_seed_gives_identical_results_and_the_generator_drives_sampling():
    block = _mlp()
    x, y = _data(block, n=24)
    layers = {"0": QuantScheme(2, 32, False), "2": QuantScheme(4, 32, True)}
    settings = TuneSettings(iters=50, batch_size=4)
    a = tune_block(block, layers, x, y, _forward, settings, _gen(7))
    b = tune_block(block, layers, x, y, _forward, settings, _gen(7))
    _assert_qw_equal(a.weights, b.weights)
    assert a.losses == b.losses and a.best_iter == b.best_iter
    c = tune_block(block, layers, x, y, _forward, settings, _gen(8))
    assert c.losses != a.losses


def test_block_comes_back_unchanged():
    layer, forward = _llama_layer()
    x, y = _data(layer, n=8, forward=forward)
    layer.input_layernorm.weight.requires_grad_(False)  # a non-uniform requires_grad pattern to restore
    before_state = {k: v.clone() for k, v in layer.state_dict().items()}
    before_modules = [(n, type(m), id(m)) for n, m in layer.named_modules()]
    before_params = [(n, id(p), p.requires_grad) for n, p in layer.named_parameters()]
    layers = {"self_attn.q_proj": QuantScheme(2, 32, True), "mlp.down_proj": QuantScheme(4, 32, False)}
    tune_block(layer, layers, x, y, forward, TuneSettings(iters=5, batch_size=4), _gen(0))
    after_state = layer.state_dict()
    assert list(after_state) == list(before_state)
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert [(n, type(m), id(m)) for n, m in layer.named_modules()] == before_modules
    assert [(n, id(p), p.requires_grad) for n, p in layer.named_parameters()] == before_params
    assert all(p.grad is None for p in layer.parameters())
    # also when the forward raises half-way through
    def bad_forward(block, xb):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tune_block(layer, layers, x, y, bad_forward, TuneSettings(iters=3, batch_size=4), _gen(0))
    assert [(n, type(m), id(m)) for n, m in layer.named_modules()] == before_modules
    assert [(n, id(p), p.requires_grad) for n, p in layer.named_parameters()] == before_params


def test_bad_layer_names_are_rejected_without_touching_the_block():
    block = _mlp()
    x, y = _data(block, n=4)
    before = [(n, id(m)) for n, m in block.named_modules()]
    with pytest.raises(ValueError, match="not found"):
        tune_block(block, {"0": QuantScheme(4, 32, True), "nope": QuantScheme(4, 32, True)}, x, y, _forward,
                   TuneSettings(iters=1), _gen(0))
    with pytest.raises(ValueError, match="expected nn.Linear"):
        tune_block(block, {"1": QuantScheme(4, 32, True)}, x, y, _forward, TuneSettings(iters=1), _gen(0))
    assert [(n, id(m)) for n, m in block.named_modules()] == before


# --- optimizer details -----------------------------------------------------------------------


def test_sampler_cycles_through_shuffled_epochs_like_autoround():
    s = _IndexSampler(10, 4, _gen(0))
    batches = [s.next_batch().tolist() for _ in range(6)]
    # two batches per epoch of 10 (the remaining 2 are dropped), then a reshuffle
    for e in range(3):
        seen = batches[2 * e] + batches[2 * e + 1]
        assert len(set(seen)) == 8 and all(0 <= i < 10 for i in seen)
    assert TuneSettings().layer_lr(4) == pytest.approx(1 / 200)
    assert default_lr(1000, 2) == pytest.approx(2 / 1000) and default_lr(1000, 4) == pytest.approx(1 / 1000)
    assert TuneSettings(iters=100, lr=0.3).layer_minmax_lr(2) == 0.3


def test_v_moves_by_sign_steps_under_the_linear_lr_decay():
    block = _mlp()
    x, y = _data(block, n=8)
    layers = {"2": QuantScheme(4, 32, True)}
    lr, iters = 0.01, 20
    res = tune_block(block, layers, x, y, _forward,
                     TuneSettings(iters=iters, lr=lr, batch_size=8, minmax_tuning=False, keep_params=True), _gen(0))
    assert res.params["2"]["min_scale"] is None
    v = res.params["2"]["v"]
    k = res.best_iter  # steps taken before the best iteration's parameters
    bound = lr * sum(1 - j / iters for j in range(k))
    assert k >= 1
    assert lr * 0.5 < v.abs().max().item() <= bound + 1e-6  # |v| <= sum of the decayed lrs (no clamp)


# --- amp / compile -----------------------------------------------------------------------------


def test_amp_bf16_runs_and_its_loss_is_close_to_fp32():
    block = _mlp()
    x, y = _data(block, n=16)
    layers = {"0": QuantScheme(4, 32, True), "2": QuantScheme(4, 32, True)}
    fp32 = tune_block(block, layers, x, y, _forward, TuneSettings(iters=60, batch_size=8), _gen(0))
    amp = tune_block(block, layers, x, y, _forward, TuneSettings(iters=60, batch_size=8, amp_bf16=True), _gen(0))
    assert amp.first_loss == pytest.approx(fp32.first_loss, rel=0.25)
    assert amp.best_loss < amp.first_loss
    rtn = _full_mse(block, _rtn(block, layers), x, y)
    assert _full_mse(block, amp.weights, x, y) < rtn


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    block = _mlp()
    x, y = _data(block, n=8)
    layers = {"0": QuantScheme(4, 32, True)}
    eager = tune_block(block, layers, x, y, _forward, TuneSettings(iters=5, batch_size=4), _gen(0))

    def compile_raises(fn, *a, **k):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", compile_raises)
    with pytest.warns(RuntimeWarning, match="torch.compile"):
        r1 = tune_block(block, layers, x, y, _forward, TuneSettings(iters=5, batch_size=4, compile=True), _gen(0))

    def compile_fails_on_call(fn, *a, **k):
        def broken(*args, **kwargs):
            raise RuntimeError("inductor failed")
        return broken

    monkeypatch.setattr(torch, "compile", compile_fails_on_call)
    with pytest.warns(RuntimeWarning, match="eager"):
        r2 = tune_block(block, layers, x, y, _forward, TuneSettings(iters=5, batch_size=4, compile=True), _gen(0))
    for r in (r1, r2):
        _assert_qw_equal(r.weights, eager.weights)
        assert r.losses == eager.losses


# --- optimized (importance-weighted) RTN -------------------------------------------------------


def _skewed_importance(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) ** 6 * 100 + 1e-3  # spans ~5 orders of magnitude


@pytest.mark.parametrize("bits,sym,group_size", [(2, True, 32), (3, False, 32), (4, True, 64), (4, False, 32),
                                                 (8, True, -1)])
def test_weighted_rtn_error_is_never_above_rtn(bits, sym, group_size):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(96, 128, generator=g) * 0.05
    w[:, :4] *= 6  # a few outlier input channels
    imp = _skewed_importance(128, seed=bits)
    s = QuantScheme(bits, group_size, sym)
    e_rtn = weighted_error(w, quantize_rtn(w, s).dequantize(), imp)
    e_opt = weighted_error(w, quantize_weighted_rtn(w, s, imp).dequantize(), imp)
    assert torch.all(e_opt <= e_rtn * (1 + 1e-6))  # per output row
    if bits <= 4:
        assert e_opt.sum() < 0.95 * e_rtn.sum()
    # explicit plain-shrink candidates (the 1.0 .. 0.7 idea) are also never worse than RTN
    shrink = quantize_weighted_rtn(w, s, imp, factors=torch.linspace(1.0, 0.7, 20).tolist())
    assert torch.all(weighted_error(w, shrink.dequantize(), imp) <= e_rtn * (1 + 1e-6))


def test_factors_up_to_one_equal_min_max_scale_and_search_respects_autoround_range():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    for s in (QuantScheme(4, 32, True), QuantScheme(2, 32, False)):
        f = torch.rand(16, 2, generator=g) * 0.5 + 0.5
        _assert_qw_equal({"w": quantize_with_factors(w, s, f)},
                         {"w": quantize(w, s, min_scale=f, max_scale=f)})
        _assert_qw_equal({"w": quantize_with_factors(w, s, torch.ones(16, 2))}, {"w": quantize_rtn(w, s)})
        best = search_scale_factors(w, s, _skewed_importance(64))
        lo, hi = autoround_factor_range(s.bits)
        assert best.shape == (16, 2)
        assert torch.all(best >= lo * 0.97) and torch.all(best <= hi * 1.03)
    assert autoround_factor_range(2) == pytest.approx((2 / 2.9, 2 / 1.1))
    assert autoround_factor_range(4) == pytest.approx((1 / 1.75, 1 / 0.25))


def test_all_zero_importance_group_falls_back_to_plain_mse():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g)
    imp = torch.ones(64)
    imp[:32] = 0
    s = QuantScheme(3, 32, True)
    q = quantize_weighted_rtn(w, s, imp)
    e_uniform = weighted_error(w[:, :32], q.dequantize()[:, :32], torch.ones(32))
    e_rtn = weighted_error(w[:, :32], quantize_rtn(w, s).dequantize()[:, :32], torch.ones(32))
    assert torch.all(e_uniform <= e_rtn * (1 + 1e-6))


def test_importance_collector_accumulates_mean_square_per_input_channel():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    xs = [torch.randn(3, 5, 8), torch.randn(2, 7, 8)]
    with torch.no_grad():
        h = [block[1](block[0](x)) for x in xs]
    with ImportanceCollector({"0": block[0], "2": block[2]}) as col:
        with torch.no_grad():
            for x in xs:
                block(x)
    flat = torch.cat([x.reshape(-1, 8) for x in xs])
    torch.testing.assert_close(col.importance["0"], (flat ** 2).mean(0))
    hid = torch.cat([t.reshape(-1, 16) for t in h])
    torch.testing.assert_close(col.importance["2"], (hid ** 2).mean(0))
    assert col.counts["0"] == 3 * 5 + 2 * 7 and col.importance["0"].dtype == torch.float32
    assert not block[0]._forward_pre_hooks and not block[2]._forward_pre_hooks
    block(xs[0])  # hooks are gone: nothing accumulates any more
    assert col.counts["0"] == 29
    with pytest.raises(TypeError):
        ImportanceCollector({"relu": block[1]})


# --- a group size that does not divide in_features (shorter last group) -----------------------


@pytest.mark.parametrize("bits,sym", [(2, True), (4, False), (4, True)])
def test_weighted_rtn_short_last_group_equals_its_groups_quantized_alone(bits, sym):
    """Per group, the search sees only the group's real columns: the padded columns of the short group add
    no error, so in=192, g=128 gives what the 128 and the 64 columns give quantized on their own."""
    g = torch.Generator().manual_seed(bits + sym)
    w = torch.randn(40, 192, generator=g) * 0.05
    imp = _skewed_importance(192, seed=bits)
    imp[150:] = 0  # a partly dead short group
    s = QuantScheme(bits, 128, sym)
    qw = quantize_weighted_rtn(w, s, imp)
    assert qw.scale.shape == (40, 2) and qw.q.shape == (40, 192)
    full = quantize_weighted_rtn(w[:, :128], s, imp[:128])
    short = quantize_weighted_rtn(w[:, 128:], QuantScheme(bits, -1, sym), imp[128:])
    assert torch.equal(qw.q, torch.cat([full.q, short.q], dim=1))
    assert torch.equal(qw.scale, torch.cat([full.scale, short.scale], dim=1))
    assert torch.equal(qw.zero, torch.cat([full.zero, short.zero], dim=1))
    assert torch.all(weighted_error(w, qw.dequantize(), imp) <= weighted_error(w, quantize_rtn(w, s).dequantize(), imp)
                     * (1 + 1e-6))
    best = search_scale_factors(w, s, imp)
    assert best.shape == (40, 2)


def test_tuning_a_layer_with_a_short_last_group():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Linear(96, 64))  # "2": in 96 = 64 + a group of 32
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    block.eval()
    x, y = _data(block, n=16)
    layers = {"0": QuantScheme(2, 64, True), "2": QuantScheme(2, 64, False)}
    wrapped = TunedLinear(block[2], layers["2"], minmax_tuning=True)
    assert wrapped.v.shape == (64, 96) and wrapped.min_scale.shape == (64, 2)
    res = tune_block(block, layers, x, y, _forward, TuneSettings(iters=60, batch_size=16, keep_params=True), _gen(0))
    qw = res.weights["2"]
    assert qw.scale.shape == (64, 2) and qw.q.shape == (64, 96)
    assert (res.params["2"]["v"][:, 64:] != 0).any()  # the short group's offsets were tuned
    _assert_qw_equal({"2": quantize(block[2].weight, layers["2"], **res.params["2"])}, {"2": qw})
    assert _full_mse(block, res.weights, x, y) < _full_mse(block, _rtn(block, layers), x, y)
