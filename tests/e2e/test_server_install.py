"""The server side installs light: the wheel without the ``engine`` extra runs the store plugin.

Builds the wheel from a copy of the source tree (``uv build``), installs it WITHOUT extras into a
fresh virtual environment (``uv venv``, no system site-packages; dependencies from PyPI, pinned by
a constraints file to the versions of this environment so the run is reproducible), then
from that environment: torch and the other engine-only packages are not importable, the
server-side commands work and an engine command exits 2 with the install hint, and
``mlflow server --registry-store-uri safedelta+sqlite:///...`` tags and enqueues a version
registered through the REST API. Needs PyPI (as CI has). Measured on a shared 2-core machine:
build + venv + install 26 s with uv and an empty uv cache (159 s with pip: hence uv); the
module about 150 s in all (most of it starting MLflow from a venv with no bytecode yet).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlflow_safedelta.extras import ENGINE, EXTRA_OF_MODULE, install_hint
from mlflow_safedelta.jobqueue import JobQueue
from mlflow_safedelta.vocab import ENV_CACHE, ENV_QUEUE_URI, STATUS_PENDING, TAG_PARENT, TAG_STATUS
from tests.e2e.conftest import start_mlflow_server
from tests.unit.test_dependencies import MLFLOW_BRINGS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "safedelta", "plugin", "policies")
#: the engine's packages that MLflow does not bring itself: none may be in the server's image
ENGINE_ONLY = sorted(m for m, e in EXTRA_OF_MODULE.items()
                     if e == ENGINE and m not in MLFLOW_BRINGS)
INSTALL_TIMEOUT_S = 900


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def _constraints(path: Path) -> Path:
    """``name==version`` of every distribution here except this package (pins what pip picks)."""
    pins = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                   if d.metadata["Name"] and d.metadata["Name"].lower() != "mlflow-safedelta"})
    path.write_text("\n".join(pins) + "\n")
    return path


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed without extras; returns its ``bin`` directory."""
    root = tmp_path_factory.mktemp("light")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=ignore)
        else:
            shutil.copy2(item, src / name)
    started = time.monotonic()
    uv = [sys.executable, "-m", "uv"]  # the dev extra installs uv: 10x faster than pip here
    built = _run([*uv, "build", "-q", "--wheel", "--out-dir", root / "wheels", src], timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "wheels").glob("mlflow_safedelta-*.whl")
    venv = root / "venv"
    made = _run([*uv, "venv", "-q", "--python", sys.executable, venv], timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    installed = _run([*uv, "pip", "install", "-q", "--python", venv / "bin" / "python",
                      "-c", _constraints(root / "constraints.txt"), wheel],
                     timeout=INSTALL_TIMEOUT_S)
    assert installed.returncode == 0, installed.stderr[-3000:]
    print(f"light venv: wheel built and installed in {time.monotonic() - started:.0f} s")
    return venv / "bin"


def _light_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    """This environment's variables with the light venv first on PATH and nothing that would
    let it import from this checkout or this venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def test_the_engine_is_not_installed(light_venv):
    script = ("import importlib.util, json, sys; print(json.dumps("
              "{m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))")
    probe = _run([light_venv / "python", "-c", script, *ENGINE_ONLY],
                 env=_light_env(light_venv), timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == dict.fromkeys(ENGINE_ONLY, False)
    torch = _run([light_venv / "python", "-c", "import torch"], env=_light_env(light_venv),
                 timeout=120)
    assert torch.returncode == 1 and "No module named 'torch'" in torch.stderr


def test_server_side_commands_work_and_engine_commands_name_the_extra(light_venv, tmp_path):
    env = _light_env(light_venv, **{ENV_CACHE: str(tmp_path / "cache"),
                                    "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    cli = light_venv / "mlflow-safedelta"
    jobs = _run([cli, "jobs", "list", "--json", "--queue-uri", f"sqlite:///{tmp_path / 'q.db'}"],
                env=env, cwd=tmp_path, timeout=300)
    assert jobs.returncode == 0, jobs.stderr
    assert json.loads(jobs.stdout) == []
    shown = _run([cli, "policy", "show", "strict"], env=env, cwd=tmp_path, timeout=300)
    assert shown.returncode == 0 and "promotion" in shown.stdout, shown.stderr
    for argv in (["protect", "--aligned", ".", "--finetuned", ".", "--out", "out"],
                 ["gate", "some-model", "1"], ["worker"]):
        proc = _run([cli, *argv], env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert install_hint(ENGINE) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # the same group attached to MLflow's own CLI
    via_mlflow = _run([light_venv / "mlflow", "safedelta", "protect", "--aligned", ".",
                       "--finetuned", ".", "--out", "out", "--json"],
                      env=env, cwd=tmp_path, timeout=300)
    assert via_mlflow.returncode == 2
    assert install_hint(ENGINE) in json.loads(via_mlflow.stdout)["reason"]


def _process_group_commands(pgid: int) -> list[list[str]]:
    cmds = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                cmds.append(stat.with_name("cmdline").read_bytes().decode().split("\0")[:-1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    return cmds


def test_mlflow_server_from_the_light_install_tags_and_enqueues(light_venv, tmp_path):
    from mlflow import MlflowClient

    queue_uri = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    env = {ENV_QUEUE_URI: queue_uri, ENV_CACHE: str(tmp_path / "cache"), "PYTHONPATH": "",
           "PATH": f"{light_venv}{os.pathsep}{os.environ.get('PATH', '')}"}
    with start_mlflow_server(tmp_path / "server", env=env, mlflow_bin=light_venv / "mlflow",
                             registry_store_uri="safedelta+sqlite:///{db_path}") as server:
        # every process of the server (CLI, uvicorn) runs the light venv's python
        commands = _process_group_commands(server.process.pid)
        assert commands and all(c[0].startswith(str(light_venv)) for c in commands), commands
        client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        client.create_registered_model("light-ft")
        mv = client.create_model_version("light-ft", "s3://safedelta-tests/ft-1",
                                         tags={TAG_PARENT: "models:/aligned/1"})
        assert client.get_model_version("light-ft", mv.version).tags[TAG_STATUS] == STATUS_PENDING
        jobs = JobQueue(queue_uri).list()
        assert [(j.model_name, str(j.version), j.source) for j in jobs] == \
            [("light-ft", str(mv.version), "store")]
        assert "Traceback" not in server.log_tail(400)
