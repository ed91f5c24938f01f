"""Host allocator tuning: applied on glibc, a clean no-op elsewhere or when switched off."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from smine_jax import hostmem


def test_applies_on_glibc_in_a_fresh_process():
    # A subprocess, so the test suite's own allocator stays as it was.
    code = textwrap.dedent("""
        import platform
        from smine_jax import hostmem
        applied = hostmem.tune_malloc()
        print(applied, platform.libc_ver()[0] == "glibc")
        import jax.numpy as jnp
        # A jitted output above glibc's 64 MiB arena heap: served and freed repeatedly.
        for _ in range(3):
            big = jnp.ones((128, 227, 227, 3), jnp.float32) * 2.0
            assert float(big[0, 0, 0, 0]) == 2.0
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    applied, is_glibc = result.stdout.split()
    assert applied == is_glibc


_HEAP_PROBE = textwrap.dedent("""
    import ctypes, sys
    from smine_jax import hostmem

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    applied = hostmem.tune_malloc() if sys.argv[1] == "tuned" else False
    before = libc.mallinfo2()
    block = libc.malloc(200 << 20)  # above glibc's default (dynamic) mmap threshold, 32 MiB max
    mapped = libc.mallinfo2().hblks - before.hblks
    libc.free(block)
    kept = libc.mallinfo2().arena - before.arena  # heap bytes still held after the free
    print(applied, mapped, kept >= 200 << 20)
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt / mallinfo2 only")
def test_tuning_keeps_large_blocks_on_the_heap():
    # M_MMAP_THRESHOLD: a 200 MiB block comes from the heap, not from its own mmap;
    # M_TRIM_THRESHOLD: freeing it does not hand the heap's top back to the system. Untuned,
    # the same block is mmapped (the control, so this test fails if the settings do nothing).
    def probe(mode):
        result = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True,
                                text=True, timeout=60, check=True)
        return result.stdout.split()

    assert probe("tuned") == ["True", "0", "True"]
    assert probe("default")[:2] == ["False", "1"]


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("SMINE_JAX_MALLOC_TUNING", "0")
    assert hostmem.tune_malloc() is False


def test_no_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(hostmem, "_glibc_mallopt", lambda: None)
    assert hostmem.tune_malloc() is False


@pytest.mark.parametrize("field, value", [("arena_max", 0), ("mmap_threshold", 2**31),
                                          ("trim_threshold", 1.5), ("arena_max", True)])
def test_bad_settings_name_the_argument(field, value):
    with pytest.raises(ValueError, match=f"^{field}"):
        hostmem.tune_malloc(**{field: value})
