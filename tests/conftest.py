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

    ``mlflow.set_registry_uri(url)`` also writes ``MLFLOW_REGISTRY_URI`` into ``os.environ`` and
    ``set_registry_uri(None)`` does not take it out: without the reset below, a test that pointed
    MLflow at a server leaves every later test (and every subprocess it starts) talking to that
    server after it is stopped.
    """
    saved = {k: os.environ.get(k) for k in _MLFLOW_URI_VARS}
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("SAFEDELTA_CACHE", str(tmp_path / "safedelta-cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if "mlflow" in sys.modules:  # module-level URIs set through the fluent API
        import mlflow.tracking._model_registry.utils as registry_utils
        import mlflow.tracking._tracking_service.utils as tracking_utils

        registry_utils._registry_uri = None
        tracking_utils._tracking_uri = None


_MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def require_service(name: str, available: bool, why: str):
    """Skip when a local service is missing, unless CI demands it (SAFEDELTA_REQUIRE_SERVICES=1):
    then fail, so a missing PostgreSQL/Redis can never turn CI green by skipping."""
    if available:
        return
    if os.environ.get("SAFEDELTA_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{name} is required (SAFEDELTA_REQUIRE_SERVICES=1) but unavailable: {why}")
    pytest.skip(f"{name} unavailable: {why}")
