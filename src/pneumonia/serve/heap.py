"""Keep the service's heap from growing: a fixed mmap threshold for glibc malloc.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
request-sized buffers (upload bodies, decoded images, activations) come from the heap instead
of fresh mappings, and the heap's free holes are not returned to the kernel. On this service
that added ~40 MB of resident memory under load (the benchmark's 4 concurrent clients: peak
147 MB against 104 MB with a fixed threshold; ``benchmarks/bench_serve.py`` measures it).
Fixing the threshold at 64 KiB sends every large buffer to its own mapping, which is given
back on free. It is what ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment does, applied
from inside the process so that ``pneumonia serve`` gets it however it is started.
See mallopt(3).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("pneumonia.serve")

M_MMAP_THRESHOLD = -3  # from glibc's <malloc.h>
MMAP_THRESHOLD_BYTES = 64 * 1024
ENV_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap threshold once, before the service allocates much.

    Leaves malloc alone when the operator set ``MALLOC_MMAP_THRESHOLD_`` themselves, and on
    C libraries without ``mallopt`` (musl, macOS).

    Returns:
        True if the threshold was set here.
    """
    if ENV_OVERRIDE in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("mallopt is not available; heap tuning skipped")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
