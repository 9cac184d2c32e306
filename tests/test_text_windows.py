"""Text is cut into windows the standard way: a text file tokenized once as it is, non-overlapping windows.

qrunner's perplexity on a text file must equal an independent transformers computation (the file tokenized once,
cut into non-overlapping windows, the model's own loss), in `high` and in `low`; calibration windows from a text
file hold no token that is not in its text (no end-of-text separators)."""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_inprocess
from qrunner._paths import asset


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    held = asset("corpus/heldout.txt").read_text()
    (folder / "eval.txt").write_text(held[:40_000])
    (folder / "calib.txt").write_text(asset("corpus/calibration.txt").read_text()[:60_000])
    return folder


def independent_perplexity(text_file: Path, seqlen: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    demo = asset("demo-llama")
    tokenizer = AutoTokenizer.from_pretrained(demo)
    model = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    ids = tokenizer(text_file.read_text(), return_tensors="pt").input_ids[0]
    n = len(ids) // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)
    with torch.no_grad():  # every window has seqlen - 1 predicted tokens: the mean of the means is the mean
        losses = [float(model(input_ids=windows[i:i + 4], labels=windows[i:i + 4]).loss) * len(windows[i:i + 4])
                  for i in range(0, n, 4)]
    return math.exp(sum(losses) / n)


@pytest.fixture(scope="module")
def runs(texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    common = [f"run.root={root}", "quant.iters=0", f"data.source={texts / 'calib.txt'}", "data.nsamples=16",
              "data.seqlen=128", f"eval.source={texts / 'eval.txt'}", "eval.seqlen=128", "eval.nsamples=0"]
    return {mode: run_inprocess([*common, f"memory={mode}", f"run.dir={root / mode}"]) for mode in ("high", "low")}


def test_perplexity_on_a_text_file_equals_transformers_tokenized_once_in_high_and_low(texts, runs):
    expected = independent_perplexity(texts / "eval.txt", 128)
    for mode, report in runs.items():
        q = report["quality"]
        assert abs(q["ppl_original"] - expected) / expected < 1e-4, (mode, q["ppl_original"], expected)
    high, low = runs["high"]["quality"], runs["low"]["quality"]
    assert abs(high["ppl_quantized"] - low["ppl_quantized"]) / high["ppl_quantized"] < 1e-4
    assert high["ppl_quantized"] > high["ppl_original"]


def test_calibration_windows_of_a_text_file_are_slices_of_its_token_stream_without_separators(texts, runs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(asset("demo-llama"))
    stream = tokenizer(texts.joinpath("calib.txt").read_text(), verbose=False)["input_ids"]
    samples = load_file(str(Path(runs["high"]["run_dir"]) / "stages" / "data" / "calibration.safetensors"))
    windows = samples["input_ids"]
    assert windows.shape == (16, 128)
    assert tokenizer.eos_token_id not in stream  # the text has no end-of-text token ...
    assert not (windows == tokenizer.eos_token_id).any()  # ... so no window has one
    starts = set(range(0, len(stream) - 127, 128))
    as_text = {tuple(stream[s:s + 128]) for s in starts}
    assert all(tuple(w.tolist()) in as_text for w in windows)  # each window is one of the stream's windows
