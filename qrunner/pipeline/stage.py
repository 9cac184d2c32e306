"""A stage: a plain class with declared inputs (`needs`), the config keys it reads and a version."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type

from omegaconf import DictConfig

from qrunner.pipeline.units import UnitStore


@dataclass
class StageContext:
    """What a running stage sees: its config, its output folder and its upstream stages' folders."""

    cfg: DictConfig
    out: Path  # write everything here; it is committed atomically when run() returns
    inputs: Mapping[str, Path]  # committed folder of every stage in `needs` (and in `uses`, when in the pipeline)
    upstream_manifests: Mapping[str, Dict[str, Any]]
    units: UnitStore  # per-unit checkpoints (e.g. one per block) that survive a kill
    session: Any  # in-process objects shared between stages (loaded model, tokenizer); never on disk
    log: logging.Logger
    run_dir: Path
    metrics: Dict[str, Any] = field(default_factory=dict)


class Stage:
    """Subclasses set `name`, `needs`, `reads` and `version`, and implement `run`."""

    name: ClassVar[str]
    # the registry key a family's pipeline lists (`FamilyAdapter.stages`); default: `name`. A family whose step
    # differs (diffusion's capture) registers its own class under another key with the same `name`, so the stages
    # downstream find it under the name they need.
    key: ClassVar[str] = ""
    needs: ClassVar[Tuple[str, ...]] = ()
    # upstream stages read when the pipeline has them (quantize reads the autoscheme plan under scheme=auto)
    uses: ClassVar[Tuple[str, ...]] = ()
    # dotted config keys whose values change this stage's result (part of its fingerprint)
    reads: ClassVar[Tuple[str, ...]] = ()
    version: ClassVar[int] = 1
    # whether another run directory's committed result with the same fingerprint may be taken (False for stages
    # whose result lives outside their folder, as the export's does)
    shareable: ClassVar[bool] = True
    description: ClassVar[str] = ""

    @classmethod
    def in_pipeline(cls, cfg: DictConfig) -> bool:
        """Whether the config asks for this stage at all (e.g. task evaluation only with eval.tasks)."""
        return True

    def preflight(self, cfg: DictConfig, session: Any) -> None:
        """Checks against the model's structure (the meta skeleton) before any stage runs; raise UserError."""

    def run(self, ctx: StageContext) -> Optional[Dict[str, Any]]:
        """Do the work, write files under ctx.out, return metrics for the manifest."""
        raise NotImplementedError(f"stage {self.name} does not implement run()")

    def still_valid(self, cfg: DictConfig, stage_dir: Path, manifest: Dict[str, Any]) -> Optional[str]:
        """For stages that write outside their folder: why a committed result is no longer usable, or None."""
        return None

    def estimate_bytes(self, cfg: DictConfig, session: Any) -> int:
        """Rough size of what the stage writes (for disk-space checks); 0 when unknown or small."""
        return 0


_REGISTRY: Dict[str, Type[Stage]] = {}


def register_stage(cls: Type[Stage]) -> Type[Stage]:
    key = cls.key or cls.name
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise ValueError(f"two stages are registered as {key!r}: {_REGISTRY[key]} and {cls}")
    _REGISTRY[key] = cls
    return cls


def stage_class(key: str) -> Type[Stage]:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise KeyError(f"no stage registered as {key!r}; registered: {', '.join(sorted(_REGISTRY))}") from None
