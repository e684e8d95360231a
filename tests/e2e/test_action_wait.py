"""The Action's default mode against a real ``mlflow server`` whose registry plugin enqueues each
registration: the step waits while a worker (this test process, the real gate job with a
fixed-metrics evaluator standing in for generation) gates a fresh fine-tune, then reports the
server's verdict. Also: ``gate --json`` over HTTP, where closing the run makes MLflow print
"🏃 View run ...", still prints exactly one JSON document on stdout."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

import mlflow

from mlflow_safedelta import flavor
from mlflow_safedelta.cli import cli
from mlflow_safedelta.gate_job import run_gate_job
from mlflow_safedelta.jobqueue import JobQueue
from mlflow_safedelta.waiting import GIT_COMMIT_TAG
from mlflow_safedelta.worker import Worker
from tests.helpers.tiny import save_tiny_pair
from tests.unit.plugin.test_actions import VENV_BIN, gate_step, step_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.usefixtures("fluent_on_server")]  # tests log with the fluent API


def fixed_metrics(asr: float):
    """A stand-in for generation: a real EvalReport (saved to the run as the real one is) with
    fixed metrics, naming the models by the directories it was handed."""
    from safedelta.eval.report import EvalReport

    def evaluator(models, policy, **_):
        assert set(models) == {"aligned", "finetuned", "protected"}
        suites = policy.safety.suites  # every suite the policy gates, with counts for its bounds
        return EvalReport(judge={"judge": "keyword", "list": "test", "rule": "substring",
                                 "keywords": ["I cannot"]}, models={r: str(p) for r, p in models.items()},
                          metrics={"aligned": {f"asr.{s}": 0.05 for s in suites},
                                   "finetuned": {f"asr.{s}": 0.6 for s in suites},
                                   "protected": {**{f"asr.{s}": asr for s in suites},
                                                 **{f"asr.{s}.n": 50.0 for s in suites},
                                                 "utility_retention": 0.9}})
    return evaluator


@pytest.fixture(scope="module")
def queue_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('queue') / 'jobs.sqlite'}"


@pytest.fixture(scope="module")
def mlflow_server_options(queue_uri):
    return {"env": {"SAFEDELTA_QUEUE_URI": queue_uri},
            "registry_store_uri": "safedelta+sqlite:///{db_path}"}


@pytest.fixture(scope="module")
def models(mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    with mlflow.start_run():
        flavor.log_model(str(save_tiny_pair(root / "aligned", seed=0)), name="model",
                         role="aligned", registered_model_name="wait-aligned")
    yield {"root": root, "ft": save_tiny_pair(root / "ft", seed=1)}
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def register_finetune(name: str, ft: Path, commit: str | None = None) -> str:
    tags = {GIT_COMMIT_TAG: commit} if commit else None
    with mlflow.start_run(tags=tags):
        info = flavor.log_model(str(ft), name="model", parent="models:/wait-aligned/1",
                                registered_model_name=name)
    return str(info.registered_model_version)


def test_gate_json_is_one_document_over_http(mlflow_server, models, monkeypatch, tmp_path):
    import mlflow_safedelta.gate_job as gate_job

    v = register_finetune("json-bot", models["ft"])
    monkeypatch.setattr(gate_job, "default_evaluator", fixed_metrics(0.02))
    res = CliRunner().invoke(cli, ["gate", "json-bot", v, "--no-promote", "--json",
                                   "--tracking-uri", mlflow_server.url,
                                   "--work-dir", str(tmp_path / "work")])
    assert res.exit_code == 0, res.output
    gate = json.loads(res.stdout)  # the whole of stdout is the one document
    assert gate["verdict"] == "passed" and gate["run_id"]
    # MLflow's "View run" line (printed on set_terminated over HTTP) never reaches stdout: the
    # gate job sends it to its debug log with credentials removed (recovery.terminate_run)
    assert "View run" not in res.stdout
    (tmp_path / "gate.json").write_text(res.stdout)
    summary = CliRunner().invoke(cli, ["summary", "--from", str(tmp_path / "gate.json")])
    assert summary.exit_code == 0 and "Safe Delta gate: **PASSED**" in summary.stdout
    # the evaluation report names models by URI, not by the worker's scratch directories
    report = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=gate["run_id"], artifact_path="eval/report.json",
        dst_path=str(tmp_path / "eval"))).read_text())
    assert report["models"]["aligned"] == "models:/wait-aligned/1"
    assert report["models"]["finetuned"] == f"models:/json-bot/{v}"
    assert str(tmp_path / "work") not in json.dumps(report["models"])
    # the reuse path (verdict on record) is clean too
    again = CliRunner().invoke(cli, ["gate", "json-bot", v, "--no-promote", "--json",
                                     "--tracking-uri", mlflow_server.url])
    assert json.loads(again.stdout)["run_id"] == gate["run_id"]


def test_the_action_waits_while_the_server_worker_gates(mlflow_server, models, queue_uri,
                                                        tmp_path):
    commit = uuid.uuid4().hex + uuid.uuid4().hex[:8]
    v = register_finetune("wait-bot", models["ft"], commit=commit)
    assert [j.version for j in JobQueue(queue_uri).list(model_name="wait-bot")] == [v], \
        mlflow_server.log_tail()

    summary, output = tmp_path / "summary.md", tmp_path / "output.txt"
    step = gate_step()
    env = {k: val for k, val in os.environ.items()
           if not k.startswith(("INPUT_", "MLFLOW_TRACKING_", "MLFLOW_REGISTRY_"))}
    env.update(step_env(step, {"tracking-uri": mlflow_server.url, "model": "wait-bot",
                               "commit": commit, "parent": "models:/wait-aligned/1",
                               "timeout": "300", "poll-interval": "0.5"}))
    env.update(GITHUB_STEP_SUMMARY=str(summary), GITHUB_OUTPUT=str(output),
               RUNNER_TEMP=str(tmp_path), OMP_NUM_THREADS="1",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    log = open(tmp_path / "step.log", "w+")
    proc = subprocess.Popen(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                             step["run"]], env=env, cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        # the registration carries no tags (its MLmodel names the parent): the version has no
        # status until the worker picks it up
        while "wait-bot v1: unseen" not in (tmp_path / "step.log").read_text():
            assert proc.poll() is None, (tmp_path / "step.log").read_text()
            assert time.monotonic() < deadline, "the step never reported waiting"
            time.sleep(0.5)
        # the server's worker gates it now, while the step waits
        job = functools.partial(run_gate_job, evaluator=fixed_metrics(0.35), progress=False,
                                work_dir=tmp_path / "work")
        worker = Worker(JobQueue(queue_uri), job, tracking_uri=mlflow_server.url)
        while worker.run_once() is not None:
            pass
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "step.log").read_text()
    assert code == 1, text
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    assert outputs["verdict"] == "failed" and outputs["version"] == v, text
    assert outputs["protected-version"] == "2" and outputs["promoted-alias"] == ""
    assert outputs["run-url"].startswith(f"{mlflow_server.url}/#/experiments/")
    md = summary.read_text()
    assert "| ❌ | max_asr | `asr.advbench` | protected | upper_bound |" in md
    assert "::error title=Safe Delta gate failed::max_asr FAILED" in text
    # the runner fetched one file per download (gate.json), never a model
    assert set(re.findall(r"\d+/(\d+) \[", text)) <= {"1"}, text
