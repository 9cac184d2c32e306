"""The runner: order the stages, skip the ones whose committed result matches, run and commit the rest."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig

from qrunner.memory.monitor import MemoryMonitor
from qrunner.pipeline.dag import topological_order
from qrunner.pipeline.fingerprint import select_keys, stage_fingerprint
from qrunner.pipeline.stage import Stage, StageContext, stage_class
from qrunner.pipeline.store import ArtifactStore
from qrunner.pipeline.units import UnitStore


@dataclass
class StageResult:
    name: str
    status: str  # "ran" or "reused"
    fingerprint: str
    seconds: float
    peak_rss_mb: float
    metrics: Dict[str, Any] = field(default_factory=dict)
    reason: str = ""


class Runner:
    def __init__(self, cfg: DictConfig, run_dir: Path, stage_names: Sequence[str], session: Any,
                 log: logging.Logger, monitor: MemoryMonitor, model_id: str, forbidden_keys: Sequence[str] = ()):
        self.cfg = cfg
        self.run_dir = run_dir
        self.session = session
        self.log = log
        self.monitor = monitor
        self.model_id = model_id
        self.store = ArtifactStore(run_dir)
        self.stages: Dict[str, Stage] = {name: stage_class(name)() for name in stage_names}
        for stage in self.stages.values():
            bad = [k for k in stage.reads if any(k == f or k.startswith(f + ".") for f in forbidden_keys)]
            if bad:
                raise ValueError(f"stage {stage.name} reads {bad}, which must not change results")
        self.order = topological_order({n: s.needs for n, s in self.stages.items()})
        self.fingerprints = self._fingerprints()

    def _fingerprints(self) -> Dict[str, str]:
        fps: Dict[str, str] = {}
        for name in self.order:
            stage = self.stages[name]
            fps[name] = stage_fingerprint(name, stage.version, select_keys(self.cfg, stage.reads),
                                          {n: fps[n] for n in stage.needs}, self.model_id)
        return fps

    def plan(self) -> Dict[str, Optional[str]]:
        """For each stage: None if its committed result is reused, else why it runs."""
        decisions: Dict[str, Optional[str]] = {}
        for name in self.order:
            manifest = self.store.manifest(name)
            if manifest is None:
                partial = self.store.partial(name)
                decisions[name] = "resuming from its checkpoints" if partial.exists() else "not run yet"
            elif manifest.get("fingerprint") != self.fingerprints[name]:
                decisions[name] = "its inputs or settings changed"
            else:
                decisions[name] = self.stages[name].still_valid(self.cfg, self.store.final(name), manifest)
        return decisions

    def run(self) -> List[StageResult]:
        self.store.clean_temporaries()
        results: List[StageResult] = []
        for name, reason in self.plan().items():
            stage, fp = self.stages[name], self.fingerprints[name]
            if reason is None:
                manifest = self.store.manifest(name) or {}
                self.log.info("stage %-9s reused (finished earlier, fingerprint %s)", name, fp[:12])
                results.append(StageResult(name, "reused", fp, manifest.get("seconds", 0.0),
                                           manifest.get("peak_rss_mb", 0.0), manifest.get("metrics", {})))
                continue
            self.log.info("stage %-9s running: %s", name, reason)
            results.append(self._run_stage(stage, fp, reason))
        return results

    def _run_stage(self, stage: Stage, fp: str, reason: str) -> StageResult:
        out = self.store.begin(stage.name, fp)
        units = UnitStore(out / "units", stage.name)
        units.clean_temporaries()
        ctx = StageContext(
            cfg=self.cfg, out=out, units=units, session=self.session, log=self.log, run_dir=self.run_dir,
            inputs={n: self.store.final(n) for n in stage.needs},
            upstream_manifests={n: self.store.manifest(n) or {} for n in stage.needs},
        )
        self.monitor.begin_section(stage.name)
        started = time.time()
        metrics = dict(stage.run(ctx) or {})
        seconds = round(time.time() - started, 3)
        peak = self.monitor.section_peak_mb()
        self.store.commit(stage.name, {
            "stage": stage.name, "version": stage.version, "fingerprint": fp, "needs": list(stage.needs),
            "started_at": started, "ended_at": started + seconds, "seconds": seconds, "peak_rss_mb": peak,
            "metrics": metrics,
        })
        self.log.info("stage %-9s done in %.2fs, peak RSS %.0f MB", stage.name, seconds, peak)
        return StageResult(stage.name, "ran", fp, seconds, peak, metrics, reason)
