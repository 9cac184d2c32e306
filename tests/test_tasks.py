"""eval.tasks: lm-eval task accuracy of the original and the quantized model, offline, equal to lm-eval's own run."""
from pathlib import Path

import pytest
import torch

from conftest import run_inprocess
from local_tasks import TASK, write_task
from qrunner._paths import asset
from qrunner.errors import UserError

pytest.importorskip("lm_eval")

LIMIT = 16


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("tasks"))


def lm_eval_scores(model, task_dir: Path) -> dict:
    """lm-eval's own run: HFLM over a transformers model, the task from the same YAML folder."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(asset("demo-llama")), batch_size=4)
    results = simple_evaluate(model=lm, tasks=[TASK], limit=LIMIT,
                              task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    return {k.split(",")[0]: v for k, v in results["results"][TASK].items() if k in ("acc,none", "acc_norm,none")}


@pytest.fixture(scope="module")
def runs(task_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    common = [f"run.root={root}", "quant.iters=0", "scheme=w2a16", "scheme.group_size=64", "eval.enabled=false",
              "data.nsamples=8", "data.seqlen=64",
              f"eval.tasks=[{TASK}]", f"eval.tasks_include={task_dir}", f"eval.tasks_limit={LIMIT}"]
    return {mode: run_inprocess([*common, f"memory={mode}", f"run.dir={root / mode}"]) for mode in ("high", "low")}


def test_original_accuracy_equals_lm_evals_own_run_in_high_and_low(task_dir, runs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(asset("demo-llama"), dtype=torch.float32).eval()
    expected = lm_eval_scores(model, task_dir)
    assert 0.5 < expected["acc"] <= 1.0  # the demo model reads Python: far above chance (0.25)
    for mode, report in runs.items():
        tasks = report["tasks"]
        assert tasks["samples"] == {TASK: LIMIT}
        assert {m: tasks["original"][TASK][m] for m in expected} == expected, mode


def test_quantized_accuracy_equals_lm_evals_run_on_the_fake_quantized_model_in_high_and_low(task_dir, runs):
    from transformers import AutoModelForCausalLM

    from qrunner.stages.quantize import quantized_layers

    model = AutoModelForCausalLM.from_pretrained(asset("demo-llama"), dtype=torch.float32).eval()
    layers = quantized_layers(Path(runs["high"]["run_dir"]) / "stages" / "quantize")
    for name, qw in layers.items():
        model.get_submodule(name).weight.data = qw.dequantize(torch.float32)
    expected = lm_eval_scores(model, task_dir)
    for mode, report in runs.items():
        assert {m: report["tasks"]["quantized"][TASK][m] for m in expected} == expected, mode


def test_task_scores_are_in_report_md_and_json(runs):
    report = runs["high"]
    md = (Path(report["run_dir"]) / "report.md").read_text()
    acc = report["tasks"]["quantized"][TASK]["acc"]
    assert f"| {TASK} | {LIMIT} | acc |" in md and f"{acc:.4f}" in md
    assert [s["name"] for s in report["stages"]][-1] == "tasks"


def test_no_tasks_no_stage(tmp_path):
    report = run_inprocess([f"run.root={tmp_path}", "quant.iters=0", "eval.enabled=false", "data.nsamples=4",
                            "data.seqlen=64"])
    assert "tasks" not in [s["name"] for s in report["stages"]] and report["tasks"] == {}


def test_task_that_needs_a_download_stops_with_the_fix(tmp_path):
    from qrunner.stages.tasks import load_tasks

    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "remote_task.yaml").write_text(
        "task: remote_task\ndataset_path: qrunner-tests/not-cached-anywhere\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n")
    with pytest.raises(UserError, match="remote_task.*could not load its data offline.*local Hugging Face cache"):
        load_tasks(["remote_task"], str(remote))
