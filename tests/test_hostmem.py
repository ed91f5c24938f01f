"""Host allocator tuning: applied on glibc, a clean no-op elsewhere or when switched off."""

from __future__ import annotations

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
