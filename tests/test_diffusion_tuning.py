"""AutoRound on a double-stream diffusion block: the loss covers both streams, so every linear is tuned.

A calibration row holds both streams joined (text tokens first). With `family.loss_streams=image` (the reference
tool's loss) the text tokens' output is left out of the loss: the text-stream layers of a Flux double block get no
gradient and come out exactly as round-to-nearest. With `both` (the default) they are tuned and the text stream's
error falls below RTN's. The last block's text output is read by nothing after it, so its loss is the image
stream's whatever `family.loss_streams` says.
"""
from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("diffusers")

from qrunner.memory.activations import BlockRows, TensorRows  # noqa: E402
from qrunner.models.adapter import HIDDEN  # noqa: E402
from qrunner.models.diffusion import CONTEXT, ROTARY, SPECS, TEMB  # noqa: E402
from qrunner.models.diffusion_adapter import DENOISER, TEXT_OUTPUT_READ, TEXT_TOKENS, DiffusionAdapter  # noqa: E402
from qrunner.quant.autoround import TuneSettings, tune_block  # noqa: E402
from qrunner.quant.rtn import quantize  # noqa: E402
from qrunner.quant.scheme import QuantScheme  # noqa: E402
from qrunner.stages.quantize import tuning_pair  # noqa: E402
from tiny_diffusion import make_tiny_transformer, tiny_inputs  # noqa: E402

TEXT_ONLY_LAYERS = ("attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2")


def _with_weights(block, weights):
    """A copy of `block` with the given quantized weights put in (dequantized)."""
    out = copy.deepcopy(block)
    for name, w in weights.items():
        out.get_submodule(name).weight.data = w.dequantize(torch.float32)
    return out


def test_both_streams_tune_every_layer_image_stream_only_leaves_text_layers_at_rtn():
    model = make_tiny_transformer("flux")
    spec, adapter = SPECS["FluxTransformer2DModel"], DiffusionAdapter()
    with torch.no_grad():
        values, _ = spec.prologue(model, **tiny_inputs("flux", batch=8, text_tokens=8))
    block = spec.blocks(model)[0][1]
    text_tokens = values.streams[CONTEXT].shape[1]
    joined = torch.cat([values.streams[CONTEXT], values.streams[HIDDEN]], dim=1)
    rows = BlockRows(TensorRows(joined), {TEMB: TensorRows(values.temb)})
    shared = {DENOISER: "FluxTransformer2DModel", TEXT_TOKENS: text_tokens, ROTARY: values.shared[ROTARY],
              TEXT_OUTPUT_READ: True}
    scheme = QuantScheme(bits=2, group_size=64, sym=False)  # coarse, so tuning has something to win
    layers = {n: scheme for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(TEXT_ONLY_LAYERS) <= set(layers)
    settings = TuneSettings(iters=40, batch_size=4)

    with torch.no_grad():
        target, _ = adapter.run_block(block, rows.read(range(len(rows))), shared)
        out = spec.run_block(block, values)  # the joined row carries exactly the block's two output streams
    torch.testing.assert_close(target, torch.cat([out[CONTEXT], out[HIDDEN]], dim=1), rtol=0, atol=0)

    def tuned(streams):
        cfg = OmegaConf.create({"family": {"loss_streams": streams}})
        forward, compared = tuning_pair(adapter, block, shared, cfg, TensorRows(target))
        return tune_block(block, layers, rows, compared, forward, settings, torch.Generator().manual_seed(0))

    both, image = tuned("both"), tuned("image")
    rtn = {n: quantize(block.get_submodule(n).weight, s) for n, s in layers.items()}

    for name in TEXT_ONLY_LAYERS:  # no gradient reaches them from the image stream
        assert torch.equal(image.weights[name].dequantize(), rtn[name].dequantize()), name
        assert not torch.equal(both.weights[name].dequantize(), rtn[name].dequantize()), name

    parts = adapter.output_parts(block, shared)
    assert parts == {HIDDEN: slice(text_tokens, None), CONTEXT: slice(0, text_tokens)}

    def errors(weights):
        with torch.no_grad():
            got = adapter.run_block(_with_weights(block, weights), rows.read(range(len(rows))), shared)[0]
        return {k: float(((got[:, sl] - target[:, sl]) ** 2).mean()) for k, sl in parts.items()}

    e_rtn, e_both, e_image = errors(rtn), errors(both.weights), errors(image.weights)
    assert e_both[CONTEXT] < 0.9 * e_rtn[CONTEXT]
    assert e_both[CONTEXT] < e_image[CONTEXT]
    assert e_both[HIDDEN] < e_rtn[HIDDEN] and e_image[HIDDEN] < e_rtn[HIDDEN]


def test_the_last_blocks_text_output_is_left_out_of_the_loss():
    adapter, block = DiffusionAdapter(), torch.nn.Identity()
    cfg = {s: OmegaConf.create({"family": {"loss_streams": s}}) for s in ("both", "image")}
    inner = {TEXT_TOKENS: 5, TEXT_OUTPUT_READ: True}
    last = {TEXT_TOKENS: 5, TEXT_OUTPUT_READ: False}
    assert adapter.tuning_compared(block, inner, cfg["both"]) is None
    assert adapter.tuning_compared(block, last, cfg["both"]) == slice(5, None)
    assert adapter.tuning_compared(block, inner, cfg["image"]) == slice(5, None)
    # the tuner's forward and targets are cut alike
    target = TensorRows(torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3))
    _, compared = tuning_pair(adapter, block, last, cfg["both"], target)
    assert torch.equal(compared.read([1]), target.read([1])[:, 5:])
