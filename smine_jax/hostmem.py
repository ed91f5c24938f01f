"""Host allocator tuning for XLA on CPU: keep large per-step buffers out of fresh mmaps.

XLA on CPU allocates every large intermediate and output buffer of a jitted call with the C
library's malloc, from its worker threads. glibc gives each thread group its own arena, and a
non-main arena cannot serve a block larger than its 64 MiB heap, so a 75 MiB float32 batch of
augmented 227² images is a fresh ``mmap`` on every call: ~19k page faults to touch it, then an
``munmap``. On the 2-core CPU machine that made kernel time two thirds of
``benchmarks/data_bench.py`` and capped gather + augment at ~2,600-3,500 images/s; with one
arena and no mmap / trim for large blocks the same measurement gave ~8,000-11,000 images/s, and
the Omniglot train step ran ~20 % faster.

`tune_malloc` applies that (``mallopt``: M_ARENA_MAX = 1, M_MMAP_THRESHOLD and M_TRIM_THRESHOLD
at their maximum). It only affects arenas and blocks created afterwards, so call it first thing
in a process, before jax runs anything; the experiment entry points do. The cost: freed memory
stays with the process (the resident set does not shrink after a peak) and all threads share
one arena lock. It is a no-op (returns False) where the C library is not glibc. Set
``SMINE_JAX_MALLOC_TUNING=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# mallopt takes an int: the thresholds at their largest value (never mmap / trim large blocks).
_MAX_INT = 2**31 - 1

_ENV_SWITCH = "SMINE_JAX_MALLOC_TUNING"


def tune_malloc(*, arena_max: int = 1, mmap_threshold: int = _MAX_INT,
                trim_threshold: int = _MAX_INT) -> bool:
    """Sets glibc's malloc so that large blocks are reused instead of mmapped per call.

    Returns True when every setting was applied, False where it could not be (not glibc, or
    disabled with SMINE_JAX_MALLOC_TUNING=0).
    """
    for name, value in (("arena_max", arena_max), ("mmap_threshold", mmap_threshold),
                        ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_INT:
            raise ValueError(f"{name}: expected an integer in [1, {_MAX_INT}], got {value!r}")
    if os.environ.get(_ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in (
        (_M_ARENA_MAX, arena_max), (_M_MMAP_THRESHOLD, mmap_threshold),
        (_M_TRIM_THRESHOLD, trim_threshold)))


def peak_rss_gib() -> float:
    """Peak resident set size of this process in GiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / 2**30


def _glibc_mallopt():
    """glibc's ``mallopt`` function, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: other libcs' mallopt differ
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt
