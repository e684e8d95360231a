"""The worker: claims gate jobs from the queue and runs them, one at a time.

For each claimed job it (1) decides whether the version needs a gate at all (a ``safedelta.parent``
tag, or an MLmodel whose ``safedelta`` flavor names a parent; never the gate's own
``safedelta.role=protected`` outputs), (2) calls the gate job, by default
``mlflow_safedelta.gate_job.run_gate_job`` (it writes ``safedelta.status`` running/passed/failed/error
itself and is idempotent once a final status exists), and (3) settles the queue row:

- success: ``done``;
- a transient failure (connection refused, timeouts, a locked database, anything with
  ``transient = True``): back to the queue with exponential backoff, up to ``max_attempts``;
- anything else, or attempts exhausted (also when workers keep dying on the job): ``failed``, and
  the version is tagged ``safedelta.status=error`` with ``safedelta.reason``, never left half-way.

A lease heartbeat runs beside the job; if this process dies, the lease expires and another worker
(or this one restarted) takes the job over, and the idempotent gate job finishes it once.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from typing import Any, Callable

from mlflow_safedelta.jobqueue import Job, JobQueue
from mlflow_safedelta.vocab import (
    CHECK,
    ENV_JOB,
    GATE,
    RECORDED,
    STATUS_ERROR,
    TAG_REASON,
    TAG_STATUS,
    gate_decision,
)

_logger = logging.getLogger(__name__)

DEFAULT_JOB = "mlflow_safedelta.gate_job:run_gate_job"

GateJob = Callable[..., Any]
"""``job(model_name, version, *, tracking_uri=None, registry_uri=None) -> GateResult``."""


def load_job(spec: str | None = None) -> GateJob:
    """Import the gate job named ``module:function`` (default ``$SAFEDELTA_JOB``, else
    :data:`DEFAULT_JOB`)."""
    spec = spec or os.environ.get(ENV_JOB) or DEFAULT_JOB
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"job must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: lost connections, timeouts, a busy database, rate
    limits, or any exception that declares ``transient = True``. Follows ``__cause__``."""
    seen = 0
    while exc is not None and seen < 8:
        if getattr(exc, "transient", False):
            return True
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        mod = type(exc).__module__
        name = type(exc).__name__
        if mod.startswith("requests") and name in ("ConnectionError", "Timeout", "ConnectTimeout",
                                                   "ReadTimeout", "RetryError"):
            return True
        if mod.startswith("urllib3") and name in ("MaxRetryError", "NewConnectionError"):
            return True
        if mod.startswith("sqlalchemy") and name == "OperationalError":
            return True
        code = getattr(exc, "error_code", None)
        if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class Worker:
    """Runs gate jobs from a :class:`JobQueue`.

    Args:
        queue: the queue to claim from.
        job: the gate job callable; default :func:`load_job` (``run_gate_job``).
        tracking_uri / registry_uri: where the registry lives (default: MLflow's resolution).
        poll_interval: seconds to sleep when the queue is idle.
    """

    def __init__(self, queue: JobQueue, job: GateJob | None = None, *,
                 tracking_uri: str | None = None, registry_uri: str | None = None,
                 poll_interval: float = 1.0):
        self.queue = queue
        self._job = job
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.poll_interval = poll_interval

    @property
    def job(self) -> GateJob:
        if self._job is None:
            self._job = load_job()
        return self._job

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)

    # -- deciding ------------------------------------------------------------------------------

    def needs_gate(self, model_name: str, version: str) -> tuple[bool, str]:
        """Whether this version should be gated, and why (for the job's result column)."""
        tags = dict(self.client().get_model_version(model_name, version).tags or {})
        decision, why = gate_decision(tags)
        if decision == CHECK:
            decision, why = gate_decision(tags, self._read_flavors(model_name, version))
        if decision == RECORDED:  # the job reuses or re-checks what is recorded (idempotent)
            return True, f"{why} (job is idempotent)"
        return decision == GATE, why if decision == GATE else f"skipped: {why}"

    def _read_flavors(self, model_name: str, version: str) -> dict[str, Any]:
        import yaml
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException

        uri = self.client().get_model_version_download_uri(model_name, version)
        try:
            path = download_artifacts(artifact_uri=f"{uri.rstrip('/')}/MLmodel",
                                      tracking_uri=self.tracking_uri)
        except (MlflowException, OSError) as exc:
            if is_transient(exc):
                raise
            _logger.info("%s v%s has no readable MLmodel (%s): not a safedelta model",
                         model_name, version, exc)
            return {}
        with open(path) as fh:
            return (yaml.safe_load(fh) or {}).get("flavors") or {}

    # -- running -------------------------------------------------------------------------------

    def run_once(self) -> Job | None:
        """Claim and process one due job. Returns the claimed job (None when idle)."""
        job = self.queue.claim()
        if job is None:
            return None
        self.process(job)
        return job

    def run(self, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set."""
        _logger.info("worker started on %s", self.queue.uri)
        while not stop.is_set():
            try:
                job = self.run_once()
            except Exception:  # a broken queue must not kill the loop; log and back off
                _logger.exception("worker loop error")
                job = None
            if job is None:
                stop.wait(self.poll_interval)

    def process(self, job: Job) -> None:
        name, version = job.model_name, job.version
        if job.attempts > self.queue.max_attempts:
            reason = (f"gave up after {job.attempts - 1} attempts; the last worker stopped "
                      f"mid-job (killed or crashed): {job.last_error or 'no error recorded'}")
            self._record_error(name, version, reason)
            self.queue.fail(job, reason)
            return
        stop_hb = threading.Event()
        hb = threading.Thread(target=self._heartbeat, args=(job, stop_hb), daemon=True)
        hb.start()
        try:
            needed, why = self.needs_gate(name, version)
            if not needed:
                self.queue.complete(job, why)
                return
            _logger.info("gating %s v%s (%s), attempt %d", name, version, why, job.attempts)
            kwargs = {"tracking_uri": self.tracking_uri, "registry_uri": self.registry_uri}
            if job.force:  # an operator's `jobs retry`: re-run despite a final status
                kwargs["force"] = True
            result = self.job(name, version, **kwargs)
            if getattr(result, "verdict", None) == STATUS_ERROR:
                # the job recorded status=error and its reason itself; keep it retryable
                self.queue.fail(job, f"gate error: {getattr(result, 'reason', '')}")
            else:
                self.queue.complete(job, _summary(result))
        except Exception as exc:  # noqa: BLE001 - every failure is settled here
            msg = f"{type(exc).__name__}: {exc}"
            if is_transient(exc) and self.queue.retry_later(job, msg):
                _logger.warning("%s v%s: transient failure, will retry: %s", name, version, msg)
                return
            _logger.error("%s v%s: gate job failed: %s", name, version, msg)
            self._record_error(name, version, msg)
            self.queue.fail(job, msg)
        finally:
            stop_hb.set()
            hb.join()

    def _heartbeat(self, job: Job, stop: threading.Event) -> None:
        interval = max(0.2, self.queue.lease_seconds / 4)
        while not stop.wait(interval):
            try:
                if not self.queue.heartbeat(job):
                    _logger.warning("%s v%s: lease lost", job.model_name, job.version)
                    return
            except Exception:  # noqa: BLE001 - retried on the next beat
                _logger.exception("heartbeat failed")

    def _record_error(self, name: str, version: str, reason: str) -> None:
        """Tag the version ``safedelta.status=error`` with a reason (best effort, logged)."""
        try:
            client = self.client()
            tags = dict(client.get_model_version(name, version).tags or {})
            client.set_model_version_tag(name, version, TAG_STATUS, STATUS_ERROR)
            if not (tags.get(TAG_STATUS) == STATUS_ERROR and tags.get(TAG_REASON)):
                client.set_model_version_tag(name, version, TAG_REASON, reason[:1000])
        except Exception:  # noqa: BLE001
            _logger.exception("could not tag %s v%s as error", name, version)


def _summary(result: Any) -> str:
    for attr in ("verdict", "status", "passed"):
        if hasattr(result, attr):
            return f"{attr}={getattr(result, attr)}"
    return "done" if result is None else str(result)[:500]
