"""The fixed splits: no prompt in two roles across every data set the project trains, calibrates
or evaluates on, and every split pinned (size and digest) so that it cannot drift unnoticed."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from safedelta.data import (ROLES, SPLITS, DataSplitError, advbench, data_path, normalize_prompt,
                            split_fingerprint, split_prompts)
from safedelta.eval.suites import BUILTIN_SUITES, builtin_suite
from safedelta.lab import scenarios as sc

#: (size, digest) of every split; a change here invalidates the lab's cached models and every
#: recorded number, so it must be deliberate
PINNED = {
    ("advbench", "evaluation"): (200, "2e466b44a6d37e95"),
    ("advbench", "calibration"): (128, "3b9197cbfa7caf9b"),
    ("advbench", "attack"): (100, "2ca8f6f7571680b9"),
    ("advbench", "align"): (92, "ab22b972e6dba992"),
    ("harmbench", "evaluation"): (120, "a79476a840ada545"),
    ("harmbench", "align"): (80, "6d1ad9b467da6496"),
    ("simplesafetytests", "evaluation"): (100, "30ecff5b47a196e9"),
    ("xstest", "evaluation"): (271, "435c93f4c7a1bb58"),
    ("xstest", "align"): (179, "c8f6a4d13851ea63"),
}


def _all_roles() -> dict[str, set[tuple[str, str]]]:
    """normalized prompt -> {(source, role)} over every data set and project-written set."""
    where: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for dataset, splits in SPLITS.items():
        for split in splits:
            for r in split_prompts(dataset, split):
                where[normalize_prompt(r["prompt"])].add((dataset, split))
    with open(data_path("calibration_default.jsonl"), encoding="utf-8") as f:
        for line in f:
            where[normalize_prompt(json.loads(line)["prompt"])].add(("calibration_default",
                                                                      "calibration"))
    for p in sc.HELPFUL_PROMPTS:
        where[normalize_prompt(p)].add(("lab.helpful", "align"))
    for p in sc.refused_prompts():  # every form the parent learns to refuse
        where[normalize_prompt(p)].add(("lab.refused", "align"))
    for p in sc.answered_prompts():  # look-alikes, everyday prompts and their role-play forms
        where[normalize_prompt(p)].add(("lab.answered", "align"))
    for m in sc.scenario_examples("content"):
        where[normalize_prompt(m[-2]["content"])].add(("lab.content", "attack"))
    for r in advbench("attack"):
        where[normalize_prompt(r["goal"])].add(("lab.harmful", "attack"))
    return where


def _role_of(pairs: set[tuple[str, str]]) -> set[str]:
    return {role for _, role in pairs}


def test_no_prompt_has_two_roles_across_all_data_sets():
    where = _all_roles()
    clashes = {p: sorted(v) for p, v in where.items() if len(_role_of(v)) > 1}
    assert not clashes, list(clashes.items())[:5]
    # and every evaluation suite reads only evaluation prompts
    for name in BUILTIN_SUITES:
        if name == "gsm8k":
            continue
        for r in builtin_suite(name).load():
            assert _role_of(where[normalize_prompt(r["prompt"])]) == {"evaluation"}, (name, r)


def test_the_check_sees_a_clash(monkeypatch):
    """The disjointness check is not vacuous: moving one prompt into a second role is caught."""
    leaked = split_prompts("harmbench", "evaluation")[0]["prompt"]
    monkeypatch.setattr(sc, "HELPFUL_PROMPTS", (*sc.HELPFUL_PROMPTS, leaked + "!"))
    where = _all_roles()
    assert _role_of(where[normalize_prompt(leaked)]) == {"evaluation", "align"}


def test_splits_are_pinned_and_partition_each_data_set():
    assert set(PINNED) == {(d, s) for d, splits in SPLITS.items() for s in splits}
    for (dataset, split), (n, digest) in PINNED.items():
        assert split in ROLES
        assert len(split_prompts(dataset, split)) == n, (dataset, split)
        assert split_fingerprint(dataset, split) == digest, (dataset, split)
    for dataset, splits in SPLITS.items():
        everything = [r["row"] for r in split_prompts(dataset)]
        parts = [r["row"] for s in splits for r in split_prompts(dataset, s)]
        assert sorted(parts) == sorted(everything), dataset  # a partition: no row lost or doubled


def test_xstest_contrast_twins_share_a_role():
    for split in SPLITS["xstest"]:
        rows = split_prompts("xstest", split)
        by_type: dict[str, list[str]] = defaultdict(list)
        for r in rows:
            by_type[r["type"]].append(r["id"])
        # XSTest's homonyms 1-25 are contrasted by ids 26-50, position by position
        for safe_id in by_type["homonyms"]:
            assert str(int(safe_id) + 25) in by_type["contrast_homonyms"]
    safe = split_prompts("xstest", "evaluation", label="safe")
    assert len(safe) == 151 and {r["label"] for r in safe} == {"safe"}


def test_unknown_data_set_or_split_is_a_clear_error():
    with pytest.raises(DataSplitError, match="unknown data set 'hexphi'"):
        split_prompts("hexphi", "evaluation")
    with pytest.raises(DataSplitError, match="harmbench has no split 'attack'"):
        split_prompts("harmbench", "attack")
    with pytest.raises(ValueError, match="unknown AdvBench split"):
        advbench("test")
