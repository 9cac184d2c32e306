"""Run directory = resume: killed runs continue where they stopped, and give byte-identical exports."""
import json
import signal
from pathlib import Path

import pytest

from conftest import run_cli, run_inprocess, stage_status, tiny_overrides, tree_bytes
from qrunner.errors import UserError


def _run_dir(root: Path) -> Path:
    (run_dir,) = [p for p in (root / "demo").iterdir() if p.is_dir()]
    return run_dir


def test_sigkill_after_block_k_resumes_at_k_plus_1_with_byte_identical_export(tiny_llama, tmp_path):
    clean = run_cli(tiny_overrides(tiny_llama, tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr

    args = tiny_overrides(tiny_llama, tmp_path / "killed")
    killed = run_cli([*args, "run.on_oom=fail"], env={"QRUNNER_FAULT": "quantize.block_committed:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = _run_dir(tmp_path / "killed")
    units = run_dir / "stages" / "quantize.partial" / "units"
    assert sorted(p.name for p in units.iterdir()) == ["block_0000", "block_0001"]
    assert not (run_dir / "stages" / "quantize").exists()  # the stage is not marked done
    before = {b: (units / b / "quantized.safetensors").stat() for b in ("block_0000", "block_0001")}

    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at block 3/3 (2 block(s) already committed)" in resumed.stderr
    for stage in ("load", "data", "capture"):
        assert f"stage {stage:<9} reused" in resumed.stderr
    log = resumed.stderr
    assert "block 1/3" not in log and "block 2/3" not in log and "block 3/3 model.layers.2 committed" in log
    final_units = run_dir / "stages" / "quantize" / "units"
    for block, stat in before.items():  # blocks < k were not recomputed: same files, untouched
        after = (final_units / block / "quantized.safetensors").stat()
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)

    assert tree_bytes(run_dir / "model") == tree_bytes(_run_dir(tmp_path / "clean") / "model")
    manifest = json.loads((run_dir / "stages" / "quantize" / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_at_block"] == 2


def test_evaluation_change_reruns_only_evaluate_and_memory_change_reruns_nothing(tiny_llama, tmp_path):
    first = run_inprocess(tiny_overrides(tiny_llama, tmp_path, "memory=auto"))
    assert set(stage_status(first).values()) == {"ran"}
    export_before = tree_bytes(Path(first["export_dir"]))

    evaluated = run_inprocess(tiny_overrides(tiny_llama, tmp_path, "eval.nsamples=2"))
    assert evaluated["run_dir"] == first["run_dir"]
    assert stage_status(evaluated) == {"load": "reused", "data": "reused", "capture": "reused",
                                       "quantize": "reused", "export": "reused", "evaluate": "ran"}
    assert evaluated["quality"]["ppl_quantized"] != first["quality"]["ppl_quantized"]

    high = run_inprocess(tiny_overrides(tiny_llama, tmp_path, "eval.nsamples=2", "memory=high"))
    assert high["run_dir"] == first["run_dir"]
    assert set(stage_status(high).values()) == {"reused"}
    assert tree_bytes(Path(high["export_dir"])) == export_before

    fresh = run_inprocess(tiny_overrides(tiny_llama, tmp_path, "eval.nsamples=2", "run.fresh=true"))
    assert set(stage_status(fresh).values()) == {"ran"}
    assert tree_bytes(Path(fresh["export_dir"])) == export_before


def test_scheme_change_gets_its_own_run_directory(tiny_llama, tmp_path):
    w4 = run_inprocess(tiny_overrides(tiny_llama, tmp_path))
    w8 = run_inprocess(tiny_overrides(tiny_llama, tmp_path, "scheme=w8a16"))
    assert w4["run_dir"] != w8["run_dir"]
    assert w8["quality"]["ppl_quantized"] != w4["quality"]["ppl_quantized"]
    # another tuning setting: its own run directory, but what it does not change is taken from the W4 run beside
    # it (same fingerprints) instead of recomputed
    rtn = run_inprocess(tiny_overrides(tiny_llama, tmp_path, "quant.iters=0"))
    assert rtn["run_dir"] not in (w4["run_dir"], w8["run_dir"])
    assert stage_status(rtn) == {"load": "reused", "data": "reused", "capture": "reused", "quantize": "ran",
                                 "export": "ran", "evaluate": "ran"}
    captured = Path(w4["run_dir"]) / "stages" / "capture"
    assert tree_bytes(Path(rtn["run_dir"]) / "stages" / "capture") == tree_bytes(captured)


def test_deleted_export_is_rewritten(tiny_llama, tmp_path):
    import shutil

    first = run_inprocess(tiny_overrides(tiny_llama, tmp_path))
    expected = tree_bytes(Path(first["export_dir"]))
    shutil.rmtree(first["export_dir"])
    again = run_inprocess(tiny_overrides(tiny_llama, tmp_path))
    assert stage_status(again)["export"] == "ran" and stage_status(again)["quantize"] == "reused"
    assert tree_bytes(Path(again["export_dir"])) == expected


def test_failing_stage_leaves_nothing_marked_done(tiny_llama, tmp_path):
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"content": "no text field here"}\n')
    with pytest.raises(UserError, match="has no field 'text'"):
        run_inprocess(tiny_overrides(tiny_llama, tmp_path / "out", f"data.source={bad}"))
    (run_dir,) = [p for p in (tmp_path / "out" / "demo").iterdir()]
    stages = run_dir / "stages"
    assert (stages / "load" / "manifest.json").is_file()
    assert not (stages / "data").exists()
    assert not any((stages / name).exists() for name in ("capture", "quantize", "export", "evaluate"))


def test_explicit_output_dir_is_used_exactly_and_foreign_folders_are_refused(tiny_llama, tmp_path):
    out = tmp_path / "my-quantized-model"
    report = run_inprocess(tiny_overrides(tiny_llama, tmp_path / "runs", f"export.output_dir={out}"))
    assert Path(report["export_dir"]) == out
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="not a checkpoint qrunner wrote"):
        run_inprocess(tiny_overrides(tiny_llama, tmp_path / "runs", f"export.output_dir={foreign}"))
    assert (foreign / "keep.txt").read_text() == "user data"


def test_two_runs_of_the_same_config_give_byte_identical_exports(tiny_llama, tmp_path):
    a = run_inprocess(tiny_overrides(tiny_llama, tmp_path / "a", "quant.iters=30", "quant.rtn_loss=true"))
    b = run_inprocess(tiny_overrides(tiny_llama, tmp_path / "b", "quant.iters=30", "quant.rtn_loss=true"))
    assert tree_bytes(Path(a["export_dir"])) == tree_bytes(Path(b["export_dir"]))
    assert a["block_loss"] == b["block_loss"]
    assert len(a["block_loss_rtn"]) == len(a["block_loss"]) > 0
    assert all(after <= before for before, after in zip(a["block_loss_rtn"], a["block_loss"]))


def test_opt_rtn_variant_runs_and_differs_from_plain_rtn(tiny_llama, tmp_path):
    plain = run_inprocess(tiny_overrides(tiny_llama, tmp_path, "quant.iters=0"))
    opt = run_inprocess(tiny_overrides(tiny_llama, tmp_path, "quant.iters=0", "quant.opt_rtn=true",
                                       "quant.rtn_loss=true"))
    assert plain["run_dir"] != opt["run_dir"]
    # the RTN reference of opt_rtn is plain RTN; on block 0 both chains have the same inputs
    assert opt["block_loss_rtn"][0] == plain["block_loss"][0]
    assert sum(opt["block_loss"]) < sum(plain["block_loss"])
    assert tree_bytes(Path(opt["export_dir"])) != tree_bytes(Path(plain["export_dir"]))
