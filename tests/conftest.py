from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import make_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tuning tests on tiny tensors: the 2 test cores are shared with other jobs, and with intra-op threads tiny
    ops wait on busy cores (measured 1000x slower per op). One thread keeps a module fast."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def compose(overrides: Sequence[str]) -> Tuple[object, Dict[str, str]]:
    """The config `qrunner OVERRIDES...` would run with, composed in-process."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from qrunner._paths import conf_dir
    from qrunner.cli import _register

    _register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def run_inprocess(overrides: Sequence[str]) -> dict:
    """Run the pipeline in this process (as `qrunner OVERRIDES...` would) and return its report."""
    from qrunner.cli import execute

    overrides = list(overrides) + ["run.show_progress=false"]
    cfg, choices = compose(overrides)
    return execute(cfg, choices.get("recipe") or "custom", choices, overrides)


def run_cli(args: List[str], env: Dict[str, str] | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "qrunner", *args, "run.show_progress=false"], cwd=cwd or REPO,
                          env=full_env, capture_output=True, text=True, timeout=600)


def tiny_overrides(model: Path, root: Path, *extra: str) -> List[str]:
    return [f"model.path={model}", f"run.root={root}", "scheme.group_size=32", "data.nsamples=8",
            "data.seqlen=64", "eval.nsamples=4", "eval.seqlen=64", *extra]


def stage_status(report: dict) -> Dict[str, str]:
    return {s["name"]: s["status"] for s in report["stages"]}


def tree_bytes(folder: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_tensors(folder: Path) -> Dict[str, "torch.Tensor"]:
    """Every tensor of the safetensors shards in `folder`, by stored name."""
    from safetensors import safe_open

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def exports_by_mode(model: Path, root: Path, modes: Sequence[str], monkeypatch, *extra: str
                    ) -> Tuple[Dict[str, Dict[str, bytes]], List[str]]:
    """Run `model` once per memory mode; returns each export's files (name -> bytes) and the names of every
    tensor the runs read from the shards."""
    import qrunner.memory.streaming

    read: List[str] = []
    original = qrunner.memory.streaming.materialize_tensors

    def recording(model, names, reader, dtype):
        read.extend(names)
        original(model, names, reader, dtype)

    monkeypatch.setattr(qrunner.memory.streaming, "materialize_tensors", recording)
    exports = {}
    for mode in modes:
        report = run_inprocess(tiny_overrides(model, root / mode, f"memory={mode}", *extra))
        exports[mode] = tree_bytes(Path(report["export_dir"]))
    return exports, read
