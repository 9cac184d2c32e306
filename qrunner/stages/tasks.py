"""tasks: lm-eval-harness task accuracy of the original and of the quantized model (`eval.tasks`), offline.

`memory=high` wraps the model in RAM in lm-eval's `HFLM` (the original, then the fake-quantized model). The
streaming modes wrap the meta skeleton in `HFLM` and answer its forward passes from one block-streamed pass over
all the requests lm-eval makes (`StreamedLM`): one block in RAM at a time, so tasks run on models larger than RAM
(loglikelihood and multiple-choice tasks; generation needs memory=high)."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from qrunner.errors import UserError
from qrunner.pipeline.stage import Stage, StageContext, register_stage
from qrunner.stages.evaluate import fake_quantized_model, streamed_chains
from qrunner.stages.quantize import QuantizedLayers, quantized_layers

RESULTS = "tasks.json"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def require_lm_eval() -> None:
    try:
        importlib.import_module("lm_eval.tasks")
    except ImportError:
        raise UserError("eval.tasks needs lm-eval-harness: pip install 'qrunner[eval]' (or pip install lm-eval), "
                        "or set eval.tasks=[] to skip task evaluation") from None


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No hub access while tasks load their data: a task whose data set is not cached fails at once."""
    saved = {k: os.environ.get(k) for k in OFFLINE_VARIABLES}
    os.environ.update({k: "1" for k in OFFLINE_VARIABLES})
    patched = []
    for module, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                         ("datasets.config", "HF_DATASETS_OFFLINE")):
        mod = importlib.import_module(module)
        if hasattr(mod, attr):
            patched.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in patched:
            setattr(mod, attr, value)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_tasks(names: List[str], include: Optional[str]) -> Dict[str, Any]:
    """lm-eval's task objects for `names` (built-in tasks or those defined by YAML under `include`), with their
    data loaded from local files or the Hugging Face cache; a clear error when a task is unknown or its data
    would have to be downloaded."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager, get_task_dict

    folder = str(Path(include).expanduser()) if include else None  # validate() checked that it exists
    manager = None
    if folder:  # indexing lm-eval's own few thousand task files takes half a minute: only when needed
        manager = TaskManager(include_path=folder, include_defaults=False)
    if manager is None or any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=folder)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"eval.tasks: unknown lm-eval task(s) {', '.join(unknown)}; give lm-eval task names "
                        "(lm-eval ls tasks) or define them in YAML files under eval.tasks_include")
    tasks = {}
    with offline():
        for name in names:
            try:
                tasks.update(get_task_dict([name], manager))
            except Exception as err:  # datasets/hub raise many kinds when a download is refused
                raise UserError(
                    f"eval.tasks: task {name!r} could not load its data offline ({type(err).__name__}: "
                    f"{str(err)[:300]}). qrunner runs tasks without network: put the data set in the local Hugging "
                    "Face cache (HF_HOME) on a machine with network first, or define the task over local files "
                    "(lm-eval task YAML with dataset_path: json and data_files) under eval.tasks_include"
                ) from None
    return tasks


def task_scores(results: Dict[str, Any], names: List[str]) -> Dict[str, Dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results (the default filter's metrics, stderr left out)."""
    out = {}
    for name in names:
        metrics = results["results"].get(name, {})
        out[name] = {key.split(",")[0]: float(value) for key, value in metrics.items()
                     if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    return out


def evaluate_tasks(lm: Any, tasks: Dict[str, Any], limit: Optional[int]) -> Dict[str, Any]:
    from lm_eval.evaluator import evaluate

    with offline(), torch.no_grad():
        return evaluate(lm=lm, task_dict=tasks, limit=limit, verbosity="WARNING")


def in_memory_lm(model: torch.nn.Module, tokenizer: Any, batch_size: int) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


class StreamedLM:
    """lm-eval's `HFLM` over the meta skeleton (memory=medium/low), in two passes over the task requests: the
    first records the token batches lm-eval asks logits for (answering with zeros, results thrown away); then the
    recorded batches, right-padded to one length (causal: padding never changes earlier positions), run through
    the streamed blocks once, the original and the quantized chain side by side; the later passes answer each
    batch from the last block's output rows through the head."""

    def __init__(self, ctx: StageContext, batch_size: int) -> None:
        from lm_eval.models.huggingface import HFLM

        owner, session = self, ctx.session
        self.ctx, self.recorded, self.answer = ctx, [], None  # type: ignore[var-annotated]
        self.vocab = int(session.adapter.text_config(session.hf_config).vocab_size)

        class StreamedHFLM(HFLM):
            @property
            def device(self) -> torch.device:
                return torch.device("cpu")

            def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
                return owner.logits(inps)

            def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
                raise UserError("eval.tasks: generation tasks need the whole model in RAM (memory=high); in "
                                "memory=medium/low qrunner runs loglikelihood and multiple-choice tasks only")

        self.lm = StreamedHFLM(pretrained=session.skeleton, tokenizer=session.tokenizer, batch_size=batch_size)

    def logits(self, inps: torch.Tensor) -> torch.Tensor:
        if self.answer is None:
            self.recorded.append(inps.clone())
            return torch.zeros(*inps.shape, self.vocab)
        return self.answer(inps)

    @contextlib.contextmanager
    def streamed(self, layers: QuantizedLayers, chains: List[str]) -> Iterator[None]:
        """After the recording pass: the recorded batches through the streamed blocks, then answer()-ready for
        `use(chain)`."""
        if not self.recorded:
            yield
            return
        length = max(b.shape[1] for b in self.recorded)
        windows = torch.cat([torch.nn.functional.pad(b, (0, length - b.shape[1])) for b in self.recorded])
        starts = [0]
        for b in self.recorded:
            starts.append(starts[-1] + len(b))
        session = self.ctx.session
        with streamed_chains(self.ctx, windows, layers, chains, desc="tasks") as last, session.sliced_head() as head:
            self.last, self.head, self.starts = last, head, starts
            try:
                yield
            finally:
                self.answer = None

    def use(self, chain: str) -> None:
        batch = iter(range(len(self.recorded)))

        def answer(inps: torch.Tensor) -> torch.Tensor:
            k = next(batch)
            if not torch.equal(inps, self.recorded[k]):
                raise RuntimeError("lm-eval asked for other token batches than on its recording pass")
            rows = self.last[chain].read(range(self.starts[k], self.starts[k + 1]))[:, : inps.shape[1]]
            return self.head.logits(rows)

        self.answer = answer


@register_stage
class TasksStage(Stage):
    name = "tasks"
    needs = ("load", "quantize")
    reads = ("eval.tasks", "eval.tasks_limit", "eval.tasks_include", "eval.original", "model.compute_dtype")
    version = 1
    description = "lm-eval task accuracy, original vs quantized"

    @classmethod
    def in_pipeline(cls, cfg: Any) -> bool:
        return bool(cfg.eval.tasks)

    def run(self, ctx: StageContext) -> Dict[str, Any]:
        cfg, session = ctx.cfg, ctx.session
        names = [str(t) for t in cfg.eval.tasks]
        limit = int(cfg.eval.tasks_limit) or None
        tasks = load_tasks(names, cfg.eval.tasks_include)
        layers = quantized_layers(ctx.inputs["quantize"])
        bs = int(cfg.eval.batch_size)
        chains = ["original", "quantized"] if cfg.eval.original else ["quantized"]
        scores: Dict[str, Any] = {}

        def record(chain: str, results: Dict[str, Any]) -> None:
            scores[chain] = task_scores(results, names)
            scores.setdefault("samples", {}).update({n: int(v.get("effective", v.get("original", 0)))
                                                     for n, v in results.get("n-samples", {}).items()})

        if session.streams_blocks:
            streamed = StreamedLM(ctx, bs)
            ctx.log.info("tasks: recording the requests of %s%s", ", ".join(names),
                         f" ({limit} examples each)" if limit else "")
            evaluate_tasks(streamed.lm, tasks, limit)
            with streamed.streamed(layers, chains):
                for chain in chains:
                    ctx.log.info("tasks: scoring the %s model", chain)
                    streamed.use(chain)
                    record(chain, evaluate_tasks(streamed.lm, tasks, limit))
        else:
            for chain in chains:
                ctx.log.info("tasks: %s on the %s model%s", ", ".join(names), chain,
                             f" ({limit} examples each)" if limit else "")
                if chain == "original":
                    record(chain, evaluate_tasks(in_memory_lm(session.model(), session.tokenizer, bs), tasks, limit))
                else:
                    with fake_quantized_model(session, layers) as model:
                        record(chain, evaluate_tasks(in_memory_lm(model, session.tokenizer, bs), tasks, limit))
        for name in names:
            ctx.log.info("tasks: %s %s", name, "  ".join(
                f"{metric} {scores['original'][name][metric]:.4f} -> {value:.4f}" if "original" in scores
                else f"{metric} {value:.4f}" for metric, value in scores["quantized"][name].items()))
        (ctx.out / RESULTS).write_text(json.dumps(scores, indent=1) + "\n")
        return {"tasks": scores, "limit": limit}
