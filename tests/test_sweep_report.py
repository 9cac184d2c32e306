"""The comparison a multirun ends with: one row per job in sweep.json / sweep.md (failed jobs included, with their
error), the Pareto front of size against perplexity, and a non-zero exit when a job failed."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from conftest import run_cli, tiny_overrides
from qrunner.report.sweep import bits_per_weight, pareto


def test_pareto_front_keeps_the_jobs_no_other_beats_on_size_and_perplexity():
    rows = [{"job": 0, "status": "done", "export_bytes": 100, "ppl_quantized": 10.0},
            {"job": 1, "status": "done", "export_bytes": 200, "ppl_quantized": 9.0},
            {"job": 2, "status": "done", "export_bytes": 300, "ppl_quantized": 9.5},  # beaten by job 1
            {"job": 3, "status": "failed", "error": "x"},
            {"job": 4, "status": "done", "export_bytes": 100, "ppl_quantized": 10.5}]  # beaten by job 0
    assert pareto(rows) == [0, 1]
    # a tuned export a few bytes larger than the untuned one (its config says so) is the same size, and better
    rows.append({"job": 5, "status": "done", "export_bytes": 100.05, "ppl_quantized": 9.9})
    assert pareto(rows) == [1, 5]


def test_bits_per_weight_counts_scales_and_zero_points_and_full_precision_layers():
    def layer(quantize, bits=4, group=128):
        return SimpleNamespace(in_features=256, out_features=64, quantize=quantize, bits=bits, group_size=group,
                               sym=True)
    assert bits_per_weight([layer(True)]) == pytest.approx(4 + (16 + 4) / 128, abs=1e-4)  # scale + zero a group
    assert bits_per_weight([layer(True), layer(False)]) == pytest.approx((4 + 20 / 128 + 16) / 2, abs=1e-4)
    assert bits_per_weight([]) is None


def test_a_sweep_ends_with_one_row_per_job_failed_ones_included(tiny_llama, tmp_path):
    res = run_cli(["-m", *tiny_overrides(tiny_llama, tmp_path), "scheme=w4a16", "quant.iters=0,-1"])
    assert res.returncode == 1, res.stderr  # one of the two jobs has a bad value
    assert "1 of 2 jobs failed" in res.stderr
    sweep = json.loads((tmp_path / "multirun" / "sweep.json").read_text())
    rows = {r["job"]: r for r in sweep["jobs"]}
    assert sorted(rows) == [0, 1]
    done, failed = rows[0], rows[1]
    assert done["status"] == "done" and failed["status"] == "failed"
    assert "quant.iters=-1" in failed["error"] and "quant.iters=-1" in failed["overrides"]
    assert done["bits_per_weight"] == 4 + 20 / 32  # group 32: a 16-bit scale and a zero point per 32 weights
    assert done["ppl_quantized"] > 1 and done["peak_rss_mb"] > 100
    assert done["exports"]["auto_round"] == done["run_dir"] + "/model"
    assert sweep["pareto"] == [0]
    md = (tmp_path / "multirun" / "sweep.md").read_text()
    assert md.count("\n| ") == 2 + 1 and "failed: ConfigValueError" in md
    assert (tmp_path / "multirun" / "sweep.png").stat().st_size > 5000
