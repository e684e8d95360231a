"""The registry-store plugin, resolved through MLflow's own entry-point registry."""

from __future__ import annotations

import pytest

from mlflow_safedelta.jobqueue import JobQueue
from mlflow_safedelta.reconcile import reconcile
from mlflow_safedelta.store import SafeDeltaRegistryStore, strip_scheme


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    return root / "mlflow.db", root


@pytest.fixture
def client(db, tmp_path, monkeypatch):
    """A client whose registry is ``safedelta+sqlite:///`` (the direct-DB route); its own queue."""
    from mlflow import MlflowClient

    db_path, _ = db
    monkeypatch.setenv("SAFEDELTA_QUEUE_URI", f"sqlite:///{tmp_path / 'queue.sqlite'}")
    return MlflowClient(tracking_uri=f"sqlite:///{db_path}",
                        registry_uri=f"safedelta+sqlite:///{db_path}")


def _model(client, name):
    client.create_registered_model(name)
    return name


def test_mlflow_resolves_both_schemes_to_the_plugin(db):
    from mlflow.tracking._model_registry.utils import _get_store_registry

    db_path, _ = db
    registry = _get_store_registry()
    for scheme in ("safedelta+sqlite", "safedelta+postgresql"):
        builder = registry.get_store_builder(f"{scheme}://x")
        assert builder.__module__ == "mlflow_safedelta.store"
    store = registry.get_store(f"safedelta+sqlite:///{db_path}", f"sqlite:///{db_path}")
    assert isinstance(store, SafeDeltaRegistryStore)


def test_registration_with_a_parent_is_tagged_pending_and_enqueued(client):
    name = _model(client, "with-parent")
    mv = client.create_model_version(name, "file:///x/model",
                                     tags={"safedelta.parent": "models:/base/1"})
    assert mv.status == "READY"  # never left in PENDING_REGISTRATION
    assert client.get_model_version(name, mv.version).tags["safedelta.status"] == "pending"
    jobs = JobQueue().list(model_name=name)
    assert [(j.version, j.source, j.state) for j in jobs] == [(str(mv.version), "store", "queued")]


def test_registration_without_a_parent_is_enqueued_for_a_flavor_check(client):
    name = _model(client, "no-parent")
    mv = client.create_model_version(name, "file:///x/model")
    assert "safedelta.status" not in client.get_model_version(name, mv.version).tags
    assert [j.version for j in JobQueue().list(model_name=name)] == [str(mv.version)]


def test_protected_outputs_are_not_enqueued(client):
    name = _model(client, "protected")
    mv = client.create_model_version(name, "file:///x/model", tags={
        "safedelta.role": "protected", "safedelta.parent": "models:/base/1"})
    assert "safedelta.status" not in client.get_model_version(name, mv.version).tags
    assert JobQueue().list(model_name=name) == []


def test_a_broken_queue_never_fails_the_registration(client, monkeypatch, tmp_path):
    name = _model(client, "queue-down")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the queue's directory should be")
    monkeypatch.setenv("SAFEDELTA_QUEUE_URI", f"sqlite:///{blocker / 'q.sqlite'}")
    mv = client.create_model_version(name, "file:///x/model",
                                     tags={"safedelta.parent": "models:/base/1"})
    assert mv.status == "READY"
    # the sweep is the safety net: it finds the (pending, job-less) version
    good = JobQueue(f"sqlite:///{tmp_path / 'good.sqlite'}")
    report = reconcile(good, tracking_uri=client._tracking_client.tracking_uri,
                       model_name=name)
    assert report.enqueued == [(name, str(mv.version))]


def test_strip_scheme_names_the_expected_form():
    assert strip_scheme("safedelta+postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(ValueError, match="safedelta\\+sqlite"):
        strip_scheme("sqlite:///x.db")
