"""Registry-store plugin: notice every registration inside ``create_model_version``.

Schemes ``safedelta+sqlite`` and ``safedelta+postgresql`` (``mlflow.model_registry_store`` entry
points) wrap MLflow's SQL registry store. Pass the URI only as ``--registry-store-uri``; the
tracking store keeps the plain database URI::

    mlflow server --backend-store-uri sqlite:///mlflow.db \\
        --registry-store-uri safedelta+sqlite:///mlflow.db ...

The override runs inside the HTTP request, so it only records and enqueues (milliseconds): the
version is created as usual (READY, never left PENDING_REGISTRATION), tagged
``safedelta.status=pending`` when it names a parent, and one job is put in the durable queue
(``SAFEDELTA_QUEUE_URI``). A queue failure is logged and never fails the registration: the
reconcile sweep finds the version later. No state is kept in memory across processes.
"""

from __future__ import annotations

import logging

from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

from mlflow_safedelta.jobqueue import JobQueue, driver_url
from mlflow_safedelta.policy import snapshot_for_version
from mlflow_safedelta.vocab import (
    GATE,
    RECORDED,
    SKIP,
    STATUS_PENDING,
    TAG_STATUS,
    gate_decision,
)

_logger = logging.getLogger(__name__)

SCHEME_PREFIX = "safedelta+"


def strip_scheme(store_uri: str) -> str:
    """``safedelta+sqlite:///x.db`` -> ``sqlite:///x.db`` (also ``safedelta+postgresql+psycopg2``)."""
    if not store_uri.startswith(SCHEME_PREFIX):
        raise ValueError(f"not a safedelta registry URI: {store_uri!r} "
                         f"(expected 'safedelta+sqlite://...' or 'safedelta+postgresql://...')")
    return store_uri[len(SCHEME_PREFIX):]


class SafeDeltaRegistryStore(SqlAlchemyStore):
    """MLflow's SQL registry store plus: tag and enqueue a gate job on each new version."""

    is_plugin = True

    def __init__(self, store_uri: str, tracking_uri: str | None = None):
        self.safedelta_store_uri = store_uri
        super().__init__(driver_url(strip_scheme(store_uri)))

    @property
    def queue(self) -> JobQueue:
        """The queue named by ``SAFEDELTA_QUEUE_URI`` now (engines are cached per URL)."""
        return JobQueue()

    def create_model_version(self, name, source, run_id=None, tags=None, run_link=None,
                             description=None, local_model_path=None, model_id=None):
        mv = super().create_model_version(
            name, source, run_id=run_id, tags=tags, run_link=run_link, description=description,
            local_model_path=local_model_path, model_id=model_id)
        try:
            self._notice(mv, tags)
        except Exception:  # noqa: BLE001 - never fail a registration; reconcile will catch it
            _logger.exception("safedelta: could not enqueue a gate job for %s v%s; the reconcile "
                              "sweep will pick it up", mv.name, mv.version)
        return mv

    def _notice(self, mv, tags) -> None:
        decision, _ = gate_decision(tags)
        if decision in (SKIP, RECORDED):
            return
        if decision == GATE:
            super().set_model_version_tag(mv.name, mv.version, _tag(TAG_STATUS, STATUS_PENDING))
            mv.tags[TAG_STATUS] = STATUS_PENDING
        self.queue.enqueue(mv.name, mv.version, source="store", created=mv.creation_timestamp,
                           policy=snapshot_for_version(mv.name, mv.tags))


def _tag(key: str, value: str):
    from mlflow.entities.model_registry import ModelVersionTag

    return ModelVersionTag(key, value)


def build_store(store_uri: str, tracking_uri: str | None = None) -> SafeDeltaRegistryStore:
    """Entry-point builder (MLflow calls it with exactly these parameter names)."""
    return SafeDeltaRegistryStore(store_uri=store_uri, tracking_uri=tracking_uri)
