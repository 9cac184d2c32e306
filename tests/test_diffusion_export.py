"""A quantized pipeline folder (qrunner.export.diffusion_pipeline) loads with diffusers' AutoRound quantizer on
CPU: its transformer gives what qrunner's fake-quantized transformer gives, the other components are the source's
files unchanged, and the reloaded pipeline generates."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("auto_round")

from qrunner.export.auto_round import quantization_config  # noqa: E402
from qrunner.export.diffusion_pipeline import write_quantized_pipeline  # noqa: E402
from qrunner.models.diffusion import read_pipeline_folder  # noqa: E402
from qrunner.quant.rtn import quantize  # noqa: E402
from qrunner.quant.scheme import QuantScheme  # noqa: E402
from tiny_diffusion import make_tiny_pipeline, tiny_inputs  # noqa: E402


def _bf16(inputs):
    return {k: v.to(torch.bfloat16) if v.is_floating_point() and not k.endswith("_ids") else v
            for k, v in inputs.items()}


@pytest.mark.parametrize("kind, sym", [("flux", True), ("sd35", False)])
def test_quantized_pipeline_reloads_in_diffusers_and_matches_fake_quant(kind, sym, tmp_path):
    from diffusers import DiffusionPipeline

    folder = read_pipeline_folder(make_tiny_pipeline(kind, tmp_path / "src", full=True))
    spec = folder.spec()
    model = spec.model_class().from_pretrained(str(folder.denoiser_dir)).eval()
    scheme = QuantScheme(bits=4, group_size=128, sym=sym)
    layers = {f"{b}.{n}": quantize(m.weight.detach(), scheme) for b, block in spec.blocks(model)
              for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    out = tmp_path / "out"
    result = write_quantized_pipeline(folder, layers, quantization_config(scheme, list(spec.block_lists), 0), out,
                                      max_shard_bytes=200_000)
    assert result["quantized_layers"] == len(layers) and result["shards"] > 2
    index = json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert any(k.endswith(".qweight") for k in index["weight_map"])
    for rel in result["copied"]:  # every other component as it was
        assert (out / rel).read_bytes() == (folder.path / rel).read_bytes(), rel
    assert "model_index.json" in result["copied"] and any(r.startswith("text_encoder/") for r in result["copied"])

    with torch.no_grad():
        for name, qw in layers.items():
            model.get_submodule(name).weight.data = qw.dequantize(torch.float32)
    reference = model.to(torch.bfloat16)
    pipe = DiffusionPipeline.from_pretrained(str(out), dtype=torch.bfloat16)
    loaded = pipe.transformer
    first = loaded.get_submodule(next(iter(layers)))
    assert type(first).__name__ == "QuantLinear"
    inputs = _bf16(tiny_inputs(kind))
    with torch.no_grad():
        want = reference(**inputs).sample.float()
        got = loaded(**inputs).sample.float()
    assert (got - want).abs().max() <= 0.01 * want.abs().max()  # bf16 rounding of the two kernels

    image = pipe(prompt="a red cat", height=64, width=64, num_inference_steps=2, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
