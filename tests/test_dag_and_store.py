import json

import pytest

from qrunner.pipeline.dag import DagError, downstream_of, topological_order
from qrunner.pipeline.fingerprint import stage_fingerprint
from qrunner.pipeline.store import ArtifactStore
from qrunner.pipeline.units import UnitStore


def test_topological_order_respects_needs_and_declaration_order():
    needs = {"export": ["quantize"], "load": [], "data": ["load"], "quantize": ["load", "data"],
             "evaluate": ["quantize"]}
    order = topological_order(needs)
    assert order == ["load", "data", "quantize", "export", "evaluate"]
    assert downstream_of(needs, "data") == ["quantize", "export", "evaluate"]


def test_cycle_is_reported_with_its_path():
    with pytest.raises(DagError, match="cycle: a -> b -> a|cycle: b -> a -> b"):
        topological_order({"a": ["b"], "b": ["a"], "c": []})


def test_unknown_dependency_is_reported():
    with pytest.raises(DagError, match="'a' needs unknown stage 'zzz'"):
        topological_order({"a": ["zzz"]})


def test_fingerprint_changes_with_reads_upstream_and_version():
    base = stage_fingerprint("s", 1, {"k": 1}, {"up": "x"}, "model")
    assert base == stage_fingerprint("s", 1, {"k": 1}, {"up": "x"}, "model")
    assert base != stage_fingerprint("s", 2, {"k": 1}, {"up": "x"}, "model")
    assert base != stage_fingerprint("s", 1, {"k": 2}, {"up": "x"}, "model")
    assert base != stage_fingerprint("s", 1, {"k": 1}, {"up": "y"}, "model")
    assert base != stage_fingerprint("s", 1, {"k": 1}, {"up": "x"}, "other-model")


def test_stage_is_complete_only_after_commit(tmp_path):
    store = ArtifactStore(tmp_path)
    out = store.begin("quantize", "fp1")
    (out / "a.bin").write_bytes(b"123")
    assert not store.is_complete("quantize", "fp1")
    store.commit("quantize", {"fingerprint": "fp1", "metrics": {"x": 1}})
    assert store.is_complete("quantize", "fp1")
    assert not store.is_complete("quantize", "fp2")
    manifest = json.loads((tmp_path / "stages" / "quantize" / "manifest.json").read_text())
    assert manifest["files"]["a.bin"]["size"] == 3 and len(manifest["files"]["a.bin"]["sha256_ends"]) == 64
    assert not store.partial("quantize").exists()
    assert store.damaged("quantize") is None
    (tmp_path / "stages" / "quantize" / "a.bin").write_bytes(b"124")
    assert store.damaged("quantize").endswith("a.bin: content changed")
    (tmp_path / "stages" / "quantize" / "a.bin").write_bytes(b"12")
    assert store.damaged("quantize").endswith("a.bin: 2 bytes, expected 3")


def test_partial_work_survives_with_same_fingerprint_and_is_discarded_otherwise(tmp_path):
    store = ArtifactStore(tmp_path)
    units = UnitStore(store.begin("quantize", "fp1") / "units", "quantize")
    units.commit("block_0000", lambda d: (d / "t.bin").write_bytes(b"x") and None)
    assert UnitStore(store.begin("quantize", "fp1") / "units", "quantize").completed() == ["block_0000"]
    assert UnitStore(store.begin("quantize", "fp2") / "units", "quantize").completed() == []


def test_unit_without_manifest_is_not_done(tmp_path):
    units = UnitStore(tmp_path / "units", "quantize")
    (tmp_path / "units" / "block_0000").mkdir(parents=True)
    (tmp_path / "units" / "block_0000" / "quantized.safetensors").write_bytes(b"half")
    assert not units.done("block_0000")
    info = units.commit("block_0001", lambda d: {"loss": 0.5})
    assert units.done("block_0001") and info["loss"] == 0.5
