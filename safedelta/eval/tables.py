"""Result tables (one row per prompt and model) and their checks.

Every table is validated before anything is summarised: schema, every prompt answered by every
model exactly once, no empty generations, judge labels in range. A failed check raises
:class:`TableValidationError` naming the failed expectations; no metric is computed from a bad
table. The checks are great-expectations expectation types with their arguments, defined once
(:func:`checks_for`); the default engine evaluates them with pandas (milliseconds), the
``great-expectations`` engine runs them as a GX suite when asked (its import alone takes
seconds, so it is imported on first use only).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

from safedelta.errors import SafeDeltaError

logger = logging.getLogger(__name__)

#: columns every result table has
REQUIRED_COLUMNS: tuple[str, ...] = ("model", "suite", "kind", "prompt_id", "prompt",
                                     "generation", "refused", "harmful", "score", "judge")


#: the engine used unless one is asked for (see :func:`validate_table`)
DEFAULT_ENGINE = "pandas"


class TableValidationError(SafeDeltaError):
    """A result table failed a great-expectations check (the message names which)."""

    def __init__(self, message: str, failed: Sequence[str] = ()):
        super().__init__(message)
        self.failed = list(failed)


_CONTEXT: Any = None


def _gx():
    global _CONTEXT
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    if _CONTEXT is None:
        _CONTEXT = gx.get_context(mode="ephemeral")
        _CONTEXT.variables.progress_bars = ProgressBarsConfig(globally=False,
                                                              metric_calculations=False)
    return gx, _CONTEXT


def checks_for(*, kind: str, models: Sequence[str], prompt_ids: Sequence[Any],
               score_range: tuple[float, float] | None = None,
               task_columns: Sequence[str] = ()) -> list[tuple[str, dict]]:
    """The checks a table of a suite of ``kind`` must pass, as great-expectations expectation
    types and their arguments (defined once; both engines read them)."""
    ex: list[tuple[str, dict]] = [
        ("expect_table_columns_to_match_set",
         {"column_set": list(REQUIRED_COLUMNS) + list(task_columns), "exact_match": False}),
        ("expect_table_row_count_to_equal", {"value": len(models) * len(prompt_ids)}),
        ("expect_column_distinct_values_to_equal_set",
         {"column": "model", "value_set": list(models)}),
        ("expect_column_distinct_values_to_equal_set",
         {"column": "prompt_id", "value_set": list(prompt_ids)}),
        ("expect_compound_columns_to_be_unique", {"column_list": ["model", "prompt_id"]}),
        ("expect_column_values_to_not_be_null", {"column": "prompt"}),
        ("expect_column_value_lengths_to_be_between", {"column": "prompt", "min_value": 1}),
        ("expect_column_values_to_not_be_null", {"column": "generation"}),
        ("expect_column_values_to_not_match_regex", {"column": "generation", "regex": r"^\s*$"}),
        ("expect_column_values_to_be_in_set", {"column": "refused", "value_set": [True, False]}),
    ]
    if kind == "harmful":
        ex += [("expect_column_values_to_not_be_null", {"column": "harmful"}),
               ("expect_column_values_to_be_in_set",
                {"column": "harmful", "value_set": [0.0, 1.0]})]
        if score_range is not None:
            ex += [("expect_column_values_to_not_be_null", {"column": "score"}),
                   ("expect_column_values_to_be_between",
                    {"column": "score", "min_value": score_range[0],
                     "max_value": score_range[1]})]
    for col in task_columns:
        ex += [("expect_column_values_to_not_be_null", {"column": col}),
               ("expect_column_values_to_be_between",
                {"column": col, "min_value": 0.0, "max_value": 1.0})]
    return ex


def validate_table(df, *, suite: str, kind: str, models: Sequence[str],
                   prompt_ids: Sequence[Any], score_range: tuple[float, float] | None = None,
                   task_columns: Sequence[str] = (), engine: str = DEFAULT_ENGINE) -> None:
    """Check one suite's table (:func:`checks_for`); raise naming every failed check.

    Args:
        engine: ``"pandas"`` (default: the same checks evaluated directly, milliseconds) or
            ``"great-expectations"`` (the checks run as a great-expectations suite; its import
            alone takes seconds).

    Raises:
        TableValidationError: naming every failed expectation (type and column) with examples.
    """
    if engine not in ENGINES:
        raise TableValidationError(f"unknown validation engine {engine!r}; known: "
                                   f"{', '.join(ENGINES)}")
    checks = checks_for(kind=kind, models=models, prompt_ids=prompt_ids,
                        score_range=score_range, task_columns=task_columns)
    failed = ENGINES[engine](df, suite, checks)
    if failed:
        raise TableValidationError(
            f"result table of suite {suite!r} failed {len(failed)} check(s): "
            + "; ".join(line for _, line in failed), [t for t, _ in failed])


def _label(etype: str, args: dict) -> str:
    col = args.get("column") or args.get("column_list")
    return f"{etype}({col})" if col else etype


def _validate_gx(df, suite: str, checks: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    gx, ctx = _gx()
    import great_expectations.expectations as gxe

    def expectation(etype: str, args: dict):  # expect_a_b -> gxe.ExpectAB
        return getattr(gxe, "".join(w.title() for w in etype.split("_")))(**args)

    name = f"results_{suite}".replace("-", "_").replace(" ", "_")
    try:
        ds = ctx.data_sources.get(name)
    except (KeyError, ValueError, LookupError):
        ds = None
    except Exception:  # GX raises its own DataContextError subclasses
        ds = None
    if ds is None:
        ds = ctx.data_sources.add_pandas(name)
        ds.add_dataframe_asset("table").add_batch_definition_whole_dataframe("all")
    batch = ds.get_asset("table").get_batch_definition("all").get_batch(
        batch_parameters={"dataframe": df})
    esuite = gx.ExpectationSuite(name=f"{name}_checks")
    for t, args in checks:
        esuite.add_expectation(expectation(t, args))
    result = batch.validate(esuite)
    if result.success:
        return []
    failed = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        res = r.result or {}
        detail = ""
        if "unexpected_count" in res:
            detail = (f": {res['unexpected_count']} unexpected, e.g. "
                      f"{res.get('partial_unexpected_list', [])[:3]!r}")
        elif "observed_value" in res:
            detail = f": observed {res['observed_value']!r}"
        if r.exception_info and r.exception_info.get("raised_exception"):
            detail += f" (check raised: {r.exception_info.get('exception_message')})"
        failed.append((cfg.type, _label(cfg.type, cfg.kwargs) + detail))
    return failed


def _validate_pandas(df, suite: str, checks: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    failed = []
    for t, args in checks:
        col = args.get("column")
        if col is not None and col not in df.columns:
            detail = f" (check raised: column {col!r} is missing)"
        else:
            detail = _PANDAS_CHECKS[t](df, **args)
        if detail is not None:
            failed.append((t, _label(t, args) + detail))
    return failed


def _unexpected(values) -> str | None:
    """``None`` when no value is unexpected, else the count and examples (as GX words it)."""
    if len(values) == 0:
        return None
    return f": {len(values)} unexpected, e.g. {list(values)[:3]!r}"


def _observed(ok: bool, value: Any) -> str | None:
    return None if ok else f": observed {value!r}"


def _in_set(df, column, value_set):
    s = df[column].dropna()
    return _unexpected(s[~s.isin(value_set)].tolist())


def _between(df, column, min_value=None, max_value=None):
    s = df[column].dropna()
    bad = s[((s < min_value) if min_value is not None else False)
            | ((s > max_value) if max_value is not None else False)]
    return _unexpected(bad.tolist())


def _lengths_between(df, column, min_value=None, max_value=None):
    s = df[column].dropna().astype(str)
    n = s.str.len()
    bad = s[((n < min_value) if min_value is not None else False)
            | ((n > max_value) if max_value is not None else False)]
    return _unexpected(bad.tolist())


def _not_match(df, column, regex):
    s = df[column].dropna().astype(str)
    return _unexpected(s[s.str.contains(regex, regex=True)].tolist())


def _columns_match(df, column_set, exact_match=False):
    cols = set(df.columns)
    ok = cols == set(column_set) if exact_match else set(column_set) <= cols
    return _observed(ok, sorted(cols))


def _distinct_equal(df, column, value_set):
    seen = set(df[column].dropna().tolist())
    return _observed(seen == set(value_set), sorted(seen, key=str))


def _compound_unique(df, column_list):
    missing = [c for c in column_list if c not in df.columns]
    if missing:
        return f" (check raised: column(s) {missing!r} missing)"
    dup = df[df.duplicated(column_list, keep=False)]
    return _unexpected(dup[column_list].values.tolist())


_PANDAS_CHECKS: dict[str, Callable[..., str | None]] = {
    "expect_table_columns_to_match_set": _columns_match,
    "expect_table_row_count_to_equal": lambda df, value: _observed(len(df) == value, len(df)),
    "expect_column_distinct_values_to_equal_set": _distinct_equal,
    "expect_compound_columns_to_be_unique": _compound_unique,
    "expect_column_values_to_not_be_null":
        lambda df, column: _unexpected(df.index[df[column].isna()].tolist()),
    "expect_column_value_lengths_to_be_between": _lengths_between,
    "expect_column_values_to_not_match_regex": _not_match,
    "expect_column_values_to_be_in_set": _in_set,
    "expect_column_values_to_be_between": _between,
}

#: validation engines by name (``validate_table(engine=...)``)
ENGINES: dict[str, Callable[..., list[tuple[str, str]]]] = {
    "pandas": _validate_pandas, "great-expectations": _validate_gx}
