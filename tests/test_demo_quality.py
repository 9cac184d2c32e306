"""Quality on the bundled demo model (trained, so perplexity means something), pinned to measured bounds.

Measured on the demo recipe (all 194 held-out windows of 256 tokens, the text tokenized once; 50 tuning
iterations unless said): original 46.791; W8A16 RTN 46.793; W4A16 RTN 46.863, tuned 46.848 (100
iterations 46.847, 200 iterations 46.828); W2A16 g64 RTN 48.909, tuned with 100 iterations 47.344.
"""
from pathlib import Path

import pytest

from conftest import run_inprocess
from test_export_loads_in_transformers import loaded_perplexity


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-runs")
    cache = {}

    def run(*overrides: str) -> dict:
        key = tuple(overrides)
        if key not in cache:
            cache[key] = (run_inprocess([f"run.root={root}", *overrides]), [f"run.root={root}", *overrides])
        return cache[key][0]

    run.overrides = lambda *o: cache[tuple(o)][1]
    return run


def test_w8a16_rtn_within_one_percent_of_original(demo):
    q = demo("scheme=w8a16", "quant.iters=0")["quality"]
    assert q["ppl_ratio"] < 1.01
    assert 40 < q["ppl_original"] < 55  # the demo model is trained: far below the unigram baseline (~630)


def test_w4a16_rtn_within_pinned_bound_and_tuning_is_no_worse(demo):
    rtn = demo("quant.iters=0")["quality"]
    tuned = demo()["quality"]
    assert rtn["ppl_ratio"] < 1.005  # measured 1.0015
    # no worse than RTN within evaluation noise: measured 46.848 vs 46.863 on an AVX2 EPYC, 46.871 vs 46.863 on an
    # AVX-512 Xeon (the same code; MKL's kernels round differently and 50 sign-SGD steps follow them). Tuning's
    # clear win is asserted at 2 bits below.
    assert tuned["ppl_quantized"] <= rtn["ppl_quantized"] * 1.0005


def test_w2a16_g64_tuning_clearly_beats_rtn(demo):
    rtn = demo("scheme=w2a16", "scheme.group_size=64", "quant.iters=0")["quality"]
    tuned = demo("scheme=w2a16", "scheme.group_size=64", "quant.iters=100")["quality"]
    assert rtn["ppl_ratio"] > 1.03  # measured 1.0453
    assert tuned["ppl_ratio"] - 1 < 0.5 * (rtn["ppl_ratio"] - 1)  # measured 1.0118


def test_tuning_lowers_every_block_loss_and_the_report_shows_it(demo):
    report = demo()
    assert len(report["block_loss"]) == 4
    for before, after in zip(report["block_loss_rtn"], report["block_loss"]):
        assert after < 0.7 * before
    run_dir = Path(report["run_dir"])
    md = (run_dir / "report.md").read_text()
    assert "loss before tuning (RTN)" in md and (run_dir / "block_loss.png").stat().st_size > 5000
    assert (run_dir / "memory.png").stat().st_size > 5000


def test_demo_export_loads_in_transformers_and_matches_own_evaluation(demo):
    # the demo's run, evaluated again on its first 32 windows (only evaluate reruns): auto-round's CPU kernels
    # take about 1.5 s a window, so the loaded model is scored on those 32, not on all 194
    report = demo("eval.nsamples=32")
    assert report["run_dir"] == demo()["run_dir"] and report["quality"]["ppl_quantized"] != demo()["quality"][
        "ppl_quantized"]
    loaded = loaded_perplexity(report["export_dir"], demo.overrides("eval.nsamples=32"))
    ours = report["quality"]["ppl_quantized"]
    assert abs(loaded - ours) / ours < 0.005, (loaded, ours)


@pytest.mark.parametrize("fmt", ["gptq", "compressed_tensors", "gguf"])
def test_demo_exports_in_the_other_formats_load_and_match_own_evaluation(demo, fmt):
    # the demo's run with the formats added: only their export stages run; the same 32 windows as above
    overrides = ("eval.nsamples=32", "export.formats=[auto_round,gptq,compressed_tensors,gguf]")
    base = demo()
    report = demo(*overrides)
    assert report["run_dir"] == base["run_dir"]
    assert {s["name"]: s["status"] for s in report["stages"]}["quantize"] == "reused"
    loaded = loaded_perplexity(report["exports"][fmt], demo.overrides(*overrides), fmt)
    ours = report["quality"]["ppl_quantized"]
    assert abs(loaded - ours) / ours < 0.005, (loaded, ours)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["auto_round", "gptq", "compressed_tensors", "gguf"])
def test_demo_w8a16_exports_in_every_format_load_and_match_own_evaluation(demo, fmt):
    overrides = ("scheme=w8a16", "quant.iters=0", "eval.nsamples=32",
                 "export.formats=[auto_round,gptq,compressed_tensors,gguf]")
    report = demo(*overrides)
    loaded = loaded_perplexity(report["exports"][fmt], demo.overrides(*overrides), fmt)
    ours = report["quality"]["ppl_quantized"]
    assert abs(loaded - ours) / ours < 0.005, (loaded, ours)
