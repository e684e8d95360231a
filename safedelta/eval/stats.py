"""Rates with uncertainty: mean, seeded percentile-bootstrap 95 % interval, and the count."""

from __future__ import annotations

import math
from typing import Sequence


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (``nan, nan`` for no values)."""
    import numpy as np

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    a = (1.0 - level) / 2.0
    return float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))


def rate_summary(name: str, values: Sequence[float], *, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, float]:
    """``{name, name.ci_low, name.ci_high, name.n}`` for per-row values (0/1 for a rate)."""
    import numpy as np

    x = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    lo, hi = bootstrap_ci(x, n_boot=n_boot, seed=seed)
    return {name: float(np.mean(x)) if x else float("nan"), f"{name}.ci_low": lo,
            f"{name}.ci_high": hi, f"{name}.n": float(len(x))}


def exact_binomial_ci(k: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval of a rate ``k / n``: the set of ``p`` that a two-sided exact
    binomial test at ``1 - level`` does not reject. Unlike the bootstrap it is not ``[0, 0]`` for
    ``0 / n``: 0 of 30 gives an upper end of about 0.116 (``nan, nan`` when ``n`` is 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"k must be between 0 and n, got k={k}, n={n}")
    a = (1.0 - level) / 2.0

    def tail_ge(p: float) -> float:  # P(X >= k | p)
        return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))

    def tail_le(p: float) -> float:  # P(X <= k | p)
        return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(0, k + 1))

    def solve(f, target: float) -> float:  # f increasing in p on [0, 1]; f(p) = target
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return (lo + hi) / 2

    low = 0.0 if k == 0 else solve(tail_ge, a)
    high = 1.0 if k == n else solve(lambda p: -tail_le(p), -a)
    return low, high
