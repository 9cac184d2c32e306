"""The output head applied in row slices (memory/sliced_head.py) against the whole head: same perplexity (1e-6
relative), same gradient, same logits; tied heads read the embedding's rows; a run in memory=low evaluates
through it and matches memory=high."""
from __future__ import annotations

import math

import pytest
import torch
import transformers

from conftest import run_inprocess, tiny_overrides
from qrunner.models.registry import get_family
from tiny_causal_lms import ARCHS, make_tiny_causal_lm
from tiny_models import make_tiny_llama
from qrunner.memory.sliced_head import SlicedHead
from qrunner.memory.streaming import CheckpointReader

HEAD = ["model.norm", "lm_head"]


def whole_head_nll(model, hidden, labels, softcap=None):
    logits = model.lm_head(model.model.norm(hidden))[:, :-1].float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             reduction="sum")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("m") / "llama", dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model


def sliced(path, model, slice_rows=37, softcap=None):
    """A head read in slices of `slice_rows` rows (not a divisor of the vocabulary: the last slice is short)."""
    head = SlicedHead(model, HEAD, CheckpointReader(path), torch.float32, softcap,
                      slice_bytes=slice_rows * model.config.hidden_size * 4)
    assert head.slice_rows == slice_rows and head.vocab % slice_rows
    return head


def sample(model, n=3, tokens=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, tokens + 1, model.config.hidden_size, generator=g)
    labels = torch.randint(0, model.config.vocab_size, (n, tokens), generator=g)
    return hidden, labels


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_sliced_nll_is_the_whole_heads(llama, softcap):
    path, model = llama
    hidden, labels = sample(model)
    with torch.no_grad():
        whole = float(whole_head_nll(model, hidden, labels, softcap))
    part = sliced(path, model, softcap=softcap).nll(lambda r: hidden[r.start:r.stop], labels)
    ppl_whole, ppl_part = math.exp(whole / labels.numel()), math.exp(part / labels.numel())
    assert ppl_part == pytest.approx(ppl_whole, rel=1e-6)
    assert part != 0.0


def test_groups_of_rows_give_the_same_nll(llama, monkeypatch):
    import qrunner.memory.sliced_head as module

    path, model = llama
    hidden, labels = sample(model, n=5)
    one_group = sliced(path, model).nll(lambda r: hidden[r.start:r.stop], labels)
    monkeypatch.setattr(module, "GROUP_BYTES", 1)  # one row a group
    seen = []

    def read(r):
        seen.append(len(r))
        return hidden[r.start:r.stop]

    per_row = sliced(path, model).nll(read, labels)
    assert seen == [1] * 5
    assert per_row == pytest.approx(one_group, rel=1e-9)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_sliced_gradient_is_autograds(llama, softcap):
    path, model = llama
    hidden, labels = sample(model, n=2)
    h = hidden.clone().requires_grad_(True)
    whole = whole_head_nll(model, h, labels, softcap)
    (expected,) = torch.autograd.grad(whole, [h])
    nll, grad = sliced(path, model, softcap=softcap).nll_and_grad(hidden, labels)
    assert nll == pytest.approx(float(whole.detach()), rel=1e-6)
    assert grad.shape == hidden.shape
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6)
    assert float(grad[:, -1].abs().max()) == 0.0  # the last position predicts nothing
    assert float(grad.abs().max()) > 0.0


def test_sliced_logits_are_the_whole_heads(llama):
    path, model = llama
    hidden, _ = sample(model, n=2, tokens=7)
    with torch.no_grad():
        expected = model.lm_head(model.model.norm(hidden)).float()
    assert torch.allclose(sliced(path, model).logits(hidden), expected, rtol=1e-5, atol=1e-6)


def test_tied_head_reads_the_embedding_rows(tmp_path):
    path = make_tiny_llama(tmp_path / "tied", dtype=torch.float32, tie=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    head = SlicedHead(model, HEAD, CheckpointReader(path, tied), torch.float32, slice_bytes=50 * 64 * 4)
    hidden, labels = sample(model)
    with torch.no_grad():
        whole = float(whole_head_nll(model, hidden, labels))
    assert head.nll(lambda r: hidden[r.start:r.stop], labels) == pytest.approx(whole, rel=1e-6)


def test_low_memory_perplexity_through_the_sliced_head_matches_high(tiny_llama, tmp_path, monkeypatch):
    import qrunner.memory.sliced_head as module

    monkeypatch.setattr(module, "SLICE_BYTES", 40 * 64 * 4)  # 40 rows of the 64-wide head a slice
    calls = []
    real = module.SlicedHead.slices

    def counted(self):
        for part in real(self):
            calls.append(part[1] - part[0])
            yield part

    monkeypatch.setattr(module.SlicedHead, "slices", counted)
    extra = ("quant.iters=0", "eval.enabled=true", "eval.nsamples=3", "eval.seqlen=32",
             "model.compute_dtype=float32")
    low = run_inprocess(tiny_overrides(tiny_llama, tmp_path / "low", "memory=low", *extra))
    assert calls and max(calls) == 40 and sum(calls) % 320 == 0  # every row of the 320-token head, 40 at a time
    high = run_inprocess(tiny_overrides(tiny_llama, tmp_path / "high", "memory=high", *extra))
    for key in ("ppl_original", "ppl_quantized"):
        assert low["quality"][key] == pytest.approx(high["quality"][key], rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_sliced_head_gives_the_models_logits_for_every_architecture(arch, tmp_path):
    """The family's head modules (final norm, projection) and logit transform (Granite's division, Cohere's
    scale, Gemma 2's soft cap) as the streaming modes apply them reproduce the model's own logits."""
    adapter = get_family("llm")
    path = make_tiny_causal_lm(tmp_path / arch, arch, dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    names = adapter.heads(model)
    seen = []
    hook = model.get_submodule(names[0]).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    ids = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    hook.remove()
    head = SlicedHead(model, names, CheckpointReader(path), torch.float32, adapter.logit_softcap(model.config),
                      slice_bytes=37 * model.config.hidden_size * 4, scale=adapter.logit_scale(model.config))
    torch.testing.assert_close(head.logits(seen[0]), want, rtol=1e-5, atol=1e-5)
