"""Shared fixtures. Every test gets its own MLflow tracking store, safedelta cache and HF home."""

from __future__ import annotations

import os
import sys

import pytest

# tests never reach a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    """Send MLflow tracking, the safedelta cache and HF caches to this test's tmp dir.

    monkeypatch restores every variable below after the test. ``mlflow.set_registry_uri(url)``
    also writes ``MLFLOW_REGISTRY_URI`` into ``os.environ`` (and ``set_registry_uri(None)`` does
    not take it out), while ``delenv`` of an unset variable records nothing to undo: the
    ``setenv`` first makes monkeypatch remove it at teardown, so no test leaves later tests (and
    the subprocesses they start) talking to a server it stopped.
    """
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    monkeypatch.setenv("SAFEDELTA_CACHE", str(tmp_path / "safedelta-cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    yield
    if "mlflow" in sys.modules:  # module-level URIs set through the fluent API
        import mlflow.tracking._model_registry.utils as registry_utils
        import mlflow.tracking._tracking_service.utils as tracking_utils

        registry_utils._registry_uri = None
        tracking_utils._tracking_uri = None


def require_service(name: str, available: bool, why: str):
    """Skip when a local service is missing, unless CI demands it (SAFEDELTA_REQUIRE_SERVICES=1):
    then fail, so a missing PostgreSQL/Redis can never turn CI green by skipping."""
    if available:
        return
    if os.environ.get("SAFEDELTA_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{name} is required (SAFEDELTA_REQUIRE_SERVICES=1) but unavailable: {why}")
    pytest.skip(f"{name} unavailable: {why}")
