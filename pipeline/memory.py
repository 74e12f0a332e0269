"""Keep a long stage's resident memory at its working set instead of letting glibc's heaps creep.

By default glibc adapts two thresholds as a process runs: each time a large mmapped buffer (up to 32 MB) is freed,
later buffers up to that size come from the heap instead, and each heap (one per thread that allocates: dask's
readers, the prefetch thread, the trainer) keeps up to twice that much free memory at its top before returning any
to the OS. The training stage frees buffers of a few MB to ~100 MB all the time (maps read from zarr, their float32
copies, slices of pixel features) on several threads, so its resident size crept up with the number of training
images although its working set does not change (measured at the 256 geometry: peak 1077 MB at N = 5, 1282 MB at
N = 20, +19%). Fixing both thresholds at 16 MB stops the drift: the MLP's own per-step buffers (8.6 MB gradients
and optimizer temporaries at D = 8448) still come from the heap, bigger buffers are mapped on their own and
returned when freed, and a heap gives back whatever it holds free beyond 16 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
STAGE_THRESHOLD_BYTES = 16 << 20


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def fix_malloc_thresholds(threshold_bytes: int = STAGE_THRESHOLD_BYTES) -> bool:
    """From now on, for the whole process (glibc only): serve C allocations of >= threshold_bytes with their own
    mapping, and return a heap's free top to the OS beyond threshold_bytes; glibc's dynamic adjustment of both
    stops. Returns True when it took effect, False where the C library has no mallopt (nothing changes there)."""
    if threshold_bytes < 1:
        raise ValueError(f"threshold_bytes must be >= 1, got {threshold_bytes}")
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):  # not glibc (musl, macOS)
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)) == 1 and mallopt(M_TRIM_THRESHOLD, int(threshold_bytes)) == 1


def release_free_memory() -> bool:
    """Return the free pages of every glibc heap to the OS now (malloc_trim(0)); False where there is none."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True
