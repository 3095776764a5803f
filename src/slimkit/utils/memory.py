"""Give freed heap memory back to the operating system (glibc), so resident memory tracks what is alive."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_free_memory() -> None:
    """Collect garbage and ``malloc_trim(0)``: a no-op where glibc is not the allocator.

    Why: glibc keeps freed blocks (and, after large frees, raises its mmap
    threshold, so later large buffers come from the heap too); a long job that
    frees and reallocates large tensors (block-by-block calibration) then holds
    hundreds of MB that nothing uses, and measured peaks would count them.
    """
    gc.collect()
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
