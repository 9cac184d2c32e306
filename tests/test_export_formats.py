"""export.formats: GPTQ v1, compressed-tensors and GGUF beside the AutoRound format, from the one quantize stage.

The packings are checked against the compressed-tensors and gguf packages' own code; every format's codes and
scales unpack to the same dequantized weights; each export loads in a real loader on CPU and gives qrunner's own
perplexity; adding a format to a finished run writes only that format; a killed export resumes byte-identical.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, run_inprocess, stage_status, tiny_overrides, tree_bytes
from qrunner.errors import UserError
from qrunner.export.auto_round import PACKING_SYM, unpack_layer
from qrunner.export.compressed_tensors import pack_ct_layer
from qrunner.export.gptq import pack_gptq_layer
from qrunner.quant.rtn import quantize
from qrunner.quant.scheme import QuantScheme

FORMATS = "export.formats=[auto_round,gptq,compressed_tensors,gguf]"
MIXED = ("+quant.layer_overrides={down_proj:{bits:8}}", "quant.ignore_layers=[layers\\.1\\.self_attn\\.o_proj]")


def _weight(out_f=64, in_f=256, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits,group,sym", [(2, 32, True), (3, 64, True), (4, 128, True), (8, 32, True),
                                            (4, 64, False), (3, 32, False), (4, -1, True)])
def test_compressed_tensors_packing_is_the_packages_own(bits, group, sym):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    qw = quantize(_weight(), QuantScheme(bits=bits, group_size=group, sym=sym))
    t = pack_ct_layer(qw)
    offset = 2 ** (bits - 1)
    signed = (qw.q.to(torch.int16) - offset).to(torch.int8)
    assert torch.equal(t["weight_packed"], pack_to_int32(signed, bits, packed_dim=1))
    assert torch.equal(unpack_from_int32(t["weight_packed"], bits, qw.q.shape, packed_dim=1), signed)
    assert t["weight_packed"].shape == (64, 256 * bits // 32) and t["weight_packed"].dtype == torch.int32
    assert t["weight_shape"].tolist() == [64, 256]
    assert torch.equal(t["weight_scale"], qw.scale)
    if sym:
        assert "weight_zero_point" not in t
    else:
        zero = (qw.zero - offset).to(torch.int8)
        assert torch.equal(t["weight_zero_point"], pack_to_int32(zero, bits, packed_dim=0))


def test_gptq_layer_is_autoround_symmetric_packing_plus_g_idx_and_refuses_asymmetric():
    qw = quantize(_weight(in_f=192), QuantScheme(bits=4, group_size=128, sym=True))  # 128 does not divide 192
    t = pack_gptq_layer(qw)
    again = unpack_layer(t, 4, 64, True, PACKING_SYM, 192, 64)  # written as gcd(192, 128) = 64 groups
    assert torch.equal(again.dequantize(), qw.dequantize())
    assert torch.equal(t["g_idx"], torch.arange(192, dtype=torch.int32) // 64)
    with pytest.raises(ValueError, match="symmetric"):
        pack_gptq_layer(quantize(_weight(), QuantScheme(bits=4, group_size=64, sym=False)))


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 64), (4, -1)])
def test_gguf_blocks_dequantize_exactly_to_qrunners_weights(bits, group):
    gguf = pytest.importorskip("gguf")
    from qrunner.export.gguf import encode_layer

    qw = quantize(_weight(), QuantScheme(bits=bits, group_size=group, sym=True))
    data = encode_layer(qw)
    kind = gguf.GGMLQuantizationType.Q4_0 if bits == 4 else gguf.GGMLQuantizationType.Q8_0
    assert data.shape == (64, 256 // 32 * (18 if bits == 4 else 34))
    assert np.array_equal(gguf.quants.dequantize(data, kind), qw.dequantize().numpy())
    rows = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(gguf.quants.dequantize(encode_layer(qw, rows), kind), qw.dequantize()[rows].numpy())
    with pytest.raises(ValueError, match="no exact GGUF"):
        encode_layer(quantize(_weight(), QuantScheme(bits=4, group_size=32, sym=False)))


def _gguf_dequantized(path):
    """Every tensor of a GGUF file, dequantized by the gguf package, in torch's [out, in] order."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    return {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(
        [int(d) for d in reversed(t.shape)]) for t in reader.tensors}


def _ct_dequantized(tensors, prefix, bits):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(tensors[f"{prefix}.weight_shape"].tolist())
    signed = unpack_from_int32(tensors[f"{prefix}.weight_packed"], bits, shape, packed_dim=1).to(torch.float32)
    scale = tensors[f"{prefix}.weight_scale"].to(torch.float32)
    return (signed.reshape(shape[0], scale.shape[1], -1) * scale[:, :, None]).reshape(shape)


def _autoround_dequantized(tensors, prefix, bits, group, in_f, out_f):
    layer = {k: tensors[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales")}
    return unpack_layer(layer, bits, group, True, PACKING_SYM, in_f, out_f).dequantize()


@pytest.fixture(scope="module")
def mixed_run(tiny_llama, tmp_path_factory):
    """A mixed-precision run (down_proj at 8 bits, one layer left in full precision) in all three formats."""
    overrides = tiny_overrides(tiny_llama, tmp_path_factory.mktemp("mixed"), "quant.iters=4", FORMATS, *MIXED)
    return run_inprocess(overrides), overrides


def test_every_format_carries_the_same_codes_and_scales(mixed_run):
    report, _ = mixed_run
    exports = {k: Path(v) for k, v in report["exports"].items()}
    assert set(exports) == {"auto_round", "gptq", "compressed_tensors", "gguf"}
    assert exports["gptq"].name == "model-gptq" and exports["auto_round"].name == "model"
    gguf = _gguf_dequantized(exports["gguf"] / "model.gguf")
    ar, gptq, ct = (load_file(str(exports[f] / "model.safetensors")) for f in ("auto_round", "gptq",
                                                                                "compressed_tensors"))
    layers = sorted(k[:-len(".qweight")] for k in ar if k.endswith(".qweight"))
    assert len(layers) == 3 * 7 - 1  # 3 blocks x 7 linears, one left in full precision
    assert "model.layers.1.self_attn.o_proj.weight" in ct and "model.layers.1.self_attn.o_proj.weight" in gptq
    for prefix in layers:
        bits = 8 if prefix.endswith("down_proj") else 4
        out_f, in_f = ct[f"{prefix}.weight_shape"].tolist()
        reference = _autoround_dequantized(ar, prefix, bits, 32, in_f, out_f)
        assert torch.equal(_autoround_dequantized(gptq, prefix, bits, 32, in_f, out_f), reference), prefix
        assert torch.equal(_ct_dequantized(ct, prefix, bits), reference), prefix
        assert torch.equal(gptq[f"{prefix}.g_idx"], torch.arange(in_f, dtype=torch.int32) // 32)
        block, kind = prefix.split(".")[2], prefix.split(".")[-1]
        name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        got = gguf[f"blk.{block}.{name}.weight"]
        if kind in ("q_proj", "k_proj"):  # llama.cpp's row order for Llama's q/k: undo it as transformers does
            heads = 4 if kind == "q_proj" else 2  # the tiny Llama's attention and key/value heads
            got = got.reshape(heads, out_f // heads // 2, 2, in_f).swapaxes(1, 2).reshape(out_f, in_f)
        assert torch.equal(got, reference), prefix
    kept = gguf["blk.1.attn_output.weight"]  # left in full precision: the source's bf16 values
    assert kept.dtype == torch.float32 and torch.equal(kept.to(torch.bfloat16).float(), kept)


def test_mixed_precision_configs_name_the_layers(mixed_run):
    report, _ = mixed_run
    gptq = json.loads((Path(report["exports"]["gptq"]) / "config.json").read_text())["quantization_config"]
    assert "meta" not in gptq and gptq["quant_method"] == "gptq" and gptq["checkpoint_format"] == "gptq"
    rules = list(gptq["dynamic"])
    assert rules[0] == "-:^model\\.layers\\.1\\.self_attn\\.o_proj$"  # skips first: vLLM takes the first match
    assert all(r.startswith("+:") for r in rules[1:]) and len(rules) == 4
    assert gptq["dynamic"]["+:^model\\.layers\\.0\\.mlp\\.down_proj$"] == {"bits": 8, "group_size": 32, "sym": True}
    assert json.loads((Path(report["exports"]["gptq"]) / "quantize_config.json").read_text()) == gptq

    ct = json.loads((Path(report["exports"]["compressed_tensors"]) / "config.json").read_text())[
        "quantization_config"]
    assert ct["format"] == "mixed-precision" and ct["quantization_status"] == "compressed"
    groups = {g["weights"]["num_bits"]: g["targets"] for g in ct["config_groups"].values()}
    assert groups[8] == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    assert len(groups[4]) == 3 * 6 - 1
    assert ct["ignore"] == ["lm_head", "model.layers.1.self_attn.o_proj"]


@pytest.mark.parametrize("fmt", ["gptq", "compressed_tensors", "gguf"])
def test_mixed_exports_load_and_match_own_evaluation(mixed_run, fmt):
    from test_export_loads_in_transformers import loaded_perplexity

    report, overrides = mixed_run
    loaded = loaded_perplexity(report["exports"][fmt], overrides, fmt)
    ours = report["quality"]["ppl_quantized"]
    assert abs(loaded - ours) / ours < 0.005, (loaded, ours)


def test_w8a16_exports_load_and_match_own_evaluation(tiny_llama, tmp_path):
    from test_export_loads_in_transformers import loaded_perplexity

    overrides = tiny_overrides(tiny_llama, tmp_path, "scheme=w8a16", "quant.iters=0",
                               "export.formats=[gptq,compressed_tensors,gguf]")
    report = run_inprocess(overrides)
    assert set(report["exports"]) == {"gptq", "compressed_tensors", "gguf"}
    assert report["export_dir"].endswith("model-gptq")
    ours = report["quality"]["ppl_quantized"]
    for fmt in ("gptq", "compressed_tensors", "gguf"):
        loaded = loaded_perplexity(report["exports"][fmt], overrides, fmt)
        assert abs(loaded - ours) / ours < 0.005, (fmt, loaded, ours)


def test_adding_a_format_to_a_finished_run_writes_only_that_format(tiny_llama, tmp_path):
    first = run_inprocess(tiny_overrides(tiny_llama, tmp_path, "quant.iters=2"))
    before = tree_bytes(Path(first["export_dir"]))
    second = run_inprocess(tiny_overrides(tiny_llama, tmp_path, "quant.iters=2",
                                          "export.formats=[auto_round,compressed_tensors]"))
    assert second["run_dir"] == first["run_dir"]
    status = stage_status(second)
    assert status.pop("export_compressed_tensors") == "ran"
    assert set(status.values()) == {"reused"}, status
    assert tree_bytes(Path(second["export_dir"])) == before
    log = (Path(second["run_dir"]) / "run.log").read_text().split("run directory")[-1]
    assert "export compressed_tensors:" in log and "export auto_round:" not in log


@pytest.mark.parametrize("hit,fmt", [(1, "gptq"), (2, "compressed_tensors"), (3, "gguf")])  # hits count from 0
def test_a_killed_export_resumes_to_byte_identical_exports(tiny_llama, tmp_path, mixed_run, hit, fmt):
    reference, _ = mixed_run
    args = tiny_overrides(tiny_llama, tmp_path, "quant.iters=4", FORMATS, *MIXED, "run.on_oom=fail")
    killed = run_cli(args, env={"QRUNNER_FAULT": f"export.shards_written:{hit}", "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_cli(args, env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    (run_dir,) = [p for p in (tmp_path / "demo").iterdir() if p.is_dir()]
    report = json.loads((run_dir / "report.json").read_text())
    assert stage_status(report)["export"] == "reused" and stage_status(report)[f"export_{fmt}"] == "ran"
    for name, path in report["exports"].items():
        assert tree_bytes(Path(path)) == tree_bytes(Path(reference["exports"][name])), name


@pytest.mark.parametrize("extra,match", [
    (["scheme.sym=false", "export.formats=[gptq]"], "GPTQ v1 stores zero points minus one"),
    (["export.formats=[gptq,gptq]"], "distinct formats"),
    ([FORMATS, "export.output_dir=/tmp/x"], "set export.output_dir only with one format"),
    (["export.formats=[onnx]"], "onnx"),
])
def test_bad_export_formats_are_refused_with_the_fix(tiny_llama, tmp_path, extra, match):
    from hydra.errors import ConfigCompositionException

    from test_config import _validate

    with pytest.raises((UserError, ConfigCompositionException), match=match):
        _validate(tiny_overrides(tiny_llama, tmp_path, *extra))


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_gguf_of_other_architectures_loads_and_matches_own_evaluation(tmp_path, model_type):
    from test_export_loads_in_transformers import loaded_perplexity
    from tiny_models import make_tiny_llama

    # Qwen3: transformers' GGUF reader assumes head_dim 128 (it reads no key_length), as every real Qwen3 has.
    # Mistral: the folder name becomes general.name, and transformers 5.24 turns a "llama" file whose name says
    # "mistral" into model_type mistral, which its gguf tensor mapping then does not know; llama.cpp has no such step.
    size = {"hidden": 512, "intermediate": 1024} if model_type == "qwen3" else {}
    model = make_tiny_llama(tmp_path / f"tiny-{model_type[:3]}", model_type=model_type, **size)
    overrides = tiny_overrides(model, tmp_path / "runs", "quant.iters=0", "export.formats=[gguf]")
    report = run_inprocess(overrides)
    loaded = loaded_perplexity(report["exports"]["gguf"], overrides, "gguf")
    ours = report["quality"]["ppl_quantized"]
    assert abs(loaded - ours) / ours < 0.005, (loaded, ours)


@pytest.mark.parametrize("scheme", [["scheme=w2a16"], ["scheme.sym=false"], ["scheme.group_size=16"]])
def test_gguf_refuses_schemes_it_cannot_carry_before_tuning(tiny_llama, tmp_path, scheme):
    with pytest.raises(UserError, match="no exact GGUF encoding.*model.layers.0.self_attn"):
        run_inprocess(tiny_overrides(tiny_llama, tmp_path, *scheme, "export.formats=[auto_round,gguf]"))
    assert not list(tmp_path.rglob("stages"))  # stopped before any stage ran


def test_gguf_refuses_a_model_it_cannot_describe(tmp_path):
    from tiny_models import make_tiny_llama

    model = make_tiny_llama(tmp_path / "llama",
                            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(UserError, match="rope scaling 'linear'"):
        run_inprocess(tiny_overrides(model, tmp_path / "runs", "quant.iters=0", "export.formats=[gguf]"))


def test_gguf_writes_llama3_rope_scaling_as_llama_cpps_rope_freqs(tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tiny_models import make_tiny_llama

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    model = make_tiny_llama(tmp_path / "llama", rope_parameters=rope)
    report = run_inprocess(tiny_overrides(model, tmp_path / "runs", "quant.iters=0", "export.formats=[gguf]"))
    factors = _gguf_dequantized(Path(report["exports"]["gguf"]) / "model.gguf")["rope_freqs.weight"]
    # llama.cpp divides each rotary frequency by its factor: the factors are transformers' unscaled over scaled ones
    config = AutoConfig.from_pretrained(model)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = config.hidden_size // config.num_attention_heads
    plain = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    torch.testing.assert_close(factors.reshape(-1), plain / scaled, rtol=1e-6, atol=0)
    assert factors.min() == 1.0 and factors.max() == 8.0  # short wavelengths kept, long ones divided by 8


@pytest.mark.parametrize("group", [32, 64, -1])
def test_asymmetric_4bit_auto_round_is_awq_as_auto_rounds_own_dequantizer_reads_it(group):
    pytest.importorskip("auto_round")
    from auto_round.export.export_to_awq.utils import dequantize_gemm

    from qrunner.export.auto_round import PACKING_AWQ, pack_layer

    qw = quantize(_weight(), QuantScheme(bits=4, group_size=group, sym=False))
    t = pack_layer(qw, packing=PACKING_AWQ)
    assert t["qweight"].shape == (256, 64 // 8) and t["qzeros"].shape == (qw.n_groups, 64 // 8)
    got = dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, 256 if group == -1 else group)
    assert torch.equal(got.float().t(), qw.dequantize(torch.float16).float())
    again = unpack_layer(t, 4, group, False, PACKING_AWQ, 256, 64)
    assert torch.equal(again.dequantize(), qw.dequantize())
