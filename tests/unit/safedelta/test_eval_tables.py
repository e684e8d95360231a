"""Checks on result tables: a malformed table is an error naming the check, with either engine
(pandas, the default, and great-expectations) giving the same verdicts and names."""

from __future__ import annotations

import pandas as pd
import pytest

from safedelta.eval import TableValidationError, validate_table


def _table(n=3, models=("aligned", "protected")):
    rows = []
    for m in models:
        for i in range(n):
            rows.append({"model": m, "suite": "s", "kind": "harmful", "prompt_id": i,
                         "prompt": f"prompt {i}", "generation": f"answer {i}",
                         "refused": i % 2 == 0, "harmful": float(i % 2), "score": None,
                         "judge": "keyword"})
    return pd.DataFrame(rows)


@pytest.fixture(params=["pandas", "great-expectations"], autouse=True)
def engine(request, monkeypatch):
    monkeypatch.setattr("safedelta.eval.tables.DEFAULT_ENGINE", request.param)
    return request.param


def _check(df, n=3, models=("aligned", "protected"), **kw):
    from safedelta.eval import tables

    validate_table(df, suite="s", kind=kw.pop("kind", "harmful"), models=list(models),
                   prompt_ids=list(range(n)), engine=tables.DEFAULT_ENGINE, **kw)


def test_a_well_formed_table_passes():
    _check(_table())


def _broken(kind):
    df = _table()
    if kind == "empty generation":
        df.loc[1, "generation"] = "   "
    elif kind == "missing prompt":
        df.loc[2, "prompt"] = None
    elif kind == "unanswered prompt":
        df = df.drop(index=4).reset_index(drop=True)
    elif kind == "label out of range":
        df.loc[0, "harmful"] = 2.0
    elif kind == "missing column":
        df = df.drop(columns=["refused"])
    elif kind == "duplicate row":
        df.loc[5, "prompt_id"] = 0
    return df


@pytest.mark.parametrize("kind, expectation, column", [
    ("empty generation", "expect_column_values_to_not_match_regex", "generation"),
    ("missing prompt", "expect_column_values_to_not_be_null", "prompt"),
    ("unanswered prompt", "expect_table_row_count_to_equal", None),
    ("label out of range", "expect_column_values_to_be_in_set", "harmful"),
    ("missing column", "expect_table_columns_to_match_set", None),
    ("duplicate row", "expect_compound_columns_to_be_unique", None),
])
def test_malformed_tables_are_rejected_by_name(kind, expectation, column):
    with pytest.raises(TableValidationError) as ei:
        _check(_broken(kind))
    assert expectation in ei.value.failed
    assert expectation in str(ei.value) and "suite 's'" in str(ei.value)
    if column:
        assert f"{expectation}({column})" in str(ei.value)


def test_judge_scores_and_task_columns_must_be_in_range():
    df = _table()
    df["score"] = [1.0, 5.0, 3.0, 2.0, 7.0, 1.0]
    with pytest.raises(TableValidationError, match=r"expect_column_values_to_be_between\(score\)"):
        _check(df, score_range=(1.0, 5.0))
    df["score"] = [1.0, 5.0, 3.0, 2.0, None, 1.0]
    with pytest.raises(TableValidationError, match=r"expect_column_values_to_not_be_null\(score\)"):
        _check(df, score_range=(1.0, 5.0))
    t = _table()
    t["kind"], t["harmful"] = "task", None
    t["gsm8k_accuracy"] = [1.0, 0.0, 1.0, 0.0, 1.0, 1.5]
    with pytest.raises(TableValidationError, match=r"be_between\(gsm8k_accuracy\)"):
        _check(t, kind="task", task_columns=["gsm8k_accuracy"])
    t["gsm8k_accuracy"] = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    _check(t, kind="task", task_columns=["gsm8k_accuracy"])


def test_an_unknown_engine_is_refused():
    with pytest.raises(TableValidationError, match="unknown validation engine"):
        validate_table(_table(), suite="s", kind="harmful", models=["aligned", "protected"],
                       prompt_ids=[0, 1, 2], engine="spark")
