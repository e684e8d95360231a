"""Waiting for the server's verdict (mlflow_safedelta.waiting) and the Action's default `wait`
mode, on a local SQLite registry: the version moves pending -> running -> final while the
waiter polls (the "worker" here is the sleep hook, which writes what the gate job writes)."""

from __future__ import annotations

import json

import pytest

from mlflow_safedelta import action
from mlflow_safedelta.errors import RegistryError
from mlflow_safedelta.waiting import GIT_COMMIT_TAG, find_version, wait_for_verdict
from tests.unit.plugin.test_actions import CannedGate, run_action_step

SHA = "1f3e5d7c9b2a4f6e8d0c1b3a5f7e9d2c4b6a8f0e"


@pytest.fixture
def registry(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cl = MlflowClient(uri, uri)
    exp = cl.create_experiment("training")
    run = cl.create_run(exp, tags={GIT_COMMIT_TAG: SHA})
    other = cl.create_run(exp)
    cl.create_registered_model("bot")
    v1 = cl.create_model_version("bot", "s3://b/1", run_id=other.info.run_id).version
    v2 = cl.create_model_version("bot", "s3://b/2", run_id=run.info.run_id,
                                 tags={"safedelta.status": "pending"}).version
    # the gate's protected output of v2, logged by the same run: never the one to wait for
    cl.create_model_version("bot", "s3://b/3", run_id=run.info.run_id,
                            tags={"safedelta.role": "protected"})
    return {"uri": uri, "cl": cl, "run": run.info.run_id, "v1": str(v1), "v2": str(v2)}


def test_find_version_by_version_run_and_commit(registry):
    cl = registry["cl"]
    assert find_version(cl, "bot", version="1") == "1"
    assert find_version(cl, "bot", run_id=registry["run"]) == registry["v2"]
    assert find_version(cl, "bot", commit=SHA) == registry["v2"]
    assert find_version(cl, "bot", commit=SHA[:10]) == registry["v2"]
    with pytest.raises(RegistryError, match="no version of bot was registered from commit"):
        find_version(cl, "bot", commit="abcdef1234")
    with pytest.raises(RegistryError, match="must be a git SHA"):
        find_version(cl, "bot", commit="main")
    with pytest.raises(RegistryError, match="exactly one of"):
        find_version(cl, "bot", version="1", commit=SHA)


def test_waits_through_pending_and_running_to_the_verdict(registry):
    cl, v = registry["cl"], registry["v2"]
    seen, naps = [], []

    def worker_steps(seconds):  # each poll interval, the server's gate moves on
        naps.append(seconds)
        if len(naps) == 1:
            cl.set_model_version_tag("bot", v, "safedelta.status", "running")
        elif len(naps) == 2:  # final status written, the run tag not yet: keep waiting
            cl.set_model_version_tag("bot", v, "safedelta.reason", "max_asr FAILED: 0.4 > 0.2")
            cl.set_model_version_tag("bot", v, "safedelta.status", "failed")
        else:
            cl.set_model_version_tag("bot", v, "safedelta.run_id", "no-such-run")

    res = wait_for_verdict("bot", v, tracking_uri=registry["uri"], timeout=60, interval=2,
                           sleep=worker_steps, on_wait=lambda s, r: seen.append(s))
    assert res.verdict == "failed" and res.reason == "max_asr FAILED: 0.4 > 0.2"
    assert seen == ["pending", "running", "failed"] and naps == [2, 2, 2]


def test_timeout_is_an_error_that_says_what_the_version_was_doing(registry):
    now = [0.0]

    def clock():
        return now[0]

    def sleep(s):
        now[0] += s

    res = wait_for_verdict("bot", registry["v1"], tracking_uri=registry["uri"], timeout=30,
                           interval=10, sleep=sleep, clock=clock)
    assert res.verdict == "error" and now[0] == 30
    assert "no verdict after 30 s: bot version 1 has no safedelta.status tag yet" in res.reason
    assert "gate worker running" in res.reason


def _wait_inputs(registry, **extra):
    return {"tracking-uri": registry["uri"], "model": "bot", "timeout": "5",
            "poll-interval": "0.1", **extra}


def test_the_action_waits_by_default_and_never_runs_the_gate(registry, tmp_path, monkeypatch):
    cl, v = registry["cl"], registry["v2"]
    cl.set_model_version_tag("bot", v, "safedelta.policy", "default")
    cl.set_model_version_tag("bot", v, "safedelta.status", "passed")
    cl.set_model_version_tag("bot", v, "safedelta.run_id", registry["run"])
    gate = CannedGate({}, 0)
    code, out, _, summary, outputs = run_action_step(tmp_path, monkeypatch, gate,
                                                     _wait_inputs(registry, commit=SHA))
    assert code == 0, out
    assert gate.calls == []  # nothing ran on the runner
    assert outputs["verdict"] == "passed" and outputs["version"] == v
    assert "PASSED" in summary and "`bot` version 2" in summary
    # the manifest names another policy than the one the server gated with: an error
    (tmp_path / "b").mkdir()
    code, _, _, _, outputs = run_action_step(tmp_path / "b", monkeypatch, gate,
                                             _wait_inputs(registry, version=v, policy="strict"))
    assert code == 2 and "the server gated under policy 'default'" in outputs["reason"]


def test_the_action_reports_a_timeout_as_error(registry, tmp_path, monkeypatch):
    code, out, _, summary, outputs = run_action_step(
        tmp_path, monkeypatch, CannedGate({}, 0), _wait_inputs(registry, version=registry["v2"],
                                                             timeout="0.3"))
    assert code == 2 and outputs["verdict"] == "error"
    assert "no verdict after 0.3 s: bot version 2 is still pending" in outputs["reason"]
    assert "bot v2: pending" in out
    assert json.loads(open(outputs["json-file"]).read())["verdict"] == "error"


@pytest.mark.parametrize("inputs, why", [
    ({"mode": "later", "version": "1"}, "`mode` must be one of wait, run"),
    ({"mode": "run", "commit": SHA}, "mode `run` takes `version` or `alias`"),
    ({"run-id": "abc", "commit": SHA}, "exactly one of the inputs `version`, `alias`, `run-id`"),
    ({"version": "1", "timeout": "soon"}, "`timeout` must be a number of seconds"),
])
def test_bad_wait_inputs(registry, tmp_path, monkeypatch, inputs, why):
    code, _, _, summary, outputs = run_action_step(tmp_path, monkeypatch, CannedGate({}, 0),
                                                   _wait_inputs(registry, **inputs))
    assert code == 2 and why in outputs["reason"]


def test_action_module_exposes_both_modes():
    assert action.MODES == ("wait", "run")
