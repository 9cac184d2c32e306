"""One qrunner job: validate the config, choose the memory mode, run the stage DAG in its run directory and
write the report. `cli` runs one job per budget when scheme=auto is given several."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from omegaconf import DictConfig, OmegaConf

from qrunner.config import schema
from qrunner.errors import UserError


def choose_memory(cfg: DictConfig, session: Any, log: logging.Logger) -> Dict[str, Any]:
    """memory.mode, with memory=auto resolved from the predicted peaks and the RAM budget; every mode's predicted
    peak is kept (the report sets it beside the measured one)."""
    from qrunner.memory.predict import choose_mode

    memory = choose_mode(cfg, session)
    if cfg.memory.mode.value != "auto":  # the mode asked for; the predictions are kept for the report
        memory["mode"] = cfg.memory.mode.value
        log.info("memory=%s: predicted peak %s MB", memory["mode"], memory["predicted_peak_mb"][memory["mode"]])
        return memory
    log.info("memory=auto: predicted peak %s MB, budget %.1f GB -> %s", memory["predicted_peak_mb"],
             memory["budget_gb"], memory["mode"])
    if memory["mode"] is None:
        raise UserError(f"memory=auto: no memory mode fits memory.budget_gb={memory['budget_gb']} "
                        f"(predicted peaks {memory['predicted_peak_mb']} MB); raise memory.budget_gb, "
                        "lower data.nsamples / data.seqlen, or set memory=low to try anyway")
    return memory


def open_session(cfg: DictConfig, adapter: Any, log: logging.Logger) -> Any:
    """The run's in-process session: a transformers checkpoint's, or a diffusers pipeline folder's."""
    if adapter.pipeline_folder:
        from qrunner.diffusion_session import DiffusionSession

        return DiffusionSession(cfg, adapter, log)
    from qrunner.session import ModelSession

    return ModelSession(cfg, adapter, log)


def _waiting_for_run(run_dir: Path) -> Any:
    def say(holder: str) -> None:
        print(f"[qrunner] run directory {run_dir} is in use by pid {holder} (another job of the sweep with the same "
              "results); waiting for it", file=sys.stderr)
    return say


def check_device_fits(cfg: DictConfig, session: Any, device: Any, memory: Dict[str, Any], log: logging.Logger
                      ) -> None:
    """On a GPU: the device's predicted peak goes into the memory record; under memory=auto a run whose block
    does not fit the device even with a micro-batch of one sample is refused with the figures."""
    from qrunner.memory.device import device_total_mb
    from qrunner.memory.predict import predict_device_peak_mb

    total = device_total_mb(device)
    if total is None:
        return
    predicted, smallest = predict_device_peak_mb(cfg, session), predict_device_peak_mb(cfg, session, 1)
    memory["predicted_device_peak_mb"], memory["device_total_mb"] = round(predicted), round(total)
    log.info("%s: predicted peak %.0f MB of %.0f MB (micro-batch 1: %.0f MB)", device, predicted, total, smallest)
    if cfg.memory.mode.value == "auto" and smallest > total:
        raise UserError(f"memory=auto: a block of this model needs about {smallest:.0f} MB on {device} even with a "
                        f"micro-batch of one sample (quant.batch_size={cfg.quant.batch_size}: {predicted:.0f} MB), "
                        f"and the device has {total:.0f} MB; use device=cpu, a GPU with more memory, or lower "
                        "data.seqlen")


def _device_peak(results: List[Any]) -> Any:
    """The largest of the stages' peak device memory (None when no stage used a GPU)."""
    peaks = [r.peak_vram_mb for r in results if r.peak_vram_mb]
    return max(peaks, key=lambda v: v["allocated_mb"]) if peaks else None


def run_job(cfg: DictConfig, recipe: str, overrides: List[str], share_from: Sequence[Path] = ()) -> Dict[str, Any]:
    """Run the pipeline of a validated config; returns the report. Committed stages with the same fingerprint in
    the run directories of `share_from` and of every run under run.root are taken instead of recomputed (e.g.
    another scheme's calibration inputs, another budget's scores); jobs running at the same time that need the
    same missing stage compute it once (`StageLock`)."""
    import torch

    from qrunner.memory.device import resolve_device, vram_probe
    from qrunner.memory.monitor import MemoryMonitor, process_peak_mb
    from qrunner.memory.trim import freeze_long_lived_objects
    from qrunner.models.adapter import full_precision_layers, kernel_warning
    from qrunner.models.registry import get_family
    from qrunner.pipeline.lock import RunLock
    from qrunner.pipeline.runner import Runner, preflight_stages
    from qrunner.pipeline.status import report_status
    from qrunner.report.sweep import bits_per_weight
    from qrunner.report.write import build_report, print_summary, write_report
    from qrunner.rundir import clear_run_dir, run_dir_for, run_dirs_under, save_config, setup_logging
    from qrunner.stages.layer_plan import AUTOSCHEME, plan_layers, read_plan
    from qrunner.supervise import restarts
    from qrunner.sweep_job import in_sweep

    started = time.time()
    monitor = MemoryMonitor().start()
    adapter = get_family(cfg.family.name)
    session = open_session(cfg, adapter, logging.getLogger("qrunner"))
    session.preflight()  # on the meta skeleton: nothing loaded yet
    preflight_stages(cfg, adapter.stages, session)
    device = resolve_device(cfg.device)  # a device this machine lacks is refused before anything is written
    plain = schema.as_plain(cfg)
    run_dir = run_dir_for(plain, recipe)
    root = Path(plain["run"]["root"]).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir, wait=_waiting_for_run(run_dir) if in_sweep() else None):
        if cfg.run.fresh:
            clear_run_dir(run_dir)
        log = setup_logging(run_dir)
        log.info("run directory %s", run_dir)
        kept = kernel_warning(session.layer_plan)
        if kept:
            log.warning(kept)
        memory = choose_memory(cfg, session, log)
        session.memory_mode = memory["mode"]
        session.device = device
        monitor.vram_probe = vram_probe(device)
        check_device_fits(cfg, session, device, memory, log)
        log.info("memory mode: %s, blocks on %s", memory["mode"], session.device)
        report_status(mode=memory["mode"], run_dir=str(run_dir), on_oom=cfg.run.on_oom.value)
        for attempt in restarts():
            log.warning("restarted after %s in memory=%s at %s (peak RSS %s MB) -> memory=%s", attempt["cause"],
                        attempt["mode"], attempt["where"], attempt["peak_rss_mb"], attempt["restart_mode"])
        save_config(run_dir, OmegaConf.to_yaml(cfg, resolve=True), overrides)
        runner = Runner(cfg, run_dir, adapter.stages, session, log, monitor, session.identity(),
                        forbidden_keys=schema.NON_SEMANTIC_KEYS,
                        other_runs=lambda: [*map(Path, share_from), *run_dirs_under(root, run_dir)], lock_root=root)
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
        report["device"] = str(session.device)
        report["peak_vram_mb"] = _device_peak(results)
        plan = session.layer_plan
        if AUTOSCHEME in runner.stages:
            autoscheme = read_plan(runner.store.final(AUTOSCHEME))
            plan = plan_layers(autoscheme)
            report["autoscheme"] = {k: v for k, v in autoscheme.items() if k != "layers"}
        report["full_precision_layers"] = full_precision_layers(plan)
        report["bits_per_weight"] = bits_per_weight(plan)
        write_report(report, run_dir)
        print_summary(report)
        return report

