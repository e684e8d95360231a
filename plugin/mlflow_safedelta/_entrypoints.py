"""Loaded by MLflow during ``import mlflow``: attaches ``mlflow safedelta`` to MLflow's CLI.

MLflow's CLI has no entry point for third-party subcommands, but it does load
``mlflow.run_context_provider`` plugins while ``import mlflow`` runs, and the ``mlflow`` console
script imports ``mlflow`` (the package) before ``mlflow.cli``. So this module, loaded as that
plugin, installs a one-shot import hook: when ``mlflow.cli`` finishes executing, the hook adds
``mlflow_safedelta.cli:cli`` as the ``safedelta`` command and removes itself.

Rules for this module (it runs inside everybody's ``import mlflow``): import nothing heavy (only
the standard library here; click and the CLI only once ``mlflow.cli`` is loaded anyway), change
no global state beyond the one finder on ``sys.meta_path``, and never raise: every failure is
logged at debug level, and ``mlflow-safedelta`` remains as the standalone script.
"""

from __future__ import annotations

import logging
import os
import sys

from mlflow_safedelta.vocab import ENV_NO_MLFLOW_CLI_HOOK

_logger = logging.getLogger(__name__)

TARGET = "mlflow.cli"
COMMAND_NAME = "safedelta"
DISABLE_ENV = ENV_NO_MLFLOW_CLI_HOOK


def attach(cli_module) -> bool:
    """Add the ``safedelta`` group to ``mlflow.cli.cli``. Never raises; True when attached."""
    try:
        group = getattr(cli_module, "cli", None)
        if group is None or COMMAND_NAME in getattr(group, "commands", {}):
            return False
        from mlflow_safedelta.cli import cli as safedelta_cli

        group.add_command(safedelta_cli, name=COMMAND_NAME)
        return True
    except Exception as exc:  # noqa: BLE001 - must never break the mlflow CLI
        _logger.debug("mlflow-safedelta: could not attach 'mlflow safedelta': %r", exc)
        return False


class _CliHook:
    """A ``sys.meta_path`` finder that wraps the loader of ``mlflow.cli`` once."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        try:
            self.remove()  # one-shot; also avoids recursing into ourselves below
            from importlib.machinery import PathFinder

            spec = PathFinder.find_spec(fullname, path)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            spec.loader = _AttachingLoader(spec.loader)
            return spec
        except Exception as exc:  # noqa: BLE001
            _logger.debug("mlflow-safedelta: import hook failed: %r", exc)
            return None

    def remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


class _AttachingLoader:
    """Delegates to the real loader, then attaches our group after the module has executed."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)  # errors of mlflow.cli itself propagate unchanged
        attach(module)

    def __getattr__(self, name):  # get_source, get_code, is_package, resource readers...
        return getattr(self._loader, name)


def install() -> None:
    """Install the hook (or attach right away if ``mlflow.cli`` is already imported)."""
    if os.environ.get(DISABLE_ENV) == "1":
        return
    module = sys.modules.get(TARGET)
    if module is not None and hasattr(module, "cli"):
        attach(module)
        return
    if not any(isinstance(f, _CliHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _CliHook())


def _base_provider():
    # MLflow has imported it by the time it loads this plugin; importing it ourselves would
    # start `import mlflow` from here (circular) when this module is imported first.
    module = sys.modules.get("mlflow.tracking.context.abstract_context")
    return getattr(module, "RunContextProvider", object)


class SafeDeltaRunContext(_base_provider()):  # type: ignore[misc]
    """The entry point MLflow loads (``mlflow.run_context_provider``). It adds no run tags;
    loading it is what installs the CLI hook."""

    def in_context(self) -> bool:
        return False

    def tags(self) -> dict:
        return {}


try:
    install()
except Exception as _exc:  # noqa: BLE001 - never break `import mlflow`
    _logger.debug("mlflow-safedelta: not attaching to the mlflow CLI: %r", _exc)
