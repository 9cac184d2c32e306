"""Clear errors for a checkpoint the chosen family does not fit: wrong family, unsupported architecture, block
names that do not exist. Each names the problem and the fix, before anything is loaded or written."""
from __future__ import annotations

import json

import pytest

from conftest import run_inprocess, tiny_overrides
from qrunner.errors import UserError
from tiny_models import make_tiny_gemma4, make_tiny_vlm


@pytest.fixture(scope="module")
def tiny_gemma4(tmp_path_factory):
    return make_tiny_gemma4(tmp_path_factory.mktemp("g4") / "gemma4", "dense", multimodal=True)


@pytest.fixture(scope="module")
def tiny_qwen_vl(tmp_path_factory):
    return make_tiny_vlm(tmp_path_factory.mktemp("vlm") / "qwen2_5_vl", "qwen2_5_vl")


def test_family_that_does_not_match_the_checkpoint(tiny_llama, tiny_gemma4, tiny_qwen_vl, tmp_path):
    with pytest.raises(UserError, match=r"family=gemma4 does not support model_type='llama'.*use family=llm"):
        run_inprocess(tiny_overrides(tiny_llama, tmp_path, "family=gemma4"))
    with pytest.raises(UserError, match=r"family=llm does not support model_type='gemma4'.*use family=gemma4"):
        run_inprocess(tiny_overrides(tiny_gemma4, tmp_path))
    with pytest.raises(UserError, match=r"family=gemma4 does not support model_type='qwen2_5_vl'.*use family=vlm"):
        run_inprocess(tiny_overrides(tiny_qwen_vl, tmp_path, "family=gemma4"))
    assert not any(tmp_path.iterdir())  # refused before a run folder was made


def _with_config(tiny_llama, folder, **changes):
    """A copy of the tiny llama whose config.json has `changes`."""
    folder.mkdir()
    for f in tiny_llama.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unsupported_architecture(tiny_llama, tmp_path):
    # a model type the installed transformers does not know, and no code of its own
    unknown = _with_config(tiny_llama, tmp_path / "unknown", model_type="qrunner_test_arch")
    with pytest.raises(UserError, match=r"cannot read .*model_type='qrunner_test_arch'.*not supported yet"):
        run_inprocess(tiny_overrides(unknown, tmp_path / "runs"))
    # a model transformers knows, but not as a causal language model
    encoder_decoder = _with_config(tiny_llama, tmp_path / "t5", model_type="t5")
    with pytest.raises(UserError, match=r"family=llm does not support model_type='t5'.*no causal language model"):
        run_inprocess(tiny_overrides(encoder_decoder, tmp_path / "runs"))
    # a checkpoint that ships its own code runs it only when told to
    remote = _with_config(tiny_llama, tmp_path / "remote", model_type="qrunner_test_arch",
                          auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XLM"})
    with pytest.raises(UserError, match=r"needs the checkpoint's own Python code.*model.trust_remote_code=true"):
        run_inprocess(tiny_overrides(remote, tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_block_names_that_do_not_exist(tiny_gemma4, tmp_path):
    with pytest.raises(UserError, match=r"family.block_names: 'model.language_model.blocks' is not a module list"
                                        r".*model.language_model.layers"):
        run_inprocess(tiny_overrides(tiny_gemma4, tmp_path, "family=gemma4",
                                     "family.block_names=[model.language_model.blocks]"))
    # the vision tower's layers exist, but a vision block cannot be run on text hidden states
    with pytest.raises(UserError, match=r"model.vision_tower.encoder.layers.*lies in model.vision_tower.*not a decoder block list"):
        run_inprocess(tiny_overrides(tiny_gemma4, tmp_path, "family=gemma4",
                                     "family.block_names=[model.vision_tower.encoder.layers]"))


def test_llm_without_a_block_list_names_the_module_lists_it_found():
    """family=llm finds the blocks without a model list: the usual paths, else the one module list as long as the
    config's num_hidden_layers; with neither, the error lists the module lists there are."""
    from types import SimpleNamespace

    from torch import nn

    from qrunner.models.registry import get_family

    class Odd(nn.Module):
        def __init__(self, lists):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=3)
            for name, n in lists.items():
                setattr(self, name, nn.ModuleList(nn.Linear(2, 2) for _ in range(n)))

    adapter = get_family("llm")
    assert adapter.block_lists(Odd({"heads": 2, "stack": 3}), []) == ["stack"]
    with pytest.raises(UserError, match=r"no single module list has num_hidden_layers=3 entries \(module lists: "
                                        r"heads \(2\), stack \(4\)\).*family.block_names"):
        adapter.block_lists(Odd({"heads": 2, "stack": 4}), [])
