"""Layers the scheme's group size does not divide, end to end: quantized with a shorter last group, exported under
a group size the loader takes, reloaded with transformers + auto-round; shapes no loader takes stay in full precision
and are reported."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_inprocess, tiny_overrides
from qrunner.models.adapter import get_module
from qrunner.stages.quantize import quantized_layers
from tiny_models import make_tiny_gemma4, make_tiny_llama

pytest.importorskip("auto_round")

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _overrides(model: Path, root: Path, *extra: str):
    return [o for o in tiny_overrides(model, root) if not o.startswith("scheme.group_size")] + list(extra)


def _loaded_vs_ours(model_dir: Path, export: Path, run_dir: Path, model_cls=None):
    """Logits of the reloaded export and of the source model with qrunner's dequantized weights plugged in
    (both in float32), and of the source model itself."""
    from transformers import AutoModelForCausalLM

    model_cls = model_cls or AutoModelForCausalLM
    layers = quantized_layers(run_dir / "stages" / "quantize")
    loaded = model_cls.from_pretrained(export, dtype=torch.float32).eval()
    for name in layers:
        assert type(get_module(loaded, name)).__name__ == "QuantLinear", name
    ours = model_cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    source = model_cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    quantized = {f"{name}.weight" for name in layers}
    with torch.no_grad():  # the loader holds every other tensor (rotary tables included) in float16
        for name, p in ours.named_parameters():
            if name not in quantized:
                p.copy_(p.half().float())
        for b in ours.buffers():
            if b.is_floating_point():
                b.copy_(b.half().float())
    for name, qw in layers.items():
        get_module(ours, name).weight.data = qw.dequantize(torch.float32)
    ids = torch.randint(1, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the CPU backend casts to float16; back in float32 it computes what the codes say
        got = torch.nn.Module.float(loaded)(input_ids=ids, use_cache=False).logits
        want = ours(input_ids=ids, use_cache=False).logits
        original = source(input_ids=ids, use_cache=False).logits
    return layers, float((got - want).abs().max()), float((original - want).abs().max())


def test_llama_with_group_128_on_widths_192_and_320_runs_reloads_and_reports_kept_layers(tmp_path):
    """hidden 192 and intermediate 320 with group 128 (as hidden 576 would): every block linear has a shorter last
    group; one key/value head makes k/v_proj 48 wide, which no loader kernel takes: they stay in full precision,
    are named in a warning and in report.json, and get {"bits": 16}."""
    model_dir = make_tiny_llama(tmp_path / "model", layers=2, hidden=192, intermediate=320, kv_heads=1)
    report = run_inprocess(_overrides(model_dir, tmp_path / "runs", "scheme=w4a16", "scheme.group_size=128",
                                      "memory=low", "quant.iters=2", "eval=none"))
    run_dir, export = Path(report["run_dir"]), Path(report["export_dir"])

    kept = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj")]
    fp = report["full_precision_layers"]
    block = 192 * 192 * 2 + 192 * 48 * 2 + 192 * 320 * 3
    assert fp == {"count": 4, "share_of_weights": pytest.approx(2 * 192 * 48 / block), "names": kept,
                  "reasons": {"in/out features not divisible by 32 (loader kernels)": 4}}
    assert json.loads((run_dir / "report.json").read_text())["full_precision_layers"] == fp
    assert "full precision: 4 layer(s), 6.67 % of the block linear weights" in (run_dir / "report.md").read_text()
    log = (run_dir / "run.log").read_text()
    assert "WARNING 4 layer(s) stay in full precision (6.67 % of the block linear weights)" in log
    assert "model.layers.0.self_attn.k_proj [out 48, in 192]" in log

    qconfig = json.loads((export / "config.json").read_text())["quantization_config"]
    assert qconfig["group_size"] == 128
    extra = qconfig["extra_config"]
    for i in range(2):
        for name in LINEARS:
            full = f"model.layers.{i}.{name}"
            assert extra[full] == ({"bits": 16} if full in kept else {"group_size": 64}), full

    layers, loader_error, quantization_error = _loaded_vs_ours(model_dir, export, run_dir)
    assert len(layers) == 10 and all(qw.group_size == 128 for qw in layers.values())
    assert layers["model.layers.0.mlp.down_proj"].scale.shape == (192, 3)  # 320 = 128 + 128 + 64
    assert layers["model.layers.1.self_attn.q_proj"].scale.shape == (192, 2)  # 192 = 128 + 64
    print(f"loaded vs ours {loader_error:.2e}, ours vs original {quantization_error:.2e}")
    assert loader_error < 1e-5 * quantization_error, (loader_error, quantization_error)  # measured: 0


def test_gemma4_w8a16_with_per_layer_input_width_64(tmp_path):
    """The reported case: `qrunner recipe=gemma4_w8a16 memory=low` on a Gemma 4 whose per-layer input width (and
    here hidden size) is 64 stopped with "scheme.group_size=128 ... does not divide the input size 64"; now the
    64-wide layers are one group per row (written as group_size -1) and the run goes on."""
    model_dir = make_tiny_gemma4(tmp_path / "model", "ple_kv", layers=4, hidden_size_per_layer_input=64)
    report = run_inprocess(_overrides(model_dir, tmp_path / "runs", "recipe=gemma4_w8a16", "memory=low",
                                      "quant.iters=2", "eval=none"))
    run_dir, export = Path(report["run_dir"]), Path(report["export_dir"])
    assert report["full_precision_layers"]["count"] == 0
    qconfig = json.loads((export / "config.json").read_text())["quantization_config"]
    assert (qconfig["bits"], qconfig["group_size"]) == (8, 128)
    layers, loader_error, quantization_error = _loaded_vs_ours(model_dir, export, run_dir)
    assert layers["model.layers.0.per_layer_projection"].scale.shape == (64, 1)
    narrow = {name for name, qw in layers.items() if qw.in_features < 128}
    assert "model.layers.0.per_layer_projection" in narrow and len(narrow) < len(layers)  # the MLP's down: in 128
    assert qconfig["extra_config"] == {name: {"group_size": -1} for name in narrow}
    print(f"loaded vs ours {loader_error:.2e}, ours vs original {quantization_error:.2e}")
    assert loader_error < 1e-5 * quantization_error, (loader_error, quantization_error)  # measured: 0
