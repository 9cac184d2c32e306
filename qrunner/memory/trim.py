"""Give freed heap memory back to the operating system between blocks.

glibc keeps memory freed by large tensors in its heap, so a block-by-block loop that allocates and frees
hundreds of MB per block ratchets RSS up. `malloc_trim(0)` returns the free pages (top of the heap and
whole free pages inside it) at the cost of a few milliseconds; qrunner calls it after each block.

Inside a block the heap still fragments: on a 768-wide, 32-block Llama the AutoScheme replay's per-block peak
wandered over 650-745 MB from block to block, so deeper models (more blocks, more draws) peaked higher. torch's
`THP_MEM_ALLOC_ENABLE=1` (allocations of 2 MB and more on transparent huge pages) took that spread to 590-615 MB
and was faster, not slower (scores 57-68 s against 65-71 s); a fixed MALLOC_MMAP_THRESHOLD_ flattened it too but
cost 40-80 % in time. `prefer_huge_pages` sets it for the process before torch is imported.

A tuning loop is the opposite case: every iteration allocates and frees the same tensors (a micro-batch's
activations, each layer's recomputed fake-quantization). With glibc's defaults the heap top is trimmed after each
iteration and the next one faults the same pages back in, zeroed (~5,000 faults, 20 MB, an iteration on the demo
model at 128 samples: 6-10 % of its time, benchmarks/tuning_ab.py). `keep_freed_memory` holds freed memory in the
heap for the loop's duration and gives it back after.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, Optional, Sequence, Tuple


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


# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc's own dynamic thresholds top out here (64-bit): the mmap threshold at 32 MiB, the trim threshold at twice that
_MMAP_THRESHOLD_MAX = 32 << 20


@contextmanager
def _malloc_options(options: Sequence[Tuple[int, int]]) -> Iterator[bool]:
    """Inside: the mallopt `options` ((parameter, value) pairs). After: glibc's usual limits (as its own adjustment
    leaves them after large frees) and a trim. Yields False where the C library has no mallopt (non-glibc)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield False
        return
    for parameter, value in options:
        libc.mallopt(parameter, int(value))
    try:
        yield True
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)
        release_freed_memory()


@contextmanager
def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> Iterator[bool]:
    """Inside: freed memory stays in the C heap for reuse (allocations up to `mmap_threshold` come from the heap, and
    up to `trim_threshold` bytes of free heap top are kept), so a loop that frees and allocates the same sizes
    does not fault its pages in again every turn. The peak is the loop's working set either way; what changes is
    that RSS stays there until the loop ends. After: glibc's usual limits and a trim. Yields False where the C
    library has no mallopt (non-glibc): nothing changes."""
    with _malloc_options([(_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold)]) as active:
        yield active


@contextmanager
def return_freed_memory(mmap_threshold: int = 1 << 20) -> Iterator[bool]:
    """The opposite trade, for memory=low: inside, every allocation from `mmap_threshold` up is mapped on its own
    and unmapped when freed, so a loop's freed tensors leave no heap slack behind (on an 8B model's block, tuning's
    peak 255 MiB lower) and each turn faults its pages in again (about 10 % of that block's tuning time here).
    glibc's dynamic threshold would otherwise rise to the largest freed mapping (up to 32 MiB) and serve smaller
    tensors from the heap. After: as `keep_freed_memory` leaves it. Yields False where there is no mallopt."""
    with _malloc_options([(_M_MMAP_THRESHOLD, mmap_threshold)]) as active:
        yield active
