"""Image–text calibration (`data.images`) for vision-language models: image samples go through the model's
processor (or, for Qwen without torchvision, its image processor and tokenizer), the vision tower is read from
the shards only while the capture stage runs the samples to the decoder, and the per-sample inputs images
bring (Qwen's M-RoPE positions) are stored per sample. The exports of `high` and `low` are byte-identical and
reload with transformers (+ auto-round) computing what qrunner's fake-quantized model computes on an image."""
from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import List

import pytest
import torch

from conftest import run_inprocess, tiny_overrides, tree_bytes
from qrunner.errors import UserError
from qrunner.image_pairs import read_image_pairs
from qrunner.memory.activations import ActivationFile
from qrunner.stages.quantize import quantized_layers
from test_vlm import assert_reload_matches
from tiny_models import make_tiny_vlm, write_images

pytest.importorskip("auto_round")

TOWER = ("model.visual.", "model.vision_tower.", "model.multi_modal_projector.")
IMAGE_ARGS = ("family=vlm", "quant.iters=4", "scheme=w4a16", "scheme.group_size=32", "data.nsamples=5")


def _record_reads(monkeypatch) -> List[tuple]:
    """(tensor name, read while the capture stage ran) for every tensor read from the shards."""
    import qrunner.memory.streaming

    reads: List[tuple] = []
    original = qrunner.memory.streaming.materialize_tensors

    def recording(model, names, reader, dtype):
        in_capture = any(f.filename.endswith("stages/capture.py") for f in traceback.extract_stack())
        reads.extend((n, in_capture) for n in names)
        original(model, names, reader, dtype)

    monkeypatch.setattr(qrunner.memory.streaming, "materialize_tensors", recording)
    return reads


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "llava"])
def test_image_calibration_end_to_end(kind, tmp_path, monkeypatch):
    model_dir = make_tiny_vlm(tmp_path / "model", kind, layers=2)
    images = write_images(tmp_path / "images")
    reads = _record_reads(monkeypatch)
    reports = {mode: run_inprocess(tiny_overrides(model_dir, tmp_path / mode, f"memory={mode}", f"data.images={images}",
                                                  *IMAGE_ARGS)) for mode in ("high", "low")}
    text_only = run_inprocess(tiny_overrides(model_dir, tmp_path / "text", "memory=low", *IMAGE_ARGS))

    low = reports["low"]
    data = next(s for s in low["stages"] if s["name"] == "data")
    assert data["metrics"]["image_samples"] == 3 and data["metrics"]["samples"] == 5
    # the vision tower is read in low, and only while capturing block inputs (never during tuning/evaluation)
    tower_reads = [(n, c) for n, c in reads if n.startswith(TOWER)]
    assert tower_reads and all(in_capture for _, in_capture in tower_reads)
    side = {p.name for p in (Path(low["run_dir"]) / "stages" / "capture" / "side").glob("*.json")}
    assert side == ({"position_embeddings.0.0.json", "position_embeddings.0.1.json"} if kind == "qwen2_5_vl"
                    else set())

    exports = {mode: tree_bytes(Path(r["export_dir"])) for mode, r in reports.items()}
    assert exports["high"] == exports["low"]
    # block 0's inputs: the 3 image samples hold image features (they differ from the text-only run's samples),
    # the 2 text samples after them are the text-only run's samples 3 and 4
    hidden = {name: ActivationFile.open(Path(r["run_dir"]) / "stages" / "capture" / "hidden_states").read_all()
              for name, r in (("images", low), ("text", text_only))}
    assert torch.equal(hidden["images"][3:], hidden["text"][3:])
    assert all(not torch.equal(hidden["images"][i], hidden["text"][i]) for i in range(3))
    layers_q = quantized_layers(Path(low["run_dir"]) / "stages" / "quantize")

    from qrunner.models.registry import get_family
    from qrunner.image_pairs import open_image
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    encode = get_family("vlm").image_text_encoder(model_dir, AutoTokenizer.from_pretrained(model_dir), config, False)
    pair = read_image_pairs(str(images), "Describe this image.")[1]
    inputs = encode(open_image(pair), pair.prompt)
    assert int((inputs["input_ids"] == (config.image_token_id if kind != "llava" else config.image_token_index)
                ).sum()) > 0
    assert_reload_matches(model_dir, Path(low["export_dir"]), layers_q, inputs, f"{kind} image")


def test_image_pairs_from_a_folder_and_jsonl(tmp_path):
    folder = write_images(tmp_path / "images")
    pairs = read_image_pairs(str(folder), "Describe this image.")
    assert [p.image.name for p in pairs] == ["image0.png", "image1.png", "image2.png"]
    assert [p.prompt for p in pairs] == ["What is in this picture?", "Describe this image.", "Describe the colours."]
    lines = [{"image": "images/image2.png", "text": "first"}, {"image": str(folder / "image0.png")}]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    pairs = read_image_pairs(str(jsonl), "default")
    assert [(p.image, p.prompt) for p in pairs] == [(folder / "image2.png", "first"),
                                                     (folder / "image0.png", "default")]


@pytest.mark.parametrize("content, message", [
    ('{"text": "no image"}', 'line 1 of .* has no "image" path'),
    ('{"image": "missing.png"}', "line 1 of .* names .*missing.png, which does not exist"),
    ("not json", "line 1 of .* is not JSON"),
])
def test_bad_image_pairs_are_named(tmp_path, content, message):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(content + "\n")
    with pytest.raises(UserError, match=message):
        read_image_pairs(str(jsonl), "p")
    with pytest.raises(UserError, match="does not exist"):
        read_image_pairs(str(tmp_path / "nowhere"), "p")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no image"):
        read_image_pairs(str(tmp_path / "empty"), "p")


def test_image_calibration_errors(tmp_path):
    from tiny_models import make_tiny_llama

    images = write_images(tmp_path / "images")
    vlm = make_tiny_vlm(tmp_path / "vlm", "llava", layers=2)
    with pytest.raises(UserError, match="more than data.seqlen=8; raise data.seqlen"):
        run_inprocess(tiny_overrides(vlm, tmp_path / "r1", "family=vlm", f"data.images={images}", "data.seqlen=8"))
    (images / "image1.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read the image .*image1.png"):
        run_inprocess(tiny_overrides(vlm, tmp_path / "r2", "family=vlm", f"data.images={images}"))
    llm = make_tiny_llama(tmp_path / "llm", layers=2)
    with pytest.raises(UserError, match="has no image processor|processor, which did not load"):
        run_inprocess(tiny_overrides(llm, tmp_path / "r3", f"data.images={images}"))
