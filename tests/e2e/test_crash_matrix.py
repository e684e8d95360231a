"""Exactly one gate per version under any crash: the worker is SIGKILLed at every step boundary
of the gate job (``gate_job.FAULT_POINTS``, via the test-only ``SAFEDELTA_FAULT_AFTER``), on a
SQLite and on a PostgreSQL MLflow + queue; a second worker takes the job over. Afterwards there is
exactly one protected version and one gate run per fine-tune, no run is left RUNNING, and the
final status and alias are what an uninterrupted run gives.

The first attempt is a forked copy of this test process (imports already paid for) running the
real :class:`Worker` with the real gate job; only the evaluator is the fast measuring one of
``test_gate_job``. One MLflow server per backend is shared by every case.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from mlflow_safedelta import flavor, registry as reg
from mlflow_safedelta.gate_job import run_gate_job
from mlflow_safedelta.recovery import FAULT_POINTS
from mlflow_safedelta.jobqueue import JobQueue
from mlflow_safedelta.policy import policy_snapshot
from mlflow_safedelta.vocab import ENV_FAULT_AFTER, GATE_EXPERIMENT, HESSIAN_EXPERIMENT
from mlflow_safedelta.worker import Worker
from tests.e2e.conftest import fresh_pg_database, start_mlflow_server
from tests.e2e.test_gate_job import PASSING, MeasuringEvaluator
from tests.helpers.tiny import save_tiny_pair

pytestmark = [pytest.mark.e2e]

ALIAS = PASSING.promotion.target
CHILD_TIMEOUT_S = 300.0


@pytest.fixture(scope="module",
                params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request, tmp_path_factory):
    """One MLflow server (tracking + registry) and one queue per backend, with a registered
    aligned parent and a fine-tune checkpoint to register per case."""
    import torch

    torch.set_num_threads(1)  # the forked worker must not inherit a busy thread pool
    root = tmp_path_factory.mktemp(f"crash-{request.param}")
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            opts, queue_uri = {}, f"sqlite:///{root / 'queue.sqlite'}"
        else:
            db = stack.enter_context(fresh_pg_database("safedelta_crash"))
            opts = {"extra_args": ["--backend-store-uri",
                                   db.replace("postgresql", "postgresql+psycopg2", 1)]}
            queue_uri = db
        server = stack.enter_context(start_mlflow_server(root / "server", **opts))
        cl = reg.client(server.url)
        aligned = save_tiny_pair(root / "aligned", seed=0)
        _register(cl, aligned, "aligned", role="aligned")
        yield {"name": request.param, "url": server.url, "client": cl, "queue": queue_uri,
               "ft": save_tiny_pair(root / "ft", seed=1), "cache": root / "cache",
               "root": root}


def _register(cl, model_dir: Path, name: str, *, role: str, tags: dict | None = None) -> str:
    run = cl.create_run(reg.experiment_id(cl, "registrations"))
    saved = model_dir.parent / f"{name}-{uuid.uuid4().hex[:6]}-mlflow"
    flavor.save_model(str(model_dir), saved, role=role)
    mv = reg.register_saved_model(cl, saved, name, run_id=run.info.run_id, tags=tags)
    cl.set_terminated(run.info.run_id, "FINISHED")
    return str(mv.version)


def _worker(b, clock=time.time) -> Worker:
    job = functools.partial(run_gate_job, evaluator=MeasuringEvaluator(), progress=False,
                            cache_dir=b["cache"])
    return Worker(JobQueue(b["queue"], lease_seconds=30, clock=clock), job, tracking_uri=b["url"])


def _killed_attempt(b, step: str) -> None:
    """A forked worker that claims the job and SIGKILLs itself right after ``step``."""
    pid = os.fork()
    if pid == 0:  # the child: a worker that dies at the boundary
        code = 3
        try:
            os.environ[ENV_FAULT_AFTER] = step
            from mlflow_safedelta import jobqueue

            for eng in jobqueue._ENGINES.values():  # never share the parent's connections
                eng.dispose(close=False)
            _worker(b).run_once()
        finally:
            os._exit(code)  # reached only when the fault point was never hit
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:  # a hung child must not hang the suite
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked worker did not reach {step!r} in {CHILD_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"the worker was not killed after {step!r} (status {status})")


def _outcome(b, name: str, version: str) -> dict:
    """What the registry and the queue hold for one fine-tune, in comparable form."""
    cl = b["client"]
    protected = [mv for mv in cl.search_model_versions(f"name = '{name}'")
                 if (mv.tags or {}).get(reg.TAG_PROTECTED_FROM) == f"{name}/{version}"]
    tags = reg.version_tags(cl, name, version)
    exps = [cl.get_experiment_by_name(e).experiment_id for e in (GATE_EXPERIMENT,
                                                                 HESSIAN_EXPERIMENT)]
    gate_runs = [r for r in cl.search_runs(exps[:1], max_results=1000)
                 if r.data.tags.get("safedelta.model") == name]
    alias = (cl.get_registered_model(name).aliases or {}).get(ALIAS)
    return {"status": tags.get(reg.TAG_STATUS),
            "protected_versions": len(protected),
            "alias_on_protected": bool(protected) and str(alias) == str(protected[0].version)
            and tags.get(reg.TAG_PROTECTED_VERSION) == str(protected[0].version),
            "gate_runs": sorted(r.info.status for r in gate_runs),
            "running_anywhere": [r.info.run_id for r in cl.search_runs(
                exps, filter_string="attributes.status = 'RUNNING'")],
            "job": JobQueue(b["queue"]).get(name, version).state}


UNINTERRUPTED = {"status": "passed", "protected_versions": 1, "alias_on_protected": True,
                 "gate_runs": ["FINISHED"], "running_anywhere": [], "job": "done"}


def _fine_tune(b, case: str) -> tuple[str, str]:
    name = f"ft-{case}"
    v = _register(b["client"], b["ft"], name, role="finetuned",
                  tags={reg.TAG_PARENT: "models:/aligned/1"})
    JobQueue(b["queue"]).enqueue(name, v, source="store", policy=policy_snapshot(PASSING))
    return name, v


def test_an_uninterrupted_gate_gives_the_reference_outcome(backend):
    name, v = _fine_tune(backend, "uninterrupted")
    assert _worker(backend).run_once()
    assert _outcome(backend, name, v) == UNINTERRUPTED


@pytest.mark.parametrize("step", FAULT_POINTS)
def test_a_worker_killed_after_each_step_is_taken_over_into_exactly_one_gate(backend, step):
    name, v = _fine_tune(backend, step)
    _killed_attempt(backend, step)
    assert JobQueue(backend["queue"]).get(name, v).state == "running"  # the dead claim
    # the takeover: a worker whose clock says the dead worker's lease has long expired
    assert _worker(backend, clock=lambda: time.time() + 3600).run_once()
    assert _outcome(backend, name, v) == UNINTERRUPTED
