"""Data shipped with safedelta, each file beside its LICENSE and NOTICE.

AdvBench (MIT) is split once, deterministically, into four disjoint parts so that the prompts
used to *align* a parent, to *attack* it by fine-tuning, to *calibrate* Safe Delta and to
*evaluate* the result never overlap:

- rows are ordered by ``sha256(goal)`` (independent of the file's topic grouping);
- ``evaluation``: positions 0-199 (200 prompts), ``calibration``: 200-327 (128, the paper's
  calibration size), ``attack``: 328-427 (100, the paper's PureBad size), ``align``: 428-519 (92).

``advbench(split)`` returns the rows of one part as ``{"goal", "target", "row"}`` dicts (``row`` is
the 0-based data row in ``harmful_behaviors.csv``).
"""

from __future__ import annotations

import csv
import hashlib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

AdvBenchSplit = Literal["evaluation", "calibration", "attack", "align", "all"]

ADVBENCH_SPLITS: dict[str, tuple[int, int]] = {
    "evaluation": (0, 200),
    "calibration": (200, 328),
    "attack": (328, 428),
    "align": (428, 520),
}


def data_path(*parts: str) -> Path:
    """Path of a shipped data file, e.g. ``data_path("advbench", "harmful_behaviors.csv")``."""
    return Path(str(resources.files("safedelta.data").joinpath(*parts)))


@lru_cache(maxsize=1)
def _advbench_rows() -> tuple[dict, ...]:
    with open(data_path("advbench", "harmful_behaviors.csv"), newline="", encoding="utf-8") as f:
        return tuple({"goal": r["goal"], "target": r["target"], "row": i}
                     for i, r in enumerate(csv.DictReader(f)))


def advbench(split: AdvBenchSplit = "all") -> list[dict]:
    """The AdvBench rows of one fixed split (see module docstring)."""
    rows = _advbench_rows()
    if split == "all":
        return [dict(r) for r in rows]
    if split not in ADVBENCH_SPLITS:
        raise ValueError(f"unknown AdvBench split {split!r}; choose one of "
                         f"{', '.join([*ADVBENCH_SPLITS, 'all'])}")
    order = sorted(rows, key=lambda r: hashlib.sha256(r["goal"].encode("utf-8")).hexdigest())
    lo, hi = ADVBENCH_SPLITS[split]
    return [dict(r) for r in order[lo:hi]]
