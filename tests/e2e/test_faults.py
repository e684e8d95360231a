"""Faults: a worker SIGKILLed mid-job, a missing parent, transient failures.

The registry here is a direct SQLite MLflow database (what a worker beside the server would
use); the worker runs as the real ``mlflow-safedelta worker`` subprocess where it gets killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlflow_safedelta.jobqueue import JobQueue
from mlflow_safedelta.worker import Worker

pytestmark = [pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 120.0


def wait_for(predicate, what: str, timeout: float = WAIT_S, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"gave up waiting for {what}")


def blocking_job(name, version, *, tracking_uri=None, registry_uri=None, **_):
    """Marks the version running, waits for a release file, then records a verdict. Every start
    and finish is appended to a log, so the test can count them across processes."""
    from mlflow import MlflowClient

    log = Path(os.environ["SAFEDELTA_TEST_JOB_LOG"])
    release = Path(os.environ["SAFEDELTA_TEST_RELEASE"])
    client = MlflowClient(tracking_uri, registry_uri)
    client.set_model_version_tag(name, version, "safedelta.status", "running")
    with log.open("a") as fh:
        fh.write(f"start {os.getpid()}\n")
    while not release.exists():
        time.sleep(0.05)
    client.set_model_version_tag(name, version, "safedelta.status", "passed")
    with log.open("a") as fh:
        fh.write(f"done {os.getpid()}\n")
    return type("Result", (), {"verdict": "passed"})()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('faults') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("aligned")
    client.create_model_version("aligned", "s3://safedelta-tests/aligned")
    return uri, client


@contextlib.contextmanager
def worker_process(queue_uri: str, tracking_uri: str, env: dict[str, str], log: Path):
    cmd = [str(Path(sys.executable).with_name("mlflow-safedelta")), "worker",
           "--queue-uri", queue_uri, "--tracking-uri", tracking_uri, "--poll-interval", "0.2",
           "--job", "tests.e2e.test_faults:blocking_job"]
    full_env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_a_worker_killed_mid_job_is_replaced_and_the_job_completes_once(registry, tmp_path):
    uri, client = registry
    client.create_registered_model("killed")
    v = str(client.create_model_version("killed", "s3://safedelta-tests/ft",
                                        tags={"safedelta.parent": "models:/aligned/1"}).version)
    queue_uri = f"sqlite:///{tmp_path / 'queue.sqlite'}"
    JobQueue(queue_uri).enqueue("killed", v, source="store")
    job_log, release = tmp_path / "job.log", tmp_path / "release"
    env = {"SAFEDELTA_TEST_JOB_LOG": str(job_log), "SAFEDELTA_TEST_RELEASE": str(release),
           "SAFEDELTA_JOB_LEASE": "3"}
    out = tmp_path / "workers.log"

    def starts():
        return [ln for ln in (job_log.read_text().splitlines() if job_log.exists() else [])
                if ln.startswith("start")]

    with worker_process(queue_uri, uri, env, out) as first:
        wait_for(lambda: starts() or (first.poll() is not None and pytest.fail(out.read_text())),
                 "the first worker to start the job")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the half state the kill left behind
    assert client.get_model_version("killed", v).tags["safedelta.status"] == "running"
    assert JobQueue(queue_uri).get("killed", v).state == "running"
    release.touch()
    with worker_process(queue_uri, uri, env, out) as second:
        wait_for(lambda: JobQueue(queue_uri).get("killed", v).state == "done"
                 or (second.poll() is not None and pytest.fail(out.read_text())),
                 "the restarted worker to finish the job")
    lines = job_log.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["start", "start", "done"]
    assert lines[1].split()[1] == lines[2].split()[1] == str(second.pid)  # ran to the end once
    job = JobQueue(queue_uri).get("killed", v)
    assert (job.attempts, job.result) == (2, "verdict=passed")
    tags = client.get_model_version("killed", v).tags
    assert tags["safedelta.status"] == "passed" and "safedelta.reason" not in tags
    assert [str(m.version) for m in client.search_model_versions("name='killed'")] == [v]


def test_a_missing_parent_ends_in_error_with_a_reason(registry, tmp_path):
    from mlflow_safedelta.gate_job import run_gate_job

    uri, client = registry
    client.create_registered_model("orphan")
    v = str(client.create_model_version("orphan", "s3://safedelta-tests/orphan", tags={
        "safedelta.parent": "models:/no-such-parent/7"}).version)
    queue = JobQueue(f"sqlite:///{tmp_path / 'queue.sqlite'}")
    queue.enqueue("orphan", v, source="webhook")
    Worker(queue, run_gate_job, tracking_uri=uri).run_once()
    tags = client.get_model_version("orphan", v).tags
    assert tags["safedelta.status"] == "error"
    assert "no-such-parent" in tags["safedelta.reason"]
    job = queue.get("orphan", v)
    assert job.state == "failed" and "no-such-parent" in job.last_error
    assert client.get_registered_model("orphan").aliases == {}
    assert [str(m.version) for m in client.search_model_versions("name='orphan'")] == [v]


def test_a_transient_failure_is_retried_with_backoff(registry, tmp_path):
    uri, client = registry
    client.create_registered_model("flaky")
    v = str(client.create_model_version("flaky", "s3://safedelta-tests/flaky",
                                        tags={"safedelta.parent": "models:/aligned/1"}).version)
    queue = JobQueue(f"sqlite:///{tmp_path / 'queue.sqlite'}", backoff_base=0.5,
                     max_attempts=5)
    queue.enqueue("flaky", v, source="store")
    calls = []

    def flaky_job(name, version, **kw):
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionRefusedError("registry briefly unreachable")
        client.set_model_version_tag(name, version, "safedelta.status", "passed")
        return type("Result", (), {"verdict": "passed"})()

    worker = Worker(queue, flaky_job, tracking_uri=uri, poll_interval=0.05)
    wait_for(lambda: worker.run_once() and queue.get("flaky", v).state == "done",
             "the flaky job to succeed", interval=0.05)
    assert len(calls) == 3
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0  # the queue never hands it out before its backoff
    job = queue.get("flaky", v)
    assert job.attempts == 3 and "ConnectionRefusedError" in job.last_error
    assert client.get_model_version("flaky", v).tags["safedelta.status"] == "passed"
