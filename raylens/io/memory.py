"""Host memory handed back to the operating system: what a long-running worker (an extraction
worker between windows of documents, a trainer) frees is otherwise kept by the allocators
(pyarrow's memory pool, glibc's heap) and its resident memory grows with fragmentation.
glibc-specific calls are skipped with another C library."""

from __future__ import annotations

import ctypes
import functools

import pyarrow as pa


def release_host_memory() -> None:
    """Hand freed host memory back to the OS: pyarrow's pool keeps freed pages
    (``release_unused``) and glibc keeps freed heap memory (``malloc_trim(0)``; skipped with
    another C library). Called by extraction after each window of documents: without it the
    resident memory between windows stays about 15-30 MiB higher per 64 MiB of window and grows
    with fragmentation."""
    pa.default_memory_pool().release_unused()
    if _libc() is not None:
        _libc().malloc_trim(0)


def mmap_large_allocations(threshold: int = 2**20) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own ``mmap``
    (``mallopt(M_MMAP_THRESHOLD)``, process-wide; it turns off glibc's dynamic threshold), given
    back to the OS when freed, and make Arrow allocate through glibc too (its default pool,
    mimalloc, keeps freed segments per thread). Else glibc raises its threshold after the first
    large free (up to 32 MiB) and batches' tensors and windows come from the heap, whose freed
    holes stay resident (extraction then grew to about twice its budget); with mimalloc the
    extraction test's growth over one batch's peak was 48-69 MiB of a 64 MiB budget (5 runs),
    35-46 MiB with glibc (3 runs). Called once by an extraction worker. Returns whether glibc's
    threshold was set (False with another C library, and Arrow's pool is then left alone)."""
    lib = _libc()
    if lib is None or not lib.mallopt(-3, int(threshold)):  # -3: M_MMAP_THRESHOLD
        return False
    pa.set_memory_pool(pa.system_memory_pool())
    return True


def limit_malloc_arenas(n: int = 2) -> bool:
    """Cap glibc at ``n`` malloc arenas (``mallopt(M_ARENA_MAX)``, process-wide; effective for
    threads that have no arena yet, as long as the process has not passed glibc's own arena
    test: call it before starting reader threads). Threads then share arenas, so what one
    thread frees another reuses instead of each keeping its own freed holes resident; large
    blocks stay in the heap (no page fault per 4 KiB on every fresh block, as with
    :func:`mmap_large_allocations`). Used by the concept trainer's activation streams:
    measured on ``tests/test_readers.py``'s stream child (d_model 2048, 2 to 64 shards of
    32 MiB, 3 runs each) the peak RSS growth was 32-38 MiB at every size (one run 57) and the
    stream read 2.1x faster, against 51-61 MiB with mmap. Returns whether glibc took it
    (False with another C library)."""
    lib = _libc()
    return lib is not None and bool(lib.mallopt(-8, int(n)))  # -8: M_ARENA_MAX


@functools.cache
def _libc():
    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.malloc_trim, lib.mallopt  # noqa: B018 (glibc only)
        return lib
    except (OSError, AttributeError):
        return None


__all__ = ["limit_malloc_arenas", "mmap_large_allocations", "release_host_memory"]
