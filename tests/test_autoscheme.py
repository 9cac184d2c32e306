"""scheme=auto: block-streamed scores equal a whole-model backward, the plan respects the budget and the shared
groups, the export loads and matches, a killed scoring resumes to the same bytes, budgets share the scores."""
import json
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import compose, run_cli, run_inprocess, stage_status, tiny_overrides, tree_bytes
from qrunner.errors import UserError
from qrunner.quant.rtn import quantize_rtn
from qrunner.quant.scheme import parse_scheme_name

OPTIONS = "scheme.auto.options=[w2a16g32,w4a16g32,bf16]"


def auto_overrides(model, root, *extra, nsamples=4):
    return tiny_overrides(model, root, "scheme=auto", OPTIONS, "scheme.auto.avg_bits=3", "scheme.auto.seqlen=64",
                          f"scheme.auto.nsamples={nsamples}", "quant.iters=0", *extra)


def stage_dir(report, name) -> Path:
    return Path(report["run_dir"]) / "stages" / name


def whole_model_scores(model_dir: Path, overrides, options):
    """Reference: the whole model in RAM, every block linear replaced by its RTN value as a leaf tensor, one
    autograd backward of the mean next-token loss per scoring batch; |grad ⊙ (W − Ŵ)| summed over batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qrunner.stages.autoscheme_scores import scoring_windows

    cfg, _ = compose(overrides)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    windows = scoring_windows(cfg, AutoTokenizer.from_pretrained(model_dir))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    originals = {n: m.weight.data.clone() for n, m in layers.items()}
    out = {}
    for option in options:
        scheme = parse_scheme_name(option)
        if scheme is None:
            continue
        for n, m in layers.items():
            m.weight.data = quantize_rtn(originals[n].float(), scheme).dequantize(torch.float32)
            m.weight.requires_grad_(True)
        scores, total = dict.fromkeys(layers, 0.0), 0.0
        for start in range(0, len(windows), int(cfg.scheme.auto.batch_size)):
            batch = windows[start:start + int(cfg.scheme.auto.batch_size)]
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            grads = torch.autograd.grad(loss, [m.weight for m in layers.values()])
            for (n, m), g in zip(layers.items(), grads):
                scores[n] += float((g.double() * (originals[n].double() - m.weight.detach().double())).abs().sum())
            total += float(loss.detach()) * len(batch)
        out[option] = (total / len(windows), scores)
        for n, m in layers.items():
            m.weight.requires_grad_(False)
            m.weight.data = originals[n]
    return out


@pytest.mark.parametrize("mode, batch", [pytest.param("high", 12, marks=pytest.mark.slow), ("low", 8)],
                         ids=["high-one-batch", "low-batches-8-4"])
def test_block_streamed_scores_equal_a_whole_model_backward(tiny_llama, tmp_path, mode, batch):
    overrides = auto_overrides(tiny_llama, tmp_path, f"memory={mode}", "eval.enabled=false",
                               f"scheme.auto.batch_size={batch}", nsamples=12)
    report = run_inprocess(overrides)
    scores = json.loads((stage_dir(report, "autoscheme_scores") / "scores.json").read_text())
    reference = whole_model_scores(tiny_llama, overrides, scores["options"])
    assert set(reference) == {"w2a16g32", "w4a16g32"}
    for option, (loss, expected) in reference.items():
        assert scores["loss"][option] == pytest.approx(loss, rel=1e-5)
        assert set(scores["scores"][option]) == set(expected)
        for layer, value in expected.items():
            assert scores["scores"][option][layer] == pytest.approx(value, rel=1e-5), (option, layer)
        # quantizing harder moves the weights further: the W2 scores are the larger ones
    assert sum(scores["scores"]["w2a16g32"].values()) > 3 * sum(scores["scores"]["w4a16g32"].values())
    assert set(scores["scores"]["bf16"].values()) == {0.0} and scores["loss"]["bf16"] is None


def test_side_values_carry_gradients_back_gemma4_kv_sharing(tmp_path):
    """Gemma 4's shared keys/values: blocks that reuse them send their gradient back to the block that wrote
    them (streamed in low == whole-model backward)."""
    from tiny_models import make_tiny_gemma4

    model_dir = make_tiny_gemma4(tmp_path / "model", "ple_kv", layers=4)
    overrides = auto_overrides(model_dir, tmp_path, "family=gemma4", "memory=low", "eval.enabled=false",
                               "scheme.auto.options=[w2a16g32,bf16]", "scheme.auto.avg_bits=8", nsamples=12)
    report = run_inprocess(overrides)
    scores = json.loads((stage_dir(report, "autoscheme_scores") / "scores.json").read_text())
    loss, expected = whole_model_scores(model_dir, overrides, ["w2a16g32"])["w2a16g32"]
    assert scores["loss"]["w2a16g32"] == pytest.approx(loss, rel=1e-5)
    writer = [n for n in expected if n.startswith("model.layers.1.self_attn.k_proj")]
    assert writer and expected[writer[0]] > 0
    for layer, value in expected.items():
        assert scores["scores"]["w2a16g32"][layer] == pytest.approx(value, rel=1e-5, abs=1e-9), layer


def test_plan_within_budget_shared_groups_and_export_loads(tiny_llama, tmp_path):
    pytest.importorskip("auto_round")
    from test_export_loads_in_transformers import loaded_perplexity

    overrides = auto_overrides(tiny_llama, tmp_path, "memory=low", "scheme.auto.avg_bits=3.5",
                               "scheme.auto.shared_layers=['self_attn.[qkv]_proj','mlp.(gate|up)_proj']")
    report = run_inprocess(overrides)
    auto = report["autoscheme"]
    assert auto["avg_bits"] <= 3.5 and auto["avg_bits"] > 3.0
    chosen = auto["option_of_layer"]
    assert len(chosen) == 21 and set(chosen.values()) <= {"w2a16g32", "w4a16g32", "bf16"}
    for i in range(3):
        assert len({chosen[f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"}) == 1
        assert chosen[f"model.layers.{i}.mlp.gate_proj"] == chosen[f"model.layers.{i}.mlp.up_proj"]
    # the quantized weights follow the plan
    plan = {p["name"]: p for p in json.loads((stage_dir(report, "autoscheme") / "plan.json").read_text())["layers"]}
    from qrunner.stages.quantize import quantized_layers

    layers = quantized_layers(stage_dir(report, "quantize"))
    for name, option in chosen.items():
        if option == "bf16":
            assert name not in layers and not plan[name]["quantize"]
        else:
            scheme = parse_scheme_name(option)
            assert (layers[name].bits, layers[name].group_size) == (scheme.bits, scheme.group_size)
    # the export says so per layer and loads with auto-round's kernels to the same perplexity
    extra = json.loads((Path(report["export_dir"]) / "config.json").read_text())["quantization_config"]["extra_config"]
    for name, option in chosen.items():
        expected = {"bits": 16} if option == "bf16" else ({"bits": 2} if option == "w2a16g32" else None)
        assert extra.get(name) == expected, name
    loaded = loaded_perplexity(report["export_dir"], overrides)
    ours = report["quality"]["ppl_quantized"]
    assert abs(loaded - ours) / ours < 0.005, (loaded, ours)


def test_new_budget_resolves_from_committed_scores_and_a_list_shares_them(tiny_llama, tmp_path):
    first = run_inprocess(auto_overrides(tiny_llama, tmp_path, "eval.enabled=false", "scheme.auto.avg_bits=2.75"))
    assert first["autoscheme"]["avg_bits"] <= 2.75
    # a list: one job per budget, each its own run directory and export; the 2.75 job is the run above (all
    # reused); the 4-bit job takes the scores committed beside it (same fingerprint) instead of rescoring
    report = run_inprocess(auto_overrides(tiny_llama, tmp_path, "eval.enabled=false", "scheme.auto.avg_bits=[2.75,4]"))
    budgets = report["budgets"]
    assert [b["avg_bits_target"] for b in budgets] == [2.75, 4.0]
    assert budgets[0]["run_dir"] == first["run_dir"] and budgets[0]["avg_bits"] == first["autoscheme"]["avg_bits"]
    assert 2.75 < budgets[1]["avg_bits"] <= 4
    assert len({b["export_dir"] for b in budgets}) == 2
    assert stage_status(report) == {"load": "reused", "data": "reused", "capture": "reused",
                                    "autoscheme_scores": "reused", "autoscheme": "ran", "quantize": "ran",
                                    "export": "ran", "evaluate": "ran"}
    scores = [(Path(b["run_dir"]) / "stages" / "autoscheme_scores" / "scores.json").read_bytes() for b in budgets]
    assert scores[0] == scores[1]
    assert "| 4 | " in (Path(report["run_dir"]) / "report.md").read_text()  # the budgets table


def test_sigkill_during_scoring_resumes_to_the_same_plan_and_bytes(tiny_llama, tmp_path):
    clean = run_inprocess(auto_overrides(tiny_llama, tmp_path / "clean", "memory=low", "eval.enabled=false"))
    args = auto_overrides(tiny_llama, tmp_path / "killed", "memory=low", "eval.enabled=false", "run.on_oom=fail")
    killed = run_cli(args, env={"QRUNNER_FAULT": "autoscheme.block_committed:4"})  # second option, mid-replay
    assert killed.returncode == -signal.SIGKILL
    res = run_cli(args)
    assert res.returncode == 0, res.stderr
    assert "autoscheme_scores running: resuming from its checkpoints" in res.stderr
    (run_dir,) = [p for p in (tmp_path / "killed" / "demo").iterdir() if p.is_dir()]
    plan = json.loads((run_dir / "stages" / "autoscheme" / "plan.json").read_text())
    clean_plan = json.loads((stage_dir(clean, "autoscheme") / "plan.json").read_text())
    assert plan == clean_plan
    assert tree_bytes(run_dir / "model") == tree_bytes(Path(clean["export_dir"]))


@pytest.mark.parametrize("extra, message", [
    (["scheme.auto.options=[w2a16g64,int4]"], "scheme.auto.options.1='int4' is not allowed"),
    (["scheme.auto.options=[w4a16]"], "at least two distinct scheme names"),
    (["scheme.auto.avg_bits=1.5"], "scheme.auto.avg_bits=1.5 is outside what the options"),
    (["scheme.auto.avg_bits=20"], "to 16.0000 (all most expensive)"),
    (["scheme.auto.shared_layers=[attn.qkv_proj]"], "matches no quantized layer inside a block"),
    (["+quant.layer_overrides={down_proj:{bits:8}}"], "only {bits: 16} with scheme=auto"),
])
def test_bad_autoscheme_settings_stop_before_anything_runs(tiny_llama, tmp_path, extra, message):
    with pytest.raises(UserError, match=None) as err:
        run_inprocess(auto_overrides(tiny_llama, tmp_path, *extra))
    assert message in str(err.value)
    assert not list(tmp_path.rglob("stages")) and not (tmp_path / "demo").exists()


def test_memory_auto_counts_the_scoring_inputs_kept_in_ram(tiny_llama, tmp_path):
    """high/medium keep every block's input of the option being scored: memory=auto's prediction says so."""
    import logging

    from qrunner.memory.predict import predict_peaks_mb
    from qrunner.models.registry import get_family
    from qrunner.session import ModelSession

    def peaks(*extra):
        cfg, _ = compose(tiny_overrides(tiny_llama, tmp_path, *extra))
        return predict_peaks_mb(cfg, ModelSession(cfg, get_family("llm"), logging.getLogger("test")))

    uniform = peaks()
    auto = peaks("scheme=auto", "scheme.auto.nsamples=512", "scheme.auto.seqlen=1024")
    kept_mb = 3 * 512 * 1024 * 64 * 4 / 2**20  # blocks x samples x seqlen x hidden x fp32
    assert auto["medium"] - uniform["medium"] >= kept_mb
    assert auto["low"] - uniform["low"] < kept_mb / 10
