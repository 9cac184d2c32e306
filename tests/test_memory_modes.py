"""Memory modes: same results in every mode, one block in RAM at a time in medium/low, resumable across modes."""
import json
import signal
from pathlib import Path

import pytest
import torch

import qrunner.memory.streaming
import qrunner.session
from conftest import run_cli, run_inprocess, stage_status, tiny_overrides, tree_bytes
from qrunner.errors import UserError
from qrunner.memory.activations import ActivationFile, TensorRows
from qrunner.memory.streaming import CheckpointReader


def _run(model, root, *extra):
    return run_inprocess(tiny_overrides(model, root, "quant.iters=6", *extra))


@pytest.fixture(scope="module")
def runs_by_mode(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    return {mode: _run(tiny_llama, root / mode, f"memory={mode}") for mode in ("high", "medium", "low")}


def test_high_medium_low_give_byte_identical_exports(runs_by_mode):
    exports = {mode: tree_bytes(Path(r["export_dir"])) for mode, r in runs_by_mode.items()}
    assert exports["high"] == exports["medium"] == exports["low"]
    assert runs_by_mode["high"]["block_loss"] == runs_by_mode["low"]["block_loss"]
    assert [r["memory"]["mode"] for r in runs_by_mode.values()] == ["high", "medium", "low"]


def test_streamed_evaluation_matches_whole_model_evaluation(runs_by_mode):
    high = runs_by_mode["high"]["quality"]
    for mode in ("medium", "low"):
        q = runs_by_mode[mode]["quality"]
        for key in ("ppl_original", "ppl_quantized"):
            assert q[key] == pytest.approx(high[key], rel=1e-4), (mode, key)


def test_low_never_holds_more_than_one_block(tiny_llama, tmp_path, monkeypatch):
    """Every time qrunner reads tensors from the shards, count the block parameters that are not on meta."""
    seen = []
    original = qrunner.memory.streaming.materialize_tensors

    def counting(model, names, reader, dtype):
        original(model, names, reader, dtype)
        per_block = {}
        for name, p in model.named_parameters():
            if name.startswith("model.layers.") and p.device.type != "meta":
                block = int(name.split(".")[2])
                per_block[block] = per_block.get(block, 0) + p.numel()
        embeddings = model.model.embed_tokens.weight.device.type != "meta"
        head = model.lm_head.weight.device.type != "meta"
        seen.append((per_block, embeddings, head))

    monkeypatch.setattr(qrunner.memory.streaming, "materialize_tensors", counting)
    _run(tiny_llama, tmp_path, "memory=low")
    block_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        tiny_llama).model.layers[0].parameters())
    assert len(seen) >= 2 * 3 + 2  # quantize and evaluate stream each of the 3 blocks; capture, head
    for per_block, embeddings, head in seen:
        assert len(per_block) <= 1, per_block
        assert all(n == block_params for n in per_block.values())
        assert not (per_block and (embeddings or head))  # never a block together with embeddings or head
    assert sorted(b for per_block, _, _ in seen for b in per_block) == [0, 0, 1, 1, 2, 2]


def test_killed_in_high_resumes_in_low_with_identical_export(tiny_llama, tmp_path, runs_by_mode):
    args = tiny_overrides(tiny_llama, tmp_path, "quant.iters=6", "memory=high")
    killed = run_cli([*args, "run.on_oom=fail"], env={"QRUNNER_FAULT": "quantize.block_committed:0"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_cli([a if a != "memory=high" else "memory=low" for a in args])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at block 2/3" in resumed.stderr and "memory mode: low" in resumed.stderr
    (run_dir,) = [p for p in (tmp_path / "demo").iterdir() if p.is_dir()]
    assert tree_bytes(run_dir / "model") == tree_bytes(Path(runs_by_mode["high"]["export_dir"]))


def test_auto_picks_the_fastest_mode_that_fits(tiny_llama, tmp_path, monkeypatch):
    roomy = _run(tiny_llama, tmp_path, "memory=auto", "memory.budget_gb=64")
    predicted = roomy["memory"]["predicted_peak_mb"]
    assert predicted["high"] >= predicted["medium"] >= predicted["low"] > 400
    assert roomy["memory"]["mode"] == "high"

    import qrunner.memory.predict as predict

    monkeypatch.setattr(predict, "predict_peaks_mb", lambda cfg, session: {"high": 3000, "medium": 2000, "low": 1000})
    for budget, mode in ((2.5, "medium"), (1.5, "low")):
        chosen = _run(tiny_llama, tmp_path, "memory=auto", f"memory.budget_gb={budget}")
        assert chosen["memory"]["mode"] == mode
        assert set(stage_status(chosen).values()) == {"reused"}  # the memory mode is in no fingerprint
    with pytest.raises(UserError, match="no memory mode fits"):
        _run(tiny_llama, tmp_path, "memory=auto", "memory.budget_gb=0.5")


def test_activation_file_round_trip_and_damage_detection(tmp_path):
    rows = torch.randn(5, 3, 4).to(torch.bfloat16)
    file = TensorRows(rows).save(tmp_path / "acts")
    again = ActivationFile.open(tmp_path / "acts")
    assert torch.equal(again.read_all(), rows)
    assert torch.equal(again.read(torch.tensor([4, 0, 1, 2])), rows[[4, 0, 1, 2]])
    again.write(2, torch.zeros(1, 3, 4, dtype=torch.bfloat16))
    assert again.read([2]).abs().sum() == 0 and torch.equal(again.read([3]), rows[[3]])
    with pytest.raises(IndexError):
        again.read([5])
    with open(file.data_file(file.path), "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="damaged"):
        ActivationFile.open(tmp_path / "acts")


def test_corrupt_shard_is_named_in_the_error(tiny_llama, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="model.safetensors"):
        CheckpointReader(broken)
    (broken / "model.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(UserError, match="model.safetensors"):
        _run(broken, tmp_path / "runs", "memory=low")
    assert not list((tmp_path / "runs").rglob("manifest.json"))  # nothing was marked done


def test_tied_embeddings_stream_from_their_source(tmp_path):
    from tiny_models import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "tied", layers=2, tie=True)
    keys = json.loads((model_dir / "config.json").read_text())
    assert keys["tie_word_embeddings"] is True
    high = _run(model_dir, tmp_path / "high", "memory=high")
    low = _run(model_dir, tmp_path / "low", "memory=low")
    assert tree_bytes(Path(high["export_dir"])) == tree_bytes(Path(low["export_dir"]))
    assert low["quality"]["ppl_original"] == pytest.approx(high["quality"]["ppl_original"], rel=1e-4)


def test_embedding_tables_are_read_by_rows(tiny_llama, tmp_path, monkeypatch):
    """In the streaming modes an embedding lookup reads only the rows of the ids it is given; the table itself
    stays on the meta device, and the hidden states are those of the whole table."""
    import torch

    from qrunner.memory.streaming import CheckpointReader

    reader = CheckpointReader(tiny_llama)
    table = reader.read("model.embed_tokens.weight")
    rows = [0, 1, 2, 7, 8, 100, len(table) - 1]
    assert torch.equal(reader.read_rows("model.embed_tokens.weight", rows), table[rows])

    calls = []
    original = CheckpointReader.read_rows

    def counting(self, key, wanted):
        calls.append((key, len(wanted)))
        return original(self, key, wanted)

    monkeypatch.setattr(CheckpointReader, "read_rows", counting)
    low = _run(tiny_llama, tmp_path / "low", "memory=low")
    assert calls and all(key == "model.embed_tokens.weight" for key, _ in calls)
    assert max(n for _, n in calls) <= 64 < len(table)  # at most one window's distinct ids (seqlen 64)
    high = _run(tiny_llama, tmp_path / "high", "memory=high")
    assert tree_bytes(Path(high["export_dir"])) == tree_bytes(Path(low["export_dir"]))



_THP_PROBE = """
import re
from qrunner.memory.trim import prefer_huge_pages
on = prefer_huge_pages()
import torch
t = torch.ones(64 << 20, dtype=torch.uint8)
inside, huge = False, 0
for line in open("/proc/self/smaps"):
    m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
    if m:
        inside = int(m.group(1), 16) <= t.data_ptr() < int(m.group(2), 16)
    elif inside and line.startswith("AnonHugePages:"):
        huge = int(line.split()[1])
print(on, huge)
"""


@pytest.mark.skipif("[never]" in (Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
                                  if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists() else "[never]"),
                    reason="transparent huge pages are off on this machine")
@pytest.mark.parametrize("preset, huge", [(None, True), ("0", False)])
def test_large_tensors_sit_on_huge_pages_unless_the_user_says_no(preset, huge):
    """The entry point's prefer_huge_pages() (called before torch is imported) puts torch's large tensors on
    transparent huge pages (what keeps the AutoScheme replay's transient from wandering with heap fragmentation);
    a value the user set is kept."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    out = subprocess.run([sys.executable, "-c", _THP_PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout
    on, huge_kib = out.split()
    assert on == str(huge)
    assert (int(huge_kib) >= 2048) == huge, f"{huge_kib} KiB of the 64 MiB tensor on huge pages"


_KEEP_PROBE = """
import resource
import os
os.environ["THP_MEM_ALLOC_ENABLE"] = "0"  # glibc's own heap: huge-page-aligned blocks fault in 2 MB pages
from qrunner.memory.trim import keep_freed_memory
import torch
from qrunner.memory.monitor import current_rss_mb

def faults_per_turn():
    torch.empty(1 << 20).fill_(1.0)  # a warm-up turn
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):  # a loop's turn: the same sizes allocated, written and freed
        a = torch.empty(3 << 20).fill_(1.0)
        b = torch.empty(5 << 20).fill_(2.0)
        del a, b
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20

plain = faults_per_turn()
with keep_freed_memory() as kept:
    inside = faults_per_turn()
    held = current_rss_mb()
print(kept, plain, inside, held, current_rss_mb())
"""


def test_a_loop_inside_keep_freed_memory_reuses_its_pages_and_gives_them_back_after():
    """glibc trims the heap after the loop's big frees and the next turn faults 32 MB back in; inside
    keep_freed_memory the turn reuses them (6-10 % of a tuning iteration on the demo model), and they go back after."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _KEEP_PROBE], capture_output=True, text=True, check=True).stdout
    kept, plain, inside, held, after = out.split()
    if kept != "True":
        pytest.skip("not glibc: keep_freed_memory changes nothing")
    assert float(plain) > 1000  # 32 MB written a turn: thousands of 4 KiB pages faulted in again
    assert float(inside) < 0.05 * float(plain)
    assert float(after) < float(held) - 20  # the 32 MB the loop held are returned on exit


_RETURN_PROBE = """
import os
os.environ["THP_MEM_ALLOC_ENABLE"] = "0"  # glibc's own heap
import torch
from qrunner.memory.trim import return_freed_memory
from qrunner.memory.monitor import current_rss_mb

def left_after_free():
    torch.empty(5 << 20).fill_(1.0)  # 20 MB mapped and unmapped: glibc's dynamic mmap threshold rises to 20 MB
    before = current_rss_mb()
    t = torch.empty(4 << 20).fill_(1.0)  # 16 MB: from the heap now, unless mapped on its own
    del t
    return current_rss_mb() - before

plain = left_after_free()
with return_freed_memory() as active:
    inside = left_after_free()
print(active, plain, inside)
"""


def test_inside_return_freed_memory_a_freed_tensor_leaves_no_heap_behind():
    """memory=low's tuning loop: with glibc's dynamic threshold a freed 16 MB tensor stays in the heap (RSS); inside
    return_freed_memory it is unmapped at once."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RETURN_PROBE], capture_output=True, text=True, check=True).stdout
    active, plain, inside = out.split()
    if active != "True":
        pytest.skip("not glibc: return_freed_memory changes nothing")
    assert float(plain) > 12  # the 16 MB stayed resident
    assert float(inside) < 2
