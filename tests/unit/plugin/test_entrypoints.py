"""``mlflow safedelta`` via the real console scripts, and the entry module's import safety."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest

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


FRESH_CHECK = """
import io, json, sys, contextlib
from importlib.metadata import distribution, entry_points
import mlflow_safedelta, mlflow_safedelta.policy as p
out = {"module": mlflow_safedelta.__file__,
       "policies": [p.load_policy(n).source for n in p.SHIPPED_POLICIES]}
(ep,) = [e for e in entry_points(group="console_scripts")
         if e.name == "mlflow-safedelta" and str(e.dist._path).startswith(sys.prefix)]
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        sys.argv = ["mlflow-safedelta", "--help"]
        ep.load()()
    except SystemExit as exc:
        out["script_exit"] = exc.code
out["script_help"] = buf.getvalue()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_help_from_a_fresh_install_of_the_wheel(tmp_path):
    """Build the wheel from the sources, unpack it into a fresh virtual environment (the
    dependencies come from this one's site-packages as a plain path, so this checkout's editable
    install is not seen), then: ``python -m mlflow safedelta --help`` (MLflow's own CLI, the
    hook installed by the wheel's entry points), the wheel's ``mlflow-safedelta`` console-script
    entry point, and the shipped policies all work from the installed files alone."""
    import shutil
    import site
    import venv
    import zipfile

    repo = Path(__file__).resolve().parents[3]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        if (repo / name).exists():
            shutil.copy2(repo / name, src / name)
    for name in ("plugin", "policies", "safedelta"):
        shutil.copytree(repo / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("mlflow_safedelta-*.whl")

    fresh = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(fresh)
    py = fresh / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; "
                                   "print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(purelib)
    assert "mlflow_safedelta/policies/strict.yaml" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "zz_deps.pth").write_text("\n".join(deps) + "\n")  # plain paths: no .pth run

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{fresh / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    env.pop("SAFEDELTA_NO_MLFLOW_CLI_HOOK", None)
    via_mlflow = subprocess.run([str(py), "-m", "mlflow", "safedelta", "--help"], env=env,
                                capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert via_mlflow.returncode == 0, via_mlflow.stderr
    assert "safedelta" in via_mlflow.stdout and "gate" in via_mlflow.stdout
    checked = subprocess.run([str(py), "-c", FRESH_CHECK], env=env, capture_output=True,
                             text=True, timeout=180, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    import json

    out = json.loads(checked.stdout.strip().splitlines()[-1])
    assert out["module"].startswith(str(purelib))  # the installed copy, not this checkout
    assert out["policies"] == ["default", "strict", "permissive"]
    assert out.get("script_exit") in (0, None)
    assert "Usage: mlflow-safedelta" in out["script_help"] and "protect" in out["script_help"]
