"""family=vlm end to end in memory=low: only the language model's blocks are quantized; the export keeps the
checkpoint's own tensor names, copies the vision tower and the processor files, and reloads with transformers
(+ auto-round) as the vision-language model it is, computing what qrunner's fake-quantized model computes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import checkpoint_tensors, exports_by_mode, run_inprocess, tiny_overrides
from qrunner.models.adapter import get_module
from qrunner.stages.quantize import quantized_layers
from tiny_models import VLM_KINDS, make_tiny_vlm

pytest.importorskip("auto_round")


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_vlm_low_memory_export_reloads_and_matches(kind, tmp_path):
    model_dir = make_tiny_vlm(tmp_path / "model", kind, layers=2)
    report = run_inprocess(tiny_overrides(model_dir, tmp_path / "runs", "family=vlm", "memory=low",
                                          "quant.iters=4", "scheme=w4a16", "scheme.group_size=32"))
    export = Path(report["export_dir"])
    layers_q = quantized_layers(Path(report["run_dir"]) / "stages" / "quantize")
    config = json.loads((export / "config.json").read_text())
    assert config["quantization_config"]["block_name_to_quantize"] == "model.language_model.layers"
    assert len(layers_q) == 14 and all(n.startswith("model.language_model.layers.") for n in layers_q)
    # processor, chat template and tokenizer files travel with the checkpoint
    copied = {p.name for p in model_dir.iterdir() if p.suffix != ".safetensors" and p.name != "config.json"}
    assert {"chat_template.jinja", "tokenizer.json", "generation_config.json"} <= copied
    assert copied & {"preprocessor_config.json", "processor_config.json"}  # LLaVA's processor holds its config
    for name in copied:
        assert (export / name).read_bytes() == (model_dir / name).read_bytes(), name

    # the checkpoint's own tensor names are kept; everything but the quantized weights is byte-identical
    source, exported = checkpoint_tensors(model_dir), checkpoint_tensors(export)
    stored_q = {k.rpartition(".")[0] for k in exported if k.endswith(".qweight")}
    assert len(stored_q) == 14
    vision = [k for k in source if "vision" in k or "visual" in k or "projector" in k]
    assert vision and all(torch.equal(exported[k].view(torch.uint8), source[k].view(torch.uint8)) for k in vision)
    for key, tensor in source.items():
        if key.rpartition(".")[0] in stored_q and key.endswith(".weight"):
            assert key not in exported
        else:
            assert torch.equal(exported[key].view(torch.uint8), tensor.view(torch.uint8)), key

    ids = torch.randint(1, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    assert_reload_matches(model_dir, export, layers_q, {"input_ids": ids}, kind)


def assert_reload_matches(model_dir: Path, export: Path, layers_q, inputs, label: str) -> None:
    """The export loads with transformers (+ auto-round) as the VLM it is, with no missing or unexpected key,
    and computes on `inputs` what qrunner's fake-quantized model computes (to well within the quantization
    change)."""
    from transformers import AutoModelForImageTextToText

    loaded, info = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(get_module(loaded, next(iter(layers_q)))).__name__ != "Linear"
    ours = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    original = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, qw in layers_q.items():
        get_module(ours, name).weight.data = qw.dequantize(torch.float32)
    with torch.no_grad():
        got = loaded.eval()(**inputs, use_cache=False).logits.float()  # auto-round's CPU backend: float16
        want = ours(**inputs, use_cache=False).logits
        before = original(**inputs, use_cache=False).logits
    loader_error, quantization_error = float((got - want).abs().max()), float((before - want).abs().max())
    print(f"{label}: loaded vs ours {loader_error:.2e}, ours vs original {quantization_error:.2e}")
    assert loader_error < 0.05 * quantization_error, (loader_error, quantization_error)


def test_vlm_memory_modes_give_byte_identical_exports_and_never_read_the_vision_tower(tmp_path, monkeypatch):
    model_dir = make_tiny_vlm(tmp_path / "model", "gemma3", layers=4)
    exports, read = exports_by_mode(model_dir, tmp_path, ("high", "low"), monkeypatch, "family=vlm", "quant.iters=4")
    assert exports["high"] == exports["low"]
    assert read and not any(n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in read)
