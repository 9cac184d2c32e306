"""Wall time per named phase of a piece of work (a block's quantization: its forwards, the tuning's forward and
backward passes, sign steps, snapshots, row reads, the commit), summed over repeats.

Host-side times: on a GPU, work the host only queues is counted where the host next waits for it (a loss's
``.item()``, a copy to the host), so the split between the device phases is approximate there."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, Iterator, Mapping

__all__ = ["PhaseTimes"]


class PhaseTimes:
    """Seconds by phase name; ``with times.phase("forward"): ...`` adds the block's duration to "forward"."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def merge(self, other: Mapping[str, float], prefix: str = "") -> None:
        for name, seconds in other.items():
            self.seconds[prefix + name] += seconds

    def as_dict(self, digits: int = 4) -> Dict[str, float]:
        return {name: round(seconds, digits) for name, seconds in self.seconds.items()}
