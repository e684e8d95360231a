"""Per-phase peak memory: a phase reports its own peak, not the process's lifetime peak."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from safedelta.memory import memory_summary, phase_peak

linux = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists()
                           or not sys.platform.startswith("linux"),
                           reason="needs Linux /proc/self/clear_refs")


def _touch(mib: int) -> bytearray:
    buf = bytearray(mib << 20)
    for i in range(0, len(buf), 4096):  # fault every page in
        buf[i] = 1
    return buf


@linux
def test_a_later_small_phase_does_not_report_an_earlier_big_one():
    with phase_peak() as big:
        buf = _touch(300)
        del buf
    with phase_peak() as small:
        _touch(10)
    assert big.exact and small.exact
    assert big.rss_mib - small.rss_mib > 200


@linux
def test_an_enclosing_phase_keeps_the_peak_seen_before_an_inner_reset():
    with phase_peak() as outer:
        buf = _touch(300)
        del buf
        with phase_peak() as inner:
            _touch(10)
    assert outer.rss_mib - inner.rss_mib > 200


def test_summary_takes_the_largest_phase():
    with phase_peak() as a:
        pass
    s = memory_summary({"validate": a, "stream": a})
    assert set(s["phases"]) == {"validate", "stream"}
    assert s["peak_rss_mib"] == a.rss_mib and s["peak_rss_mib"] > 0
