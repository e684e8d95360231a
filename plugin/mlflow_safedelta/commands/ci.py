"""``ci-gate`` (the GitHub Action's step) and ``summary`` (its Markdown, rendered locally)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from mlflow_safedelta.cli import UsageError, cli, translate_errors


@cli.command(name="ci-gate")
@translate_errors
def ci_gate() -> None:
    """Report the gate as the GitHub Action step does (inputs from INPUT_* variables).

    \b
    INPUT_MODE=wait (default): find the version (INPUT_VERSION, INPUT_ALIAS, INPUT_RUN_ID or
      INPUT_COMMIT) and wait up to INPUT_TIMEOUT seconds for the verdict the server's gate
      worker records; no model is downloaded.
    INPUT_MODE=run: run `mlflow safedelta gate ... --json` here (INPUT_VERSION or
      INPUT_ALIAS, INPUT_POLICY, INPUT_PROMOTE, INPUT_FORCE).

    Also reads INPUT_TRACKING_URI, INPUT_PARENT and the credentials INPUT_TRACKING_TOKEN /
    _USERNAME / _PASSWORD (never from the command line; masked), writes the summary to
    $GITHUB_STEP_SUMMARY and `verdict=...` to $GITHUB_OUTPUT.

    Exit codes: 0 passed, 1 failed, 2 error.
    """
    from mlflow_safedelta.action import run_ci_gate

    sys.exit(run_ci_gate(os.environ))


@cli.command(name="summary")
@click.option(
    "--from",
    "from_",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="A gate result: the JSON of `mlflow safedelta gate --json` (or '-' for stdin).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the Markdown here instead of stdout.",
)
@translate_errors
def summary(from_: str, output: str | None) -> None:
    """Render a gate result as the Markdown summary the GitHub Action writes.

    The input is the JSON the gate prints (or the action's `json-file` output). For the
    result stored on a version in the tracking server, `report MODEL VERSION` renders the
    same Markdown.

    \b
    Example usage:
      mlflow safedelta gate support-bot 7 --json > gate.json
      mlflow-safedelta summary --from gate.json
    """
    from mlflow_safedelta.verdict import render_markdown

    try:
        text = sys.stdin.read() if from_ == "-" else Path(from_).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read gate result '{from_}': {exc.strerror or exc}") from exc
    try:
        gate = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"'{from_}' is not JSON (expected `gate --json` output): {exc}") from exc
    if not isinstance(gate, dict) or "verdict" not in gate:
        raise UsageError(f"'{from_}' is not a gate result: no `verdict` field")
    markdown = render_markdown(gate)
    if output:
        Path(output).write_text(markdown, encoding="utf-8")
    else:
        click.echo(markdown, nl=False)
