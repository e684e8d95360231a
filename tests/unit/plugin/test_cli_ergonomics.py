"""What users of ``mlflow``/``hf``/``llm`` expect of a CLI: one JSON document on stdout whatever
libraries print, a dead server reported in seconds, ``-v`` anywhere, full reasons, tables with
headers, ISO 8601 times in JSON."""

from __future__ import annotations

import calendar
import json
import re
import socket
import time

from click.testing import CliRunner

from mlflow_safedelta.cli import cli
from mlflow_safedelta.jobqueue import JobQueue

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _run(*args, **kw):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False, **kw)


def test_library_prints_go_to_stderr_under_json(monkeypatch):
    """What a library prints while a --json command runs (MLflow's "🏃 View run" lines) lands on
    stderr; stdout holds exactly the JSON document."""
    import mlflow_safedelta.policy as policy_mod

    real = policy_mod.load_policy

    def noisy(*a, **k):
        print("🏃 View run gate-x at: http://example/#/runs/1")
        return real(*a, **k)

    monkeypatch.setattr(policy_mod, "load_policy", noisy)
    res = _run("policy", "show", "default", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["name"] == "default"
    assert "View run" in res.stderr and "View run" not in res.stdout
    # without --json the print stays where it was (people read both streams)
    plain = _run("policy", "show", "default")
    assert "View run" in plain.stdout


def test_unreachable_server_fails_in_seconds_with_a_clear_message(monkeypatch):
    """No retry settings in the environment (MLflow's default would retry for minutes)."""
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    for args in (["status"], ["status", "--json"], ["report", "m", "1"]):
        t0 = time.monotonic()
        res = _run(*args, "--tracking-uri", dead)
        assert time.monotonic() - t0 < 10
        assert res.exit_code == 2, res.output
        assert f"cannot reach the MLflow server at {dead}" in res.output


def test_unreachable_server_message_hides_the_password():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://alice:s3cr3t-pw@127.0.0.1:{s.getsockname()[1]}"
    res = _run("status", "--json", "--tracking-uri", dead)
    assert res.exit_code == 2
    assert "s3cr3t-pw" not in res.output and "alice:***@127.0.0.1" in res.output


def test_verbose_is_accepted_before_and_after_the_subcommand():
    for args in (["-v", "policy", "show"], ["policy", "show", "-v"], ["policy", "-vv", "show"],
                 ["policy", "show", "default", "--verbose", "--json"]):
        res = _run(*args)
        assert res.exit_code == 0, (args, res.output)
    assert "--verbose" in _run("--help").output


def _local_registry(tmp_path, reason):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cl = MlflowClient(uri, uri)
    cl.create_registered_model("bot")
    cl.create_model_version("bot", str(tmp_path / "m"), tags={
        "safedelta.status": "failed", "safedelta.reason": reason})
    return uri


def test_status_prints_the_whole_reason_under_a_header(tmp_path):
    reason = ("max_asr FAILED: attack success rate on advbench (asr.advbench, protected) "
              "measured 0.35, limit <= 0.2; the tail of this reason must survive: END-OF-REASON")
    uri = _local_registry(tmp_path, reason)
    res = _run("status", "--tracking-uri", uri)
    assert res.exit_code == 0, res.output
    head, row = res.stdout.splitlines()[:2]
    assert head.split() == ["model", "version", "status", "role", "parent", "protected",
                            "aliases", "reason"]
    assert row.endswith(reason)


def test_jobs_list_has_a_header_and_json_times_are_iso8601(tmp_path):
    uri = f"sqlite:///{tmp_path / 'q.sqlite'}"
    q = JobQueue(uri)
    q.enqueue("m", 1, source="webhook")
    q.fail(q.claim(), "RegistryError: parent models:/x/1 not found")
    table = _run("jobs", "list", "--queue-uri", uri)
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["model", "version", "state", "attempts", "source", "updated",
                                "detail"]
    assert lines[1].split()[:5] == ["m", "1", "failed", "1", "webhook"]
    assert lines[1].endswith("RegistryError: parent models:/x/1 not found")
    (row,) = json.loads(_run("jobs", "list", "--queue-uri", uri, "--json").stdout)
    for key in ("enqueued_at", "updated_at"):
        assert ISO.match(row[key]), row[key]
    updated = calendar.timegm(time.strptime(row["updated_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(time.time() - updated) < 600
