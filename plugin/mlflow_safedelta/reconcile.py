"""The reconcile sweep: find registered versions that no route noticed, and enqueue them.

Webhook deliveries are fire-and-forget (never redelivered after a restart), direct-database
clients bypass both webhooks and a server-side store plugin, and the queue may have been down.
The sweep pages through the registry and enqueues every version that has no ``safedelta.status``
(or is still ``pending``), is not a protected output of the gate, and has no job yet. Versions with
a ``safedelta.parent`` tag are gated; the worker checks the others' MLmodel for a ``safedelta``
flavor and records a skip, so each version is looked at once. Enqueueing is idempotent, so the
sweep can run as often as wanted, beside the other routes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from mlflow_safedelta.jobqueue import JobQueue
from mlflow_safedelta.vocab import RECORDED, SKIP, gate_decision

_logger = logging.getLogger(__name__)


@dataclass
class SweepReport:
    """What one sweep saw and did."""

    scanned: int = 0
    enqueued: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"scanned": self.scanned,
                "enqueued": [{"model": m, "version": v} for m, v in self.enqueued]}


def reconcile(queue: JobQueue, *, tracking_uri: str | None = None,
              registry_uri: str | None = None, model_name: str | None = None,
              page_size: int = 200) -> SweepReport:
    """Enqueue every version that needs a look and has no job yet (optionally for one model)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    report = SweepReport()
    filter_string = f"name = '{model_name}'" if model_name else None
    token = None
    while True:
        page = client.search_model_versions(filter_string=filter_string, max_results=page_size,
                                            page_token=token)
        todo = []
        for mv in page:
            report.scanned += 1
            if gate_decision(mv.tags)[0] in (SKIP, RECORDED):
                continue
            todo.append((mv.name, str(mv.version)))
        known = queue.known(todo)
        for key in todo:
            if key in known:
                continue
            _, created = queue.enqueue(*key, source="reconcile")
            if created:
                report.enqueued.append(key)
        token = page.token
        if not token:
            break
    if report.enqueued:
        _logger.info("reconcile: enqueued %d of %d versions", len(report.enqueued),
                     report.scanned)
    return report


def reconcile_periodically(queue: JobQueue, stop: threading.Event, interval: float, **kwargs):
    """Run :func:`reconcile` every ``interval`` seconds until ``stop`` is set (errors logged)."""
    while not stop.is_set():
        try:
            reconcile(queue, **kwargs)
        except Exception:  # noqa: BLE001 - a registry outage must not end the loop
            _logger.exception("reconcile sweep failed; retrying in %.0f s", interval)
        stop.wait(interval)
