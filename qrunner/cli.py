"""`qrunner`: compose the config with Hydra, validate it, pick the run directory, run the stage DAG."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, List

import hydra
from omegaconf import DictConfig, OmegaConf

from qrunner._paths import asset, conf_dir, recipes_dir
from qrunner.config import schema
from qrunner.errors import UserError


def _register() -> None:
    schema.register()
    if not OmegaConf.has_resolver("qrunner.asset"):
        OmegaConf.register_new_resolver("qrunner.asset", lambda name: str(asset(name)))
    import qrunner.stages  # noqa: F401  (registers the stages)


def _recipe_dirs() -> List[Path]:
    local = Path.cwd() / "recipes"
    return [d for d in (local, recipes_dir()) if d.is_dir()]


def execute(cfg: DictConfig, recipe: str, choices: dict, overrides: List[str]) -> dict:
    """Validate, then run the pipeline; returns the report. Raises UserError for bad input."""
    from qrunner.config.provenance import Provenance
    from qrunner.config.validate import validate
    import torch

    from qrunner.memory.monitor import MemoryMonitor, process_peak_mb
    from qrunner.memory.predict import choose_mode
    from qrunner.memory.trim import freeze_long_lived_objects
    from qrunner.models.adapter import full_precision_layers, kernel_warning
    from qrunner.models.registry import get_family
    from qrunner.pipeline.fingerprint import model_identity
    from qrunner.pipeline.lock import RunLock
    from qrunner.pipeline.runner import Runner
    from qrunner.report.write import build_report, print_summary, write_report
    from qrunner.rundir import clear_run_dir, run_dir_for, save_config, setup_logging
    from qrunner.pipeline.status import report_status
    from qrunner.session import ModelSession
    from qrunner.supervise import restarts

    started = time.time()
    monitor = MemoryMonitor().start()
    provenance = Provenance(choices, overrides, _recipe_dirs())
    validate(cfg, provenance)
    adapter = get_family(cfg.family.name)
    session = ModelSession(cfg, adapter, logging.getLogger("qrunner"))
    session.preflight()  # on the meta skeleton: nothing loaded yet
    plain = schema.as_plain(cfg)
    run_dir = run_dir_for(plain, recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        if cfg.run.fresh:
            clear_run_dir(run_dir)
        log = setup_logging(run_dir)
        log.info("run directory %s", run_dir)
        kept = kernel_warning(session.layer_plan)
        if kept:
            log.warning(kept)
        memory = {"mode": cfg.memory.mode.value}
        if memory["mode"] == "auto":
            memory = choose_mode(cfg, session)
            log.info("memory=auto: predicted peak %s MB, budget %.1f GB -> %s", memory["predicted_peak_mb"],
                     memory["budget_gb"], memory["mode"])
            if memory["mode"] is None:
                raise UserError(f"memory=auto: no memory mode fits memory.budget_gb={memory['budget_gb']} "
                                f"(predicted peaks {memory['predicted_peak_mb']} MB); raise memory.budget_gb, "
                                "lower data.nsamples / data.seqlen, or set memory=low to try anyway")
        session.memory_mode = memory["mode"]
        log.info("memory mode: %s", memory["mode"])
        report_status(mode=memory["mode"], run_dir=str(run_dir), on_oom=cfg.run.on_oom.value)
        for attempt in restarts():
            log.warning("restarted after %s in memory=%s at %s (peak RSS %s MB) -> memory=%s", attempt["cause"],
                        attempt["mode"], attempt["where"], attempt["peak_rss_mb"], attempt["restart_mode"])
        save_config(run_dir, OmegaConf.to_yaml(cfg, resolve=True), overrides)
        runner = Runner(cfg, run_dir, adapter.stages, session, log, monitor, model_identity(session.model_dir),
                        forbidden_keys=schema.NON_SEMANTIC_KEYS)
        freeze_long_lived_objects()
        try:
            results = runner.run()
        except (MemoryError, torch.OutOfMemoryError):
            report_status(peak_rss_mb=round(process_peak_mb()))
            raise
        monitor.stop()
        plain["_recipe"] = recipe
        report = build_report(plain, run_dir, results, monitor, memory, time.time() - started)
        report["restarts"] = restarts()
        report["full_precision_layers"] = full_precision_layers(session.layer_plan)
        write_report(report, run_dir)
        print_summary(report)
        return report


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    choices = dict(hc.runtime.choices)
    import torch

    from qrunner.pipeline.status import current_status
    from qrunner.supervise import EXIT_OOM, resume_command

    log = logging.getLogger("qrunner")
    try:
        execute(cfg, choices.get("recipe") or "custom", choices, list(hc.overrides.task))
    except UserError as err:
        started = "run_dir" in current_status()
        print(f"qrunner: {err}" + (f"\nResume with: {resume_command()}" if started else ""), file=sys.stderr)
        sys.exit(2)
    except (MemoryError, torch.OutOfMemoryError) as err:
        log.error("out of memory in stage %s: %s", current_status().get("stage"), err)
        print(f"qrunner: out of memory in stage {current_status().get('stage')} ({type(err).__name__}); "
              f"nothing committed is lost. Resume with: {resume_command()} memory=low", file=sys.stderr)
        sys.exit(EXIT_OOM)
    except Exception as err:  # a bug or an environment problem: keep the traceback in run.log
        log.exception("stage %s failed", current_status().get("stage"))
        print(f"qrunner: stage {current_status().get('stage')} failed: {type(err).__name__}: {err}\n"
              f"(traceback in run.log of the run directory). Resume with: {resume_command()}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    from qrunner.supervise import should_supervise, supervise

    argv = sys.argv[1:]
    if should_supervise(argv):
        sys.exit(supervise(argv))
    _register()
    _hydra_entry()


if __name__ == "__main__":
    main()
