"""What a dead attempt of a gate job left behind, and how a takeover picks it up.

Every side effect of a gate job carries its job key (:func:`job_key`, tag ``safedelta.job_key``
on the gate run and the protected version). A worker that takes over adopts the RUNNING run
(:func:`adopt_run`) and the protected version (:func:`adopt_protected`) a dead attempt made,
closes runs it cannot adopt (:func:`close_dead_runs`), and, when the verdict is already on
record, closes the recorded run (:func:`settle_recorded`). :data:`FAULT_POINTS` name the step
boundaries of the job; :func:`fault_point` is the test-only fault injection.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
from contextlib import redirect_stdout
from typing import Any

from mlflow_safedelta import registry as reg
from mlflow_safedelta.redact import redact_text
from mlflow_safedelta.vocab import (
    ENV_FAULT_AFTER,
    GATE_EXPERIMENT,
    RUN_TAG_ERROR,
    TAG_JOB_KEY,
)

_logger = logging.getLogger(__name__)


#: the step boundaries of a gate job, in order (the recovery points; ``SAFEDELTA_FAULT_AFTER``)
FAULT_POINTS = ("claimed", "tags", "hessians", "protect", "run", "registered", "finish",
                "alias")


def fault_point(step: str) -> None:
    """TEST-ONLY fault injection, read in this one place: when ``$SAFEDELTA_FAULT_AFTER`` names
    ``step``, the process SIGKILLs itself here (what a crashed or OOM-killed worker looks like to
    the registry). Never set in production."""
    if os.environ.get(ENV_FAULT_AFTER) == step:
        _logger.warning("%s=%s: killing this process (test-only fault injection)",
                        ENV_FAULT_AFTER, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def job_key(name: str, version: str, created: Any, policy_sha: str) -> str:
    """The key every side effect of one gate job is recorded under (``safedelta.job_key``): the
    registered version for good (name, number, creation time, which MLflow never reuses) and the
    policy content. A takeover of the job computes the same key and adopts what carries it."""
    ident = json.dumps([name, str(version), str(created), policy_sha])
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def terminate_run(cl: Any, run_id: str, status: str, reason: str | None = None) -> None:
    """End a run (with ``safedelta.error`` = reason when given). MLflow's "View run at <tracking
    URI>" line goes to the log, credentials removed, never to stdout."""
    if reason:
        cl.set_tag(run_id, RUN_TAG_ERROR, redact_text(reason)[:4000])
    buf = io.StringIO()
    with redirect_stdout(buf):
        cl.set_terminated(run_id, status)
    if buf.getvalue().strip():
        _logger.debug("%s", redact_text(buf.getvalue().strip()))


def running_runs(cl: Any, key: str) -> list[Any]:
    """Gate runs of job ``key`` still marked RUNNING, newest first."""
    exp = cl.get_experiment_by_name(GATE_EXPERIMENT)
    if exp is None:
        return []
    return list(cl.search_runs([exp.experiment_id],
                               filter_string=f"tags.`{TAG_JOB_KEY}` = '{key}' "
                                             "and attributes.status = 'RUNNING'",
                               order_by=["attributes.start_time DESC"], max_results=100))


def close_dead_runs(cl: Any, key: str, *, keep: str | None = None, status: str = "KILLED",
                    reason: str = "a dead attempt of this gate job; not adopted") -> None:
    """Close every RUNNING gate run of job ``key`` except ``keep`` (a dead attempt's run)."""
    for run in running_runs(cl, key):
        if run.info.run_id != keep:
            _logger.warning("closing run %s of a dead attempt (%s)", run.info.run_id, status)
            terminate_run(cl, run.info.run_id, status, reason)


def adopt_run(cl: Any, key: str, name: str, version: str) -> str | None:
    """The RUNNING gate run a dead attempt of this job left (the newest; older ones are closed
    KILLED), or None: a takeover continues that run instead of starting a second one."""
    runs = running_runs(cl, key)
    if not runs:
        return None
    run_id = runs[0].info.run_id
    _logger.warning("%s v%s: adopting run %s of a dead attempt of this job", name,
                    version, run_id)
    close_dead_runs(cl, key, keep=run_id)
    return run_id


def adopt_protected(cl: Any, key: str, name: str, version: str, run_id: str) -> str | None:
    """The protected version this job's run already registered (a dead attempt got that far;
    its tags were set at creation, so it either exists with them or not at all), or None."""
    for mv in cl.search_model_versions(f"name = '{name}'"):
        t = dict(mv.tags or {})
        if t.get(TAG_JOB_KEY) == key and t.get(reg.TAG_RUN_ID) == run_id:
            _logger.warning("%s v%s: adopting protected version %s of a dead attempt",
                            name, version, mv.version)
            return str(mv.version)
    return None


def settle_recorded(cl: Any, mv: Any, tags: dict[str, str]) -> None:
    """A verdict is on record: a run of its job a dead attempt left RUNNING is closed (FINISHED
    when it is the recorded run, which holds the whole record; KILLED otherwise)."""
    sha = tags.get(reg.TAG_POLICY_SHA256)
    if not sha:
        return
    key = job_key(mv.name, str(mv.version), mv.creation_timestamp, sha)
    recorded = tags.get(reg.TAG_RUN_ID)
    try:
        for run in running_runs(cl, key):
            if run.info.run_id == recorded:
                terminate_run(cl, recorded, "FINISHED")
        close_dead_runs(cl, key, keep=recorded)
    except Exception as exc:  # noqa: BLE001 - the verdict stands; the sweep is best effort
        _logger.warning("could not close dead runs of %s v%s: %s", mv.name, mv.version,
                        redact_text(str(exc)))
