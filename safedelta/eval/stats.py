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
