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

Under a governance file (``SAFEDELTA_GOVERNANCE``, see :mod:`mlflow_safedelta.governance`) the
store also enforces the gate (:mod:`mlflow_safedelta.guard`):

- ``set_registered_model_alias`` on a guarded alias is refused (403, ``PERMISSION_DENIED``) unless
  the version holds a valid signed pass under the bound policy, or a valid admin override; the
  message says why and which version the gate recommends. Deleting an alias stays allowed;
- state tags (``safedelta.status``, ``role``, ``verdict`` ...) are refused at registration and
  afterwards unless the gate signed them (the version's ``safedelta.signature`` statement carries
  the same value); the signature itself is verified when written (valid key, this very version,
  not older than the one in place). A registrant with write access but no key can therefore
  neither skip the gate nor open a guarded alias.

Without a governance file nothing is refused and the server log says the gate is unenforced.
"""

from __future__ import annotations

import logging

from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

from mlflow_safedelta import governance, guard
from mlflow_safedelta.jobqueue import JobQueue, driver_url
from mlflow_safedelta.vocab import (
    GATE,
    RECORDED,
    SIGNED_TAGS,
    SKIP,
    STATE_TAGS,
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
        try:  # say at start-up whether the gate is enforced (the warning comes from current())
            gov = governance.current()
        except Exception as exc:  # noqa: BLE001 - refused per request, with this reason
            _logger.error("safedelta: governance file invalid; guarded writes will be refused: "
                          "%s", exc)
        else:
            if gov is not None:
                _logger.info("safedelta: gate ENFORCED by %s", gov.path)

    @property
    def queue(self) -> JobQueue:
        """The queue named by ``SAFEDELTA_QUEUE_URI`` now (engines are cached per URL)."""
        return JobQueue()

    def create_model_version(self, name, source, run_id=None, tags=None, run_link=None,
                             description=None, local_model_path=None, model_id=None):
        gov = _governance()
        if gov is not None:
            _refuse_if(guard.check_registration, gov, name, source,
                       {t.key: t.value for t in tags or []})
        mv = super().create_model_version(
            name, source, run_id=run_id, tags=tags, run_link=run_link, description=description,
            local_model_path=local_model_path, model_id=model_id)
        try:
            self._notice(mv, tags)
        except Exception:  # noqa: BLE001 - never fail a registration; reconcile will catch it
            _logger.exception("safedelta: could not enqueue a gate job for %s v%s; the reconcile "
                              "sweep will pick it up", mv.name, mv.version)
        return mv

    def set_model_version_tag(self, name, version, tag):
        gov = _governance()
        if gov is not None and (tag.key in STATE_TAGS or tag.key in SIGNED_TAGS):
            mv = self.get_model_version(name, version)
            _refuse_if(guard.check_tag_write, gov, mv, tag.key, tag.value)
        return super().set_model_version_tag(name, version, tag)

    def delete_model_version_tag(self, name, version, key):
        gov = _governance()
        if gov is not None and (key in STATE_TAGS or key in SIGNED_TAGS):
            _refuse_if(guard.check_tag_delete, gov, self.get_model_version(name, version), key)
        return super().delete_model_version_tag(name, version, key)

    def set_registered_model_alias(self, name, alias, version):
        gov = _governance()
        if gov is not None and gov.guarded(name, alias):
            mv = self.get_model_version(name, version)
            check = guard.check_alias(gov, mv, alias)
            if not check.allowed:
                others = self.search_model_versions(f"name='{_quote(name)}'", max_results=200)
                msg = guard.refusal_message(gov, mv, alias, check.why,
                                            guard.recommended_version(gov, list(others)))
                _logger.warning("%s", msg)
                raise _denied(msg)
            if check.override is not None:
                _logger.warning("safedelta: alias %r of %s moved to v%s by admin override (%s)",
                                alias, name, version, check.why)
        return super().set_registered_model_alias(name, alias, version)

    def _notice(self, mv, tags) -> None:
        decision, _ = gate_decision(tags)
        if decision in (SKIP, RECORDED):
            return
        if decision == GATE:
            super().set_model_version_tag(mv.name, mv.version, _tag(TAG_STATUS, STATUS_PENDING))
            mv.tags[TAG_STATUS] = STATUS_PENDING
        self.queue.enqueue(mv.name, mv.version, source="store")


def _governance():
    """The governance in force, or None; a broken file fails closed (every guarded write is
    refused with the reason) rather than silently turning enforcement off."""
    try:
        return governance.current()
    except Exception as exc:  # noqa: BLE001 - reported to the client, never a 500
        raise _denied(f"safedelta: the governance file cannot be loaded, so guarded registry "
                      f"writes are refused: {exc}") from None


def _refuse_if(check, *args) -> None:
    try:
        check(*args)
    except guard.Refused as exc:
        _logger.warning("safedelta: refused: %s", exc)
        raise _denied(f"safedelta: {exc}") from None


def _denied(msg: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    return MlflowException(msg, error_code=PERMISSION_DENIED)


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _tag(key: str, value: str):
    from mlflow.entities.model_registry import ModelVersionTag

    return ModelVersionTag(key, value)


def build_store(store_uri: str, tracking_uri: str | None = None) -> SafeDeltaRegistryStore:
    """Entry-point builder (MLflow calls it with exactly these parameter names)."""
    return SafeDeltaRegistryStore(store_uri=store_uri, tracking_uri=tracking_uri)
