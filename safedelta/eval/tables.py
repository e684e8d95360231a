"""Result tables (one row per prompt and model) and their great-expectations checks.

Every table is validated before anything is summarised: schema, every prompt answered by every
model exactly once, no empty generations, judge labels in range. A failed check raises
:class:`TableValidationError` naming the failed expectations; no metric is computed from a bad
table. great-expectations is imported on first use (it is slow to import).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from safedelta.errors import SafeDeltaError

logger = logging.getLogger(__name__)

#: columns every result table has
REQUIRED_COLUMNS: tuple[str, ...] = ("model", "suite", "kind", "prompt_id", "prompt",
                                     "generation", "refused", "harmful", "score", "judge")


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


def expectations_for(*, kind: str, models: Sequence[str], prompt_ids: Sequence[Any],
                     score_range: tuple[float, float] | None = None,
                     task_columns: Sequence[str] = ()) -> list:
    """The expectations a table of a suite of ``kind`` must meet."""
    import great_expectations.expectations as gxe

    ex = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(REQUIRED_COLUMNS) + list(task_columns),
                                         exact_match=False),
        gxe.ExpectTableRowCountToEqual(value=len(models) * len(prompt_ids)),
        gxe.ExpectColumnDistinctValuesToEqualSet(column="model", value_set=list(models)),
        gxe.ExpectColumnDistinctValuesToEqualSet(column="prompt_id", value_set=list(prompt_ids)),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["model", "prompt_id"]),
        gxe.ExpectColumnValuesToNotBeNull(column="prompt"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=1),
        gxe.ExpectColumnValuesToNotBeNull(column="generation"),
        gxe.ExpectColumnValuesToNotMatchRegex(column="generation", regex=r"^\s*$"),
        gxe.ExpectColumnValuesToBeInSet(column="refused", value_set=[True, False]),
    ]
    if kind == "harmful":
        ex += [gxe.ExpectColumnValuesToNotBeNull(column="harmful"),
               gxe.ExpectColumnValuesToBeInSet(column="harmful", value_set=[0.0, 1.0])]
        if score_range is not None:
            ex += [gxe.ExpectColumnValuesToNotBeNull(column="score"),
                   gxe.ExpectColumnValuesToBeBetween(column="score", min_value=score_range[0],
                                                     max_value=score_range[1])]
    for col in task_columns:
        ex += [gxe.ExpectColumnValuesToNotBeNull(column=col),
               gxe.ExpectColumnValuesToBeBetween(column=col, min_value=0.0, max_value=1.0)]
    return ex


def validate_table(df, *, suite: str, kind: str, models: Sequence[str],
                   prompt_ids: Sequence[Any], score_range: tuple[float, float] | None = None,
                   task_columns: Sequence[str] = ()) -> None:
    """Validate one suite's table with great-expectations; raise on the first failed check set.

    Raises:
        TableValidationError: naming every failed expectation (type and column) with examples.
    """
    gx, ctx = _gx()
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
    for e in expectations_for(kind=kind, models=models, prompt_ids=prompt_ids,
                              score_range=score_range, task_columns=task_columns):
        esuite.add_expectation(e)
    result = batch.validate(esuite)
    if result.success:
        return
    failed, lines = [], []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        col = cfg.kwargs.get("column") or cfg.kwargs.get("column_list")
        label = f"{cfg.type}({col})" if col else cfg.type
        res = r.result or {}
        detail = ""
        if "unexpected_count" in res:
            detail = (f": {res['unexpected_count']} unexpected, e.g. "
                      f"{res.get('partial_unexpected_list', [])[:3]!r}")
        elif "observed_value" in res:
            detail = f": observed {res['observed_value']!r}"
        if r.exception_info and r.exception_info.get("raised_exception"):
            detail += f" (check raised: {r.exception_info.get('exception_message')})"
        failed.append(cfg.type)
        lines.append(label + detail)
    raise TableValidationError(
        f"result table of suite {suite!r} failed {len(lines)} check(s): " + "; ".join(lines),
        failed)
