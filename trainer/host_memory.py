"""glibc ``malloc`` settings that let CPU training reuse freed activation memory.

PyTorch's CPU allocator is plain ``malloc``. glibc serves every block above its mmap threshold
(128 KiB at start, raised adaptively) with a fresh ``mmap`` and unmaps it on free, and trims
the heap top back to the OS above 128 KiB of slack; a training step allocates and frees its
(B, L, 4D) activations every step, so each step page-faults them in again: 57,000 minor faults
and ~12% of a SASRec ML-1M step on this CPU (``benchmarks/train_sasrec.py``). Serving blocks up
to 32 MiB (glibc's ceiling for the threshold) from the heap and keeping up to 1 GiB of free
heap makes the faults disappear after the first step.

The cost is that up to 1 GiB of freed memory stays mapped to the process. Settings already
given in the environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) win.

Blocks up to 32 MiB from the heap also fragment it: batches of varying lengths free holes that
the next, differently sized activations do not fit, and glibc only trims the heap's top. Left
alone, a 20-minute SASRec run on ML-1M grew from 1.8 GB to 6 GB of RSS, nearly all of it free
memory the process could not give back. :func:`release_freed_memory` (``malloc_trim(0)``, which
returns every free page of every arena, not only the top) runs whenever the resident size has
grown by ``slack`` (512 MiB) since the last release, after each training epoch and after each
validation (:class:`~trainer.callbacks.ReleaseFreedMemory`); the step after it faults its
activations in once more, about a tenth of one step's time. A fixed step count was not enough:
ML-1M's shipped config (batch 128) grows about 30 MB a step, and trimming every 100 steps let a
20-minute run peak at 4.7 GB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""glibc's largest allowed mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``)."""
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Apply the settings above to this process; False where they do not apply (not glibc,
    or already set in the environment)."""
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident set size (``/proc/self/statm``); None where there is no procfs.
    Read after every training step, so one small read and no other call."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def release_freed_memory() -> bool:
    """Return the free pages of every malloc arena to the OS (glibc ``malloc_trim(0)``); False
    where there is no such call (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        malloc_trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc_trim(0)
    return True
