"""Webhook-only governance (managed MLflow without the store plugin): a plain ``mlflow server``
(SQLite) whose webhooks reach ``mlflow-safedelta serve`` running under a governance file. Nothing
prevents a forbidden alias here; the receiver notices ``model_version_alias.created`` and undoes
it within seconds, recording an incident. Pre-set state at registration is still gated.
"""

from __future__ import annotations

import json
import os

import pytest

import mlflow
from mlflow import MlflowClient

from mlflow_safedelta import flavor
from mlflow_safedelta import registry as reg
from mlflow_safedelta.gate_job import run_gate_job
from mlflow_safedelta.jobqueue import JobQueue
from tests.e2e.test_gate_job import MeasuringEvaluator
from tests.e2e.test_routes import receiver_process, wait_for, webhook_env
from tests.helpers.governed import make_governed_dir
from tests.helpers.tiny import save_tiny_pair

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def gov_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("governance")
    return {"root": root, **make_governed_dir(root)}


@pytest.fixture(scope="module")
def mlflow_server_options():
    return {"env": webhook_env()}  # no registry-store plugin: webhooks only


@pytest.fixture(scope="module")
def receiver(mlflow_server, gov_dir, tmp_path_factory):
    saved = os.environ.get("SAFEDELTA_GOVERNANCE")
    os.environ["SAFEDELTA_GOVERNANCE"] = str(gov_dir["governance"])  # the receiver's host
    queue_uri = f"sqlite:///{gov_dir['root'] / 'jobs.sqlite'}"
    try:
        with receiver_process(tmp_path_factory.mktemp("receiver"),
                              tracking_uri=mlflow_server.url, queue_uri=queue_uri) as r:
            yield {"url": r[0], "log": r[2], "queue": JobQueue(queue_uri)}
    finally:
        if saved is None:
            os.environ.pop("SAFEDELTA_GOVERNANCE", None)
        else:
            os.environ["SAFEDELTA_GOVERNANCE"] = saved


@pytest.fixture
def cl(_isolated_state, mlflow_server, gov_dir, monkeypatch):
    monkeypatch.setenv("SAFEDELTA_GOVERNANCE", str(gov_dir["governance"]))
    monkeypatch.setenv("SAFEDELTA_SIGNING_KEY", str(gov_dir["gate-a"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server.url)
    return MlflowClient(mlflow_server.url, mlflow_server.url)


def test_a_forbidden_alias_is_reverted_after_the_fact(cl, receiver, mlflow_server, tmp_path):
    aligned, ft = save_tiny_pair(tmp_path / "a", seed=0), save_tiny_pair(tmp_path / "f", seed=1)
    with mlflow.start_run():
        flavor.log_model(str(aligned), name="model", role="aligned",
                         registered_model_name="aligned")
    with mlflow.start_run():
        flavor.log_model(str(ft), name="model", parent="models:/aligned/1",
                         registered_model_name="good-bot")
    res = run_gate_job("good-bot", "1", evaluator=MeasuringEvaluator(), progress=False)
    assert res.verdict == "passed", res.reason
    passed = res.protected_version
    assert cl.get_model_version_by_alias("good-bot", "production").version == passed

    # the registrant points production at the ungated fine-tune: moved back to the signed pass
    cl.set_registered_model_alias("good-bot", "production", "1")
    wait_for(lambda: cl.get_model_version_by_alias("good-bot", "production").version == passed,
             "the receiver to move production back", timeout=30)
    incident = json.loads(reg.version_tags(cl, "good-bot", "1")[reg.TAG_INCIDENT])
    assert incident["alias"] == "production" and incident["action"] == \
        f"moved back to version {passed}"
    assert "not a protected version" in incident["why"]

    # no signed pass anywhere: the alias is deleted; forged state at registration is still gated
    cl.create_registered_model("bad-bot")
    mv = cl.create_model_version("bad-bot", "s3://safedelta-tests/ft", tags={
        reg.TAG_PARENT: "models:/aligned/1", reg.TAG_STATUS: "passed",
        reg.TAG_ROLE: "protected", reg.TAG_VERDICT: "passed"})
    wait_for(lambda: receiver["queue"].get("bad-bot", str(mv.version)),
             "the receiver to queue the version registered with forged state", timeout=30)
    cl.set_registered_model_alias("bad-bot", "production", str(mv.version))
    wait_for(lambda: "production" not in (cl.get_registered_model("bad-bot").aliases or {}),
             "the receiver to delete production", timeout=30)
    incident = json.loads(reg.version_tags(cl, "bad-bot", str(mv.version))[reg.TAG_INCIDENT])
    assert incident["action"].startswith("deleted")
    assert "INCIDENT" in receiver["log"].read_text()
    # an unguarded alias is left alone
    cl.set_registered_model_alias("bad-bot", "staging", str(mv.version))
    wait_for(lambda: "staging" in cl.get_registered_model("bad-bot").aliases, "staging")
