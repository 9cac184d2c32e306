"""The exported checkpoint loads with transformers (+ auto-round) and matches qrunner's own evaluation."""
import json
from pathlib import Path

import pytest
import torch

from conftest import run_inprocess, tiny_overrides

pytest.importorskip("auto_round")


def loaded_perplexity(export_dir: str, cfg_overrides, fmt: str = "auto_round") -> float:
    """Perplexity of an export loaded by its real loader: auto_round and gptq through transformers + auto-round
    (GPTQ v1 with `AutoRoundConfig()`), compressed_tensors through transformers + compressed-tensors (default
    path: the packed weights are decompressed by the package)."""
    from transformers import AutoModelForCausalLM, AutoRoundConfig, AutoTokenizer

    from conftest import compose
    from qrunner.stages.evaluate import evaluation_windows, perplexity

    cfg, _ = compose(cfg_overrides)
    extra = {"quantization_config": AutoRoundConfig()} if fmt == "gptq" else {}
    extra = {"gguf_file": "model.gguf"} if fmt == "gguf" else extra  # dequantized to float32 by the gguf reader
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32, **extra)
    assert type(model).__name__.endswith("ForCausalLM")
    if fmt == "compressed_tensors":
        assert type(model.hf_quantizer).__name__ == "CompressedTensorsHfQuantizer"
    elif fmt != "gguf":
        qlinear = model.model.layers[0].mlp.down_proj
        assert type(qlinear).__name__ != "Linear", "the loader did not use quantized linear layers"
    tokenizer = AutoTokenizer.from_pretrained(export_dir, **({"gguf_file": "model.gguf"} if fmt == "gguf" else {}))
    windows = evaluation_windows(cfg, tokenizer)
    return perplexity(model, windows, 4, "loaded", False)


@pytest.mark.parametrize("scheme", [["scheme=w4a16"], ["scheme=w4a16", "scheme.sym=false"], ["scheme=w2a16"]],
                         ids=["w4-sym", "w4-asym", "w2-sym"])
def test_tiny_export_loads_and_matches_own_evaluation(tiny_llama, tmp_path, scheme):
    if "scheme.sym=false" in scheme:  # AWQ-packed: transformers' CPU path for it is auto-round-lib's kernel
        pytest.importorskip("auto_round_kernel", reason="loading auto_round:auto_awq on CPU needs auto-round-lib")
    overrides = tiny_overrides(tiny_llama, tmp_path, *scheme)
    report = run_inprocess(overrides)
    qconfig = json.loads((Path(report["export_dir"]) / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "auto-round"
    # 4-bit asymmetric: AWQ's layout (vLLM and SGLang take it; on CPU transformers loads it with auto-round-lib)
    assert qconfig["packing_format"] == ("auto_round:auto_gptq" if "scheme.sym=false" not in scheme
                                         else "auto_round:auto_awq")
    loaded = loaded_perplexity(report["export_dir"], overrides)
    ours = report["quality"]["ppl_quantized"]
    assert abs(loaded - ours) / ours < 0.005, (loaded, ours)


def test_layer_overrides_and_ignored_layers_go_to_extra_config_and_load(tiny_llama, tmp_path):
    overrides = tiny_overrides(tiny_llama, tmp_path, "quant.iters=20", "+quant.layer_overrides={down_proj:{bits:8}}",
                               "quant.ignore_layers=[layers\\.1\\.self_attn\\.o_proj]")
    report = run_inprocess(overrides)
    qconfig = json.loads((Path(report["export_dir"]) / "config.json").read_text())["quantization_config"]
    extra = qconfig["extra_config"]
    assert extra["model.layers.1.self_attn.o_proj"] == {"bits": 16}
    assert all(extra[f"model.layers.{i}.mlp.down_proj"] == {"bits": 8} for i in range(3))
    assert len(extra) == 4
    loaded = loaded_perplexity(report["export_dir"], overrides)
    ours = report["quality"]["ppl_quantized"]
    assert abs(loaded - ours) / ours < 0.005, (loaded, ours)
