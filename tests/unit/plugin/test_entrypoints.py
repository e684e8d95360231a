"""``mlflow safedelta`` via the real console scripts, and the entry module's import safety."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import click

BIN = Path(sys.executable).parent


def _run(args, code=None, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SAFEDELTA_NO_MLFLOW_CLI_HOOK", None)
    cmd = [sys.executable, "-c", textwrap.dedent(code)] if code else args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_entry_points_are_registered():
    groups = {
        "mlflow.run_context_provider": "mlflow_safedelta._entrypoints:SafeDeltaRunContext",
        "mlflow.model_registry_store": "mlflow_safedelta.store:build_store",
    }
    for group, value in groups.items():
        assert value in {ep.value for ep in entry_points(group=group)}, group


def test_mlflow_safedelta_help_through_mlflows_own_cli():
    out = _run([str(BIN / "mlflow"), "safedelta", "--help"])
    assert out.returncode == 0, out.stderr
    assert "Usage: mlflow safedelta" in out.stdout
    for command in ("serve", "jobs", "reconcile", "webhook"):
        assert command in out.stdout


def test_standalone_script_help():
    out = _run([str(BIN / "mlflow-safedelta"), "--help"])
    assert out.returncode == 0, out.stderr
    assert "Usage: mlflow-safedelta" in out.stdout and "serve" in out.stdout


def test_import_mlflow_survives_a_plugin_module_that_raises():
    # installing the hook raises (here: sys.meta_path refuses inserts) -> import mlflow still works
    out = _run(None, """
        import sys
        class Refusing(list):
            def insert(self, *a):
                raise RuntimeError("boom from the plugin")
        sys.meta_path = Refusing(sys.meta_path)
        import mlflow
        print("ok", mlflow.__version__)
        print(sorted(m for m in sys.modules if m.startswith("mlflow_safedelta")))
        print("torch" in sys.modules, "mlflow.cli" in sys.modules)
    """)
    assert out.returncode == 0, out.stderr
    ok, mods, flags = out.stdout.strip().splitlines()
    assert ok.startswith("ok ")
    # MLflow loaded the entry module, which stayed light: no CLI, no torch until `mlflow.cli`
    assert "mlflow_safedelta._entrypoints" in mods and "mlflow_safedelta.cli" not in mods
    assert flags == "False False"


def test_mlflow_cli_survives_a_plugin_cli_that_raises():
    out = _run(None, """
        import sys
        class Broken:
            def find_spec(self, name, path=None, target=None):
                if name == "mlflow_safedelta.cli":
                    raise RuntimeError("the plugin CLI is broken")
        sys.meta_path.insert(0, Broken())
        import mlflow.cli
        print("safedelta" in mlflow.cli.cli.commands, "server" in mlflow.cli.cli.commands)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False True"


def test_attach_is_one_shot_and_idempotent(monkeypatch):
    from mlflow_safedelta import _entrypoints

    group = click.Group("fake")

    class FakeModule:
        cli = group

    assert _entrypoints.attach(FakeModule)
    assert not _entrypoints.attach(FakeModule)  # already there
    assert list(group.commands) == ["safedelta"]
    assert _entrypoints.attach(object()) is False  # no `cli`: nothing, no error
    provider = _entrypoints.SafeDeltaRunContext()
    assert provider.in_context() is False and provider.tags() == {}
