"""Shared fixtures. Every test gets its own MLflow tracking store, safedelta cache and HF home."""

from __future__ import annotations

import os

import pytest

# tests never reach a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    """Send MLflow tracking, the safedelta cache and HF caches to this test's tmp dir."""
    monkeypatch.setenv("SAFEDELTA_CACHE", str(tmp_path / "safedelta-cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    yield


def require_service(name: str, available: bool, why: str):
    """Skip when a local service is missing, unless CI demands it (SAFEDELTA_REQUIRE_SERVICES=1):
    then fail, so a missing PostgreSQL/Redis can never turn CI green by skipping."""
    if available:
        return
    if os.environ.get("SAFEDELTA_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{name} is required (SAFEDELTA_REQUIRE_SERVICES=1) but unavailable: {why}")
    pytest.skip(f"{name} unavailable: {why}")
