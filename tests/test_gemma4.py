"""family=gemma4 end to end in memory=low: quantize, export, reload with transformers + auto-round.

The reloaded checkpoint's logits must match qrunner's own fake-quantized model (the source model with each
quantized layer's weight replaced by its dequantized codes), and every tensor that is not a quantized layer
must be byte-identical to the source checkpoint's.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from conftest import checkpoint_tensors, exports_by_mode, run_cli, run_inprocess, tiny_overrides, tree_bytes
from qrunner.models.adapter import get_module
from qrunner.models.registry import get_family
from qrunner.stages.quantize import quantized_layers
from tiny_models import make_tiny_gemma4

pytest.importorskip("auto_round")

# per-layer inputs + KV sharing as Gemma4ForCausalLM repeats the multimodal case's text stack: `-m slow`
CASES = [("dense", False, 4), ("ple_kv", True, 6), pytest.param("ple_kv", False, 6, marks=pytest.mark.slow),
         ("moe", False, 4)]
KV_ARGS = ("family=gemma4", "quant.iters=4", "scheme.group_size=32")


@pytest.fixture(scope="module")
def ple_kv_clean(tmp_path_factory):
    """A 6-layer Gemma 4 with per-layer inputs and KV sharing, and the export of an uninterrupted run."""
    root = tmp_path_factory.mktemp("ple_kv")
    model_dir = make_tiny_gemma4(root / "model", "ple_kv", layers=6)
    clean = run_inprocess(tiny_overrides(model_dir, root / "clean", "memory=low", *KV_ARGS))
    return model_dir, tree_bytes(Path(clean["export_dir"]))


def _fake_quantized_source(model_dir: Path, layers, views: contextlib.ExitStack) -> torch.nn.Module:
    """The source model with every quantized layer's weight replaced by its dequantized codes (fused experts
    seen per expert through the adapter's block view while `views` is open)."""
    from transformers import AutoModelForCausalLM

    adapter = get_family("gemma4")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for _, block in adapter.blocks(model, adapter.block_lists(model, [])):
        views.enter_context(adapter.block_view(block))
    for name, qw in layers.items():
        layer = get_module(model, name)
        layer.weight.data = qw.dequantize(torch.float32)
    return model.eval()


@pytest.mark.parametrize("kind,multimodal,layers", CASES,
                         ids=["dense-causal", "ple_kv-mm", "ple_kv-causal", "moe-causal"])
def test_gemma4_low_memory_export_reloads_and_matches(kind, multimodal, layers, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_gemma4(tmp_path / "model", kind, layers=layers, multimodal=multimodal)
    report = run_inprocess(tiny_overrides(model_dir, tmp_path / "runs", "family=gemma4", "memory=low",
                                          "quant.iters=4", "scheme=w4a16", "scheme.group_size=32"))
    export = Path(report["export_dir"])
    run_dir = Path(report["run_dir"])
    layers_q = quantized_layers(run_dir / "stages" / "quantize")
    qconfig = json.loads((export / "config.json").read_text())["quantization_config"]
    block_list = "model.language_model.layers" if multimodal else "model.layers"
    assert qconfig["block_name_to_quantize"] == block_list
    assert len(layers_q) > 0 and all(n.startswith(block_list + ".") for n in layers_q)
    if kind == "moe":
        assert all(qconfig["extra_config"][f"{block_list}.{i}.router.proj"] == {"bits": 16} for i in range(layers))
        assert not any(".router." in n for n in layers_q)
    if kind == "ple_kv":  # reuse layers have no k/v projections; their queries are quantized
        assert f"{block_list}.5.self_attn.q_proj" in layers_q and f"{block_list}.5.self_attn.k_proj" not in layers_q

    # every tensor but the quantized layers' weights is the source's, byte for byte
    source, exported = checkpoint_tensors(model_dir), checkpoint_tensors(export)
    for key, tensor in source.items():
        module = key.rpartition(".")[0]
        if module in layers_q:
            assert key not in exported and f"{module}.qweight" in exported
        elif key.endswith(("experts.gate_up_proj", "experts.down_proj")):  # fused experts: written per expert
            assert key not in exported
            projections = ("gate_proj", "up_proj") if key.endswith("gate_up_proj") else ("down_proj",)
            for e in range(tensor.shape[0]):
                for proj in projections:
                    assert f"{module}.{e}.{proj}" in layers_q and f"{module}.{e}.{proj}.qweight" in exported
        else:
            assert torch.equal(exported[key].view(torch.uint8), tensor.view(torch.uint8)), key

    loaded = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    some_layer = get_module(loaded, next(iter(layers_q)))
    assert type(some_layer).__name__ != "Linear", "the loader did not use quantized linear layers"
    views = contextlib.ExitStack()
    ours = _fake_quantized_source(model_dir, layers_q, views)
    ids = torch.randint(1, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    source_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        # auto-round's CPU backend casts the model to float16; back in float32 it computes exactly what the
        # codes say (float16 rounding would flip expert choices of the MoE router)
        got = torch.nn.Module.float(loaded)(input_ids=ids, use_cache=False).logits
        want = ours(input_ids=ids, use_cache=False).logits
        original = source_model(input_ids=ids, use_cache=False).logits
    per_token = (got - want).abs().amax(-1).flatten()
    loader_error, typical = float(per_token.max()), float(torch.quantile(per_token, 0.97))
    quantization_error = float((original - want).abs().max())
    print(f"{kind}: loaded vs ours {loader_error:.2e} (97th percentile over tokens {typical:.2e}), "
          f"ours vs original {quantization_error:.2e}")
    # the reloaded model computes what qrunner computed, up to the loader's float16 arithmetic, far below what
    # quantizing changed; with MoE routing a near-tie between experts may flip for a token or two
    assert typical < 0.05 * quantization_error, (typical, quantization_error)
    if kind != "moe":
        assert loader_error < 0.05 * quantization_error, (loader_error, quantization_error)
    views.close()


def test_gemma4_memory_modes_give_byte_identical_exports_and_never_read_the_towers(tmp_path, monkeypatch):
    """high, medium and low export the same bytes for a multimodal Gemma 4 with per-layer inputs and KV sharing
    (side values on disk in low, in RAM otherwise); the streaming modes never read the vision tower."""
    model_dir = make_tiny_gemma4(tmp_path / "model", "ple_kv", layers=6, multimodal=True)
    exports, read = exports_by_mode(model_dir, tmp_path, ("high", "medium", "low"), monkeypatch, *KV_ARGS)
    assert exports["high"] == exports["medium"] == exports["low"]
    assert read and not any(n.startswith(("model.vision_tower.", "model.embed_vision.")) for n in read)


def test_gemma4_killed_after_the_kv_store_layers_resumes_with_identical_export(ple_kv_clean, tmp_path):
    """Killed once blocks 0-3 are committed (2 and 3 hand keys/values to the reuse layers 4 and 5): the restart
    resumes at block 5 with the committed side values and exports what an uninterrupted run exports."""
    model_dir, clean = ple_kv_clean
    res = run_cli(tiny_overrides(model_dir, tmp_path / "killed", "memory=high", *KV_ARGS),
                  env={"QRUNNER_FAULT": "quantize.block_committed:3"})
    assert res.returncode == 0, res.stderr
    assert "killed (SIGKILL, as by the OOM killer) in memory=high" in res.stderr
    (run_dir,) = [p for p in (tmp_path / "killed" / "demo").iterdir() if p.is_dir()]
    assert "quantize: resuming at block 5/6 (4 block(s) already committed)" in (run_dir / "run.log").read_text()
    assert tree_bytes(run_dir / "model") == clean
    units = run_dir / "stages" / "quantize" / "units"
    assert not list(units.rglob("side_*"))  # side values are dropped once every block is done


def test_damaged_shared_kv_rows_of_a_committed_block_are_detected_on_resume(ple_kv_clean, tmp_path):
    """The keys/values a committed store layer handed on are part of its checkpoint: truncated, they are named
    and quantization starts over instead of reading garbage; the export still equals a clean run's."""
    model_dir, clean = ple_kv_clean
    args = tiny_overrides(model_dir, tmp_path / "runs", "memory=low", *KV_ARGS)
    res = run_cli([*args, "run.on_oom=fail"], env={"QRUNNER_FAULT": "quantize.block_committed:3"})
    assert res.returncode != 0
    (run_dir,) = [p for p in (tmp_path / "runs" / "demo").iterdir() if p.is_dir()]
    (kv,) = list((run_dir / "stages" / "quantize.partial").rglob("side_quantized/kv.full_attention.k.bin"))
    kv.write_bytes(kv.read_bytes()[:-4])
    report = run_inprocess(args)
    log = (run_dir / "run.log").read_text()
    assert "committed block checkpoint damaged" in log and "kv.full_attention.k.bin" in log
    assert tree_bytes(Path(report["export_dir"])) == clean
