"""Give freed heap memory back to the operating system between blocks.

glibc keeps memory freed by large tensors in its heap, so a block-by-block loop that allocates and frees
hundreds of MB per block ratchets RSS up. `malloc_trim(0)` returns the free pages (top of the heap and
whole free pages inside it) at the cost of a few milliseconds; qrunner calls it after each block.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache
from typing import Optional


@lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def freeze_long_lived_objects() -> None:
    """Exclude what exists now (imported modules, configs, the skeleton) from later garbage collections.

    `release_freed_memory` runs a full collection several times per block; with torch, transformers (and lm-eval)
    imported that is over a million objects, 0.2-0.7 s a collection on a 2-core machine, most of a small model's
    quantize time. Frozen objects are never collected, so this is called once per run, after a collection."""
    gc.collect()
    gc.freeze()


def release_freed_memory() -> bool:
    """Collect garbage and trim the C heap; False where the C library has no malloc_trim (non-glibc)."""
    gc.collect()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
