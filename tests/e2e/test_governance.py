"""The registry enforces the gate: a real ``mlflow server`` with the ``safedelta+`` registry-store
plugin and a governance file, on SQLite and on PostgreSQL, driven with MLflow's public client API
and the REST call the UI makes. The gate job is the real one (tiny models, real Safe Delta); only
generation is replaced by the measuring evaluator of ``test_gate_job``.
"""

from __future__ import annotations

import json
import os

import pytest
import requests

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_safedelta import flavor, signing
from mlflow_safedelta import registry as reg
from mlflow_safedelta.gate_job import run_gate_job
from tests.e2e.conftest import fresh_pg_database
from tests.e2e.test_gate_job import MeasuringEvaluator
from tests.helpers.governed import make_governed_dir, write_governance
from tests.helpers.tiny import save_tiny_pair

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

UI_ALIAS_ENDPOINT = "/ajax-api/2.0/mlflow/registered-models/alias"  # what the MLflow UI posts


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request):
    if request.param == "sqlite":
        yield None
        return
    with fresh_pg_database("safedelta_gov") as uri:
        yield uri


@pytest.fixture(scope="module")
def gov_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("governance")
    return {"root": root, **make_governed_dir(root)}


@pytest.fixture(scope="module")
def mlflow_server_options(backend, gov_dir):
    # the server holds the governance file and PUBLIC keys only: it can verify, never sign
    env = {"SAFEDELTA_GOVERNANCE": str(gov_dir["governance"]),
           "SAFEDELTA_QUEUE_URI": f"sqlite:///{gov_dir['root'] / 'jobs.sqlite'}"}
    if backend is None:
        return {"env": env, "registry_store_uri": "safedelta+sqlite:///{db_path}"}
    return {"env": env, "registry_store_uri": f"safedelta+{backend}",
            "extra_args": ["--backend-store-uri",
                           backend.replace("postgresql", "postgresql+psycopg2", 1)]}


@pytest.fixture(autouse=True)
def _worker_env(_isolated_state, mlflow_server, gov_dir, monkeypatch):
    """This process plays the gate worker: governance file and the gate's private key."""
    monkeypatch.setenv("SAFEDELTA_GOVERNANCE", str(gov_dir["governance"]))
    monkeypatch.setenv("SAFEDELTA_SIGNING_KEY", str(gov_dir["gate-a"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server.url)


@pytest.fixture(scope="module")
def world(mlflow_server, gov_dir, tmp_path_factory):
    """aligned v1 (alias base), and gated: good-bot v1 (passed, production on v2) and bad-bot v1
    (failed under the bound 'impossible' policy, although its registrant asked for 'lax')."""
    os.environ["SAFEDELTA_GOVERNANCE"] = str(gov_dir["governance"])
    os.environ["SAFEDELTA_SIGNING_KEY"] = str(gov_dir["gate-a"])
    root = tmp_path_factory.mktemp("models")
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    cl = MlflowClient(mlflow_server.url, mlflow_server.url)
    aligned, ft = save_tiny_pair(root / "aligned", seed=0), save_tiny_pair(root / "ft", seed=1)
    with mlflow.start_run():
        flavor.log_model(str(aligned), name="model", role="aligned",
                         registered_model_name="aligned")
    cl.set_registered_model_alias("aligned", "base", "1")
    for name in ("good-bot", "bad-bot"):
        with mlflow.start_run():
            flavor.log_model(str(ft), name="model", parent="models:/aligned@base",
                             registered_model_name=name)
    # the registrant asks for a laxer policy by tag: governance ignores it
    cl.set_model_version_tag("bad-bot", "1", reg.TAG_POLICY, str(gov_dir["root"] / "lax.yaml"))
    ev = MeasuringEvaluator()
    good = run_gate_job("good-bot", "1", tracking_uri=mlflow_server.url, evaluator=ev,
                        progress=False)
    bad = run_gate_job("bad-bot", "1", tracking_uri=mlflow_server.url, evaluator=ev,
                       progress=False)
    yield {"cl": cl, "good": good, "bad": bad, "ft": ft, "root": root}
    for k in ("SAFEDELTA_GOVERNANCE", "SAFEDELTA_SIGNING_KEY"):
        os.environ.pop(k, None)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


def _denied(fn, *args):
    with pytest.raises(MlflowException) as info:
        fn(*args)
    assert info.value.error_code == "PERMISSION_DENIED", info.value.message
    return info.value.message


def test_the_gates_own_promotion_goes_through_and_the_laxer_tag_is_ignored(world, gov_dir):
    cl, good, bad = world["cl"], world["good"], world["bad"]
    assert good.verdict == "passed", good.reason
    assert cl.get_model_version_by_alias("good-bot", "production").version == good.protected_version
    assert good.policy["governance"] == "enforced" and good.policy["name"] == "lenient"
    # the registrant's 'lax' policy tag did not change the verdict: the bound policy decided
    assert bad.verdict == "failed" and bad.policy["name"] == "impossible"
    assert any("ignored" in n for n in bad.policy["notes"])
    tags = reg.version_tags(cl, "bad-bot", "1")
    assert tags[reg.TAG_STATUS] == "failed" and "ignored" in tags[reg.TAG_POLICY_NOTE]
    assert tags[reg.TAG_GOVERNANCE] == "enforced" and reg.TAG_SIGNATURE in tags
    assert "production" not in (cl.get_registered_model("bad-bot").aliases or {})


def test_alias_onto_a_failed_version_is_refused_by_client_and_ui_endpoint(world, mlflow_server):
    cl, bad = world["cl"], world["bad"]
    for version in ("1", bad.protected_version):
        msg = _denied(cl.set_registered_model_alias, "bad-bot", "production", version)
        assert "guarded" in msg and "impossible" in msg and "override" in msg
    assert "failed" in _denied(cl.set_registered_model_alias, "bad-bot", "production",
                               bad.protected_version)
    # the UI's own call (ajax-api), as the browser sends it
    r = requests.post(f"{mlflow_server.url}{UI_ALIAS_ENDPOINT}",
                      json={"name": "bad-bot", "alias": "production", "version": "1"}, timeout=30)
    assert r.status_code == 403 and r.json()["error_code"] == "PERMISSION_DENIED"
    assert "guarded" in r.json()["message"]
    # the refusal names the version the gate recommends
    msg = _denied(cl.set_registered_model_alias, "good-bot", "production", "1")
    assert f"recommends version {world['good'].protected_version}" in msg
    # unguarded aliases and demotion stay free
    cl.set_registered_model_alias("bad-bot", "staging", "1")
    cl.set_registered_model_alias("good-bot", "production", world["good"].protected_version)
    cl.delete_registered_model_alias("good-bot", "production")
    assert "production" not in cl.get_registered_model("good-bot").aliases
    cl.set_registered_model_alias("good-bot", "production", world["good"].protected_version)


def test_forged_state_at_registration_and_afterwards(world, mlflow_server, gov_dir):
    cl = world["cl"]
    good_pv = world["good"].protected_version
    src = "s3://safedelta-tests/forged-ft"
    for forged in ({reg.TAG_STATUS: "passed"}, {reg.TAG_ROLE: "protected"},
                   {reg.TAG_VERDICT: "passed", reg.TAG_ROLE: "protected"}):
        msg = _denied(cl.create_model_version, "good-bot", src, None,
                      {reg.TAG_PARENT: "models:/aligned/1", **forged})
        assert "gate only" in msg
    # a plain registration is gated (pending + queued), whatever comes after
    mv = cl.create_model_version("good-bot", src, tags={reg.TAG_PARENT: "models:/aligned/1"})
    v = str(mv.version)
    assert reg.version_tags(cl, "good-bot", v)[reg.TAG_STATUS] == "pending"
    for key, value in ((reg.TAG_STATUS, "passed"), (reg.TAG_VERDICT, "passed"),
                       (reg.TAG_ROLE, "protected"), (reg.TAG_BOUND_POLICY_SHA256, "x")):
        _denied(cl.set_model_version_tag, "good-bot", v, key, value)
    _denied(cl.delete_model_version_tag, "good-bot", good_pv, reg.TAG_VERDICT)
    # a genuine signature copied from the passed protected version is about another version
    sig = reg.version_tags(cl, "good-bot", good_pv)[reg.TAG_SIGNATURE]
    assert "another version" in _denied(cl.set_model_version_tag, "good-bot", v,
                                        reg.TAG_SIGNATURE, sig)
    assert "guarded" in _denied(cl.set_registered_model_alias, "good-bot", "production", v)
    # the queue the store wrote to has the job: the gate will run on it
    from mlflow_safedelta.jobqueue import JobQueue

    job = JobQueue(f"sqlite:///{gov_dir['root'] / 'jobs.sqlite'}").get("good-bot", v)
    assert job is not None and job.state == "queued"
    # status shows only signed state
    rows = {r["version"]: r for r in reg.gate_states(cl, "good-bot")}
    assert rows[good_pv]["signed"] and rows[good_pv]["governance"] == "enforced"
    assert rows["1"]["status"] == "passed"


def test_a_stricter_policy_tag_is_honoured_when_the_binding_allows_it(world, gov_dir, tmp_path):
    import yaml

    from tests.helpers.governed import policy_doc

    cl = world["cl"]
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(yaml.safe_dump(policy_doc("stricter", 0.0001)))
    with mlflow.start_run():
        info = flavor.log_model(str(world["ft"]), name="model", parent="models:/aligned@base")
    v = str(mlflow.register_model(info.model_uri, "good-bot", tags={
        reg.TAG_POLICY: str(stricter)}).version)
    res = run_gate_job("good-bot", v, evaluator=MeasuringEvaluator(), progress=False)
    assert res.verdict == "failed" and res.policy["name"] == "stricter"
    assert any("stricter" in n for n in res.policy["notes"])
    _denied(cl.set_registered_model_alias, "good-bot", "production", res.protected_version)


def test_wrong_and_rotated_out_keys_are_rejected(world, gov_dir):
    cl, root = world["cl"], gov_dir["root"]
    good_pv = world["good"].protected_version
    mv = cl.get_model_version("good-bot", good_pv)
    forged = signing.sign(signing.load_signer(gov_dir["gate-b"]), signing.KIND_STATE,
                          model="good-bot", version=good_pv, created=mv.creation_timestamp,
                          source=mv.source, tags={reg.TAG_VERDICT: "passed"})
    assert "not a valid gate key" in _denied(cl.set_model_version_tag, "good-bot", good_pv,
                                             reg.TAG_SIGNATURE, forged)
    admin_signed = signing.sign(signing.load_signer(gov_dir["admin"]), signing.KIND_STATE,
                                model="good-bot", version=good_pv, created=mv.creation_timestamp,
                                source=mv.source, tags={})
    _denied(cl.set_model_version_tag, "good-bot", good_pv, reg.TAG_SIGNATURE, admin_signed)
    try:
        # rotation: a and b both valid -> the pass signed with a still opens the alias
        write_governance(root, ["keys/gate-a.pub", "keys/gate-b.pub"])
        cl.set_registered_model_alias("good-bot", "production", good_pv)
        # a rotated out: its signatures no longer count
        write_governance(root, ["keys/gate-b.pub"])
        msg = _denied(cl.set_registered_model_alias, "good-bot", "production", good_pv)
        assert "rotated out" in msg
    finally:
        write_governance(root, ["keys/gate-a.pub"])
    cl.set_registered_model_alias("good-bot", "production", good_pv)


def test_break_glass_override_is_signed_and_audited(world, gov_dir):
    from click.testing import CliRunner

    from mlflow_safedelta.cli import cli

    cl = world["cl"]
    # the gate's key is not an admin key
    bad = CliRunner().invoke(cli, ["override", "bad-bot", "1", "--alias", "production",
                                   "--reason", "try", "--admin-key", str(gov_dir["gate-a"])])
    assert bad.exit_code != 0 and "production" not in cl.get_registered_model("bad-bot").aliases
    out = CliRunner().invoke(cli, ["override", "bad-bot", "1", "--alias", "production",
                                   "--reason", "INC-42 hotfix", "--who", "alice",
                                   "--admin-key", str(gov_dir["admin"]), "--json"])
    assert out.exit_code == 0, out.output
    rec = json.loads(out.stdout)
    assert rec["overrode"]["status"] == "failed" and rec["who"] == "alice"
    assert cl.get_model_version_by_alias("bad-bot", "production").version == "1"
    run = cl.get_run(rec["run_id"])
    assert run.data.params["reason"] == "INC-42 hotfix" and run.data.params["who"] == "alice"
    assert run.data.tags["safedelta.kind"] == "override" and run.info.status == "FINISHED"
    st = CliRunner().invoke(cli, ["status", "bad-bot"])
    assert "OVERRIDE bad-bot v1 alias 'production' by alice: INC-42 hotfix" in st.stdout
    assert "gate ENFORCED" in st.stdout
    # the override is for that alias and version only
    _denied(cl.set_registered_model_alias, "bad-bot", "production",
            world["bad"].protected_version)



def test_demote_on_fail_takes_production_off_a_pass_that_no_longer_holds(world, gov_dir):
    """The platform binds good-* to a stricter policy with demote_on_fail: production still
    points at a pass made under the old policy; the next failed gate of the model deletes it
    (no version holds a pass under the new policy)."""
    cl, root = world["cl"], gov_dir["root"]
    assert cl.get_model_version_by_alias("good-bot", "production").version == \
        world["good"].protected_version
    try:
        write_governance(root, ["keys/gate-a.pub"], good_policy="impossible.yaml",
                         demote_on_fail=True)
        with mlflow.start_run():
            info = flavor.log_model(str(world["ft"]), name="model", parent="models:/aligned@base")
        v = str(mlflow.register_model(info.model_uri, "good-bot").version)
        res = run_gate_job("good-bot", v, evaluator=MeasuringEvaluator(), progress=False)
        assert res.verdict == "failed" and res.policy["name"] == "impossible"
        assert "production" not in (cl.get_registered_model("good-bot").aliases or {})
        incident = json.loads(reg.version_tags(cl, "good-bot", world["good"].protected_version)[
            reg.TAG_INCIDENT])
        assert incident["action"].startswith("deleted") and "another policy" in incident["why"]
    finally:
        write_governance(root, ["keys/gate-a.pub"])
