"""family=llm across architectures (tests/tiny_causal_lms.py: dense and MoE), found without a per-model list.

For each: memory=low and memory=high export the same bytes; every block linear is quantized (routers stay in full
precision, every expert of every MoE block is quantized and counted); the export reloads in transformers +
auto-round and computes what qrunner's fake-quantized model computes. (Each block reproducing its in-model output
in isolation is tests/test_block_inputs_equivalence.py; the sliced head per architecture is
tests/test_sliced_head.py.)

The reloads run in one child process: loading an AutoRound MoE checkpoint re-registers transformers' conversion
mapping of that model type without its expert converters for the rest of the process, after which per-expert
checkpoints of that type no longer load (auto-round 0.16.1).
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

from conftest import checkpoint_tensors, run_inprocess, tiny_overrides, tree_bytes
from qrunner.models.adapter import get_module
from qrunner.models.registry import get_family
from qrunner.stages.quantize import quantized_layers
from tiny_causal_lms import ARCHS, MOE, make_tiny_causal_lm

pytest.importorskip("auto_round")

ROUTERS = {"deepseek_v3": 1, "qwen2_moe": 4}  # full-precision routers where not one a block of 2
ROUTER_NAMES = (".gate", ".router", ".shared_expert_gate")
RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
for job in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(job["export"], dtype=torch.float32).eval()
    kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n.startswith("model.layers.")
                    and hasattr(m, "qweight")})
    ids = torch.load(job["ids"])
    with torch.no_grad():  # auto-round's CPU backend runs in float16; back in float32 it computes what the codes say
        logits = torch.nn.Module.float(model)(input_ids=ids, use_cache=False).logits
    torch.save({"logits": logits, "quantized_linear_classes": kinds}, job["out"])
"""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """arch -> its model folder and the reports of a memory=low and a memory=high run (made on first use)."""
    root = tmp_path_factory.mktemp("zoo")
    made: Dict[str, Dict[str, Any]] = {}

    def runs(arch: str) -> Dict[str, Any]:
        if arch not in made:
            model_dir = make_tiny_causal_lm(root / arch / "model", arch, layers=2)
            made[arch] = {"model": model_dir, **{mode: run_inprocess(tiny_overrides(
                model_dir, root / arch / mode, f"memory={mode}", "quant.iters=4", "eval.enabled=false"))
                for mode in ("low", "high")}}
        return made[arch]

    return runs


@pytest.mark.parametrize("arch", ARCHS)
def test_low_and_high_export_the_same_bytes_and_quantize_every_layer(arch, zoo):
    runs = zoo(arch)
    low, high = runs["low"], runs["high"]
    assert tree_bytes(Path(low["export_dir"])) == tree_bytes(Path(high["export_dir"]))
    kept = low["full_precision_layers"]  # only the MoE routers: one a MoE block, Qwen2-MoE's shared-expert gate
    assert kept["count"] == ROUTERS.get(arch, 2 if arch in MOE else 0), kept
    assert all(n.endswith(ROUTER_NAMES) for n in kept["names"]), kept
    layers = quantized_layers(Path(low["run_dir"]) / "stages" / "quantize")
    assert not any(n.endswith(ROUTER_NAMES) for n in layers)
    if arch not in MOE:
        assert "experts" not in low["experts"]
        return
    experts = 4  # every MoE of the tiny zoo
    moe_blocks = sorted({n.split(".experts.")[0] for n in layers if ".experts." in n})
    assert len(moe_blocks) == (1 if arch == "deepseek_v3" else 2)  # DeepSeek-V3's first layer is dense
    for block in moe_blocks:  # every expert of every MoE block quantized, one layer per projection
        assert {n for n in layers if n.startswith(block + ".experts.")} == {
            f"{block}.experts.{e}.{p}" for e in range(experts) for p in ("gate_proj", "up_proj", "down_proj")}
    assert low["experts"]["experts"] == experts * len(moe_blocks)
    assert low["experts"]["experts_without_tokens"] == 0  # 8 x 64 tokens reach each of 4 experts
    exported = checkpoint_tensors(Path(low["export_dir"]))
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) or ".w1." in k for k in exported)
    assert all(f"{n}.qweight" in exported for n in layers if ".experts." in n)


def _fake_quantized_source(model_dir: Path, layers: Any, views: contextlib.ExitStack) -> torch.nn.Module:
    """The source model with every quantized layer's weight replaced by its dequantized codes (fused experts seen
    per expert through the block view while `views` is open)."""
    from transformers import AutoModelForCausalLM

    adapter = get_family("llm")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for _, block in adapter.blocks(model, adapter.block_lists(model, [])):
        views.enter_context(adapter.block_view(block))
    for name, qw in layers.items():
        get_module(model, name).weight.data = qw.dequantize(torch.float32)
    return model.eval()


def test_exports_reload_in_transformers_and_auto_round(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(1, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    expected, jobs = {}, []
    for arch in ARCHS:
        runs = zoo(arch)
        layers = quantized_layers(Path(runs["low"]["run_dir"]) / "stages" / "quantize")
        with contextlib.ExitStack() as views, torch.no_grad():
            ours = _fake_quantized_source(runs["model"], layers, views)(input_ids=ids, use_cache=False).logits
        source = AutoModelForCausalLM.from_pretrained(runs["model"], dtype=torch.float32).eval()
        with torch.no_grad():
            original = source(input_ids=ids, use_cache=False).logits
        expected[arch] = (ours, float((original - ours).abs().max()))
        jobs.append({"export": runs["low"]["export_dir"], "ids": str(tmp_path / "ids.pt"),
                     "out": str(tmp_path / f"{arch}.pt")})
    done = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for arch in ARCHS:
        loaded = torch.load(tmp_path / f"{arch}.pt")
        assert loaded["quantized_linear_classes"] and "Linear" not in loaded["quantized_linear_classes"], arch
        ours, quantization_error = expected[arch]
        per_token = (loaded["logits"] - ours).abs().amax(-1).flatten()
        worst, typical = float(per_token.max()), float(torch.quantile(per_token, 0.97))
        print(f"{arch}: loaded vs ours {worst:.2e} (97th percentile {typical:.2e}), ours vs original "
              f"{quantization_error:.2e}")
        # the reloaded model computes what qrunner computed, far below what quantizing changed; with MoE routing
        # a near-tie between experts may flip for a token or two
        assert typical < 0.05 * quantization_error, (arch, typical, quantization_error)
        if arch not in MOE:
            assert worst < 0.05 * quantization_error, (arch, worst, quantization_error)


CUSTOM_CONFIG = '''from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "qrunner_custom"
'''
CUSTOM_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


def test_a_checkpoint_with_its_own_code_runs_when_trusted(tiny_llama, tmp_path):
    """A model type transformers does not know, whose checkpoint ships its code (auto_map): refused by default
    (tests/test_family_errors.py), quantized with model.trust_remote_code=true, the code going with the export."""
    model = tmp_path / "custom"
    model.mkdir()
    for f in tiny_llama.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / "configuration_custom.py").write_text(CUSTOM_CONFIG)
    (model / "modeling_custom.py").write_text(CUSTOM_MODEL)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="qrunner_custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    report = run_inprocess(tiny_overrides(model, tmp_path / "runs", "memory=low", "quant.iters=2",
                                          "model.trust_remote_code=true"))
    assert report["full_precision_layers"]["count"] == 0
    layers = quantized_layers(Path(report["run_dir"]) / "stages" / "quantize")
    assert len(layers) == 3 * 7  # every linear of the 3 blocks
    export = Path(report["export_dir"])
    assert (export / "modeling_custom.py").is_file()
    assert json.loads((export / "config.json").read_text())["model_type"] == "qrunner_custom"
    assert report["quality"]["ppl_quantized"] < 1.1 * report["quality"]["ppl_original"]
