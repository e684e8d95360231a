"""The same flow against PostgreSQL: a fresh database per run holds MLflow (tracking and the
``safedelta+postgresql`` registry store) and the job queue (the networked backend), shared by the
server's store plugin and one ``mlflow-safedelta serve`` process that runs all the rest:
receiver, worker and periodic reconcile sweep."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from mlflow_safedelta.jobs import JobQueue
from mlflow_safedelta.reconcile import reconcile
from tests.conftest import require_service
from tests.e2e.test_routes import receiver_process, wait_for, webhook_env

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

PG = "postgresql://postgres@127.0.0.1:5432"
DRIVER = "postgresql+psycopg2"  # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3
PARENT = {"safedelta.parent": "models:/aligned/1"}


@pytest.fixture(scope="module")
def pg_uri():
    try:
        import psycopg2

        admin = psycopg2.connect(f"{PG}/postgres", connect_timeout=5)
    except Exception as exc:  # noqa: BLE001 - reported by require_service
        require_service("PostgreSQL", False, f"{PG}: {exc}")
    admin.autocommit = True
    name = f"safedelta_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


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
