"""`qrunner`: compose the config with Hydra, validate it, pick the run directory, run the stage DAG."""
from __future__ import annotations

import logging
import sys
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
    """Validate, then run the pipeline; returns the report. Raises UserError for bad input. scheme=auto with a
    list of budgets runs one job per budget (`budget_runs.run_budgets`)."""
    from qrunner.config.provenance import Provenance
    from qrunner.config.validate import budgets, validate
    from qrunner.job import run_job

    validate(cfg, Provenance(choices, overrides, _recipe_dirs()))
    if cfg.scheme.name != "auto" or len(budgets(cfg.scheme.auto)) == 1:
        return run_job(cfg, recipe, overrides)
    from qrunner.budget_runs import run_budgets

    return run_budgets(cfg, recipe, overrides)


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    if hc.mode == RunMode.MULTIRUN:  # this job runs in a supervised process of its own
        from qrunner.sweep_job import run_job_process

        return run_job_process(Path(hc.runtime.output_dir), hc.job.num, overrides, cfg.run.objective.value)
    return _run(cfg, dict(hc.runtime.choices), overrides)


def _run(cfg: DictConfig, choices: dict, overrides: List[str]) -> None:
    """One run, in this process: the report on success; on failure a message naming the problem and the command
    that resumes, and the exit code (2 bad input, EXIT_OOM out of memory, 128 + N stopped by signal N at a safe
    point, 1 anything else). In a sweep's job the
    row (or the error) also goes to the launching process."""
    import torch

    from qrunner.pipeline.status import current_status
    from qrunner.pipeline.stopping import StopRequested, install_stop_handlers
    from qrunner.report.sweep import job_row
    from qrunner.supervise import EXIT_OOM, describe_where, resume_command
    from qrunner.sweep_job import write_result

    log = logging.getLogger("qrunner")
    install_stop_handlers(log)
    try:
        write_result(job_row(execute(cfg, choices.get("recipe") or "custom", choices, overrides)))
        return
    except StopRequested as stop:
        where = describe_where(current_status())
        log.warning("%s at %s; the run directory is unlocked", stop, where)
        _failed(stop)
        print(f"qrunner: {stop} at {where}; nothing finished is lost. Resume with: {resume_command()}",
              file=sys.stderr)
        sys.exit(stop.exit_code)
    except UserError as err:
        _failed(err)
        started = "run_dir" in current_status()
        print(f"qrunner: {err}" + (f"\nResume with: {resume_command()}" if started else ""), file=sys.stderr)
        sys.exit(2)
    except (MemoryError, torch.OutOfMemoryError) as err:  # the supervisor restarts it lower (no row yet)
        log.error("out of memory in stage %s: %s", current_status().get("stage"), err)
        print(f"qrunner: out of memory in stage {current_status().get('stage')} ({type(err).__name__}); "
              f"nothing committed is lost. Resume with: {resume_command()} memory=low", file=sys.stderr)
        sys.exit(EXIT_OOM)
    except Exception as err:  # a bug or an environment problem: keep the traceback in run.log
        log.exception("stage %s failed", current_status().get("stage"))
        _failed(err)
        print(f"qrunner: stage {current_status().get('stage')} failed: {type(err).__name__}: {err}\n"
              f"(traceback in run.log of the run directory). Resume with: {resume_command()}", file=sys.stderr)
        sys.exit(1)


def _failed(err: BaseException) -> None:
    """A failed sweep job's row, for the launching process (the sweep goes on; its end says how many failed)."""
    from qrunner.pipeline.status import current_status
    from qrunner.sweep_job import write_result

    write_result({"status": "failed", "error": f"{type(err).__name__}: {err}",
                  "run_dir": current_status().get("run_dir"), "stage": current_status().get("stage")})


def main() -> None:
    from qrunner.memory.trim import prefer_huge_pages
    from qrunner.supervise import should_supervise, supervise

    prefer_huge_pages()  # before torch is imported here or in the supervised child

    argv = sys.argv[1:]
    if should_supervise(argv):
        sys.exit(supervise(argv))
    _register()
    _hydra_entry()


if __name__ == "__main__":
    main()
