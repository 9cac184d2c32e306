"""AutoRound on a double-stream diffusion block: the loss covers both streams, so every linear is tuned.

With the image stream alone in the loss (the reference tool's choice) the text-stream layers of a Flux double
block get no gradient and come out exactly as round-to-nearest; with both streams they are tuned and the text
stream's error falls below RTN's.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from qrunner.memory.activations import BlockRows, TensorRows  # noqa: E402
from qrunner.models.diffusion import (BOTH_STREAMS, CONTEXT, HIDDEN, SPECS, TEMB, joined_streams,  # noqa: E402
                                      stream_errors, tuning_forward)
from qrunner.quant.autoround import TuneSettings, tune_block  # noqa: E402
from qrunner.quant.rtn import quantize  # noqa: E402
from qrunner.quant.scheme import QuantScheme  # noqa: E402
from tiny_diffusion import make_tiny_transformer, tiny_inputs  # noqa: E402

TEXT_ONLY_LAYERS = ("attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2")


def _with_weights(block, weights):
    """A copy of `block` with the given quantized weights put in (dequantized)."""
    import copy

    out = copy.deepcopy(block)
    for name, w in weights.items():
        out.get_submodule(name).weight.data = w.dequantize(torch.float32)
    return out


def test_both_streams_tune_every_layer_image_stream_only_leaves_text_layers_at_rtn():
    model = make_tiny_transformer("flux")
    spec = SPECS["FluxTransformer2DModel"]
    with torch.no_grad():
        values, _ = spec.prologue(model, **tiny_inputs("flux", batch=8, text_tokens=8))
    block = spec.blocks(model)[0][1]
    text_tokens = values.streams[CONTEXT].shape[1]
    rows = BlockRows(TensorRows(values.streams[HIDDEN]), {CONTEXT: TensorRows(values.streams[CONTEXT]),
                                                          TEMB: TensorRows(values.temb)})
    scheme = QuantScheme(bits=2, group_size=64, sym=False)  # coarse, so tuning has something to win
    layers = {n: scheme for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(TEXT_ONLY_LAYERS) <= set(layers)
    settings = TuneSettings(iters=40, batch_size=4)
    shared = values.shared

    with torch.no_grad():
        target_both = joined_streams(spec.run_block(block, values))
    forward_both = tuning_forward(spec, shared)
    forward_image = tuning_forward(spec, shared, (HIDDEN,))
    both = tune_block(block, layers, rows, TensorRows(target_both), forward_both, settings,
                      torch.Generator().manual_seed(0))
    image = tune_block(block, layers, rows, TensorRows(target_both[:, text_tokens:]), forward_image, settings,
                       torch.Generator().manual_seed(0))
    rtn = {n: quantize(block.get_submodule(n).weight, s) for n, s in layers.items()}

    for name in TEXT_ONLY_LAYERS:  # no gradient reaches them from the image stream
        assert torch.equal(image.weights[name].dequantize(), rtn[name].dequantize()), name
        assert not torch.equal(both.weights[name].dequantize(), rtn[name].dequantize()), name

    def errors(weights):
        with torch.no_grad():
            out = forward_both(_with_weights(block, weights), rows.read(range(len(rows))))
        return stream_errors(out, target_both, text_tokens)

    e_rtn, e_both, e_image = errors(rtn), errors(both.weights), errors(image.weights)
    assert e_both[CONTEXT] < 0.9 * e_rtn[CONTEXT]
    assert e_both[CONTEXT] < e_image[CONTEXT]
    assert e_both[HIDDEN] < e_rtn[HIDDEN] and e_image[HIDDEN] < e_rtn[HIDDEN]
    assert BOTH_STREAMS == (CONTEXT, HIDDEN)
