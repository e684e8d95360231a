"""The command line: one click group, thin commands that call library functions.

The same group is the ``mlflow-safedelta`` console script and ``mlflow safedelta`` (attached to
MLflow's own CLI on import, see ``_entrypoints.py``).

Exit codes: 0 success / gate passed, 1 gate failed, 2 usage or input error.
JSON (``--json``) goes to stdout; progress bars and logs go to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any, Callable

import click

from mlflow_safedelta import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class UsageError(click.ClickException):
    """A user error: printed without a traceback, exit code 2."""

    exit_code = 2


def translate_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Re-raise library errors (``SafeDeltaError`` and friends) as clean CLI errors (exit 2)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from safedelta.errors import SafeDeltaError

        try:
            return fn(*args, **kwargs)
        except SafeDeltaError as exc:
            raise UsageError(str(exc)) from exc

    return wrapper


def emit_json(obj: Any) -> None:
    """Machine-readable output: indented JSON on stdout."""
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


json_option = click.option("--json", "json_", is_flag=True, help="Output as JSON (on stdout).")


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="mlflow-safedelta")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Safe Delta for MLflow: keep fine-tuned LLMs safe.

    Repairs a fine-tuned causal LM against its aligned parent with Safe Delta
    (Lu et al., ICML 2025), measures safety and utility, and gates promotion in the
    MLflow Model Registry.

    \b
    First steps:
      mlflow-safedelta protect --aligned ALIGNED_DIR --finetuned FT_DIR --out OUT_DIR
      mlflow-safedelta protect --help

    Exit codes: 0 ok / gate passed, 1 gate failed, 2 usage or input error.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def _register_commands() -> None:
    """Attach the command modules (each adds its commands to ``cli``)."""
    import importlib

    for mod in ("mlflow_safedelta.commands.engine", "mlflow_safedelta.commands.ci",
                "mlflow_safedelta.commands.serve", "mlflow_safedelta.commands.evaluate",
                "mlflow_safedelta.commands.gate", "mlflow_safedelta.commands.demo"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # a command module not written yet
            if exc.name != mod:
                raise


_register_commands()
