"""Diffusion transformers split into prologue -> blocks -> epilogue (qrunner.models.diffusion).

Each block of a tiny Flux, SD3 and SD3.5 transformer, run in isolation on the values the previous block handed
on, reproduces both streams it gave inside the transformer's own forward; the chain equals the forward; a
pipeline folder is read (and refused with a useful message) as a user would meet it.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional

import pytest
import torch

pytest.importorskip("diffusers")

from qrunner.errors import UserError  # noqa: E402
from qrunner.models.diffusion import (CONTEXT, HIDDEN, SPECS, BlockValues, denoiser_skeleton,  # noqa: E402
                                      read_pipeline_folder)
from tiny_diffusion import DIFFUSION_KINDS, make_tiny_pipeline, make_tiny_transformer, tiny_inputs  # noqa: E402


def _outputs_inside_forward(model, spec, inputs) -> List[Dict[str, Optional[torch.Tensor]]]:
    """Each block's (text, image) output as the transformer's own forward produced it."""
    seen: List[Dict[str, Optional[torch.Tensor]]] = []

    def hook(module, args, output):
        context, hidden = output
        seen.append({HIDDEN: hidden.clone(), CONTEXT: None if context is None else context.clone()})

    handles = [block.register_forward_hook(hook) for _, block in spec.blocks(model)]
    try:
        with torch.no_grad():
            final = model(**inputs).sample
    finally:
        for h in handles:
            h.remove()
    return seen, final


@pytest.mark.parametrize("kind", DIFFUSION_KINDS)
def test_every_block_in_isolation_reproduces_its_output_inside_the_forward(kind):
    model = make_tiny_transformer(kind)
    spec = SPECS[type(model).__name__]
    inputs = tiny_inputs(kind)
    inside, final = _outputs_inside_forward(model, spec, inputs)
    blocks = spec.blocks(model)
    assert len(inside) == len(blocks) == (4 if kind == "flux" else 3)
    with torch.no_grad():
        values, context = spec.prologue(model, **inputs)
        for (name, block), expected in zip(blocks, inside):
            out = spec.run_block(block, values)
            for stream in (HIDDEN, CONTEXT):
                if expected[stream] is None:  # SD3's last block (context_pre_only) hands on no text stream
                    assert out[stream] is None, name
                    continue
                assert out[stream].shape == expected[stream].shape
                torch.testing.assert_close(out[stream], expected[stream], rtol=1e-5, atol=1e-5, msg=name)
            values = BlockValues(out, values.temb, values.shared)
        chained = spec.epilogue(model, values.streams[HIDDEN], values.temb, context)
    torch.testing.assert_close(chained, final, rtol=1e-5, atol=1e-5)
    assert chained.abs().max() > 0
    if kind != "flux":
        assert inside[-1][CONTEXT] is None and all(o[CONTEXT] is not None for o in inside[:-1])
    if kind == "sd35":  # the dual-attention and qk-norm blocks are really there
        first = blocks[0][1]
        assert first.attn2 is not None and first.attn.norm_q is not None


@pytest.mark.parametrize("kind", DIFFUSION_KINDS)
def test_pipeline_folder_gives_the_denoiser_and_a_meta_skeleton(kind, tmp_path):
    folder = read_pipeline_folder(make_tiny_pipeline(kind, tmp_path / kind))
    assert folder.denoiser == "transformer"
    assert folder.denoiser_class == ("FluxTransformer2DModel" if kind == "flux" else "SD3Transformer2DModel")
    skeleton = denoiser_skeleton(folder)
    assert all(p.is_meta for p in skeleton.parameters())
    real = make_tiny_transformer(kind)
    assert [n for n, _ in skeleton.named_parameters()] == [n for n, _ in real.named_parameters()]
    assert [n for n, _ in folder.spec().blocks(skeleton)] == [n for n, _ in folder.spec().blocks(real)]


def test_unsupported_or_incomplete_pipelines_are_refused_with_the_fix(tmp_path):
    folder = make_tiny_pipeline("sd3", tmp_path / "p")
    index = json.loads((folder / "model_index.json").read_text())

    with pytest.raises(UserError, match="does not exist"):
        read_pipeline_folder(tmp_path / "missing")
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no model_index.json.*single model.*family=llm"):
        read_pipeline_folder(tmp_path / "llm")

    unet = dict(index, _class_name="StableDiffusionPipeline", unet=["diffusers", "UNet2DConditionModel"])
    del unet["transformer"]
    (folder / "model_index.json").write_text(json.dumps(unet))
    with pytest.raises(UserError, match=r"unsupported denoiser UNet2DConditionModel .*supported: "
                                        r"FluxTransformer2DModel, SD3Transformer2DModel"):
        read_pipeline_folder(folder)

    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "transformer"}))
    with pytest.raises(UserError, match="names no denoiser"):
        read_pipeline_folder(folder)

    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "transformer" / "config.json").unlink()
    with pytest.raises(UserError, match="transformer/config.json is missing"):
        read_pipeline_folder(folder)
