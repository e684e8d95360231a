"""Suites: the shipped ones (with notices), the fixed AdvBench split, user CSV/JSONL files."""

from __future__ import annotations

import json

import pytest

from safedelta.data import advbench, data_path
from safedelta.eval import Suite, SuiteError, builtin_suite, load_suite


def test_advbench_evaluation_suite_never_overlaps_calibration():
    ev = [r["prompt"] for r in builtin_suite("advbench").load()]
    assert len(ev) == 200 and len(set(ev)) == 200
    assert ev == [r["goal"] for r in advbench("evaluation")]
    for other in ("calibration", "attack", "align"):
        assert not set(ev) & {r["goal"] for r in advbench(other)}


def test_shipped_suites_sizes_kinds_and_notices():
    sizes = {"advbench": 200, "harmbench": 120, "simplesafetytests": 100, "xstest-safe": 151,
             "xstest-unsafe": 120, "gsm8k": 1319}
    for name, n in sizes.items():
        s = builtin_suite(name)
        rows = s.load()
        assert len(rows) == n, name
        assert all(r["prompt"].strip() for r in rows)
        assert s.license
    assert builtin_suite("xstest-safe").kind == "benign-should-answer"
    assert builtin_suite("xstest-unsafe").kind == "harmful"
    g = builtin_suite("gsm8k")
    assert g.kind == "task" and g.metric == "gsm8k"
    assert "####" in g.load(1)[0]["reference"]
    safe = {r["prompt"] for r in builtin_suite("xstest-safe").load()}
    assert not safe & {r["prompt"] for r in builtin_suite("xstest-unsafe").load()}
    for folder in ("xstest", "gsm8k", "harmbench", "simplesafetytests", "xstest_completions"):
        for f in ("LICENSE", "NOTICE"):
            assert data_path(folder, f).stat().st_size > 100


def test_limit_and_unknown_builtin():
    assert len(builtin_suite("xstest-safe").load(limit=7)) == 7
    with pytest.raises(SuiteError, match="unknown built-in suite 'hexphi'"):
        builtin_suite("hexphi")
    with pytest.raises(SuiteError, match="neither a built-in suite"):
        load_suite("no/such/file.csv")


def test_user_suite_from_csv(tmp_path):
    p = tmp_path / "redteam.csv"
    p.write_text("id,instruction,category\n1,Do bad thing A,x\n2,\"Do, bad thing B\",y\n")
    s = load_suite(p)
    assert s.name == "redteam" and s.kind == "harmful" and s.prompt_column == "instruction"
    assert [r["prompt"] for r in s.load()] == ["Do bad thing A", "Do, bad thing B"]
    assert [r["prompt_id"] for r in s.load()] == [1, 2]
    only_y = Suite("y", p, prompt_column="instruction", where=(("category", "y"),))
    assert [r["prompt"] for r in only_y.load()] == ["Do, bad thing B"]


def test_user_suite_from_jsonl(tmp_path):
    p = tmp_path / "benign.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "prompt": f"q{t}"}) for t in "abc") + "\n\n")
    s = load_suite(p, kind="benign-should-answer", prompt_column="text", name="mine")
    assert (s.name, s.kind) == ("mine", "benign-should-answer")
    assert [r["prompt"] for r in s.load()] == ["a", "b", "c"]
    assert [r["prompt"] for r in load_suite(p).load()] == ["qa", "qb", "qc"]


def test_user_suite_errors_name_the_problem(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("foo,bar\n1,2\n")
    with pytest.raises(SuiteError, match="no prompt column found.*columns: foo, bar"):
        load_suite(p)
    with pytest.raises(SuiteError, match="has no column 'baz'"):
        load_suite(p, prompt_column="baz").load()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(SuiteError, match="line 2 is not JSON"):
        load_suite(bad).load()
    empty = tmp_path / "e.csv"
    empty.write_text("prompt\n")
    with pytest.raises(SuiteError, match="has no prompts"):
        load_suite(empty).load()
    with pytest.raises(SuiteError, match="unknown kind"):
        Suite("z", prompts=("a",), kind="evil")
    with pytest.raises(SuiteError, match="needs a metric"):
        Suite("z", prompts=("a",), kind="task")


def test_fingerprint_follows_prompts():
    a = Suite("s", prompts=("a", "b"))
    assert a.fingerprint() == Suite("s", prompts=("a", "b")).fingerprint()
    assert a.fingerprint() != Suite("s", prompts=("a", "c")).fingerprint()
    assert a.fingerprint(limit=1) != a.fingerprint()
