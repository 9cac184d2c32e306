"""Every block run in isolation on the inputs qrunner prepares gives what it gives inside the full model.

The inputs go through the same code the stages use: `capture_block_inputs` (recording blocks, per-sample row
files), `save_block_inputs`/`load_block_inputs` (each distinct shared value stored once), `block_inputs`
(captured rows plus side values handed on by earlier blocks, e.g. Gemma 4's shared keys/values) and
`forward_rows`. Each block's output is compared with the output the full model's own forward gave that block.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch

from qrunner.memory.activations import TensorRows
from qrunner.models.block_io import load_block_inputs, save_block_inputs
from qrunner.models.registry import get_family
from qrunner.stages.capture import capture_block_inputs
from qrunner.stages.data import filled_to_seqlen, text_sample_inputs
from qrunner.stages.block_rows import block_inputs, forward_rows, open_block_rows
from tiny_causal_lms import ARCHS, make_tiny_causal_lm
from tiny_models import GEMMA4_KINDS, VLM_KINDS, make_tiny_gemma4, make_tiny_vlm

SEQ = 40  # longer than the tiny models' sliding window (16): sliding and full masks differ


class _Session:
    """What `block_inputs` needs of a session."""

    def __init__(self, adapter, config) -> None:
        self.adapter, self.hf_config = adapter, config


def _reference_outputs(model: torch.nn.Module, blocks: List[torch.nn.Module], input_ids: torch.Tensor,
                       extra: Optional[Dict[str, torch.Tensor]] = None) -> List[torch.Tensor]:
    outputs: List[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append((o[0] if isinstance(o, tuple) else o).clone()))
             for b in blocks]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False, **(extra or {}))
    finally:
        for h in hooks:
            h.remove()
    return outputs


def _check_blocks(family: str, model_dir: Path, tmp_path: Path, images: Optional[str] = None, seq: int = SEQ
                  ) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """Worst difference per block, and the per-sample row files the capture wrote. With `images` (a VLM kind),
    samples 0 and 2 are image–text samples with images of different sizes, sample 1 is text only."""
    adapter = get_family(family)
    model = adapter.model_class(None).from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    names = adapter.block_lists(model, [])
    blocks = [b for _, b in adapter.blocks(model, names)]
    torch.manual_seed(0)
    input_ids = torch.randint(1, 300, (3, seq))
    extras: List[Dict[str, torch.Tensor]] = [{}, {}, {}]
    if images:
        for i, size in ((0, (56, 84)), (2, (112, 56))):
            encoded = _image_sample(images, adapter, model_dir, model.config, size, seed=i)
            ids, extras[i] = filled_to_seqlen(encoded, input_ids[i], seq)
            input_ids[i] = ids[0]
            extras[i] = {k: v.float() if v.is_floating_point() else v for k, v in extras[i].items()}
        extras[1] = {k.split(".", 1)[1]: v for k, v in
                     text_sample_inputs({f"0.{k}": v for k, v in extras[0].items()}, [1], seq).items()}
    reference = [_reference_outputs(model, blocks, input_ids[i:i + 1], extras[i]) for i in range(len(input_ids))]
    if images:  # the image inputs reach the decoder: without them sample 0's first block computes otherwise
        assert not torch.allclose(_reference_outputs(model, blocks, input_ids[:1])[0], reference[0][0])

    hidden, per_block, captured = capture_block_inputs(adapter, model, adapter.blocks(model, names), input_ids,
                                                       tmp_path, "capture", False, extras.__getitem__)
    save_block_inputs(per_block, tmp_path)
    per_block = load_block_inputs(tmp_path, torch.float32)
    session = _Session(adapter, model.config)
    x: TensorRows = TensorRows(hidden.read_all())
    side = {k: TensorRows(r.read_all()) for k, r in captured.items()}
    worst = {}
    for index, block in enumerate(blocks):
        shared, reads = block_inputs(session, per_block, index)
        writes = adapter.side_io(model.config, index)[1]
        out = TensorRows.empty(len(x), x.row_shape, x.dtype)
        side.update(forward_rows(adapter, block, open_block_rows(x, reads, side.__getitem__), shared, out,
                                 writes, lambda n, count, shape, dtype: TensorRows.empty(count, shape, dtype)))
        expected = torch.cat([reference[i][index] for i in range(len(input_ids))])
        torch.testing.assert_close(out.tensor, expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"block {index} of {model_dir.name}: {m}")
        worst[f"block {index}"] = float((out.tensor - expected).abs().max())
        x = out
    return worst, captured


def _image_sample(kind: str, adapter: Any, model_dir: Path, config: Any, size: Tuple[int, int], seed: int
                  ) -> Dict[str, torch.Tensor]:
    """One image and prompt encoded as the data stage encodes them (the model's processor, or the Qwen fallback
    without torchvision); Gemma 3's tiny model has no processor, so its inputs are built by hand: begin-of-image
    token, the image's soft tokens (bidirectional attention among them via token_type_ids), end-of-image."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "gemma4":  # Gemma 4's image processor (PIL), then begin-of-image, one token per soft token, end
        import transformers
        from PIL import Image

        pixels = (torch.rand(size[1] // 4, size[0] // 4, 3, generator=generator) * 255).to(torch.uint8).numpy()
        processor = transformers.Gemma4ImageProcessorPil(max_soft_tokens=70, patch_size=4, pooling_kernel_size=2)
        image = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
        n = int(image.pop("num_soft_tokens_per_image")[0])
        ids = torch.tensor([[5, 6, config.boi_token_id] + [config.image_token_id] * n + [config.eoi_token_id, 7]])
        return {"input_ids": ids, "mm_token_type_ids": (ids == config.image_token_id).long(), **image}
    if kind == "gemma3":
        text = config.text_config
        n = config.mm_tokens_per_image
        ids = torch.tensor([[5, 6, config.boi_token_index] + [config.image_token_index] * n + [config.eoi_token_index,
                                                                                              7]])
        return {"input_ids": ids, "token_type_ids": (ids == config.image_token_index).long(),
                "pixel_values": torch.rand(1, 3, 28, 28, generator=generator) * 2 - 1} if text else {}
    from PIL import Image
    from transformers import AutoTokenizer

    pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    encode = adapter.image_text_encoder(model_dir, AutoTokenizer.from_pretrained(model_dir), config, False)
    return encode(Image.fromarray(pixels), "Describe this image.")


@pytest.mark.parametrize("multimodal", [False, True], ids=["causal", "multimodal"])
@pytest.mark.parametrize("kind", GEMMA4_KINDS)
def test_gemma4_blocks_in_isolation_match_the_full_forward(kind, multimodal, tmp_path):
    layers = 6 if kind == "ple_kv" else 4
    model_dir = make_tiny_gemma4(tmp_path / "model", kind, layers=layers, multimodal=multimodal)
    worst, _ = _check_blocks("gemma4", model_dir, tmp_path / "capture")
    assert len(worst) == layers


@pytest.mark.parametrize("kind, bidirectional", [("dense", "vision"), ("ple_kv", None)])
def test_gemma4_multimodal_blocks_match_on_image_samples(kind, bidirectional, tmp_path):
    """Image–text samples for Gemma4ForConditionalGeneration (inputs built with Gemma 4's image processor). With
    `use_bidirectional_attention="vision"` (the larger Gemma 4 models) an image's tokens attend to each other,
    so the masks of image samples differ from text samples' and are stored per sample."""
    layers = 6 if kind == "ple_kv" else 4
    model_dir = make_tiny_gemma4(tmp_path / "model", kind, layers=layers, multimodal=True,
                                 use_bidirectional_attention=bidirectional)
    worst, captured = _check_blocks("gemma4", model_dir, tmp_path / "capture", images="gemma4", seq=96)
    assert len(worst) == layers
    per_sample = {name.split(".")[0] for name in captured}
    assert per_sample == ({"attention_mask"} if bidirectional else {"per_layer_input"})


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_vlm_blocks_in_isolation_match_the_full_forward(kind, tmp_path):
    model_dir = make_tiny_vlm(tmp_path / "model", kind, layers=4)
    worst, captured = _check_blocks("vlm", model_dir, tmp_path / "capture")
    assert len(worst) == 4
    assert captured == {}  # text-only samples share every input but the hidden states


# what image samples make per-sample, besides the hidden states (the rest stays shared)
IMAGE_SAMPLE_ROWS = {
    "qwen2_vl": {"position_embeddings"},  # M-RoPE positions follow the image grid
    "qwen2_5_vl": {"position_embeddings"},
    "qwen3_vl": {"position_embeddings", "added"},  # + deepstack features after layer 0
    "llava": set(),  # image features only change the hidden states
    "gemma3": {"attention_mask"},  # bidirectional attention among an image's tokens
}


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_vlm_blocks_in_isolation_match_the_full_forward_on_image_samples(kind, tmp_path):
    model_dir = make_tiny_vlm(tmp_path / "model", kind, layers=4)
    worst, captured = _check_blocks("vlm", model_dir, tmp_path / "capture", images=kind)
    assert len(worst) == 4
    assert {name.split(".")[0] for name in captured} == IMAGE_SAMPLE_ROWS[kind]
    if kind == "qwen3_vl":
        assert sorted(n for n in captured if n.startswith("added.")) == ["added.1"]  # one deepstack layer
        added = captured["added.1"].read_all()
        assert float(added[1].abs().max()) == 0.0 and float(added[0].abs().max()) > 0  # text sample adds nothing
    # one rotary table (per attention type, Gemma 3: sliding and full) feeds every block: its rows are stored
    # once, under the first block given it, not once per block
    owners = {int(n.split(".")[1]) for n in captured if not n.startswith("added")}
    assert owners <= ({0, 1} if kind == "gemma3" else {0})


@pytest.mark.parametrize("arch", ARCHS)
def test_causal_lm_blocks_in_isolation_match_the_full_forward(arch, tmp_path):
    """family=llm on every architecture of the tiny zoo (dense and MoE): found without a per-model list, each
    block reproduces in isolation what it computed inside the model's forward."""
    model_dir = make_tiny_causal_lm(tmp_path / "model", arch, layers=3)
    worst, _ = _check_blocks("llm", model_dir, tmp_path / "capture")
    assert len(worst) == 3
