"""Peak-RSS measurement: a sampling thread for the timeline, the kernel's high-water mark for the peak."""
from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

MB = 1024 * 1024


def _status_kb(field_name: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is None:
        import psutil

        return psutil.Process().memory_info().rss / MB
    return kb / 1024


def current_anon_mb() -> float:
    kb = _status_kb("RssAnon")
    return (kb or 0) / 1024


def process_peak_mb() -> float:
    """Peak RSS of this process so far (what /usr/bin/time -v reports as maximum resident set size)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class MemoryMonitor:
    interval_s: float = 0.05
    samples: List[Tuple[float, float, float]] = field(default_factory=list)  # (t, rss MB, anon MB)
    marks: List[Tuple[float, str]] = field(default_factory=list)
    # with a GPU: the device memory allocated now (MB), sampled on the same clock as the RSS
    vram_probe: Optional[Callable[[], float]] = None
    vram_samples: List[Tuple[float, float]] = field(default_factory=list)
    _t0: float = field(default_factory=time.time)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None
    _section_peak: float = 0.0
    _section_start_maxrss: float = 0.0

    def start(self) -> "MemoryMonitor":
        self._thread = threading.Thread(target=self._loop, name="qrunner-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> float:
        rss, now = current_rss_mb(), time.time() - self._t0
        self.samples.append((now, rss, current_anon_mb()))
        if self.vram_probe is not None:
            self.vram_samples.append((now, self.vram_probe()))
        self._section_peak = max(self._section_peak, rss)
        return rss

    def begin_section(self, name: str) -> None:
        """Start measuring a new stage's peak."""
        self.marks.append((time.time() - self._t0, name))
        # The kernel's high-water mark is never reset (that would falsify what /usr/bin/time reports);
        # when it rises during a section, the section's peak is that new process peak.
        self._section_start_maxrss = process_peak_mb()
        self._section_peak = self.sample()

    def section_peak_mb(self) -> float:
        peak = max(self._section_peak, self.sample())
        now_max = process_peak_mb()
        if now_max > self._section_start_maxrss:
            peak = max(peak, now_max)
        return round(peak, 1)

    def timeline(self) -> Dict[str, object]:
        timeline = {"samples": [[round(t, 3), round(r, 1), round(a, 1)] for t, r, a in self.samples],
                    "marks": [[round(t, 3), n] for t, n in self.marks]}
        if self.vram_samples:
            timeline["vram"] = [[round(t, 3), round(v, 1)] for t, v in self.vram_samples]
        return timeline
