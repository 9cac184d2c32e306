"""scheme=auto with a list of budgets: one job per budget (each its own run directory, plan and export), the later
ones reusing the stages the budget does not change (load, data, capture, scores); the last job's report is
returned, with every budget's summary under "budgets", and a table of them printed."""
from __future__ import annotations

from pathlib import Path
from typing import List

from omegaconf import DictConfig, OmegaConf


def run_budgets(cfg: DictConfig, recipe: str, overrides: List[str]) -> dict:
    from qrunner.config.validate import budgets
    from qrunner.job import run_job

    _check_budgets(cfg)
    done: List[Path] = []
    summaries = []
    for budget in budgets(cfg.scheme.auto):
        one = cfg.copy()
        OmegaConf.update(one, "scheme.auto.avg_bits", budget, merge=False)
        report = run_job(one, recipe, overrides + [f"scheme.auto.avg_bits={budget:g}"], share_from=done)
        done.append(Path(report["run_dir"]))
        summaries.append(budget_summary(budget, report))
    report["budgets"] = summaries
    from qrunner.report.write import write_report

    write_report(report, Path(report["run_dir"]))  # the last budget's report lists them all
    print_budgets(summaries)
    return report


def _check_budgets(cfg: DictConfig) -> None:
    """Every budget against the model's layers before the first job runs (the meta skeleton only)."""
    import logging

    from qrunner.job import open_session
    from qrunner.models.registry import get_family
    from qrunner.pipeline.runner import preflight_stages

    adapter = get_family(cfg.family.name)
    session = open_session(cfg, adapter, logging.getLogger("qrunner"))
    session.preflight()
    preflight_stages(cfg, adapter.stages, session)


def budget_summary(budget: float, report: dict) -> dict:
    auto, quality = report.get("autoscheme", {}), report.get("quality", {})
    return {"avg_bits_target": budget, "avg_bits": auto.get("avg_bits"), "ppl_quantized": quality.get("ppl_quantized"),
            "ppl_original": quality.get("ppl_original"), "run_dir": report["run_dir"], "export_dir": report["export_dir"]}


def print_budgets(summaries: List[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="scheme=auto: one plan and export per budget")
    for col in ("budget", "average bits", "perplexity", "export"):
        table.add_column(col, justify="left" if col == "export" else "right")
    for s in summaries:
        ppl = "" if s["ppl_quantized"] is None else f"{s['ppl_quantized']:.4f}"
        table.add_row(f"{s['avg_bits_target']:g}", f"{s['avg_bits']:.4f}", ppl, str(s["export_dir"]))
    Console(stderr=False).print(table)
