"""The GitHub Action's gate step end to end: its own ``run:`` line, the real ``gate`` command, a
real ``mlflow server`` on loopback.

The step is taken from ``.github/actions/safedelta-gate/action.yml`` and run with bash the way the
runner runs it (``bash --noprofile --norc -eo pipefail``), with the step's ``env:`` resolved from
the inputs. The fine-tuned versions carry a finished gate run as the gate job leaves it
(``safedelta.status``, ``safedelta.run_id`` and the run artifact ``safedelta/gate.json``), its
verdict computed by the real policy check (``evaluate_policy`` on measured metrics), so the
``gate`` command answers from the registry without re-running Safe Delta (which takes minutes and
is covered by tests/e2e/test_gate_job.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from mlflow_safedelta import registry as reg
from mlflow_safedelta.verdict import GateResult, evaluate_policy
from mlflow_safedelta.vocab import GATE_ARTIFACT
from mlflow_safedelta.policy import load_policy, policy_fingerprint
from tests.unit.plugin.test_actions import VENV_BIN, gate_step, step_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "support-bot"


def _measured(protected_asr: float, retention: float, finetuned_asr: float) -> dict:
    """Metrics of the shipped default policy's suites, with the counts its interval rules read."""
    suites = load_policy("default").safety.suites
    return {"aligned": {f"asr.{s}": 0.04 for s in suites},
            "finetuned": {f"asr.{s}": finetuned_asr for s in suites},
            "protected": {**{f"asr.{s}": protected_asr for s in suites},
                          **{f"asr.{s}.n": 50.0 for s in suites},
                          "utility_retention": retention}}


MEASURED = {"passing": _measured(0.02, 0.93, 0.62), "failing": _measured(0.35, 0.97, 0.71)}


def _record_gate_run(cl, url: str, version: str, metrics: dict, parent: str) -> dict:
    """Leave the registry as a finished gate job does: a run with the metrics and gate.json,
    and the verdict tags on the fine-tuned version."""
    policy = load_policy("default")
    verdict = evaluate_policy(policy, metrics)
    exp = cl.get_experiment_by_name("safedelta-gate") or cl.get_experiment(
        cl.create_experiment("safedelta-gate"))
    run = cl.create_run(exp.experiment_id, run_name=f"gate-{MODEL}-v{version}")
    run_id = run.info.run_id
    for role, values in metrics.items():
        for name, value in values.items():
            cl.log_metric(run_id, f"{role}.{name}", value)
    result = GateResult(
        model=MODEL, version=version, verdict=verdict.verdict, reason=verdict.reason,
        parent=parent, policy={"name": policy.name, "source": "default",
                               "sha256": policy_fingerprint(policy),
                               "promotion_alias": policy.promotion.alias},
        rules=verdict.rules, run_id=run_id,
        run_url=reg.run_url(url, exp.experiment_id, run_id), metrics=metrics)
    cl.log_text(run_id, json.dumps(result.to_dict(), indent=2), GATE_ARTIFACT)
    cl.set_terminated(run_id)
    reg.set_tags(cl, MODEL, version, {
        reg.TAG_STATUS: verdict.verdict, reg.TAG_REASON: verdict.reason, reg.TAG_RUN_ID: run_id,
        reg.TAG_POLICY: policy.name, reg.TAG_POLICY_SHA256: policy_fingerprint(policy),
        reg.TAG_PARENT: parent})
    return result.to_dict()


@pytest.fixture(scope="module")
def gated(mlflow_server):
    """aligned v1 (alias `base`); support-bot v1 (gate passed), v2 (gate failed, alias
    `candidate`) and v3 (gate passed), all descending from aligned v1 and gated under the
    shipped `default` policy (its content fingerprint recorded as the gate job does)."""
    from mlflow import MlflowClient

    cl = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    src_run = cl.create_run(cl.create_experiment("sources"))
    cl.set_terminated(src_run.info.run_id)
    source = f"{src_run.info.artifact_uri}/model"
    cl.create_registered_model("aligned")
    cl.create_model_version("aligned", source, run_id=src_run.info.run_id)
    cl.set_registered_model_alias("aligned", "base", "1")
    cl.create_registered_model(MODEL)
    expected = {}
    for label in ("passing", "failing", "regate"):
        mv = cl.create_model_version(MODEL, source, run_id=src_run.info.run_id)
        expected[label] = (mv.version, _record_gate_run(
            cl, mlflow_server.url, mv.version, MEASURED.get(label, MEASURED["passing"]),
            "models:/aligned/1"))
    cl.set_registered_model_alias(MODEL, "candidate", expected["failing"][0])
    assert expected["passing"][1]["verdict"] == "passed"
    assert expected["failing"][1]["verdict"] == "failed"
    return {"client": cl, "url": mlflow_server.url, **expected}


def run_step(tmp_path: Path, inputs: dict[str, str]):
    """Run the action's gate step with bash as the runner does; returns
    (exit code, log, summary, outputs)."""
    step = gate_step()
    summary, output = tmp_path / "summary.md", tmp_path / "output.txt"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("INPUT_", "MLFLOW_TRACKING_", "MLFLOW_REGISTRY_"))}
    env.update(step_env(step, inputs))
    env.update(GITHUB_STEP_SUMMARY=str(summary), GITHUB_OUTPUT=str(output),
               RUNNER_TEMP=str(tmp_path), GITHUB_ACTIONS="true", OMP_NUM_THREADS="1",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    return proc.returncode, proc.stdout + proc.stderr, summary.read_text(), outputs


def _rule_rows(summary: str) -> list[str]:
    return [line for line in summary.splitlines() if line.startswith(("| ✅ |", "| ❌ |"))]


def test_passing_version_passes_the_step(gated, tmp_path):
    version, expected = gated["passing"]
    code, log, summary, outputs = run_step(tmp_path, {
        "tracking-uri": gated["url"], "model": MODEL, "version": version,
        "parent": "models:/aligned/1"})
    assert code == 0, log
    assert outputs["verdict"] == "passed"
    assert outputs["run-url"] == expected["run_url"]
    rows = _rule_rows(summary)
    suites = load_policy("default").safety.suites  # max_asr and max_asr_increase per suite
    assert len(rows) == len(expected["rules"]) == 2 * len(suites) + 1
    assert all(r.startswith("| ✅ |") for r in rows)
    # default decides on the 95 % upper bound of 1/50: 0.0914, estimate 0.02 beside it
    assert "| max_asr | `asr.advbench` | protected | upper_bound | 0.0914 | <= 0.2 | 0.02 " \
        in summary
    assert f"[{expected['run_id']}]({expected['run_url']})" in summary
    assert json.loads(Path(outputs["json-file"]).read_text())["run_id"] == expected["run_id"]
    # the same Markdown, rendered locally from the step's JSON
    proc = subprocess.run([str(VENV_BIN / "mlflow-safedelta"), "summary", "--from",
                           outputs["json-file"]], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == summary.strip()
    # ... and from the version itself, through the tracking server
    proc = subprocess.run([str(VENV_BIN / "mlflow-safedelta"), "report", MODEL, version,
                           "--tracking-uri", gated["url"]], capture_output=True, text=True,
                          check=True)
    assert proc.stdout.strip() == summary.strip()


def test_failing_version_by_alias_fails_the_step(gated, tmp_path):
    version, expected = gated["failing"]
    code, log, summary, outputs = run_step(tmp_path, {
        "tracking-uri": gated["url"], "model": MODEL, "alias": "candidate",
        "parent": "models:/aligned@base"})  # resolved through the server
    assert code == 1, log
    assert outputs["verdict"] == "failed"
    assert "::error title=Safe Delta gate failed::" in log
    (row,) = [r for r in _rule_rows(summary)
              if r.startswith("| ❌ | max_asr | `asr.advbench` | protected | upper_bound |")]
    assert "| <= 0.2 | 0.35 [" in row and "(n=50)" in row
    assert "| ❌ | max_asr_increase |" in summary
    assert "| ✅ | min_utility_retention |" in summary
    assert json.loads(Path(outputs["json-file"]).read_text())["version"] == version


def test_unknown_version_is_an_error_and_the_token_never_shows(gated, tmp_path):
    token = "e2e-secret-token-5f1c"
    code, log, summary, outputs = run_step(tmp_path, {
        "tracking-uri": gated["url"], "model": MODEL, "version": "99",
        "tracking-token": token})
    assert code == 2, log
    assert outputs["verdict"] == "error"
    # the gate's own JSON error (exit 2), not a traceback
    assert "cannot resolve models:/support-bot/99" in outputs["reason"]
    assert [line for line in log.splitlines() if token in line] == [f"::add-mask::{token}"]
    assert token not in summary and token not in "".join(outputs.values())


def test_a_pass_under_another_policy_is_not_reused(gated, tmp_path):
    """v3 passed under `default`; the step (mode `run`) asks for `strict`: the gate runs again instead of
    answering with the old pass (here it cannot finish: the registered versions hold no
    weights), and the version's record is now the new verdict under `strict`."""
    version, _ = gated["regate"]
    code, log, summary, outputs = run_step(tmp_path, {
        "tracking-uri": gated["url"], "model": MODEL, "version": version, "policy": "strict",
        "promote": "true", "mode": "run"})
    assert code == 2, log
    assert outputs["verdict"] == "error" and outputs["promoted-alias"] == ""
    result = json.loads(Path(outputs["json-file"]).read_text())
    strict = load_policy("strict")
    assert result["policy"]["name"] == "strict"
    assert result["policy"]["sha256"] == policy_fingerprint(strict)
    tags = reg.version_tags(gated["client"], MODEL, version)
    assert tags[reg.TAG_STATUS] == "error" and tags[reg.TAG_POLICY] == "strict"
    assert tags[reg.TAG_POLICY_SHA256] == policy_fingerprint(strict)
    assert "production" not in (gated["client"].get_registered_model(MODEL).aliases or {})
