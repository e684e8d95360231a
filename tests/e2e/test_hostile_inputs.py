"""A hostile registrant and an operator with bad luck, against a real ``mlflow server``: nothing a
registrant writes reaches outside its own artifact, credentials never reach what the gate
writes, a policy given as a path survives retries, a parent named only on the run is honoured,
and a re-created model's versions are gated.

The evaluator is the fast measuring one of ``test_gate_job``; everything else is the real code.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from pathlib import Path

import pytest
import yaml

from mlflow_safedelta import flavor, registry as reg
from mlflow_safedelta.gate_job import run_gate_job
from mlflow_safedelta.jobqueue import JobQueue
from mlflow_safedelta.policy import policy_to_yaml
from mlflow_safedelta.reconcile import reconcile
from mlflow_safedelta.worker import Worker
from tests.e2e.test_gate_job import PASSING, MeasuringEvaluator
from tests.e2e.test_routes import record_passed
from tests.helpers.tiny import save_tiny_pair

pytestmark = [pytest.mark.e2e]

SECRET = "s3cr3t-Pa55word"


@pytest.fixture(scope="module")
def models(mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    cl = reg.client(mlflow_server.url)
    aligned = save_tiny_pair(root / "aligned", seed=0)
    _register(cl, aligned, "aligned", role="aligned")
    return {"client": cl, "root": root, "aligned": aligned,
            "ft": save_tiny_pair(root / "ft", seed=1), "cache": root / "cache"}


def _register(cl, model_dir: Path, name: str, *, role: str = "finetuned", parent=None,
              tags=None, run_tags=None, edit=None) -> str:
    """Save with the safedelta flavor, optionally edit the saved directory (what a hostile
    registrant controls), log it to a run and register it."""
    run = cl.create_run(reg.experiment_id(cl, "registrations"), tags=run_tags or {})
    saved = model_dir.parent / f"{name}-{uuid.uuid4().hex[:6]}-mlflow"
    flavor.save_model(str(model_dir), saved, role=role, parent=parent)
    if edit:
        edit(saved)
    mv = reg.register_saved_model(cl, saved, name, run_id=run.info.run_id, tags=tags)
    cl.set_terminated(run.info.run_id, "FINISHED")
    return str(mv.version)


def _gate(url, name, v, models, **kw):
    return run_gate_job(name, v, tracking_uri=url, evaluator=MeasuringEvaluator(),
                        progress=False, cache_dir=models["cache"], **{"policy": PASSING, **kw})


def _edit_mlmodel(**fields):
    def edit(saved: Path):
        ml = yaml.safe_load((saved / "MLmodel").read_text())
        ml["flavors"]["safedelta"].update(fields)
        (saved / "MLmodel").write_text(yaml.safe_dump(ml))
    return edit


# -- confinement -------------------------------------------------------------------------------

def test_an_mlmodel_pointing_at_weights_outside_its_artifact_ends_in_error_naming_the_field(
        mlflow_server, models):
    # the worker's own disk holds a checkpoint; the registrant names it by absolute path
    v = _register(models["client"], models["ft"], "outside-abs",
                  tags={reg.TAG_PARENT: "models:/aligned/1"},
                  edit=_edit_mlmodel(model_data=str(models["aligned"])))
    res = _gate(mlflow_server.url, "outside-abs", v, models)
    assert res.verdict == "error" and "model_data" in res.reason, res.reason
    tags = reg.version_tags(models["client"], "outside-abs", v)
    assert tags[reg.TAG_STATUS] == "error" and "model_data" in tags[reg.TAG_REASON]
    assert len(models["client"].search_model_versions("name = 'outside-abs'")) == 1

    v = _register(models["client"], models["ft"], "outside-rel",
                  tags={reg.TAG_PARENT: "models:/aligned/1"},
                  edit=_edit_mlmodel(tokenizer="../../../../../../etc"))
    res = _gate(mlflow_server.url, "outside-rel", v, models)
    assert res.verdict == "error" and "tokenizer" in res.reason, res.reason


def test_task_data_as_a_local_path_is_refused_and_its_keys_never_echoed(mlflow_server, models,
                                                                         tmp_path):
    local = tmp_path / "secret-keys.jsonl"
    local.write_text(json.dumps({"AWS_SECRET_ACCESS_KEY_NAME": 1, "db_password_field": 2}) + "\n")
    for spec in (str(local), f"file://{local}", "../../../" + local.name):
        name = f"task-{uuid.uuid4().hex[:6]}"
        v = _register(models["client"], models["ft"], name,
                      tags={reg.TAG_PARENT: "models:/aligned/1", "safedelta.task_data": spec})
        res = _gate(mlflow_server.url, name, v, models)
        assert res.verdict == "error" and "safedelta.task_data" in res.reason, (spec, res.reason)
        reason = reg.version_tags(models["client"], name, v)[reg.TAG_REASON]
        assert "AWS_SECRET" not in reason and "db_password" not in reason


# -- credentials -------------------------------------------------------------------------------

def test_credentials_in_the_tracking_uri_never_reach_what_the_gate_writes(
        mlflow_server, models, tmp_path, monkeypatch, caplog, capfd):
    from click.testing import CliRunner

    from mlflow_safedelta import gate_job
    from mlflow_safedelta.cli import cli

    url = mlflow_server.url.replace("http://", f"http://alice:{SECRET}@")
    v = _register(models["client"], models["ft"], "credentialed",
                  tags={reg.TAG_PARENT: "models:/aligned/1"})
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_to_yaml(PASSING))
    monkeypatch.setattr(gate_job, "default_evaluator", MeasuringEvaluator())
    monkeypatch.setenv("SAFEDELTA_CACHE", str(models["cache"]))
    caplog.set_level(logging.DEBUG)
    res = CliRunner().invoke(cli, ["gate", "credentialed", v, "--policy", str(policy),
                                   "--tracking-uri", url, "--json"])
    out, err = capfd.readouterr()
    gate = json.loads(res.stdout)  # exactly one JSON document
    assert gate["verdict"] == "passed", res.output
    written = [res.output, out, err, caplog.text]
    cl = models["client"]
    for mv in cl.search_model_versions("name = 'credentialed'"):
        written.append(json.dumps(mv.tags))
    exps = [cl.get_experiment_by_name(e).experiment_id
            for e in ("safedelta-gate", "safedelta-hessians")]
    dst = tmp_path / "artifacts"
    for run in cl.search_runs(exps):
        written += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        d = dst / run.info.run_id
        d.mkdir(parents=True)
        cl.download_artifacts(run.info.run_id, "", str(d))
    files = [p for p in dst.rglob("*") if p.is_file()]
    assert any(p.name == "gate.json" for p in files) and any(p.name == "gate.md" for p in files)
    written += [p.read_bytes().decode("latin-1") for p in files]
    leaks = [w[:200] for w in written if SECRET in w or "alice:" in w]
    assert leaks == []
    assert gate["run_url"].startswith("http://***@127.0.0.1")


# -- policy snapshot ---------------------------------------------------------------------------

def test_a_policy_given_as_a_file_path_is_kept_and_force_regates_with_its_content(
        mlflow_server, models, tmp_path):
    policy = tmp_path / "team-policy.yaml"
    policy.write_text(policy_to_yaml(PASSING))
    v = _register(models["client"], models["ft"], "policy-path",
                  tags={reg.TAG_PARENT: "models:/aligned/1", "safedelta.policy": str(policy)})
    first = _gate(mlflow_server.url, "policy-path", v, models, policy=None)
    assert first.verdict == "passed", first.reason
    tags = reg.version_tags(models["client"], "policy-path", v)
    assert tags["safedelta.policy"] == str(policy)  # never rewritten to a name
    policy.unlink()  # the file is gone: --force gates with the content recorded
    again = _gate(mlflow_server.url, "policy-path", v, models, policy=None, force=True)
    assert again.verdict == "passed", again.reason
    assert again.policy["sha256"] == first.policy["sha256"]


def test_a_queued_job_gates_with_the_policy_content_snapshotted_at_enqueue(
        mlflow_server, models, tmp_path):
    policy = tmp_path / "snap.yaml"
    policy.write_text(policy_to_yaml(PASSING))
    v = _register(models["client"], models["ft"], "policy-snap",
                  tags={reg.TAG_PARENT: "models:/aligned/1", "safedelta.policy": str(policy)})
    queue = JobQueue(f"sqlite:///{tmp_path / 'q.sqlite'}")
    queue.enqueue("policy-snap", v, source="store")
    seen = []

    def job(name, version, **kw):
        seen.append(kw["policy"])
        raise ConnectionError("registry briefly unreachable")  # retried later

    worker = Worker(queue, job, tracking_uri=mlflow_server.url)
    worker.run_once()  # first claim: resolves the policy once and stores its content
    assert queue.get("policy-snap", v).policy
    policy.write_text(policy_to_yaml(PASSING.model_copy(update={"name": "edited"})))
    queue.clock = lambda: 1e12  # the retry is due
    worker.run_once()
    assert [p.name for p in seen] == [PASSING.name, PASSING.name]  # not the edited file


# -- no silent skip, re-created models ---------------------------------------------------------

def test_a_parent_named_only_on_the_run_is_gated_by_the_worker(mlflow_server, models, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_to_yaml(PASSING))
    v = _register(models["client"], models["ft"], "run-parent",
                  tags={"safedelta.policy": str(policy)},
                  run_tags={reg.TAG_PARENT: "models:/aligned/1"})
    assert "safedelta.parent" not in reg.version_tags(models["client"], "run-parent", v)
    queue = JobQueue(f"sqlite:///{tmp_path / 'q.sqlite'}")
    queue.enqueue("run-parent", v, source="reconcile")
    job = functools.partial(run_gate_job, evaluator=MeasuringEvaluator(), progress=False,
                            cache_dir=models["cache"])
    Worker(queue, job, tracking_uri=mlflow_server.url).run_once()
    tags = reg.version_tags(models["client"], "run-parent", v)
    assert tags[reg.TAG_STATUS] == "passed", tags.get(reg.TAG_REASON)
    assert tags[reg.TAG_PARENT] == "models:/aligned/1"


def test_a_re_created_models_versions_are_gated(mlflow_server, models, tmp_path):
    cl = models["client"]
    queue = JobQueue(f"sqlite:///{tmp_path / 'q.sqlite'}")
    worker = Worker(queue, record_passed, tracking_uri=mlflow_server.url)
    for attempt in ("first", "re-created"):
        if attempt == "re-created":
            cl.delete_registered_model("recreated")
        cl.create_registered_model("recreated")
        v = str(cl.create_model_version("recreated", "s3://safedelta-tests/recreated", tags={
            reg.TAG_PARENT: "models:/aligned/1"}).version)
        assert v == "1"
        assert reconcile(queue, tracking_uri=mlflow_server.url,
                         model_name="recreated").enqueued == [("recreated", "1")], attempt
        assert worker.run_once(), attempt
        assert reg.version_tags(cl, "recreated", "1")[reg.TAG_STATUS] == "passed", attempt
    job = queue.get("recreated", "1")
    assert job.state == "done" and job.version_created == str(
        cl.get_model_version("recreated", "1").creation_timestamp)


# -- Hessians: single flight per parent --------------------------------------------------------

def test_two_workers_preparing_one_parent_build_its_hessians_once(mlflow_server, models,
                                                                  tmp_path, monkeypatch):
    import threading

    import safedelta.hessian as hessian
    from mlflow_safedelta.hessian_cache import ensure_hessians

    cl = models["client"]
    v = _register(cl, models["aligned"], "shared-parent", role="aligned")
    parent = reg.ParentInfo(uri=f"models:/shared-parent/{v}",
                            resolved_uri=f"models:/shared-parent/{v}", name="shared-parent",
                            version=v, fingerprint=None, source="tag")
    built, real = [], hessian.prepare_hessians

    def counting(*a, **k):
        hs = real(*a, **k)
        if not hs.cache_hit:
            built.append(hs.fingerprint)
        return hs

    monkeypatch.setattr(hessian, "prepare_hessians", counting)
    cache = tmp_path / "shared-cache"  # both workers' cache (one host, or a shared volume)
    results, errors = [], []

    def worker():
        try:
            results.append(ensure_hessians(cl, parent, models["aligned"], cache_dir=cache,
                                           progress=False))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == [] and len(results) == 2
    assert len(built) == 1 and results[0].fingerprint == results[1].fingerprint
    runs = cl.search_runs([cl.get_experiment_by_name("safedelta-hessians").experiment_id],
                          filter_string=f"tags.`safedelta.parent` = '{parent.resolved_uri}'")
    assert [r.info.status for r in runs] == ["FINISHED"]
