"""Memory the kernels manage themselves: freed memory given back to the operating system after one-time work
(weight preparation), and large outputs written into memory kept from one forward to the next."""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import os
import sys
import threading

import torch

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


# glibc serves an allocation of at least this many bytes (its largest mmap threshold on 64-bit systems) with fresh
# pages from the kernel, every time: smaller ones are recycled from its heap once a forward has run.
FRESH_PAGES_BYTES = 32 << 20
# At most this many bytes of kept outputs (the largest few of a forward; ViT-Base at batch 32 keeps 135 MB).
MAX_KEPT_BYTES = 1 << 30
# `OPTIMUM_LRPQ_REUSE_OUTPUTS=0` turns the reuse off (read at every call).
_REUSE_ENV = "OPTIMUM_LRPQ_REUSE_OUTPUTS"


class OutputBuffers:
    """Float32 outputs of large products written into memory kept from one forward to the next.

    A fresh tensor of at least `FRESH_PAGES_BYTES` is new pages from the kernel, and the first write to each page
    faults: on a 2-core AMX Xeon (2 threads), a oneDNN GEMM of ViT-Base's fc1 at batch 32 (6304 x 3072 float32
    outputs) took 33 ms into fresh memory and 15 ms into a kept buffer, copying the bias in included. A kernel asks
    `take` for its output instead of allocating it; it gets a view of a kept buffer, or None (small outputs, reuse
    turned off, over `MAX_KEPT_BYTES`: the kernel allocates as usual).

    A buffer is handed out again only once no tensor shares its storage any more (the storage's use count: the
    views handed out, and every view or `.numpy()` of them, hold it), so an output that someone kept (a hook,
    `output_hidden_states`) is never overwritten. At most two buffers per shape: a layer's output is free again
    when the next layer of its kind runs. The kept memory is given back by `release` (`release_output_buffers`).
    """

    def __init__(self, min_bytes: int = FRESH_PAGES_BYTES, max_bytes: int = MAX_KEPT_BYTES, per_shape: int = 2):
        self.min_bytes, self.max_bytes, self.per_shape = min_bytes, max_bytes, per_shape
        self._buffers: collections.OrderedDict[tuple, list[torch.Tensor]] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def enabled() -> bool:
        return os.environ.get(_REUSE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")

    def take(self, rows: int, columns: int, device: torch.device) -> torch.Tensor | None:
        """A float32 [rows, columns] tensor on `device` (a CPU) that nobody else holds, its content undefined; None
        where the caller should allocate its output itself."""
        size = rows * columns * 4
        if size < self.min_bytes or device.type != "cpu" or not _CAN_COUNT or not self.enabled():
            return None
        key = (rows, columns)
        with self._lock:  # the view is made before another thread can see the buffer as free
            buffers = self._buffers.setdefault(key, [])
            self._buffers.move_to_end(key)
            for buffer in buffers:
                if _unshared(buffer):
                    return buffer.view(rows, columns)
            if len(buffers) >= self.per_shape or not self._make_room(size):
                return None
            with torch.inference_mode(False):  # a normal tensor even when first made under inference_mode
                buffer = torch.empty(rows, columns, dtype=torch.float32)
            buffers.append(buffer)
            return buffer.view(rows, columns)

    def kept_bytes(self) -> int:
        return sum(b.numel() * 4 for buffers in self._buffers.values() for b in buffers)

    def _make_room(self, size: int) -> bool:
        """Drop unshared buffers of the least recently used shapes until `size` more bytes fit; False if they
        cannot."""
        for key in list(self._buffers):
            if self.kept_bytes() + size <= self.max_bytes:
                break
            self._buffers[key] = [b for b in self._buffers[key] if not _unshared(b)]
        return self.kept_bytes() + size <= self.max_bytes

    def release(self) -> int:
        """Forget every kept buffer (outputs still in use stay valid: they hold their storage); returns the bytes
        no longer kept."""
        with self._lock:
            released = self.kept_bytes()
            self._buffers.clear()
        return released


# A torch without the storage use count cannot tell a free buffer from one in use: no reuse there.
_CAN_COUNT = hasattr(torch._C, "_storage_Use_Count")


def _unshared(buffer: torch.Tensor) -> bool:
    # 2: the buffer itself and the storage object made to ask
    return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) <= 2


OUTPUT_BUFFERS = OutputBuffers()


def release_output_buffers() -> int:
    """Give back the memory kept for the kernels' large outputs (see `OutputBuffers`); returns its size in bytes.
    The next forward makes new buffers."""
    return OUTPUT_BUFFERS.release()
