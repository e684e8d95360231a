"""A real ``mlflow server`` on loopback for end-to-end tests.

Use the ``mlflow_server`` fixture (module scope: one server per test module, ~8 s to start on two
cores). It yields an :class:`MlflowServer` with ``.url``, ``.db_path``, ``.artifacts``. Modules that
need a different server (extra environment, a registry-store plugin URI) override the
``mlflow_server_options`` fixture in their own module::

    @pytest.fixture(scope="module")
    def mlflow_server_options():
        return {"env": {"MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true"},
                "registry_store_uri": "safedelta+sqlite:///{db_path}"}

``registry_store_uri`` may contain ``{db_path}`` (the absolute SQLite path) and is passed as
``--registry-store-uri``; the tracking store keeps the plain ``sqlite:///`` URI (mlflow-notes.md).
Or start one by hand with :func:`start_mlflow_server` (a context manager).

The server runs in its own process session; stopping it kills the whole process group, so no
gunicorn/uvicorn worker outlives the test module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

MLFLOW_BIN = Path(sys.executable).with_name("mlflow")
READY_TIMEOUT_S = 120.0


@dataclass
class MlflowServer:
    """A running server. ``url`` is the tracking (and registry) URI clients should use."""

    url: str
    db_path: Path
    artifacts: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.db_path}"

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(server: MlflowServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as r:
                if r.status == 200 and r.read().strip() == b"OK":
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"mlflow server not ready after {timeout:.0f} s:\n{server.log_tail()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def start_mlflow_server(root: Path, *, env: dict[str, str] | None = None,
                        registry_store_uri: str | None = None,
                        extra_args: list[str] | None = None,
                        mlflow_bin: Path = MLFLOW_BIN) -> Iterator[MlflowServer]:
    """Start ``mlflow server`` (SQLite + proxied artifacts under ``root``); stop it on exit.
    ``mlflow_bin``: the ``mlflow`` script of another environment (default: this one's)."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    db_path = root / "mlflow.db"
    artifacts = root / "artifacts"
    artifacts.mkdir(exist_ok=True)
    port = free_port()
    cmd = [str(mlflow_bin), "server",
           "--backend-store-uri", f"sqlite:///{db_path}",
           "--artifacts-destination", str(artifacts),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if registry_store_uri:
        cmd += ["--registry-store-uri", registry_store_uri.format(db_path=db_path)]
    cmd += list(extra_args or [])
    full_env = dict(os.environ)
    full_env.update({
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "OMP_NUM_THREADS": "1",
    })
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.update(env or {})
    log_path = root / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=root, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = MlflowServer(url=f"http://127.0.0.1:{port}", db_path=db_path, artifacts=artifacts,
                          port=port, process=proc, log_path=log_path, env=dict(env or {}))
    try:
        _wait_ready(server, READY_TIMEOUT_S)
        yield server
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def mlflow_server_options() -> dict:
    """Override in a test module to pass ``env`` / ``registry_store_uri`` / ``extra_args``."""
    return {}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, mlflow_server_options) -> Iterator[MlflowServer]:
    """One real ``mlflow server`` on 127.0.0.1 per test module (SQLite, proxied artifacts)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with start_mlflow_server(root, **mlflow_server_options) as server:
        yield server


@pytest.fixture
def mlflow_client(mlflow_server, monkeypatch):
    """An ``MlflowClient`` on the module's server; also points the fluent API at it."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server.url)
    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


PG = "postgresql://postgres@127.0.0.1:5432"  # trust auth on this machine and in CI


@contextlib.contextmanager
def fresh_pg_database(prefix: str = "safedelta_test") -> Iterator[str]:
    """A new PostgreSQL database for one test module (its plain ``postgresql://`` URL), dropped
    afterwards with the queue's pooled connections to it closed. A missing server fails in CI
    (``SAFEDELTA_REQUIRE_SERVICES=1``) and skips elsewhere."""
    import uuid

    from tests.conftest import require_service

    try:
        import psycopg2

        admin = psycopg2.connect(f"{PG}/postgres", connect_timeout=5)
    except Exception as exc:  # noqa: BLE001 - reported by require_service
        require_service("PostgreSQL", False, f"{PG}: {exc}")
    admin.autocommit = True
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG}/{name}"
    finally:
        from mlflow_safedelta import jobqueue

        for uri in [u for u in jobqueue._ENGINES if name in u]:  # close the queue's pool
            jobqueue._ENGINES.pop(uri).dispose()
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def fluent_on_server(_isolated_state, mlflow_server, monkeypatch):
    """Point MLflow's fluent API at the module's server for one test (the root conftest resets
    MLflow's global URIs after every test). Modules that log and register with the fluent API
    use it with ``pytest.mark.usefixtures("fluent_on_server")``."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server.url)
