"""The command line: one click group, thin commands that call library functions.

The same group is the ``mlflow-safedelta`` console script and ``mlflow safedelta`` (attached to
MLflow's own CLI on import, see ``_entrypoints.py``).

Exit codes: 0 success / gate passed, 1 gate failed, 2 usage or input error.
JSON (``--json``) goes to stdout, errors included (``{"status": "error", "reason": ...}``, exit
2); progress bars and logs go to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import sys
from typing import Any, Callable

import click

from mlflow_safedelta import __version__
from mlflow_safedelta.extras import missing_extra_message
from mlflow_safedelta.vocab import ExitCode

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class UsageError(click.ClickException):
    """A user error: printed without a traceback, exit code 2."""

    exit_code = int(ExitCode.ERROR)


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


class LazyChoice(click.Choice):
    """A ``click.Choice`` whose choices come from a registry, read when first needed (parsing or
    ``--help``), so that loading the command module does not import the registry's module."""

    def __init__(self, load: Callable[[], Any], case_sensitive: bool = True):
        self._load, self.case_sensitive = load, case_sensitive

    @property
    def choices(self):  # type: ignore[override]
        return tuple(self._load())

    @choices.setter
    def choices(self, value):  # click's __init__ would set it; the registry decides
        pass


#: the real stdout of the ``--json`` commands running now (innermost last); while one runs,
#: ``sys.stdout`` is stderr, so that what libraries print (MLflow's "View run" lines on
#: ``end_run``/``set_terminated`` over HTTP) never mixes with the one JSON document
_MACHINE_STDOUT: list[Any] = []


@contextlib.contextmanager
def machine_stdout() -> Any:
    """Send every print of the body to stderr; :func:`emit_json` still writes to stdout."""
    _MACHINE_STDOUT.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _MACHINE_STDOUT.pop()


def emit_json(obj: Any) -> None:
    """Machine-readable output: indented JSON on stdout (the real one, also inside
    :func:`machine_stdout`)."""
    out = _MACHINE_STDOUT[-1] if _MACHINE_STDOUT else None
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str), file=out)


def echo_table(rows: list[tuple]) -> None:
    """A plain-text table: the first row is the header; columns padded, the last one never cut
    (it holds the long text: reasons, errors)."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths)] + [str(row[-1])]
        click.echo("  ".join(cells).rstrip())


def iso_time(epoch: float | None) -> str | None:
    """An epoch-seconds time as ISO 8601 UTC (``2026-12-02T06:14:01Z``), for JSON output."""
    import datetime as dt

    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(float(epoch), dt.timezone.utc).isoformat(
        timespec="seconds").replace("+00:00", "Z")


json_option = click.option("--json", "json_", is_flag=True, help="Output as JSON (on stdout).")


def uri_options(fn):
    """``--tracking-uri`` and ``--registry-uri`` (from MLflow's own environment variables)."""
    fn = click.option("--registry-uri", envvar="MLFLOW_REGISTRY_URI", default=None,
                      help="Model registry, when not the tracking URI  "
                           "[env MLFLOW_REGISTRY_URI].")(fn)
    return click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
                        help="MLflow tracking server or store  [env MLFLOW_TRACKING_URI].")(fn)


def needs_server(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Before the command body: check that the tracking/registry server answers (a few seconds,
    exit 2 with a clear message when it does not). For commands with :func:`uri_options`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mlflow_safedelta.registry import check_reachable

        check_reachable(kwargs.get("tracking_uri"), kwargs.get("registry_uri"))
        return fn(*args, **kwargs)

    return wrapper


def _wants_json(args: list[str]) -> bool:
    args = list(args)
    if "--" in args:
        args = args[:args.index("--")]
    if "--json" in args or "--format=json" in args:
        return True
    return any(a == "--format" and b == "json" for a, b in zip(args, args[1:]))


def error_json(reason: str, **fields: Any) -> dict[str, Any]:
    """What a ``--json`` command prints when it fails: ``status`` and ``verdict`` are
    ``error`` (so a gate consumer reads it like an error verdict), ``reason`` says why."""
    out: dict[str, Any] = {"status": "error", "verdict": "error", "reason": reason}
    out.update({k: v for k, v in fields.items() if v is not None})
    return out


class JsonErrorCommand(click.Command):
    """With ``--json`` (or ``--format json``) every error is a JSON object on stdout (see
    :func:`error_json`) and exit code 2: bad usage, a library error, or anything unexpected
    (registry unreachable ...), never a bare traceback or plain text only. The message also goes
    to stderr for people. ``--help`` and normal exits are untouched. A command that needs an
    extra that is not installed (``[engine]`` for ``protect`` ...) says which, and exits 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        wants = _wants_json(args)
        try:
            ctx = super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as exc:
            if not wants:
                raise
            self._fail(exc.format_message(), command=info_name)
        ctx.meta["mlflow_safedelta.json"] = wants
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                if not ctx.meta.get("mlflow_safedelta.json"):
                    return super().invoke(ctx)
                with machine_stdout():
                    return super().invoke(ctx)
            except ImportError as exc:  # e.g. `protect` on a server-side install (no torch)
                message = missing_extra_message(exc, f"'{ctx.command_path}'")
                if message is None:
                    raise
                raise UsageError(message) from exc
        except (click.exceptions.Exit, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            if not ctx.meta.get("mlflow_safedelta.json"):
                raise
            reason = exc.format_message() if isinstance(exc, click.ClickException) \
                else f"{type(exc).__name__}: {exc}"
            logging.getLogger(__name__).debug("%s failed", ctx.info_name, exc_info=True)
            params = ctx.params or {}
            self._fail(reason, command=ctx.info_name, model=params.get("model"),
                       version=params.get("version"))

    @staticmethod
    def _fail(reason: str, **fields: Any):
        click.echo(f"Error: {reason}", err=True)
        emit_json(error_json(reason, **fields))
        raise click.exceptions.Exit(2)


class SafeDeltaGroup(click.Group):
    """Commands (and sub-groups' commands) get :class:`JsonErrorCommand`."""

    command_class = JsonErrorCommand
    group_class = type  # sub-groups are SafeDeltaGroups too

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """``-v`` / ``-vv`` / ``--verbose`` anywhere on the line (``status -v`` as well as
        ``-v status``): the root group takes them before its subcommand is parsed."""
        if any(p.name == "verbose" for p in self.params):  # the root (also as `mlflow safedelta`)
            args = _hoist_verbose(list(args))
        return super().parse_args(ctx, args)


_VERBOSE = re.compile(r"^-v+$")


def _hoist_verbose(args: list[str]) -> list[str]:
    """Move verbosity flags (up to a ``--``) to the front, where the root group reads them."""
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if a == "--verbose" or _VERBOSE.match(a)]
    rest = [a for a in args[:end] if not (a == "--verbose" or _VERBOSE.match(a))]
    return flags + rest + args[end:]


@click.group(cls=SafeDeltaGroup, context_settings=CONTEXT_SETTINGS)
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
                "mlflow_safedelta.commands.gate", "mlflow_safedelta.commands.demo",
                "mlflow_safedelta.commands.governance"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # a command module not written yet
            if exc.name != mod:
                raise


_register_commands()
