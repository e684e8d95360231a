"""The three routes that notice a registration, against a real ``mlflow server`` (SQLite):

- the store plugin (``--registry-store-uri safedelta+sqlite:///...``) enqueues into queue "store";
- the webhook receiver (``mlflow-safedelta serve``, subscribed by itself) into queue "webhook";
- the reconcile sweep into queue "reconcile", for a version written straight to the database
  (no REST call: neither the plugin in the server nor a webhook sees it).

Each route has its own queue here so that each can be counted alone; in production they share one
and the (model, version) key merges them (checked too).
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
import requests
import sqlalchemy as sa
from click.testing import CliRunner

from mlflow_safedelta.cli import cli
from mlflow_safedelta.jobqueue import JobQueue
from mlflow_safedelta.reconcile import reconcile
from mlflow_safedelta.webhooks import WEBHOOK_NAME, ensure_webhook
from mlflow_safedelta.worker import Worker
from tests.e2e.conftest import free_port

pytestmark = [pytest.mark.e2e]

SECRET = "routes-test-secret"
PARENT = {"safedelta.parent": "models:/aligned/1"}
WAIT_S = 90.0


def webhook_env() -> dict[str, str]:
    from cryptography.fernet import Fernet

    return {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_CACHE_TTL": "0",
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode()}


def wait_for(predicate, what: str, timeout: float = WAIT_S, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"gave up waiting for {what}")


@contextlib.contextmanager
def receiver_process(root: Path, *, tracking_uri: str, queue_uri: str, secret: str = SECRET,
                     job: str | None = None, reconcile_interval: float = 0):
    """``mlflow-safedelta serve``, subscribing itself; stopped by process group. Without ``job``
    it only receives (``--no-worker``); with one (``module:function``) it also runs the worker."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).with_name("mlflow-safedelta")), "serve", "--host", "127.0.0.1",
           "--port", str(port), "--queue-uri", queue_uri, "--tracking-uri", tracking_uri,
           "--reconcile-interval", str(reconcile_interval),
           "--ensure-webhook", f"{url}/webhooks/mlflow"]
    cmd += ["--job", job] if job else ["--no-worker"]
    env = dict(os.environ, SAFEDELTA_WEBHOOK_SECRET=secret, OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    log_path = root / f"receiver-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            def up():
                if proc.poll() is not None:
                    raise AssertionError(f"receiver exited:\n{log_path.read_text()}")
                try:
                    return requests.get(f"{url}/health", timeout=1).text == "OK"
                except requests.ConnectionError:
                    return False

            wait_for(up, "the receiver to answer /health", timeout=120)
            yield url, proc, log_path
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def queues(tmp_path_factory):
    root = tmp_path_factory.mktemp("queues")
    return {k: f"sqlite:///{root / (k + '.sqlite')}" for k in ("store", "webhook", "reconcile")}


@pytest.fixture(scope="module")
def mlflow_server_options(queues):
    return {"env": {**webhook_env(), "SAFEDELTA_QUEUE_URI": queues["store"]},
            "registry_store_uri": "safedelta+sqlite:///{db_path}"}


@pytest.fixture(scope="module")
def receiver(mlflow_server, queues, tmp_path_factory):
    with receiver_process(tmp_path_factory.mktemp("receiver"), tracking_uri=mlflow_server.url,
                          queue_uri=queues["webhook"]) as r:
        yield r


@pytest.fixture(scope="module")
def rest(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


def jobs_of(queue_uri: str, model: str):
    return [(j.version, j.source) for j in JobQueue(queue_uri).list(model_name=model)]


def deliveries(queue_uri: str) -> int:
    q = JobQueue(queue_uri)
    with q.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(q.deliveries)).scalar_one()


def test_the_receiver_subscribed_itself_once(mlflow_server, receiver, rest):
    url, _, _ = receiver
    hooks = [h for h in rest.list_webhooks() if h.name == WEBHOOK_NAME]
    assert [(h.url, [str(e) for e in h.events]) for h in hooks] == [
        (f"{url}/webhooks/mlflow", ["model_version.created", "model_version_alias.created"])]
    hook, action = ensure_webhook(f"{url}/webhooks/mlflow", SECRET, tracking_uri=mlflow_server.url)
    assert action == "updated" and hook.webhook_id == hooks[0].webhook_id
    assert len([h for h in rest.list_webhooks() if h.name == WEBHOOK_NAME]) == 1


def test_store_and_webhook_routes_each_make_exactly_one_job(mlflow_server, receiver, rest, queues):
    rest.create_registered_model("routes")
    mv = rest.create_model_version("routes", "s3://safedelta-tests/ft-0", tags=PARENT)
    v = str(mv.version)
    # store route: synchronous, inside the registration request
    assert jobs_of(queues["store"], "routes") == [(v, "store")]
    assert rest.get_model_version("routes", v).tags["safedelta.status"] == "pending"
    # webhook route: MLflow delivers asynchronously
    wait_for(lambda: jobs_of(queues["webhook"], "routes"), "the webhook job")
    assert jobs_of(queues["webhook"], "routes") == [(v, "webhook")]
    assert deliveries(queues["webhook"]) == 1
    # the routes converge: a sweep into the store's queue adds nothing for this version
    assert reconcile(JobQueue(queues["store"]), tracking_uri=mlflow_server.url,
                     model_name="routes").enqueued == []
    assert jobs_of(queues["store"], "routes") == [(v, "store")]


def test_protected_outputs_make_no_job(rest, receiver, queues):
    rest.create_registered_model("outputs")
    rest.create_model_version("outputs", "s3://safedelta-tests/ft-1",
                              tags={**PARENT, "safedelta.role": "protected"})
    ok = rest.create_model_version("outputs", "s3://safedelta-tests/ft-2", tags=PARENT)  # a marker after it
    wait_for(lambda: jobs_of(queues["webhook"], "outputs"), "the marker's webhook job")
    assert jobs_of(queues["webhook"], "outputs") == [(str(ok.version), "webhook")]
    assert jobs_of(queues["store"], "outputs") == [(str(ok.version), "store")]


def test_reconcile_finds_the_version_no_route_saw(mlflow_server, receiver, rest, queues):
    from mlflow import MlflowClient

    direct_uri = mlflow_server.backend_store_uri  # plain sqlite: no plugin, no webhook
    direct = MlflowClient(tracking_uri=direct_uri, registry_uri=direct_uri)
    direct.create_registered_model("swept")
    v = str(direct.create_model_version("swept", "s3://safedelta-tests/ft-3", tags=PARENT).version)
    args = ["reconcile", "--model", "swept", "--queue-uri", queues["reconcile"],
            "--tracking-uri", mlflow_server.url, "--json"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert '"model": "swept"' in first.output and f'"version": "{v}"' in first.output
    assert jobs_of(queues["reconcile"], "swept") == [(v, "reconcile")]
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and '"enqueued": []' in again.output
    assert jobs_of(queues["store"], "swept") == [] and jobs_of(queues["webhook"], "swept") == []


def record_passed(name, version, *, tracking_uri=None, registry_uri=None, **_):
    """A fast stand-in for the gate job: records a verdict the way the real one does."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri, registry_uri).set_model_version_tag(
        name, version, "safedelta.status", "passed")
    return type("Result", (), {"verdict": "passed"})()


def test_the_worker_settles_the_store_job(mlflow_server, rest, queues):
    rest.create_registered_model("worked")
    v = str(rest.create_model_version("worked", "s3://safedelta-tests/ft-4", tags=PARENT).version)
    worker = Worker(JobQueue(queues["store"]), record_passed, tracking_uri=mlflow_server.url)
    while worker.run_once() is not None:
        pass
    job = JobQueue(queues["store"]).get("worked", v)
    assert (job.state, job.attempts, job.result) == ("done", 1, "verdict=passed")
    assert rest.get_model_version("worked", v).tags["safedelta.status"] == "passed"


def test_a_flavored_registration_is_gated_once_by_the_real_job(mlflow_server, rest, queues,
                                                                tmp_path):
    """The store route end to end with the real gate job (a fixed-metrics evaluator stands in
    for generation): the fine-tune is gated, its protected output and the parent are not."""
    import functools

    import mlflow

    from mlflow_safedelta import flavor
    from mlflow_safedelta.gate_job import run_gate_job
    from mlflow_safedelta.policy import parse_policy
    from tests.helpers.tiny import save_tiny_pair

    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    with mlflow.start_run():
        flavor.log_model(str(save_tiny_pair(tmp_path / "aligned", seed=0)), name="model",
                         role="aligned", registered_model_name="gated-aligned")
    with mlflow.start_run():
        flavor.log_model(str(save_tiny_pair(tmp_path / "ft", seed=1)), name="model",
                         parent="models:/gated-aligned/1", registered_model_name="gated-bot")
    queue = JobQueue(queues["store"])
    # no tags on either registration: the worker decides from their MLmodel
    assert jobs_of(queues["store"], "gated-bot") == [("1", "store")]
    assert jobs_of(queues["store"], "gated-aligned") == [("1", "store")]

    policy = parse_policy({
        "policy_version": 1, "name": "routes-test",
        "safety": {"suites": ["advbench"], "judge": "keyword", "max_asr": 0.5,
                   "max_asr_increase": None},
        "utility": {"min_retention": 0.0},
        "select_s": {"mode": "fixed", "s": 0.05},
        "promotion": {"enabled": True, "alias": "production"},
        "evaluation": {"limit": 4, "max_new_tokens": 4}})

    def fixed_metrics(models, policy, **_):
        assert set(models) == {"aligned", "finetuned", "protected"}
        return type("Report", (), {"judge": {"judge": "keyword"}, "metrics": {
            "aligned": {"asr.advbench": 0.05}, "finetuned": {"asr.advbench": 0.6},
            "protected": {"asr.advbench": 0.1, "utility_retention": 0.9, "asr.advbench.n": 4.0}}})()

    job = functools.partial(run_gate_job, policy=policy, evaluator=fixed_metrics, progress=False,
                            work_dir=tmp_path / "work")
    worker = Worker(queue, job, tracking_uri=mlflow_server.url)
    while worker.run_once() is not None:
        pass
    assert queue.get("gated-bot", "1").result == "verdict=passed"
    assert queue.get("gated-aligned", "1").result.startswith("skipped")
    ft = rest.get_model_version("gated-bot", "1").tags
    assert ft["safedelta.status"] == "passed" and ft["safedelta.protected_version"] == "2"
    protected = rest.get_model_version("gated-bot", "2").tags
    assert protected["safedelta.role"] == "protected"
    assert jobs_of(queues["store"], "gated-bot") == [("1", "store")]  # the output made no job
    assert rest.get_model_version_by_alias("gated-bot", "production").version == "2"

    # the webhook route saw the same registration; its job, run by a worker with the same real
    # gate job, makes no second gate run: one registration, one gate run, whatever the routes
    wait_for(lambda: jobs_of(queues["webhook"], "gated-bot"), "the webhook job")
    assert jobs_of(queues["webhook"], "gated-bot") == [("1", "webhook")]
    hook_queue = JobQueue(f"sqlite:///{tmp_path / 'webhook-copy.sqlite'}")  # that job alone
    hook_queue.enqueue("gated-bot", "1", source="webhook")
    Worker(hook_queue, job, tracking_uri=mlflow_server.url).run_once()
    assert hook_queue.get("gated-bot", "1").state == "done"
    gate_exp = rest.get_experiment_by_name("safedelta-gate").experiment_id
    runs = rest.search_runs([gate_exp], "tags.`safedelta.model` = 'gated-bot'")
    assert len(runs) == 1 and runs[0].info.run_id == ft["safedelta.run_id"]
    assert sorted(int(m.version) for m in rest.search_model_versions("name='gated-bot'")) == [1, 2]
