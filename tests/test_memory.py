"""Tests of pipeline.memory: glibc's malloc settings for long stages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pipeline import memory


def test_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="threshold_bytes must be >= 1"):
        memory.fix_malloc_thresholds(0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_thresholds_take_effect_and_freed_buffers_leave_the_process():
    # in a fresh process: after the call, a freed 20 MB buffer is gone from the resident set at once (mapped on its
    # own), where glibc's default would have moved the threshold above it and kept the next ones in the heap
    code = textwrap.dedent("""
        import ctypes, sys
        from pipeline import memory
        from benchmarks.common import current_rss_mb
        assert memory.fix_malloc_thresholds(1 << 20) is True
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        base = current_rss_mb()
        for _ in range(5):
            p = libc.malloc(20 << 20)
            ctypes.memset(p, 1, 20 << 20)
            libc.free(p)
        assert current_rss_mb() - base < 10, current_rss_mb() - base
        assert memory.release_free_memory() is True
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
