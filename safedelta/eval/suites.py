"""Prompt suites: small declarative objects naming a file, a prompt column and what kind of
prompts it holds.

Shipped suites (each file beside its LICENSE and NOTICE under ``safedelta/data``):

========================  =====================  =====  ==========================================
name                      kind                   rows   source (form of the prompts)
========================  =====================  =====  ==========================================
``advbench``              harmful                200    AdvBench *evaluation* split (imperatives:
                                                        "Write a tutorial on ...")
``harmbench``             harmful                120    HarmBench standard behaviours, *evaluation*
                                                        split (imperatives, 6 semantic categories)
``simplesafetytests``     harmful                100    SimpleSafetyTests, all (questions and
                                                        requests: "What is the easiest way ...?")
``xstest-unsafe``         harmful                120    XSTest ``unsafe`` prompts of the
                                                        *evaluation* split (questions)
``xstest-safe``           benign-should-answer   151    XSTest ``safe`` prompts of the
                                                        *evaluation* split (over-refusal)
``gsm8k``                 task                   1319   GSM8K test set (exact-match accuracy)
========================  =====================  =====  ==========================================

The splits are fixed in :mod:`safedelta.data` (``SPLITS``): no suite prompt is ever in an
alignment, attack or calibration split.

A user suite is a CSV or JSONL file (e.g. HEx-PHI, an internal red-team set)::

    load_suite("hexphi.csv", kind="harmful", prompt_column="prompt")
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from safedelta.errors import SafeDeltaError

SuiteKind = Literal["harmful", "benign-should-answer", "task"]
TaskMetric = Literal["gsm8k", "rouge", "exact"]
SUITE_KINDS: tuple[str, ...] = ("harmful", "benign-should-answer", "task")


class SuiteError(SafeDeltaError, ValueError):
    """A prompt suite cannot be loaded (unknown name, missing file or column, no rows)."""


@dataclass(frozen=True)
class Suite:
    """A prompt suite.

    Args:
        name: short name used in metric names (``asr.<name>``) and tables.
        file: CSV or JSONL file of prompts (``None`` only for inline ``prompts``).
        kind: ``harmful`` (attack success is measured), ``benign-should-answer`` (over-refusal is
            measured) or ``task`` (utility against ``reference_column``).
        prompt_column: column (CSV) or key (JSONL) holding the prompt.
        reference_column: for ``task`` suites, the expected answer.
        metric: for ``task`` suites, ``gsm8k`` (exact match on the final number), ``rouge``
            (ROUGE-1/2/L F1) or ``exact`` (stripped string equality).
        where: keep only rows whose columns equal these values, e.g. ``{"label": "safe"}``.
        split: for a shipped data set, ``(dataset, split)`` of :func:`safedelta.data.split_prompts`
            (``where`` then filters its rows, e.g. ``{"label": "safe"}``).
        prompts: inline prompts (tests, small ad-hoc suites); overrides ``file``.
        references: expected answers for inline ``task`` prompts (same order).
        license: a short licence note recorded in reports.
    """

    name: str
    file: Path | None = None
    kind: SuiteKind = "harmful"
    prompt_column: str = "prompt"
    reference_column: str | None = None
    metric: TaskMetric | None = None
    where: tuple[tuple[str, str], ...] = ()
    split: tuple[str, str] | None = None
    prompts: tuple[str, ...] | None = None
    references: tuple[str, ...] | None = None
    license: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SUITE_KINDS:
            raise SuiteError(f"suite {self.name!r}: unknown kind {self.kind!r}; "
                             f"choose one of {', '.join(SUITE_KINDS)}")
        if self.kind == "task" and self.metric is None:
            raise SuiteError(f"suite {self.name!r}: a task suite needs a metric "
                             "(gsm8k, rouge or exact)")
        if self.file is None and self.prompts is None:
            raise SuiteError(f"suite {self.name!r}: give a file or inline prompts")

    def load(self, limit: int | None = None) -> list[dict]:
        """The suite's rows as ``{"prompt_id", "prompt", "reference"}`` dicts (first ``limit``)."""
        if self.prompts is not None:
            refs = self.references or (None,) * len(self.prompts)
            rows = [{"prompt_id": i, "prompt": p, "reference": r}
                    for i, (p, r) in enumerate(zip(self.prompts, refs))]
        elif self.split is not None:
            from safedelta.data import split_prompts

            rows = [{"prompt_id": r["row"], "prompt": r["prompt"], "reference": None}
                    for r in split_prompts(*self.split)
                    if all(str(r.get(k)) == v for k, v in self.where)]
        else:
            rows = self._read_file()
        if not rows:
            raise SuiteError(f"suite {self.name!r} has no prompts"
                             + (f" in '{self.file}'" if self.file else ""))
        return rows[:limit] if limit is not None else rows

    def fingerprint(self, limit: int | None = None) -> str:
        """Digest of the suite's definition and its prompts (a cache key part)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([self.name, self.kind, [r["prompt"] for r in self.load(limit)]],
                            ensure_ascii=False).encode("utf-8"))
        return h.hexdigest()

    def describe(self) -> dict:
        """What a report records about the suite."""
        return {"name": self.name, "kind": self.kind, "file": str(self.file) if self.file else None,
                "prompt_column": self.prompt_column, "metric": self.metric,
                "where": dict(self.where),
                "split": "/".join(self.split) if self.split else None,
                "license": self.license}

    def _read_file(self) -> list[dict]:
        path = Path(self.file)
        if not path.is_file():
            raise SuiteError(f"suite {self.name!r}: file '{path}' does not exist")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                records = list(csv.DictReader(f))
        elif suffix in (".jsonl", ".json"):
            records = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        records.append(json.loads(line))
                    except ValueError as exc:
                        raise SuiteError(f"suite {self.name!r}: '{path}' line {n} is not JSON: "
                                         f"{exc}") from exc
        else:
            raise SuiteError(f"suite {self.name!r}: '{path}' is neither .csv nor .jsonl")
        if records and self.prompt_column not in records[0]:
            raise SuiteError(f"suite {self.name!r}: '{path}' has no column "
                             f"{self.prompt_column!r}; columns: {', '.join(records[0])}")
        if self.reference_column and records and self.reference_column not in records[0]:
            raise SuiteError(f"suite {self.name!r}: '{path}' has no reference column "
                             f"{self.reference_column!r}; columns: {', '.join(records[0])}")
        rows = []
        for i, r in enumerate(records):
            if any(str(r.get(k)) != v for k, v in self.where):
                continue
            rows.append({"prompt_id": int(r["id"]) if str(r.get("id", "")).isdigit() else i,
                         "prompt": r[self.prompt_column],
                         "reference": r.get(self.reference_column) if self.reference_column
                         else None})
        return rows


_XSTEST_LICENSE = "CC-BY-4.0 (XSTest, Roettger et al. NAACL 2024)"


def _builtin(name: str) -> Suite:
    from safedelta.data import HARMBENCH_FILE, SST_FILE, XSTEST_FILE, data_path

    xstest = data_path(*XSTEST_FILE)
    table = {
        "advbench": Suite("advbench", data_path("advbench", "harmful_behaviors.csv"),
                          kind="harmful", prompt_column="goal",
                          split=("advbench", "evaluation"),
                          license="MIT (AdvBench, Zou et al. 2023)"),
        "harmbench": Suite("harmbench", data_path(*HARMBENCH_FILE), kind="harmful",
                           prompt_column="Behavior", split=("harmbench", "evaluation"),
                           license="MIT (HarmBench, Mazeika et al. 2024)"),
        "simplesafetytests": Suite("simplesafetytests", data_path(*SST_FILE), kind="harmful",
                                   prompt_column="prompts_final",
                                   split=("simplesafetytests", "evaluation"),
                                   license="CC-BY-4.0 (SimpleSafetyTests, Vidgen et al. 2023)"),
        "xstest-safe": Suite("xstest-safe", xstest, kind="benign-should-answer",
                             where=(("label", "safe"),), split=("xstest", "evaluation"),
                             license=_XSTEST_LICENSE),
        "xstest-unsafe": Suite("xstest-unsafe", xstest, kind="harmful",
                               where=(("label", "unsafe"),), split=("xstest", "evaluation"),
                               license=_XSTEST_LICENSE),
        "gsm8k": Suite("gsm8k", data_path("gsm8k", "test.jsonl"), kind="task",
                       prompt_column="question", reference_column="answer", metric="gsm8k",
                       license="MIT (GSM8K, Cobbe et al. 2021)"),
    }
    return table[name]


BUILTIN_SUITES: tuple[str, ...] = ("advbench", "harmbench", "simplesafetytests", "xstest-safe",
                                   "xstest-unsafe", "gsm8k")


def builtin_suite(name: str) -> Suite:
    """A shipped suite by name (one of :data:`BUILTIN_SUITES`, see the module table)."""
    if name not in BUILTIN_SUITES:
        raise SuiteError(f"unknown built-in suite {name!r}; choose one of "
                         f"{', '.join(BUILTIN_SUITES)}, or give a CSV/JSONL file")
    return _builtin(name)


def load_suite(spec: str | Path | Suite, *, kind: SuiteKind = "harmful",
               prompt_column: str | None = None, name: str | None = None,
               reference_column: str | None = None, metric: TaskMetric | None = None) -> Suite:
    """A suite from a built-in name, a CSV/JSONL path, or a :class:`Suite` (returned as is).

    For a file, ``prompt_column`` defaults to the first of ``prompt``, ``goal``, ``instruction``,
    ``question`` found in the file; ``name`` defaults to the file's stem.
    """
    if isinstance(spec, Suite):
        return spec
    if isinstance(spec, str) and spec in BUILTIN_SUITES:
        return builtin_suite(spec)
    path = Path(spec)
    if not path.is_file():
        raise SuiteError(f"{str(spec)!r} is neither a built-in suite ({', '.join(BUILTIN_SUITES)}) "
                         "nor an existing CSV/JSONL file")
    if prompt_column is None:
        cols = _columns(path)
        prompt_column = next((c for c in ("prompt", "goal", "instruction", "question")
                              if c in cols), None)
        if prompt_column is None:
            raise SuiteError(f"'{path}': no prompt column found (looked for prompt, goal, "
                             f"instruction, question); columns: {', '.join(cols)}; "
                             "name it with prompt_column")
    return Suite(name or path.stem, path, kind=kind, prompt_column=prompt_column,
                 reference_column=reference_column,
                 metric=metric or ("exact" if kind == "task" else None))


def _columns(path: Path) -> list[str]:
    """Column names of a CSV header or of a JSONL file's first record."""
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".csv":
            return next(csv.reader(f), [])
        for line in f:
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError as exc:
                    raise SuiteError(f"'{path}' first record is not JSON: {exc}") from exc
                return list(rec) if isinstance(rec, dict) else []
    return []
