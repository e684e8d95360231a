"""``--json`` commands print a JSON object on every error path: exit 2 and
``{"status": "error", "verdict": "error", "reason": ...}`` on stdout, never a bare traceback or
plain text only (a CI step or script parses stdout)."""

from __future__ import annotations

import json
import socket

import pytest
from click.testing import CliRunner

from mlflow_safedelta.cli import cli


def _dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _error(res) -> dict:
    assert res.exit_code == 2, res.output
    d = json.loads(res.stdout)
    assert d["status"] == "error" and d["verdict"] == "error" and d["reason"]
    return d


@pytest.mark.parametrize("args, why", [
    (["gate", "--json"], "Missing argument 'MODEL'"),
    (["gate", "m", "1", "2", "--json"], "unexpected extra argument"),
    (["gate", "m", "1", "--device", "tpu", "--json"], "'--device'"),
    (["gate", "m", "--json"], "exactly one of VERSION or --alias"),
    (["gate", "m", "1", "--json"], "cannot resolve models:/m/1"),  # empty local registry
    (["gate", "m", "--alias", "prod", "--json"], "cannot resolve models:/m@prod"),
    (["report", "m", "1", "--json"], "not found"),
    (["report", "m", "1", "--format", "json"], "not found"),
    (["status", "--json", "--nope"], "No such option"),
    (["policy", "validate", "/no/such/policy.yaml", "--json"], "does not exist"),
    (["policy", "show", "no-such-policy", "--json"], "no policy 'no-such-policy'"),
])
def test_usage_and_input_errors_are_json(args, why):
    d = _error(_run(*args))
    assert why in d["reason"]


def test_a_gated_version_missing_from_report_names_it(monkeypatch):
    d = _error(_run("report", "m", "3", "--json"))
    assert d["model"] == "m" and d["version"] == "3"


@pytest.mark.parametrize("cmd", [["status"], ["report", "m", "1"], ["gate", "m", "1"]])
def test_unreachable_registry_is_json(monkeypatch, cmd):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    d = _error(_run(*cmd, "--json", "--tracking-uri", _dead_url()))
    assert "127.0.0.1" in d["reason"]


@pytest.mark.parametrize("exc", [RuntimeError("boom inside the job"),
                                 ConnectionError("registry went away mid-job")])
def test_unexpected_errors_in_the_gate_are_json(monkeypatch, exc):
    """Anything the job raises (a transient error re-raised for the worker to retry, a bug)."""
    import mlflow_safedelta.gate_job as job

    def boom(*a, **kw):
        raise exc

    monkeypatch.setattr(job, "run_gate_job", boom)
    d = _error(_run("gate", "support-bot", "4", "--json"))
    assert d["reason"] == f"{type(exc).__name__}: {exc}"
    assert d["model"] == "support-bot" and d["version"] == "4" and d["command"] == "gate"


def test_without_json_errors_stay_plain_text():
    res = _run("gate", "m")
    assert res.exit_code == 2 and "exactly one of VERSION or --alias" in res.output
    with pytest.raises(json.JSONDecodeError):
        json.loads(res.stdout or "x")


def test_help_is_untouched_by_json():
    res = _run("gate", "--help", "--json")
    assert res.exit_code == 0 and "Exit codes" in res.stdout
