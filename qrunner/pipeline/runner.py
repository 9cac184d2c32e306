"""The runner: order the stages, skip the ones whose committed result matches, run and commit the rest."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import DictConfig

from qrunner.errors import UserError
from qrunner.memory.device import HOST, begin_peak, peak_vram_mb
from qrunner.memory.monitor import MemoryMonitor
from qrunner.pipeline.dag import topological_order
from qrunner.pipeline.fingerprint import select_keys, stage_fingerprint
from qrunner.pipeline.lock import StageLock
from qrunner.pipeline.stage import Stage, StageContext, stage_class
from qrunner.pipeline.status import report_status
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
    commit_seconds: float = 0.0  # publishing the stage's folder (fsync + rename)
    source: Optional[str] = None  # the run directory a reused result was taken from (None: this run's own)
    peak_vram_mb: Optional[Dict[str, float]] = None  # the device's peak allocated / reserved (None on the CPU)


GB = 1024**3


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def preflight_stages(cfg: DictConfig, stage_names: Sequence[str], session: Any) -> None:
    """The checks of every stage the config puts in the pipeline against the model's structure (the meta
    skeleton), before a run directory is made or anything runs."""
    for key in stage_names:
        stage = stage_class(key)
        if stage.in_pipeline(cfg):
            stage().preflight(cfg, session)


class Runner:
    def __init__(self, cfg: DictConfig, run_dir: Path, stage_names: Sequence[str], session: Any,
                 log: logging.Logger, monitor: MemoryMonitor, model_id: str, forbidden_keys: Sequence[str] = (),
                 other_runs: Callable[[], Sequence[Path]] = tuple, lock_root: Optional[Path] = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.session = session
        self.log = log
        self.monitor = monitor
        self.model_id = model_id
        self.store = ArtifactStore(run_dir)
        # the other run directories (looked for again each time) whose committed stages this run takes when the
        # fingerprints match; with lock_root, jobs that need the same missing stage compute it once
        self.other_runs = other_runs
        self.lock_root = lock_root
        self.sources: Dict[str, str] = {}  # stage -> the run directory its result was taken from
        classes = [stage_class(key) for key in stage_names]
        self.stages: Dict[str, Stage] = {cls.name: cls() for cls in classes if cls.in_pipeline(cfg)}
        for stage in self.stages.values():
            bad = [k for k in stage.reads if any(k == f or k.startswith(f + ".") for f in forbidden_keys)]
            if bad:
                raise ValueError(f"stage {stage.name} reads {bad}, which must not change results")
        # what each stage reads from: its needs, and the stages it uses that this pipeline has
        self.needs = {n: tuple(s.needs) + tuple(u for u in s.uses if u in self.stages) for n, s in self.stages.items()}
        self.order = topological_order(self.needs)
        self.fingerprints = self._fingerprints()

    def _fingerprints(self) -> Dict[str, str]:
        fps: Dict[str, str] = {}
        for name in self.order:
            stage = self.stages[name]
            fps[name] = stage_fingerprint(name, stage.version, self._reads(stage),
                                          {n: fps[n] for n in self.needs[name]}, self.model_id)
        return fps

    def _reads(self, stage: Stage) -> Dict[str, Any]:
        return select_keys(self.cfg, stage.reads)

    def plan(self) -> Dict[str, Optional[str]]:
        """For each stage: None if its committed result is reused, else why it runs."""
        decisions: Dict[str, Optional[str]] = {}
        for name in self.order:
            manifest = self.store.manifest(name)
            stale = manifest is None or manifest.get("fingerprint") != self.fingerprints[name]
            if stale and self.stages[name].shareable and self._adopt(name):
                manifest = self.store.manifest(name)
            if manifest is None:
                partial = self.store.partial(name)
                decisions[name] = "resuming from its checkpoints" if partial.exists() else "not run yet"
            elif manifest.get("fingerprint") != self.fingerprints[name]:
                decisions[name] = self._drift(name, manifest, decisions)
            else:
                damaged = self.store.damaged(name)
                if damaged:
                    self.log.warning("stage %s: committed artifact %s; the stage runs again", name, damaged)
                    decisions[name] = f"damaged artifact ({damaged})"
                else:
                    decisions[name] = self.stages[name].still_valid(self.cfg, self.store.final(name), manifest)
        return decisions

    def _adopt(self, name: str) -> bool:
        """Take another run's committed result of stage `name` with this run's fingerprint, if there is one."""
        here = self.run_dir.resolve()
        for other in self.other_runs():
            if Path(other).resolve() != here and self.store.adopt(name, self.fingerprints[name], ArtifactStore(other)):
                self.sources[name] = str(other)
                self.log.info("stage %-9s taken from %s (same fingerprint)", name, other)
                return True
        return False

    def _drift(self, name: str, manifest: Dict[str, Any], decided: Dict[str, Optional[str]]) -> str:
        """Why a committed stage's fingerprint no longer matches: the keys that changed, or what else did."""
        stage = self.stages[name]
        old, new = manifest.get("reads"), self._reads(stage)
        if old is not None:
            changed = [f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in sorted(set(old) | set(new))
                       if old.get(k) != new.get(k)]
            if changed:
                return "settings changed (" + "; ".join(changed) + ")"
        if manifest.get("version") != stage.version:
            return f"stage version changed ({manifest.get('version')} -> {stage.version})"
        if manifest.get("model") not in (None, self.model_id):
            return "the source checkpoint changed (config.json or safetensors headers)"
        needs = self.needs[name]
        upstream = [n for n in needs if (manifest.get("upstream") or {}).get(n) != self.fingerprints[n]]
        if upstream or any(decided.get(n) for n in needs):
            return "upstream " + ", ".join(upstream or [n for n in needs if decided.get(n)]) + " changed"
        return "its inputs or settings changed"

    def run(self) -> List[StageResult]:
        self.store.clean_temporaries()
        results: List[StageResult] = []
        plan = self.plan()
        reused = [n for n, why in plan.items() if why is None]
        if reused and len(reused) < len(plan):
            self.log.info("resume: reusing %s; running %s", ", ".join(reused),
                          ", ".join(n for n, why in plan.items() if why is not None))
        for name, reason in plan.items():
            stage, fp = self.stages[name], self.fingerprints[name]
            if reason is None:
                if name not in self.sources:
                    self.log.info("stage %-9s reused (finished earlier, fingerprint %s)", name, fp[:12])
                results.append(self._reused(name, fp))
                continue
            if not stage.shareable or self.lock_root is None:
                results.append(self._run_stage(stage, fp, reason))
                continue
            lock = StageLock(self.lock_root, name, fp, self.run_dir)
            lock.acquire(lambda holder: self.log.info("stage %-9s waiting: %s computes the same result", name,
                                                      holder))
            try:  # another job may have committed it meanwhile
                results.append(self._reused(name, fp) if self._adopt(name) else self._run_stage(stage, fp, reason))
            finally:
                lock.release()
        return results

    def _reused(self, name: str, fp: str) -> StageResult:
        manifest = self.store.manifest(name) or {}
        return StageResult(name, "reused", fp, manifest.get("seconds", 0.0), manifest.get("peak_rss_mb", 0.0),
                           manifest.get("metrics", {}), source=self.sources.get(name),
                           peak_vram_mb=manifest.get("peak_vram_mb"))

    def _check_disk(self, stage: Stage) -> None:
        """Refuse, before writing, a stage whose estimated output does not fit the free disk space."""
        need = int(stage.estimate_bytes(self.cfg, self.session) or 0)
        free = shutil.disk_usage(self.run_dir).free
        if need > free:
            raise UserError(f"stage {stage.name} needs about {need / GB:.2f} GB of disk in {self.run_dir}, but only "
                            f"{free / GB:.2f} GB are free; free some space or point run.root (or run.dir) at a "
                            "larger disk. Nothing was written.")

    def _run_stage(self, stage: Stage, fp: str, reason: str) -> StageResult:
        self.log.info("stage %-9s running: %s", stage.name, reason)
        report_status(stage=stage.name, block=None)
        self._check_disk(stage)
        out = self.store.begin(stage.name, fp)
        units = UnitStore(out / "units", stage.name)
        units.clean_temporaries()
        ctx = StageContext(
            cfg=self.cfg, out=out, units=units, session=self.session, log=self.log, run_dir=self.run_dir,
            inputs={n: self.store.final(n) for n in self.needs[stage.name]},
            upstream_manifests={n: self.store.manifest(n) or {} for n in self.needs[stage.name]},
        )
        self.monitor.begin_section(stage.name)
        device = getattr(self.session, "device", HOST)
        begin_peak(device)
        started = time.time()
        metrics = dict(stage.run(ctx) or {})
        seconds = round(time.time() - started, 3)
        peak = self.monitor.section_peak_mb()
        vram = peak_vram_mb(device)
        committing = time.time()
        self.store.commit(stage.name, {
            "stage": stage.name, "version": stage.version, "fingerprint": fp, "needs": list(self.needs[stage.name]),
            "reads": self._reads(stage), "upstream": {n: self.fingerprints[n] for n in self.needs[stage.name]},
            "model": self.model_id,
            "started_at": started, "ended_at": started + seconds, "seconds": seconds, "peak_rss_mb": peak,
            "peak_vram_mb": vram, "metrics": metrics,
        })
        commit_seconds = round(time.time() - committing, 3)
        self.log.info("stage %-9s done in %.2fs, peak RSS %.0f MB", stage.name, seconds, peak)
        return StageResult(stage.name, "ran", fp, seconds, peak, metrics, reason, commit_seconds,
                           peak_vram_mb=vram)
