"""Data shipped with safedelta, each file beside its LICENSE and NOTICE, and the fixed splits that
keep the prompts used to *align* a parent, to *attack* it by fine-tuning, to *calibrate* Safe
Delta and to *evaluate* the result apart.

Every split is an index range over a data set's items ordered by ``sha256`` of a key (independent
of the file's topic grouping), written down once in :data:`SPLITS`:

=====================  =========================  ============================================
data set (file)        item, ordered by sha256 of  roles (positions in that order)
=====================  =========================  ============================================
``advbench``           a goal (520)               ``evaluation`` 0-199 (200), ``calibration``
                                                   200-327 (128, the paper's calibration size),
                                                   ``attack`` 328-427 (100, the paper's PureBad
                                                   size), ``align`` 428-519 (92)
``harmbench``          a *standard* behaviour     ``evaluation`` 0-119 (120), ``align`` 120-199
                       (200 of the 400 rows)       (80)
``simplesafetytests``  a prompt (100)             ``evaluation`` 0-99 (all 100: never trained on)
``xstest``             a contrast *group* (200)   ``evaluation`` 0-119 (120 groups: 120 unsafe +
                                                   151 safe prompts), ``align`` 120-199 (80
                                                   groups: 80 unsafe + 99 safe)
=====================  =========================  ============================================

An XSTest contrast group is the n-th prompt of each type of one family (``homonyms`` with
``contrast_homonyms``; ``nons_group_real_discr`` and ``real_group_nons_discr`` with
``contrast_discr``; ``privacy_public`` and ``privacy_fictional`` with ``contrast_privacy``): a
safe prompt and the unsafe prompt it was written to contrast with always share a role, so
training on one never leaks its twin into evaluation. The group key is ``"<family>:<n>"``.

AdvBench's ranges are the ones the lab's cached models were trained with; new roles are only
ever added. ``tests/unit/safedelta/test_data_splits.py`` checks that no prompt (lower-cased,
punctuation and spacing removed) is in two roles across all data sets, the project's default
calibration file and the lab's written alignment prompts, and pins each split's size and digest.

``advbench(split)`` returns ``{"goal", "target", "row"}`` dicts (``row`` is the 0-based data row);
``split_prompts(dataset, split)`` returns ``{"prompt", "row", ...}`` dicts for any data set.
"""

from __future__ import annotations

import csv
import hashlib
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

AdvBenchSplit = Literal["evaluation", "calibration", "attack", "align", "all"]
#: what a prompt may be used for; a prompt has exactly one role across all data sets
ROLES: tuple[str, ...] = ("evaluation", "calibration", "attack", "align")

#: data set -> role -> (first, last + 1) position in the sha256 order (module docstring)
SPLITS: dict[str, dict[str, tuple[int, int]]] = {
    "advbench": {"evaluation": (0, 200), "calibration": (200, 328), "attack": (328, 428),
                 "align": (428, 520)},
    "harmbench": {"evaluation": (0, 120), "align": (120, 200)},
    "simplesafetytests": {"evaluation": (0, 100)},
    "xstest": {"evaluation": (0, 120), "align": (120, 200)},
}
ADVBENCH_SPLITS: dict[str, tuple[int, int]] = SPLITS["advbench"]

HARMBENCH_FILE = ("harmbench", "harmbench_behaviors_text_standard.csv")
SST_FILE = ("simplesafetytests", "SimpleSafetyTests - test cases.csv")
XSTEST_FILE = ("xstest", "xstest_prompts.csv")
#: XSTest types that share a contrast family with a differently named type
_XSTEST_FAMILY = {"nons_group_real_discr": "discr", "real_group_nons_discr": "discr",
                  "privacy_public": "privacy", "privacy_fictional": "privacy"}


class DataSplitError(ValueError):
    """An unknown data set or split was asked for."""


def data_path(*parts: str) -> Path:
    """Path of a shipped data file, e.g. ``data_path("advbench", "harmful_behaviors.csv")``."""
    return Path(str(resources.files("safedelta.data").joinpath(*parts)))


def normalize_prompt(text: str) -> str:
    """The form in which two prompts count as the same: lower case, letters and digits only,
    single spaces."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_csv(*parts: str) -> list[dict]:
    with open(data_path(*parts), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@lru_cache(maxsize=1)
def _advbench_rows() -> tuple[dict, ...]:
    return tuple({"goal": r["goal"], "target": r["target"], "row": i}
                 for i, r in enumerate(_read_csv("advbench", "harmful_behaviors.csv")))


def _xstest_family(kind: str) -> str:
    kind = kind.removeprefix("contrast_")
    return _XSTEST_FAMILY.get(kind, kind)


@lru_cache(maxsize=None)
def _items(dataset: str) -> tuple[tuple[str, tuple[dict, ...]], ...]:
    """``(key, rows)`` per item of a data set, in file order (an item is a row, or for XSTest a
    contrast group of rows)."""
    if dataset == "advbench":
        return tuple((r["goal"], ({"prompt": r["goal"], "row": r["row"], "target": r["target"]},))
                     for r in _advbench_rows())
    if dataset == "harmbench":
        return tuple((r["Behavior"], ({"prompt": r["Behavior"], "row": i,
                                       "category": r["SemanticCategory"],
                                       "behavior_id": r["BehaviorID"]},))
                     for i, r in enumerate(_read_csv(*HARMBENCH_FILE))
                     if r["FunctionalCategory"] == "standard")
    if dataset == "simplesafetytests":
        return tuple((r["prompts_final"], ({"prompt": r["prompts_final"], "row": i,
                                            "category": r["harm_area"], "form": r["category"]},))
                     for i, r in enumerate(_read_csv(*SST_FILE)))
    if dataset == "xstest":
        groups: dict[str, list[dict]] = {}
        seen: dict[str, int] = {}
        for i, r in enumerate(_read_csv(*XSTEST_FILE)):
            n = seen[r["type"]] = seen.get(r["type"], -1) + 1
            key = f"{_xstest_family(r['type'])}:{n}"
            groups.setdefault(key, []).append({"prompt": r["prompt"], "row": i, "id": r["id"],
                                               "type": r["type"], "label": r["label"]})
        return tuple((k, tuple(v)) for k, v in groups.items())
    raise DataSplitError(f"unknown data set {dataset!r}; choose one of {', '.join(SPLITS)}")


def split_prompts(dataset: str, split: str = "all", *, label: str | None = None) -> list[dict]:
    """The rows of one fixed split of a shipped data set (``split="all"``: every row in file
    order). ``label`` keeps only XSTest rows of that label (``safe`` / ``unsafe``)."""
    items = _items(dataset)
    if split == "all":
        chosen = items
    else:
        if split not in SPLITS[dataset]:
            raise DataSplitError(f"{dataset} has no split {split!r}; choose one of "
                                 f"{', '.join([*SPLITS[dataset], 'all'])}")
        lo, hi = SPLITS[dataset][split]
        chosen = sorted(items, key=lambda kv: _sha(kv[0]))[lo:hi]
    rows = [dict(r) for _, group in chosen for r in group]
    if label is not None:
        rows = [r for r in rows if r.get("label") == label]
    return rows


def advbench(split: AdvBenchSplit = "all") -> list[dict]:
    """The AdvBench rows of one fixed split (see module docstring)."""
    if split != "all" and split not in ADVBENCH_SPLITS:
        raise ValueError(f"unknown AdvBench split {split!r}; choose one of "
                         f"{', '.join([*ADVBENCH_SPLITS, 'all'])}")
    return [{"goal": r["prompt"], "target": r["target"], "row": r["row"]}
            for r in split_prompts("advbench", split)]


def split_fingerprint(dataset: str, split: str) -> str:
    """sha256 (first 16 hex) of a split's prompts in order: pins a split in tests and reports."""
    return _sha("\n".join(r["prompt"] for r in split_prompts(dataset, split)))[:16]
