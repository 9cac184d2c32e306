"""Hydra composition, recipes, and the errors users get for bad input."""
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from conftest import compose, run_cli, tiny_overrides
from qrunner.config.provenance import Provenance
from qrunner.config.validate import validate
from qrunner.errors import UserError


def _validate(overrides):
    cfg, choices = compose(overrides)
    validate(cfg, Provenance(choices, overrides, [Path(__file__).resolve().parents[1] / "recipes"]))
    return cfg


def test_default_recipe_is_demo_with_bundled_model():
    cfg, choices = compose([])
    assert choices["recipe"] == "demo"
    assert Path(cfg.model.path).name == "demo-llama"
    assert cfg.scheme.bits == 4 and cfg.data.seqlen == 256


def test_recipe_overrides_groups_and_command_line_wins_over_recipe():
    cfg, choices = compose(["recipe=llama_w4a16", "model.path=/m"])
    assert choices["scheme"] == "w4a16" and cfg.data.seqlen == 2048
    cfg, choices = compose(["recipe=llama_w4a16", "scheme=w8a16", "data.seqlen=512", "model.path=/m"])
    assert choices["scheme"] == "w8a16" and cfg.scheme.bits == 8 and cfg.data.seqlen == 512


def test_user_recipe_in_working_directory(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text("defaults:\n  - override /scheme: w2a16\nquant:\n  seed: 7\n")
    monkeypatch.chdir(tmp_path)
    cfg, choices = compose(["recipe=mine", "model.path=/m"])
    assert choices["recipe"] == "mine" and cfg.scheme.bits == 2 and cfg.quant.seed == 7


def test_unknown_key_in_recipe_names_the_recipe_file(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "typo.yaml").write_text("quant:\n  itres: 10\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigCompositionException, match="recipe/typo") as err:
        compose(["recipe=typo"])
    assert "Key 'itres' not in 'QuantConfig'" in str(err.value)


def test_unknown_key_on_command_line():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["quant.bogus=1"])
    assert "quant.bogus" in str(err.value)
    assert "Key 'bogus' not in 'QuantConfig'" in str(err.value.__cause__)


@pytest.mark.parametrize("override,key,allowed", [
    ("scheme.bits=5", "scheme.bits", "2, 3, 4, 8"),
    ("scheme.group_size=0", "scheme.group_size", "-1"),
    ("quant.iters=-3", "quant.iters", "0 (round-to-nearest)"),
    ("data.nsamples=0", "data.nsamples", "positive integer"),
    ("memory.budget_gb=-1", "memory.budget_gb", "positive number of GB"),
    ("export.max_shard_size=lots", "export.max_shard_size", "5GB"),
    ("family.loss_streams=image", "family.loss_streams", "family=diffusion setting"),
])
def test_bad_values_name_key_value_allowed_and_source(override, key, allowed):
    with pytest.raises(UserError) as err:
        _validate([override])
    text = str(err.value)
    assert f"{key}=" in text and allowed in text and "command line" in text


def test_value_from_a_recipe_names_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "bad.yaml").write_text("model:\n  path: /m\nscheme:\n  bits: 6\n")
    monkeypatch.chdir(tmp_path)
    cfg, choices = compose(["recipe=bad"])
    with pytest.raises(UserError, match=r"scheme.bits=6 .*recipe 'bad'"):
        validate(cfg, Provenance(choices, ["recipe=bad"], [tmp_path / "recipes"]))


def test_missing_model_path_and_folders_without_config_or_weights(tmp_path):
    with pytest.raises(UserError, match="model.path is required"):
        _validate(["recipe=qwen3_w4a16"])
    with pytest.raises(UserError, match="does not exist"):
        _validate([f"model.path={tmp_path / 'nope'}"])
    with pytest.raises(UserError, match="no config.json"):
        _validate([f"model.path={tmp_path}"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no \\*.safetensors"):
        _validate([f"model.path={tmp_path}"])


def test_group_size_not_dividing_a_layer_plans_a_shorter_last_group(tiny_llama, tmp_path):
    """Once a UserError before any run directory; now such layers are quantized with a shorter last group
    (64 = 48 + 16, 128 = 2 x 48 + 32) and only shapes no loader takes stay in full precision."""
    import logging

    from qrunner.models.registry import get_family
    from qrunner.session import ModelSession

    cfg = _validate(tiny_overrides(tiny_llama, tmp_path, "scheme.group_size=48",
                                   "+quant.layer_overrides={down_proj:{group_size:256}}"))
    session = ModelSession(cfg, get_family(cfg.family.name), logging.getLogger("test"))
    session.preflight()
    plan = session.layer_plan
    assert len(plan) == 3 * 7 and all(p.quantize for p in plan)
    assert {(p.in_features, p.group_size) for p in plan} == {(64, 48), (128, 256)}


def test_unsupported_architecture_points_to_the_right_family(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    from qrunner.models.registry import get_family

    with pytest.raises(UserError, match="model_type='qwen2_vl'.*family=vlm"):
        get_family("llm").check_config(type("C", (), {"model_type": "qwen2_vl"})(), str(tmp_path))


def test_cli_prints_one_line_and_no_traceback(tmp_path):
    res = run_cli(["scheme.bits=5", f"run.root={tmp_path}"])
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "scheme.bits=5" in res.stderr and "allowed: 2, 3, 4, 8" in res.stderr
    res = run_cli(["recipe=does_not_exist"])
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "does_not_exist" in res.stderr and "demo" in res.stderr  # lists the available recipes


