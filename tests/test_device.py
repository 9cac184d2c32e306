"""device=: where the block forwards of quantize run. On this CPU machine: the device is resolved (and a device the
machine lacks refused before anything is written), every block records where it ran, and the out-of-memory
ladder's last rung (a block that does not fit the GPU runs on the CPU) is exercised with a device that runs out
of memory on entry. The runs on a real GPU are the `cuda` tests, skipped here."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import run_cli, run_inprocess, tiny_overrides, tree_bytes
from qrunner.errors import UserError
from qrunner.memory.device import DeviceRows, resolve_device, to_device, to_host

def cuda(test):
    """A test that runs on a CUDA device (`pytest -m cuda` selects them; skipped without one)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def units(report: dict) -> list:
    folder = Path(report["run_dir"]) / "stages" / "quantize" / "units"
    return [json.loads((u / "unit.json").read_text()) for u in sorted(folder.iterdir())]


def test_devices_resolve_and_a_missing_one_is_refused_naming_the_fix(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA device .* use device=cpu or device=auto"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="device=mps: qrunner runs blocks on cpu or cuda devices"):
        resolve_device("mps")
    with pytest.raises(UserError, match="device=gpu0: not a device; use device=auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("CUDA:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_rows_travel_a_batch_at_a_time_and_nested_inputs_move_whole():
    rows = DeviceRows(type("Rows", (), {"__len__": lambda s: 3, "read": lambda s, i: {"h": torch.ones(len(i), 2),
                                                                                       "pos": (torch.arange(2),)}})(),
                      torch.device("cpu"))
    batch = rows.read([0, 2])
    assert len(rows) == 3 and batch["h"].shape == (2, 2) and isinstance(batch["pos"], tuple)
    x = torch.ones(2)
    assert to_device(x, torch.device("cpu")) is x and to_host({"a": [x, 3]})["a"][1] == 3


def test_a_device_the_machine_lacks_is_refused_before_anything_is_written(tiny_llama, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    res = run_cli(tiny_overrides(tiny_llama, tmp_path, "device=cuda"))
    assert res.returncode == 2
    assert "device=cuda: this machine has no CUDA device" in res.stderr and "Traceback" not in res.stderr
    assert not any(tmp_path.glob("*/*/stages"))


def test_every_block_records_where_it_ran(tiny_llama, tmp_path):
    report = run_inprocess(tiny_overrides(tiny_llama, tmp_path, "device=cpu", "quant.iters=2"))
    assert report["device"] == "cpu" and report["peak_vram_mb"] is None
    assert all(u["device"] == "cpu" and "vram" not in u and "device_fallbacks" not in u for u in units(report))
    assert all(s["peak_vram_mb"] is None for s in report["stages"])


def test_a_block_that_does_not_fit_the_gpu_runs_on_the_cpu_and_gives_the_same_checkpoint(tiny_llama, tmp_path,
                                                                                        monkeypatch):
    """The ladder's last rung: a device where every block runs out of memory (after the tuner's micro-batch
    halving, which has its own test); each block is redone on the host, and the checkpoint is the CPU run's."""
    import qrunner.memory.device as device_module
    import qrunner.pipeline.runner as runner_module
    import qrunner.stages.evaluate as evaluate_module
    import qrunner.stages.quantize as quantize_module

    baseline = run_inprocess(tiny_overrides(tiny_llama, tmp_path / "cpu", "device=cpu", "quant.iters=2"))
    gpu = torch.device("cuda", 0)
    entered = []

    @contextmanager
    def full_gpu(module, device):
        if device.type == "cuda":
            entered.append(device)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        yield module

    monkeypatch.setattr(device_module, "resolve_device", lambda spec: gpu if spec == "cuda" else torch.device("cpu"))
    monkeypatch.setattr(quantize_module, "placed", full_gpu)
    monkeypatch.setattr(evaluate_module, "placed", full_gpu)  # the model does not fit either: evaluated on the CPU
    monkeypatch.setattr(device_module, "device_total_mb", lambda device: 80_000.0)
    monkeypatch.setattr(device_module, "vram_probe", lambda device: None)
    for module, names in ((quantize_module, ("begin_block_peak", "block_peak_vram_mb")),
                          (runner_module, ("begin_peak", "peak_vram_mb"))):  # no CUDA runtime to ask here
        for name in names:
            monkeypatch.setattr(module, name, lambda device: None)
    monkeypatch.setattr(quantize_module, "release_device", lambda device: None)
    report = run_inprocess(tiny_overrides(tiny_llama, tmp_path / "gpu", "device=cuda", "quant.iters=2"))
    blocks = units(report)
    assert report["device"] == "cuda:0" and len(entered) == len(blocks) + 2 >= 4  # each block, both evaluations
    assert report["memory"]["device_total_mb"] == 80_000 and 0 < report["memory"]["predicted_device_peak_mb"]
    assert report["quality"] == baseline["quality"]
    for u in blocks:
        assert u["device"] == "cpu"
        assert u["device_fallbacks"] == [{"device": "cuda:0",
                                          "error": "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"}]
    assert tree_bytes(Path(report["exports"]["auto_round"])) == tree_bytes(Path(baseline["exports"]["auto_round"]))


@cuda
@pytest.mark.parametrize("memory", ["high", "low"])
def test_tuning_on_the_gpu_matches_the_cpu_export_in_perplexity(tiny_llama, tmp_path, memory):
    on_cpu = run_inprocess(tiny_overrides(tiny_llama, tmp_path / "cpu", "device=cpu", f"memory={memory}"))
    on_gpu = run_inprocess(tiny_overrides(tiny_llama, tmp_path / "gpu", "device=cuda", f"memory={memory}"))
    assert on_gpu["device"] == "cuda:0" and on_gpu["peak_vram_mb"]["allocated_mb"] > 0
    assert all(u["device"] == "cuda:0" and u["vram"]["allocated_mb"] > 0 for u in units(on_gpu))
    quantize = next(s for s in on_gpu["stages"] if s["name"] == "quantize")  # the stage's peak is its blocks' max
    assert quantize["peak_vram_mb"]["allocated_mb"] >= max(u["vram"]["allocated_mb"] for u in units(on_gpu))
    ppl_cpu, ppl_gpu = on_cpu["quality"]["ppl_quantized"], on_gpu["quality"]["ppl_quantized"]
    assert abs(ppl_gpu / ppl_cpu - 1) < 0.005
    assert on_gpu["peak_rss_mb"] <= on_cpu["peak_rss_mb"] * 1.10  # nothing of the device mirrored on the host


@cuda
def test_a_real_cuda_out_of_memory_falls_back_to_the_cpu(tiny_llama, tmp_path):
    torch.cuda.set_per_process_memory_fraction(1e-6, 0)
    try:
        report = run_inprocess(tiny_overrides(tiny_llama, tmp_path, "device=cuda", "quant.iters=2"))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert all(u["device"] == "cpu" and u["device_fallbacks"] for u in units(report))
    assert report["quality"]["ppl_quantized"] > 1


def test_the_device_peak_is_predicted_and_a_block_too_large_for_the_gpu_is_refused(tiny_llama, tmp_path,
                                                                                   monkeypatch):
    import qrunner.memory.device as device_module
    from conftest import compose
    from qrunner.memory.predict import predict_device_peak_mb, predict_peaks_mb
    from qrunner.models.registry import get_family
    from qrunner.session import ModelSession

    cfg, _ = compose(tiny_overrides(tiny_llama, tmp_path))
    session = ModelSession(cfg, get_family("llm"), None)
    one, eight, host = predict_device_peak_mb(cfg, session, 1), predict_device_peak_mb(cfg, session, 8), \
        predict_peaks_mb(cfg, session)
    assert 0 < one < eight < host["low"]  # rows stay on the host; the micro-batch is what grows
    monkeypatch.setattr(device_module, "resolve_device", lambda spec: torch.device("cuda", 0))
    monkeypatch.setattr(device_module, "device_total_mb", lambda device: one / 2)
    with pytest.raises(UserError, match=r"needs about \d+ MB on cuda:0 even with a micro-batch of one sample .* "
                                        r"the device has \d+ MB; use device=cpu"):
        run_inprocess(tiny_overrides(tiny_llama, tmp_path, "device=cuda", "memory=auto"))


def test_device_memory_is_sampled_on_the_rss_clock_and_drawn_with_it(tmp_path):
    from qrunner.memory.monitor import MemoryMonitor
    from qrunner.report.write import plot_memory

    monitor = MemoryMonitor(vram_probe=lambda: 1234.5)
    monitor.begin_section("quantize")
    monitor.sample()
    timeline = monitor.timeline()
    assert [v[1] for v in timeline["vram"]] == [1234.5, 1234.5]
    assert [v[0] for v in timeline["vram"]] == [s[0] for s in timeline["samples"]]
    report = {"memory_timeline": timeline, "peak_rss_mb": 100.0}
    plain = plot_memory({"memory_timeline": {**timeline, "vram": []}, "peak_rss_mb": 100.0}, tmp_path / "cpu.png")
    with_vram = plot_memory(report, tmp_path / "gpu.png")
    assert with_vram.read_bytes() != plain.read_bytes()
    assert "vram" not in MemoryMonitor().timeline()
