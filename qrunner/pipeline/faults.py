"""Test-only fault injection: kill the process at a named point, deterministically.

Set QRUNNER_FAULT="<point>:<n>" (e.g. "quantize.block_committed:2") and the process SIGKILLs itself
the n-th time (counting from 0) that point is reached, or "<point>" for the first time. This hook exists
for the resume tests; it is not a user-facing option.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "QRUNNER_FAULT"
_hits: Counter = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    count = _hits[name]
    _hits[name] += 1
    if count == int(nth or 0):
        os.kill(os.getpid(), signal.SIGKILL)
