"""Give freed heap memory back to the operating system between blocks.

glibc keeps memory freed by large tensors in its heap, so a block-by-block loop that allocates and frees
hundreds of MB per block ratchets RSS up. `malloc_trim(0)` returns the free pages (top of the heap and
whole free pages inside it) at the cost of a few milliseconds; qrunner calls it after each block.

Inside a block the heap still fragments: on a 768-wide, 32-block Llama the AutoScheme replay's per-block peak
wandered over 650-745 MB from block to block, so deeper models (more blocks, more draws) peaked higher. torch's
`THP_MEM_ALLOC_ENABLE=1` (allocations of 2 MB and more on transparent huge pages) took that spread to 590-615 MB
and was faster, not slower (scores 57-68 s against 65-71 s); a fixed MALLOC_MMAP_THRESHOLD_ flattened it too but
cost 40-80 % in time. `prefer_huge_pages` sets it for the process before torch is imported.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
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


THP_ENV = "THP_MEM_ALLOC_ENABLE"


def prefer_huge_pages() -> bool:
    """Ask torch's CPU allocator for huge-page-aligned large tensors (THP_MEM_ALLOC_ENABLE=1), unless the user set the
    variable. torch reads it once, at its first allocation: this only takes effect when called before torch is
    imported, as qrunner's entry point does (the supervised child inherits it). True when it is now on."""
    os.environ.setdefault(THP_ENV, "1")
    return os.environ[THP_ENV] == "1"


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
