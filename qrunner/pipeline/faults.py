"""Test-only fault injection: fail the process at a named point, deterministically.

Set QRUNNER_FAULT="<point>[:<n>[:<kind>]]" (e.g. "quantize.block_committed:2") and the process fails the
n-th time (counting from 0; default 0) that point is reached. Kinds:

- `kill` (default): the process SIGKILLs itself, as the kernel's OOM killer would;
- `memory`: a `MemoryError` is raised there, as an allocation that does not fit would;
- `oom`: a `torch.OutOfMemoryError` is raised there, as a GPU allocation that does not fit would.

The supervisor (run.on_oom=downgrade) injects the fault into its first child only, so a restarted run
shows the recovery. This hook exists for the tests; it is not a user-facing option.
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
    point, _, rest = spec.partition(":")
    if point != name:
        return
    nth, _, kind = rest.partition(":")
    count = _hits[name]
    _hits[name] += 1
    if count != int(nth or 0):
        return
    if kind in ("", "kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "memory":
        raise MemoryError(f"injected fault at {name}")
    elif kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected fault at {name})")
    else:
        raise ValueError(f"{ENV}: unknown fault kind {kind!r} (kill, memory, oom)")
