"""Fused MoE experts (qrunner/models/moe.py): seen per expert they compute what the fused module computes, a fused
tensor is assembled from a per-expert checkpoint exactly as transformers assembles it, an unknown layout is
refused, and experts that receive no calibration token are rounded to nearest and reported."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import run_inprocess, tiny_overrides
from qrunner.errors import UserError
from qrunner.memory.streaming import CheckpointReader
from qrunner.models.checkpoint_names import checkpoint_key_map
from qrunner.models.moe import UnfusedExperts, expert_layout, fused_experts_modules
from qrunner.models.registry import get_family
from qrunner.quant.rtn import quantize_rtn
from qrunner.quant.scheme import QuantScheme
from qrunner.stages.quantize import quantized_layers
from tiny_causal_lms import MOE, causal_lm_config, make_tiny_causal_lm


@pytest.mark.parametrize("arch", MOE)
def test_experts_seen_per_expert_compute_what_the_fused_module_computes(arch):
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(causal_lm_config(arch, layers=2)).eval()
    adapter = get_family("llm")
    hidden = torch.randn(2, 24, 64)
    for _, block in adapter.blocks(model, adapter.block_lists(model, [])):
        if not fused_experts_modules(block):
            continue  # DeepSeek-V3's dense first layer
        with torch.no_grad():
            want = block.mlp(hidden)
            with adapter.block_view(block):
                assert isinstance(block.mlp.experts, UnfusedExperts)
                got = block.mlp(hidden)
        assert not isinstance(block.mlp.experts, UnfusedExperts)  # the view is undone
        want, got = (w[0] if isinstance(w, tuple) else w for w in (want, got))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_fused_experts_are_assembled_from_a_per_expert_checkpoint_as_transformers_does(arch, tmp_path):
    import transformers

    path = make_tiny_causal_lm(tmp_path / arch, arch)
    stored = load_file(str(path / "model.safetensors"))
    piece = "block_sparse_moe.experts.3.w1.weight" if arch == "mixtral" else "mlp.experts.3.gate_proj.weight"
    assert f"model.layers.0.{piece}" in stored  # transformers writes the experts one by one
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    reader = CheckpointReader(path)
    renamed, assembled, part_names = checkpoint_key_map(loaded, reader.shard_of)
    reader.rename(renamed)
    reader.assemble(assembled, part_names)
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert torch.equal(reader.read(name), loaded.get_parameter(name).data), name
    # each piece is named as the per-expert linear it becomes in the block's view
    assert reader.model_name(f"model.layers.0.{piece}") == "model.layers.0.mlp.experts.3.gate_proj.weight"


def test_an_unknown_fused_layout_is_refused_with_its_class_named():
    class OddExperts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 64, 32))
            self.down_proj = nn.Parameter(torch.zeros(4, 32, 16))

        def forward(self, x, index, weights):  # some other arithmetic
            return x

    with pytest.raises(UserError, match=r"OddExperts stores its experts fused .*qrunner/models/moe.py"):
        expert_layout(OddExperts())


def _route_nothing_to_expert(model_dir: Path, expert: int) -> None:
    """GPT-OSS's routers have a bias: a very negative one for `expert` keeps every token from it."""
    file = model_dir / "model.safetensors"
    tensors = load_file(str(file))
    for key in [k for k in tensors if k.endswith("mlp.router.bias")]:
        tensors[key][expert] = -1e4
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_experts_without_calibration_tokens_are_rounded_to_nearest_and_reported(tmp_path):
    model_dir = make_tiny_causal_lm(tmp_path / "model", "gpt_oss", layers=2)
    _route_nothing_to_expert(model_dir, 3)
    report = run_inprocess(tiny_overrides(model_dir, tmp_path / "runs", "memory=low", "quant.iters=8"))
    experts = report["experts"]
    assert experts["experts"] == 8 and experts["experts_without_tokens"] == 2
    assert experts["experts_without_tokens_names"] == [f"model.layers.{i}.mlp.experts.3" for i in range(2)]
    md = (Path(report["run_dir"]) / "report.md").read_text()
    assert "2 of 8 received no calibration tokens" in md

    layers = quantized_layers(Path(report["run_dir"]) / "stages" / "quantize")
    reader = CheckpointReader(model_dir)
    scheme = QuantScheme(bits=4, group_size=32, sym=True)
    fused = reader.read("model.layers.1.mlp.experts.gate_up_proj").float()
    # expert 3 (no tokens): exactly round-to-nearest of its weights; expert 0 (tuned): not
    for expert, tuned in ((3, False), (0, True)):
        weight = fused[expert].t()[:128]  # its "gate_proj" half, [out, in]
        rtn = quantize_rtn(weight, scheme)
        got = layers[f"model.layers.1.mlp.experts.{expert}.gate_proj"]
        same = torch.equal(got.q, rtn.q) and torch.equal(got.scale, rtn.scale)
        assert same != tuned, expert
    assert json.loads((Path(report["run_dir"]) / "report.json").read_text())["experts"] == experts


def test_compressed_tensors_export_of_fused_experts_is_refused_before_anything_runs(tmp_path):
    model_dir = make_tiny_causal_lm(tmp_path / "model", "qwen3_moe", layers=2)
    with pytest.raises(UserError, match=r"compressed_tensors: .* stores its MoE experts fused \(2 experts modules, "
                                        r"e.g. model.layers.0.mlp.experts\).*Export auto_round or gptq"):
        run_inprocess(tiny_overrides(model_dir, tmp_path / "runs", "export.formats=[compressed_tensors]"))
    assert not list((tmp_path / "runs").rglob("quantize"))  # refused before any stage ran


def test_weights_fused_in_an_unknown_layout_stop_the_run():
    """3-D weights that are not seen as linears would silently stay in full precision: a sizeable share stops
    the run naming them; a small one (a state-space model's convolution) is left as it is."""
    class Block(nn.Module):
        def __init__(self, experts: int) -> None:
            super().__init__()
            self.proj = nn.Linear(64, 64)
            self.w_in = nn.Parameter(torch.zeros(experts, 64, 64))

    class Model(nn.Module):
        def __init__(self, experts: int) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([Block(experts)])

    adapter = get_family("llm")
    with pytest.raises(UserError, match=r"model.layers.0 holds 1 weight\(s\) of 3 or more dimensions .*"
                                        r"model.layers.0.w_in \[4, 64, 64\]"):
        adapter.plan_layers(Model(4), ["model.layers"], 4, 32, True, [])
    small = Model(4)
    small.model.layers[0].w_in = nn.Parameter(torch.zeros(1, 4, 4))
    assert [p.name for p in adapter.plan_layers(small, ["model.layers"], 4, 32, True, [])] == ["model.layers.0.proj"]
