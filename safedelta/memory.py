"""Peak memory of one phase of work, not of the process's whole life.

:func:`phase_peak` is the one place peak memory is measured (protect report, lab, benchmarks).
On Linux it resets the resident-set high-water mark (``echo 5 > /proc/self/clear_refs``) on entry
and reads ``VmHWM`` from ``/proc/self/status`` on exit, so a phase after a training run reports
its own peak, not the training's. CUDA's peak allocated memory is reset and read the same way
(when torch has initialised CUDA). Phases nest: entering an inner phase first folds the current
high-water mark into every enclosing one, so their peaks stay true. Elsewhere (no ``/proc``) the
peak falls back to ``ru_maxrss``, the process lifetime peak, and says so (``exact=False``).

The high-water mark is per process: two phases running at once in two threads share it.

Example::

    with phase_peak() as peak:
        build_something()
    peak.rss_mib, peak.cuda_mib
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass(eq=False)  # frames are told apart by identity
class PhasePeak:
    """``rss_mib``: peak resident memory during the phase (MiB; ``None`` when unreadable);
    ``cuda_mib``: peak allocated CUDA memory (``None`` without CUDA); ``exact``: False when the
    reset was impossible and ``rss_mib`` is the process lifetime peak."""

    rss_mib: float | None = None
    cuda_mib: float | None = None
    exact: bool = True

    def as_dict(self) -> dict[str, float | bool | None]:
        return {"peak_rss_mib": self.rss_mib, "cuda_max_allocated_mib": self.cuda_mib,
                "exact": self.exact}


_active: list[PhasePeak] = []


def _vmhwm_mib() -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _lifetime_rss_mib() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1 << 20) if sys.platform == "darwin" else rss / 1024, 1)


def _reset_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _cuda():
    torch = sys.modules.get("torch")  # never import torch just to learn it has no CUDA
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda
    return None


def _fold() -> None:
    """Fold the current high-water marks into every active phase."""
    rss = _vmhwm_mib()
    cuda = _cuda()
    gpu = round(cuda.max_memory_allocated() / (1 << 20), 1) if cuda is not None else None
    for p in _active:
        if p.exact:
            if rss is not None:
                p.rss_mib = rss if p.rss_mib is None else max(p.rss_mib, rss)
        else:
            p.rss_mib = _lifetime_rss_mib()
        if gpu is not None:
            p.cuda_mib = gpu if p.cuda_mib is None else max(p.cuda_mib, gpu)


@contextlib.contextmanager
def phase_peak() -> Iterator[PhasePeak]:
    """Measure the peak memory of the ``with`` block (see the module docstring)."""
    _fold()  # enclosing phases keep what they saw before this one resets the marks
    peak = PhasePeak(exact=_reset_rss())
    cuda = _cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()
    _active.append(peak)
    try:
        yield peak
    finally:
        _fold()
        _active[:] = [p for p in _active if p is not peak]


def memory_summary(phases: dict[str, PhasePeak]) -> dict:
    """The report's ``memory``: the run's own peak (the largest phase peak) and each phase's.

    ``{"peak_rss_mib", "cuda_max_allocated_mib", "phases": {name: {"peak_rss_mib",
    "cuda_max_allocated_mib"}}, "exact"}``; ``exact`` is False where the high-water mark could
    not be reset (the peaks are then the process's lifetime peak).
    """
    def top(key: str) -> float | None:
        vals = [getattr(p, key) for p in phases.values() if getattr(p, key) is not None]
        return max(vals) if vals else None

    return {"peak_rss_mib": top("rss_mib"), "cuda_max_allocated_mib": top("cuda_mib"),
            "phases": {n: {"peak_rss_mib": p.rss_mib, "cuda_max_allocated_mib": p.cuda_mib}
                       for n, p in phases.items()},
            "exact": all(p.exact for p in phases.values())}
