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
    from qrunner.memory.monitor import MemoryMonitor
    from qrunner.memory.predict import choose_mode
    from qrunner.models.registry import get_family
    from qrunner.pipeline.fingerprint import model_identity
    from qrunner.pipeline.lock import RunLock
    from qrunner.pipeline.runner import Runner
    from qrunner.report.write import build_report, print_summary, write_report
    from qrunner.rundir import clear_run_dir, run_dir_for, save_config, setup_logging
    from qrunner.session import ModelSession

    started = time.time()
    monitor = MemoryMonitor().start()
    provenance = Provenance(choices, overrides, _recipe_dirs())
    validate(cfg, provenance)
    adapter = get_family(cfg.family.name)
    session = ModelSession(cfg, adapter, logging.getLogger("qrunner"))
    session.preflight(provenance.source_of("scheme.group_size"))  # on the meta skeleton: nothing loaded yet
    plain = schema.as_plain(cfg)
    run_dir = run_dir_for(plain, recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        if cfg.run.fresh:
            clear_run_dir(run_dir)
        log = setup_logging(run_dir)
        log.info("run directory %s", run_dir)
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
        save_config(run_dir, OmegaConf.to_yaml(cfg, resolve=True), overrides)
        runner = Runner(cfg, run_dir, adapter.stages, session, log, monitor, model_identity(session.model_dir),
                        forbidden_keys=schema.NON_SEMANTIC_KEYS)
        results = runner.run()
        monitor.stop()
        plain["_recipe"] = recipe
        report = build_report(plain, run_dir, results, monitor, memory, time.time() - started)
        write_report(report, run_dir)
        print_summary(report)
        return report


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    choices = dict(hc.runtime.choices)
    try:
        execute(cfg, choices.get("recipe") or "custom", choices, list(hc.overrides.task))
    except UserError as err:
        print(f"qrunner: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _register()
    _hydra_entry()


if __name__ == "__main__":
    main()
