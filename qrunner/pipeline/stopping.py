"""Stopping cleanly on SIGTERM, SIGINT or SIGHUP: what `timeout`, a job scheduler at its time limit or a closed
terminal send.

The process that runs the pipeline notes the first such signal (`install_stop_handlers`) and goes on to the
next safe point: `stop_point()` is called where nothing is half-written (after a unit or a stage is committed,
between tuning iterations, between the blocks of a streamed evaluation) and raises `StopRequested` there. It
unwinds like any error, so the temporaries of an unfinished unit are dropped, the run-directory lock is
released, and the entry point exits with 128 + the signal number after saying where it stopped and the
command that resumes. Repeats of the signal while stopping are ignored: a scheduler and the supervisor may
both deliver it.

`StopRequested` is a BaseException, as KeyboardInterrupt is, so that code catching `Exception` to recover
from a failure does not swallow it.
"""
from __future__ import annotations

import logging
import signal
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_requested: Optional[int] = None


class StopRequested(BaseException):
    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def install_stop_handlers(log: Optional[logging.Logger] = None) -> None:
    """From now on the signals in SIGNALS request a stop at the next `stop_point()` instead of killing."""
    log = log or logging.getLogger("qrunner")

    def request(signum: int, _frame: object) -> None:
        global _requested
        if _requested is None:
            _requested = signum
            log.warning("%s received: stopping at the next safe point (nothing finished is lost)",
                        signal.Signals(signum).name)

    for signum in SIGNALS:
        signal.signal(signum, request)


def stop_point() -> None:
    """A safe place to stop: raises StopRequested when a stop signal has arrived."""
    if _requested is not None:
        raise StopRequested(_requested)
