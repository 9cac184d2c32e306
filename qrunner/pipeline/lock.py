"""One writer per run directory (RunLock); one computation of a stage result per run.root (StageLock). Both are
`flock`s on small files that name their holder: the kernel drops a lock when its holder dies, so a crash never
leaves anything locked."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable, Optional

from qrunner.errors import UserError

Waiting = Callable[[str], None]  # told who holds the lock, before waiting for it


class _FileLock:
    def __init__(self, path: Path, holder: str) -> None:
        self.path, self.holder = path, holder
        self._fd: Optional[int] = None

    def _take(self, wait: Optional[Waiting]) -> Optional[str]:
        """Hold the lock (waiting for it when `wait` is given) and return None; without `wait`, when another
        process holds it, return who."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            if wait is None:
                os.close(fd)
                return holder
            wait(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.holder.encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class RunLock(_FileLock):
    """A second process for the same run directory fails at once naming the holder, or with `wait` (the jobs of a
    sweep that differ only in evaluation settings share a run directory) waits for it to finish."""

    def __init__(self, run_dir: Path, wait: Optional[Waiting] = None) -> None:
        super().__init__(run_dir / ".lock", str(os.getpid()))
        self.wait = wait

    def acquire(self) -> None:
        holder = self._take(self.wait)
        if holder is not None:
            raise UserError(f"run directory {self.path.parent} is in use by pid {holder}; wait for it to finish "
                            "(a second process never writes into the same run), or choose another run.dir.")

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class StageLock(_FileLock):
    """While held: this process computes the stage result `<name>` with fingerprint `fp` for every run under the
    same run.root. A second job that needs the very same result waits here, then takes the first one's (the
    runner looks for it again once the lock is its). The lock files (a few bytes) stay in `<root>/.locks`."""

    def __init__(self, root: Path, name: str, fp: str, run_dir: Path) -> None:
        super().__init__(root / ".locks" / f"{name}-{fp[:24]}.lock", f"pid {os.getpid()} ({run_dir})")

    def acquire(self, wait: Waiting) -> None:
        self._take(wait)
