"""The durable job queue and the worker: uniqueness, leases, backoff, settling failures."""

from __future__ import annotations

import threading
import uuid

import pytest

from mlflow_safedelta.jobqueue import DONE, FAILED, QUEUED, RUNNING, JobQueue
from mlflow_safedelta.vocab import gate_decision
from mlflow_safedelta.worker import Worker, is_transient
from tests.conftest import require_service


class FakeClock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return FakeClock()


REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_available() -> tuple[bool, str]:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()), ""
    except Exception as exc:  # noqa: BLE001
        return False, str(exc)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def queue_uri(request, tmp_path, monkeypatch):
    """Every queue test runs on SQLite and on Redis (a per-test key prefix, removed after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'q.sqlite'}"
        return
    ok, why = _redis_available()
    require_service("Redis", ok, f"{REDIS_URL}: {why}")
    import redis

    prefix = f"safedelta-test-{uuid.uuid4().hex[:8]}:"
    monkeypatch.setenv("SAFEDELTA_QUEUE_PREFIX", prefix)
    yield REDIS_URL
    r = redis.Redis.from_url(REDIS_URL)
    for key in r.scan_iter(f"{prefix}*"):
        r.delete(key)


@pytest.fixture
def queue(queue_uri, clock):
    return JobQueue(queue_uri, max_attempts=3, backoff_base=10.0, lease_seconds=60.0,
                    clock=clock)


def test_the_uri_picks_the_backend(queue, queue_uri):
    assert type(queue).__name__ == ("RedisJobQueue" if queue_uri.startswith("redis")
                                    else "JobQueue")


def test_enqueue_is_unique_per_model_version(queue):
    job, created = queue.enqueue("m", 1, source="store")
    again, created_again = queue.enqueue("m", "1", source="webhook")
    other, created_other = queue.enqueue("m", 2, source="webhook")
    assert (created, created_again, created_other) == (True, False, True)
    assert again.source == "store" and again.state == QUEUED
    assert sorted(j.version for j in queue.list()) == ["1", "2"]


def test_claim_leases_one_job_once(queue):
    queue.enqueue("m", 1, source="store")
    job = queue.claim()
    assert job.state == RUNNING and job.attempts == 1 and job.token
    assert queue.claim() is None  # the only job is leased
    assert queue.complete(job, "ok")
    assert queue.get("m", 1).state == DONE
    assert queue.claim() is None


def test_racing_claims_have_one_winner(queue_uri, clock):
    uri = queue_uri
    JobQueue(uri, clock=clock).enqueue("m", 1, source="store")
    wins, barrier = [], threading.Barrier(6)

    def contend():
        q = JobQueue(uri, clock=clock)
        barrier.wait()
        job = q.claim()
        if job is not None:
            wins.append(job.token)

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_expired_lease_is_taken_over_and_the_old_claim_loses(queue, clock):
    queue.enqueue("m", 1, source="store")
    first = queue.claim()
    clock.t += 30
    assert queue.heartbeat(first)  # lease now ends at +90
    clock.t += 50
    assert queue.claim() is None  # still leased (until +90)
    clock.t += 20
    second = queue.claim()
    assert second is not None and second.token != first.token and second.attempts == 2
    assert not queue.complete(first, "late")  # the dead worker cannot settle it any more
    assert queue.complete(second, "ok")
    assert queue.get("m", 1).result == "ok"


def test_transient_failure_backs_off_exponentially_then_gives_up(queue, clock):
    queue.enqueue("m", 1, source="store")
    delays = []
    for attempt in (1, 2):
        job = queue.claim()
        assert job.attempts == attempt
        start = clock.t
        assert queue.retry_later(job, "ConnectionError: refused")
        row = queue.get("m", 1)
        assert row.state == QUEUED and row.last_error.startswith("ConnectionError")
        delays.append(row.next_run_at - start)
        clock.t = row.next_run_at - 0.01
        assert queue.claim() is None  # not before its time
        clock.t = row.next_run_at
    assert 10.0 <= delays[0] <= 11.0 and 20.0 <= delays[1] <= 22.0
    job = queue.claim()
    assert job.attempts == 3
    assert not queue.retry_later(job, "ConnectionError: refused")  # max_attempts reached
    row = queue.get("m", 1)
    assert row.state == FAILED and "gave up after 3 attempts" in row.last_error


def test_operator_retry_requeues_only_failed_jobs(queue):
    queue.enqueue("m", 1, source="store")
    assert not queue.retry("m", 1)  # queued, not failed
    job = queue.claim()
    queue.fail(job, "boom")
    assert queue.retry("m", 1)
    row = queue.get("m", 1)
    assert row.state == QUEUED and row.attempts == 0
    assert not queue.retry("nope", 1)


def test_delivery_ids_dedupe_and_enqueue_together(queue):
    assert queue.record_delivery("d-1", "model_version.created", ("m", "1", "webhook"))
    assert not queue.record_delivery("d-1", "model_version.created", ("m", "2", "webhook"))
    assert [j.version for j in queue.list()] == ["1"]  # the replay wrote nothing


def test_gate_decision_from_tags_and_flavors():
    assert gate_decision({"safedelta.parent": "models:/base/1"})[0] == "gate"
    assert gate_decision({"safedelta.parent": "models:/base/1",
                          "safedelta.role": "protected"})[0] == "skip"
    assert gate_decision({"safedelta.status": "passed", "safedelta.parent": "x"})[0] == "recorded"
    assert gate_decision({"safedelta.status": "pending", "safedelta.parent": "x"})[0] == "gate"
    assert gate_decision([{"key": "other", "value": "1"}])[0] == "check"
    assert gate_decision(None)[0] == "check"
    flavor = {"safedelta": {"role": "finetuned", "parent_uri": "models:/base/1"}}
    assert gate_decision({}, flavor) == ("gate", "safedelta flavor with parent models:/base/1")
    assert gate_decision({}, {"safedelta": {"role": "protected", "parent_uri": "x"}})[0] == "skip"
    assert gate_decision({}, {"transformers": {}})[0] == "check"  # the run may name a parent
    assert gate_decision({}, {"transformers": {}}, {})[0] == "skip"


def test_a_parent_named_only_on_the_run_is_gated():
    run_tags = {"safedelta.parent": "models:/base/1"}
    assert gate_decision({}, {"transformers": {}}, run_tags) == (
        "gate", "run tag safedelta.parent models:/base/1")
    assert gate_decision({}, {}, run_tags)[0] == "gate"


class Flaky(Exception):
    transient = True


def test_is_transient_follows_causes():
    from mlflow.exceptions import MlflowException

    try:
        try:
            raise ConnectionRefusedError("refused")
        except OSError as inner:
            raise MlflowException("API request failed") from inner
    except MlflowException as exc:
        wrapped = exc
    assert is_transient(wrapped)
    assert is_transient(Flaky())
    assert not is_transient(ValueError("bad policy"))


# -- the worker against a real (direct SQLite) registry -------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("ft")
    return uri, client


def _version(client, tags):
    return str(client.create_model_version("ft", "file:///nonexistent/model", tags=tags).version)


def test_worker_retries_transient_failures_then_completes(registry, queue, clock):
    uri, client = registry
    v = _version(client, {"safedelta.parent": "models:/base/1"})
    calls = []

    def job(name, version, **kw):
        calls.append((name, version, kw["tracking_uri"]))
        if len(calls) < 3:
            raise Flaky("server busy")
        client.set_model_version_tag(name, version, "safedelta.status", "passed")
        return "passed"

    queue.enqueue("ft", v, source="store")
    worker = Worker(queue, job, tracking_uri=uri)
    for _ in range(3):
        job_row = worker.run_once()
        assert job_row is not None
        clock.t += 1000  # past any backoff
    assert calls == [("ft", v, uri)] * 3
    row = queue.get("ft", v)
    assert row.state == DONE and row.attempts == 3
    assert client.get_model_version("ft", v).tags["safedelta.status"] == "passed"


def test_worker_crash_leaves_error_status_and_reason(registry, queue):
    uri, client = registry
    v = _version(client, {"safedelta.parent": "models:/base/1"})

    def job(name, version, **kw):
        client.set_model_version_tag(name, version, "safedelta.status", "running")
        raise RuntimeError("parent weights unreadable")

    queue.enqueue("ft", v, source="store")
    Worker(queue, job, tracking_uri=uri).run_once()
    tags = client.get_model_version("ft", v).tags
    assert tags["safedelta.status"] == "error"
    assert "parent weights unreadable" in tags["safedelta.reason"]
    row = queue.get("ft", v)
    assert row.state == FAILED and row.attempts == 1  # not transient: no retry


def test_worker_skips_protected_and_unflavored_versions(registry, queue):
    uri, client = registry
    protected = _version(client, {"safedelta.role": "protected",
                                  "safedelta.parent": "models:/base/1"})
    plain = _version(client, {})
    queue.enqueue("ft", protected, source="reconcile")
    queue.enqueue("ft", plain, source="reconcile")
    calls = []
    worker = Worker(queue, lambda *a, **k: calls.append(a), tracking_uri=uri)
    assert worker.run_once() and worker.run_once()
    assert calls == []
    assert queue.get("ft", protected).result.startswith("skipped: a protected output")
    assert queue.get("ft", plain).result.startswith("skipped: no safedelta.parent")
    tags = client.get_model_version("ft", plain).tags  # never skipped silently
    assert tags["safedelta.status"] == "skipped"
    assert tags["safedelta.reason"].startswith("skipped: no safedelta.parent tag")
    assert "safedelta.status" not in client.get_model_version("ft", protected).tags


def test_worker_gates_a_safedelta_flavored_source(registry, queue, tmp_path):
    uri, client = registry
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text(
        "flavors:\n  safedelta:\n    parent_uri: models:/base/1\n")
    v = str(client.create_model_version("ft", model_dir.as_uri()).version)
    calls = []
    queue.enqueue("ft", v, source="reconcile")
    Worker(queue, lambda name, version, **k: calls.append(version), tracking_uri=uri).run_once()
    assert calls == [v]
    assert queue.get("ft", v).state == DONE


def test_worker_gives_up_on_a_job_whose_workers_keep_dying(registry, queue, clock):
    uri, client = registry
    v = _version(client, {"safedelta.parent": "models:/base/1"})
    queue.enqueue("ft", v, source="store")
    for _ in range(queue.max_attempts):  # each claim "dies": its lease simply expires
        assert queue.claim() is not None
        clock.t += queue.lease_seconds + 1
    calls = []
    Worker(queue, lambda *a, **k: calls.append(a), tracking_uri=uri).run_once()
    assert calls == []
    assert queue.get("ft", v).state == FAILED
    tags = client.get_model_version("ft", v).tags
    assert tags["safedelta.status"] == "error" and "stopped mid-job" in tags["safedelta.reason"]


def test_a_gate_error_result_fails_the_job_and_an_operator_retry_forces_a_rerun(registry, queue):
    uri, client = registry
    v = _version(client, {"safedelta.parent": "models:/base/1"})
    calls = []

    class Result:
        def __init__(self, verdict, reason=""):
            self.verdict, self.reason = verdict, reason

    def job(name, version, **kw):
        calls.append(kw.get("force", False))
        return Result("error", "parent not found") if len(calls) == 1 else Result("passed")

    queue.enqueue("ft", v, source="store")
    worker = Worker(queue, job, tracking_uri=uri)
    worker.run_once()
    row = queue.get("ft", v)
    assert row.state == FAILED and "parent not found" in row.last_error
    assert queue.retry("ft", v)
    worker.run_once()
    assert calls == [False, True]
    assert queue.get("ft", v).state == DONE and queue.get("ft", v).result == "verdict=passed"


def test_jobs_list_and_retry_commands(tmp_path):
    import json

    from click.testing import CliRunner

    from mlflow_safedelta.cli import cli

    uri = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    q = JobQueue(uri)
    q.enqueue("m", 1, source="webhook")
    q.fail(q.claim(), "RegistryError: parent models:/x/1 not found")
    q.enqueue("m", 2, source="store")
    runner = CliRunner()
    listed = runner.invoke(cli, ["jobs", "list", "--state", "failed", "--queue-uri", uri, "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [(r["version"], r["state"]) for r in rows] == [("1", "failed")]
    assert "parent models:/x/1 not found" in rows[0]["last_error"]
    retried = runner.invoke(cli, ["jobs", "retry", "m", "1", "--queue-uri", uri])
    assert retried.exit_code == 0 and "re-queued m v1" in retried.output
    assert q.get("m", 1).state == "queued" and q.get("m", 1).force
    again = runner.invoke(cli, ["jobs", "retry", "m", "1", "--queue-uri", uri])
    assert again.exit_code == 2 and "no failed job for 'm' version 1" in again.output
    no_secret = runner.invoke(cli, ["webhook", "ensure", "http://127.0.0.1:1/x"],
                              env={"SAFEDELTA_WEBHOOK_SECRET": ""})
    assert no_secret.exit_code == 2 and "secret is required" in no_secret.output


def test_a_job_of_a_re_created_version_replaces_the_stale_row(queue):
    """Name + number + creation time is a version's identity: a model deleted and created again
    gets a fresh job for its new version 1, not the old one's finished row."""
    job, created = queue.enqueue("m", "1", source="store", created=1000)
    claimed = queue.claim()
    assert queue.complete(claimed, "verdict=passed")
    assert queue.enqueue("m", "1", source="store", created=1000)[1] is False  # same version
    assert queue.known([("m", "1", 1000)]) == {("m", "1")}
    assert queue.known([("m", "1", 2000)]) == set()
    job, created = queue.enqueue("m", "1", source="reconcile", created=2000)
    assert created and job.state == "queued" and job.version_created == "2000"
    assert job.attempts == 0 and job.result is None


def test_over_long_names_and_non_numeric_versions_are_refused(queue):
    from mlflow_safedelta.jobqueue import InvalidJob

    for name, version in (("m" * 300, "1"), ("m", "[1, 2]"), ("m", [1, 2]), ("", "1")):
        with pytest.raises(InvalidJob):
            queue.enqueue(name, version, source="webhook")
    assert queue.list() == []


def test_the_policy_content_is_stored_with_the_job(queue):
    from mlflow_safedelta.policy import load_policy, policy_from_snapshot, policy_snapshot

    strict = load_policy("strict")
    queue.enqueue("m", "1", source="store", policy=policy_snapshot(strict))
    job = queue.claim()
    assert policy_from_snapshot(job.policy) == strict
    assert queue.pin(job, created=5, policy="ignored: already recorded")
    assert queue.get("m", "1").policy == job.policy
    assert queue.get("m", "1").version_created == "5"


def test_an_old_queue_database_is_migrated(tmp_path):
    """Rows of a queue made before identity and policy were recorded keep working: the columns
    are added, and such a row counts as an earlier version's when it is older than the version."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE safedelta_jobs (model_name VARCHAR(256) NOT NULL, version "
                "VARCHAR(64) NOT NULL, state VARCHAR(16) NOT NULL, source VARCHAR(32) NOT NULL, "
                "attempts INTEGER NOT NULL, enqueued_at FLOAT NOT NULL, next_run_at FLOAT NOT "
                "NULL, lease_until FLOAT, token VARCHAR(64), last_error TEXT, result TEXT, "
                "updated_at FLOAT NOT NULL, force BOOLEAN NOT NULL, PRIMARY KEY (model_name, "
                "version))")
    con.execute("INSERT INTO safedelta_jobs VALUES ('m', '1', 'done', 'store', 1, 100.0, 100.0, "
                "NULL, NULL, NULL, 'verdict=passed', 100.0, 0)")
    con.commit()
    con.close()
    queue = JobQueue(f"sqlite:///{path}")
    old = queue.get("m", "1")
    assert old.state == "done" and old.version_created is None and old.policy is None
    assert queue.enqueue("m", "1", source="store", created=50_000)[1] is False  # same version
    job, created = queue.enqueue("m", "1", source="store", created=200_000)  # re-created later
    assert created and job.state == "queued"


def test_queue_backends_are_registered_by_uri_prefix(tmp_path):
    from mlflow_safedelta import jobqueue

    assert jobqueue.queue_backend("redis://127.0.0.1:6379/0") is jobqueue.RedisJobQueue
    assert jobqueue.queue_backend(f"sqlite:///{tmp_path / 'q.sqlite'}") is None  # the SQL queue
    assert type(JobQueue(f"sqlite:///{tmp_path / 'q.sqlite'}")) is JobQueue
    with pytest.raises(ValueError, match="already served by RedisJobQueue"):
        jobqueue.register_queue_backend(("redis://",), JobQueue)

    class MemoryQueue(JobQueue):  # a throw-away backend: one class, one registration
        def __init__(self, uri=None, **kwargs):
            self.uri = uri

    try:
        jobqueue.register_queue_backend(("memory://",), MemoryQueue)
        assert type(JobQueue("memory://x")) is MemoryQueue
    finally:
        jobqueue.QUEUE_BACKENDS.pop("memory://", None)
