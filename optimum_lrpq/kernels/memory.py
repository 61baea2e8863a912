"""Giving freed memory back to the operating system after one-time work (weight preparation)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_MALLOC_TRIM = None


def return_freed_memory() -> bool:
    """Ask the C allocator to return the free parts of its heap to the system (glibc's `malloc_trim`); False where
    there is no such call (other platforms and C libraries), where it is a no-op.

    Building kernel layouts widens every weight to int32/float64 temporaries; glibc keeps such freed memory in its
    heap, where it would count as resident memory of the loaded model for the rest of the process."""
    global _MALLOC_TRIM
    if not sys.platform.startswith("linux"):
        return False
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
            _MALLOC_TRIM = False
    if not _MALLOC_TRIM:
        return False
    _MALLOC_TRIM(0)
    return True
