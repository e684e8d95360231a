"""The same flow against PostgreSQL: a fresh database per run holds MLflow (tracking and the
``safedelta+postgresql`` registry store) and the job queue (the networked backend), shared by the
server's store plugin and one ``mlflow-safedelta serve`` process that runs all the rest:
receiver, worker and periodic reconcile sweep."""

from __future__ import annotations


import pytest
import sqlalchemy as sa

from mlflow_safedelta.jobqueue import JobQueue
from mlflow_safedelta.reconcile import reconcile
from tests.e2e.conftest import fresh_pg_database
from tests.e2e.test_routes import receiver_process, wait_for, webhook_env

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

DRIVER = "postgresql+psycopg2"  # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3
PARENT = {"safedelta.parent": "models:/aligned/1"}


@pytest.fixture(scope="module")
def pg_uri():
    with fresh_pg_database("safedelta_test") as uri:
        yield uri


@pytest.fixture(scope="module")
def mlflow_server_options(pg_uri):
    # the plain postgresql:// URL for the plugin and the queue (they pick the installed driver);
    # MLflow's own tracking store needs the driver spelled out
    return {"env": {**webhook_env(), "SAFEDELTA_QUEUE_URI": pg_uri},
            "registry_store_uri": f"safedelta+{pg_uri}",
            "extra_args": ["--backend-store-uri", pg_uri.replace("postgresql", DRIVER, 1)]}


@pytest.fixture(scope="module")
def receiver(mlflow_server, pg_uri, tmp_path_factory):
    with receiver_process(tmp_path_factory.mktemp("receiver"), tracking_uri=mlflow_server.url,
                          queue_uri=pg_uri, job="tests.e2e.test_routes:record_passed",
                          reconcile_interval=1) as r:
        yield r


def _jobs(queue, model):
    return [(j.version, j.source) for j in queue.list(model_name=model)]


def _deliveries(queue) -> int:
    with queue.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(queue.deliveries)).scalar_one()


def _done(queue, model, version):
    job = queue.get(model, version)
    return job is not None and job.state == "done"


def test_three_routes_one_job_each_on_postgres(mlflow_server, receiver, pg_uri):
    from mlflow import MlflowClient

    queue = JobQueue(pg_uri)
    assert queue.engine.dialect.name == "postgresql"
    rest = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)

    # store plugin (synchronous) + webhook (asynchronous) into the shared queue: one job
    rest.create_registered_model("pg-ft")
    v = str(rest.create_model_version("pg-ft", "s3://safedelta-tests/pg-ft", tags=PARENT).version)
    assert _jobs(queue, "pg-ft") == [(v, "store")]
    wait_for(lambda: _deliveries(queue) == 1, "the webhook delivery to be recorded")

    # a registration written straight to PostgreSQL: only the serve's periodic sweep sees it
    direct_uri = pg_uri.replace("postgresql", DRIVER, 1)
    direct = MlflowClient(tracking_uri=direct_uri, registry_uri=direct_uri)
    direct.create_registered_model("pg-swept")
    w = str(direct.create_model_version("pg-swept", "s3://safedelta-tests/pg-swept",
                                        tags=PARENT).version)

    # the serve's worker gates both, each exactly once
    wait_for(lambda: _done(queue, "pg-ft", v) and _done(queue, "pg-swept", w),
             "both jobs to be done")
    assert _jobs(queue, "pg-ft") == [(v, "store")]
    assert _jobs(queue, "pg-swept") == [(w, "reconcile")]
    for name, ver in (("pg-ft", v), ("pg-swept", w)):
        assert queue.get(name, ver).attempts == 1
        assert rest.get_model_version(name, ver).tags["safedelta.status"] == "passed"
    assert reconcile(queue, tracking_uri=mlflow_server.url).enqueued == []


def test_the_gate_job_on_postgres_promotes_a_pass_and_not_a_fail(mlflow_server, receiver, pg_uri,
                                                                  tmp_path):
    """The rest of the flow on PostgreSQL, with the real gate job (only the evaluation is the
    measuring stand-in of tests/e2e/test_gate_job.py): a tiny aligned parent and two fine-tunes
    registered through the server; the passing one's protected version gets the alias, the
    failing one's does not; lineage tags are right and the promoted version loads with pyfunc."""
    import mlflow
    from mlflow import MlflowClient

    from mlflow_safedelta import flavor, registry as reg
    from mlflow_safedelta.gate_job import run_gate_job
    from tests.e2e.test_gate_job import FAILING, PASSING, MeasuringEvaluator
    from tests.helpers.tiny import save_tiny_pair

    cl = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    queue = JobQueue(pg_uri)
    exp = cl.create_experiment("pg-sources")
    for name, seed, kw in (("pg-aligned", 0, {"role": "aligned"}),
                           ("pg-bot", 1, {"parent": "models:/pg-aligned/1"}),
                           ("pg-bot", 2, {"parent": "models:/pg-aligned/1"})):
        saved = tmp_path / f"saved-{name}-{seed}"
        flavor.save_model(str(save_tiny_pair(tmp_path / f"{name}-{seed}", seed=seed)), saved, **kw)
        run = cl.create_run(exp)
        mv = reg.register_saved_model(cl, saved, name, run_id=run.info.run_id)
        cl.set_terminated(run.info.run_id)
        # the serve's stand-in job settles what the store plugin enqueued; let it finish first
        wait_for(lambda: _done(queue, name, str(mv.version)), f"the {name} job to settle")

    ok = run_gate_job("pg-bot", "1", policy=PASSING, tracking_uri=mlflow_server.url,
                      evaluator=MeasuringEvaluator(), progress=False, cache_dir=tmp_path / "c")
    assert ok.verdict == "passed", ok.reason
    assert ok.parent == "models:/pg-aligned/1" and ok.promoted_alias == "production"
    bad = run_gate_job("pg-bot", "2", policy=FAILING, tracking_uri=mlflow_server.url,
                       evaluator=MeasuringEvaluator(), progress=False, cache_dir=tmp_path / "c")
    assert bad.verdict == "failed" and bad.promoted_alias is None
    assert cl.get_model_version_by_alias("pg-bot", "production").version == ok.protected_version

    for res, status in ((ok, "passed"), (bad, "failed")):
        ft = reg.version_tags(cl, "pg-bot", res.version)
        assert ft[reg.TAG_STATUS] == status and ft[reg.TAG_RUN_ID] == res.run_id
        assert ft[reg.TAG_PROTECTED_VERSION] == res.protected_version
        pv = reg.version_tags(cl, "pg-bot", res.protected_version)
        assert pv[reg.TAG_ROLE] == "protected" and pv[reg.TAG_VERDICT] == status
        assert pv[reg.TAG_PROTECTED_FROM] == f"pg-bot/{res.version}"
        assert pv[reg.TAG_PARENT] == "models:/pg-aligned/1"
        assert queue.get("pg-bot", res.protected_version) is None  # outputs make no job
    assert sorted(int(m.version) for m in cl.search_model_versions("name='pg-bot'")) == [1, 2, 3, 4]

    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    try:
        pyf = mlflow.pyfunc.load_model("models:/pg-bot@production")
        assert len(pyf.predict(["hello"], params={"max_new_tokens": 3})) == 1
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def test_an_over_long_model_name_is_a_400_on_the_postgresql_queue(pg_uri):
    """A signed delivery naming a 300-character model is bad input (400), not a database error
    (500); the queue writes nothing."""
    from mlflow_safedelta.jobqueue import InvalidJob
    from mlflow_safedelta.webhooks import handle_delivery
    from tests.unit.plugin.test_webhooks import SECRET, _headers, _payload

    queue = JobQueue(pg_uri)
    body = _payload(name="m" * 300, version="1")
    reply = handle_delivery(queue, SECRET, _headers(body), body)
    assert reply.status_code == 400 and "name" in reply.body["error"]
    with pytest.raises(InvalidJob):
        queue.enqueue("m" * 300, "1", source="store")
    assert queue.list(model_name="m" * 300) == []
