"""The GitHub Actions side: workflow/action YAML (actionlint), the action's gate step with a canned
gate, credential masking, the Markdown summary, and registration manifests.

The gate step is run the way the action runs it: the test reads ``action.yml``, takes the gate
step's ``run:`` line and ``env:`` mapping, fills ``${{ inputs.* }}`` like the runner does, and
invokes that command. Only the gate process itself is replaced (by canned JSON) here; the e2e
test (tests/e2e/test_action_gate.py) runs the real one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mlflow_safedelta import action as ci
from mlflow_safedelta.cli import cli
from mlflow_safedelta.manifest import ManifestError, load_manifest, parse_manifest

ROOT = Path(__file__).resolve().parents[3]
ACTION = ROOT / ".github" / "actions" / "safedelta-gate" / "action.yml"
WORKFLOWS = ROOT / ".github" / "workflows"
EXAMPLE_WORKFLOW = ROOT / "docs" / "examples" / "model-gate.yml"  # the copyable one
VENV_BIN = Path(sys.executable).parent
EXPR = re.compile(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}")


# ---------------------------------------------------------------------------------------------
# helpers: the action's own step


def load_action() -> dict:
    return yaml.safe_load(ACTION.read_text())


def gate_step() -> dict:
    steps = load_action()["runs"]["steps"]
    (step,) = [s for s in steps if s.get("id") == "gate"]
    return step


def step_env(step: dict, inputs: dict[str, str]) -> dict[str, str]:
    """The step's ``env:`` as the runner resolves it: ``${{ inputs.x }}`` -> the given value or
    the input's default from action.yml."""
    declared = load_action()["inputs"]

    def value(m: re.Match) -> str:
        name = m.group(1)
        assert name in declared, f"step uses undeclared input {name!r}"
        return str(inputs.get(name, declared[name].get("default", "")))

    return {k: EXPR.sub(value, str(v)) for k, v in step.get("env", {}).items()}


GATE_JSON = {
    "model": "support-bot",
    "version": "7",
    "parent": "models:/chat-aligned/1",
    "verdict": "passed",
    "reason": "all 2 rules passed",
    "policy": {"name": "default", "source": "mlflow_safedelta.policies/default.yaml"},
    "rules": [
        {"rule": "max_attack_success_rate", "metric": "attack_success_rate", "role": "protected",
         "measured": 0.04, "limit": 0.1, "comparison": "<=", "passed": True, "message": "ok"},
        {"rule": "min_task_score", "metric": "rougeL", "role": "protected",
         "measured": 0.61, "limit": 0.5, "comparison": ">=", "passed": True, "message": "ok"},
    ],
    "protected_version": "8",
    "run_id": "0123abcd",
    "run_url": "http://127.0.0.1:5000/#/experiments/1/runs/0123abcd",
    "promoted_alias": None,
    "metrics": {},
}


def failing_json() -> dict:
    g = json.loads(json.dumps(GATE_JSON))
    g["verdict"] = "failed"
    g["reason"] = "1 of 2 rules failed: max_attack_success_rate"
    g["rules"][0].update(measured=0.37, passed=False, message="0.37 > 0.1")
    return g


class CannedGate:
    """Stands in for the gate process: records how it was called, answers canned output."""

    def __init__(self, payload, returncode: int, stderr: str = "") -> None:
        self.payload, self.returncode, self.stderr = payload, returncode, stderr
        self.calls: list[tuple[list[str], dict]] = []

    def __call__(self, args, env):
        self.calls.append((list(args), dict(env)))
        out = self.payload if isinstance(self.payload, str) else json.dumps(self.payload)
        return subprocess.CompletedProcess(["gate", *args], self.returncode, out, self.stderr)


def run_action_step(tmp_path, monkeypatch, gate: CannedGate, inputs: dict[str, str]):
    """Run the gate step's ``run:`` command in-process with the step's env; returns
    (exit code, stdout, stderr, summary text, outputs dict)."""
    step = gate_step()
    argv = shlex.split(step["run"])
    assert argv[0] == "mlflow-safedelta", "the action runs the plugin's console script"
    monkeypatch.setattr(ci, "run_gate_process", gate)
    summary, output = tmp_path / "summary.md", tmp_path / "output.txt"
    env = step_env(step, inputs)
    env.update(GITHUB_STEP_SUMMARY=str(summary), GITHUB_OUTPUT=str(output),
               RUNNER_TEMP=str(tmp_path))
    for k in list(os.environ):
        if k.startswith("INPUT_") or k.startswith("MLFLOW_TRACKING_"):
            monkeypatch.delenv(k, raising=False)
    result = CliRunner().invoke(cli, argv[1:], env=env, catch_exceptions=False)
    outputs = {}
    if output.exists():
        for line in output.read_text().splitlines():
            k, _, v = line.partition("=")
            outputs[k] = v
    text = summary.read_text() if summary.exists() else ""
    return result.exit_code, result.stdout, result.stderr, text, outputs


BASE_INPUTS = {"tracking-uri": "http://127.0.0.1:5000", "model": "support-bot", "version": "7",
               "mode": "run"}  # the gate run on the runner (canned here); wait mode below


# ---------------------------------------------------------------------------------------------
# YAML: actionlint and the action's structure


def test_actionlint_finds_nothing_in_workflows():
    workflows = sorted(WORKFLOWS.glob("*.yml")) + [EXAMPLE_WORKFLOW]
    assert {p.name for p in workflows} >= {"ci.yml", "model-gate.yml"}
    proc = subprocess.run([str(VENV_BIN / "actionlint"), "-no-color", *map(str, workflows)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_actionlint_checks_the_local_action_inputs(tmp_path):
    """A workflow passing an input the action does not declare is a finding: so the lint above
    really reads action.yml (and would catch a renamed input)."""
    repo = tmp_path / "repo"
    (repo / ".github" / "workflows").mkdir(parents=True)
    (repo / ".github" / "actions" / "safedelta-gate").mkdir(parents=True)
    (repo / ".github" / "actions" / "safedelta-gate" / "action.yml").write_text(ACTION.read_text())
    bad = repo / ".github" / "workflows" / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  g:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - uses: actions/checkout@v4\n"
        "      - uses: ./.github/actions/safedelta-gate\n"
        "        with:\n          tracking-uri: x\n          model: m\n"
        "          modle-version: 1\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    proc = subprocess.run([str(VENV_BIN / "actionlint"), "-no-color", str(bad)], cwd=repo,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "modle-version" in proc.stdout


def test_actionlint_finds_nothing_in_the_action_scripts(tmp_path):
    """actionlint reads workflows, not action metadata: lint the composite action's ``run:``
    steps (shellcheck included where installed, as on GitHub's runners) inside a workflow."""
    steps = []
    for step in load_action()["runs"]["steps"]:
        if "run" in step:
            env = {k: EXPR.sub(lambda m: f"value-of-{m.group(1)}", str(v))
                   for k, v in step.get("env", {}).items()}
            steps.append({"name": step["name"], "shell": step["shell"], "env": env,
                          "run": step["run"]})
    assert len(steps) == 2
    wf = {"on": "push", "jobs": {"action": {"runs-on": "ubuntu-latest", "steps": steps}}}
    path = tmp_path / ".github" / "workflows" / "action-steps.yml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(wf, sort_keys=False))
    proc = subprocess.run([str(VENV_BIN / "actionlint"), "-no-color", str(path)], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_action_is_composite_and_passes_inputs_only_through_env():
    action = load_action()
    assert action["runs"]["using"] == "composite"
    for step in action["runs"]["steps"]:
        if "run" in step:
            assert step.get("shell") == "bash"
            # no expression in a script: inputs are data (env), never code or argv
            assert "${{" not in step["run"], step["run"]
    env = gate_step()["env"]
    for name in ("tracking-token", "tracking-username", "tracking-password"):
        key = "INPUT_" + name.upper().replace("-", "_")
        assert env[key] == f"${{{{ inputs.{name} }}}}"
    # every output is one the gate step writes
    for name, out in action["outputs"].items():
        assert out["value"] == f"${{{{ steps.gate.outputs.{name} }}}}"


@pytest.mark.parametrize(
    "inputs, expected_tail",
    [({}, ["--extra-index-url", "https://download.pytorch.org/whl/cpu", "<action repo>"]),
     ({"package": "mlflow-safedelta[engine]==0.1.0", "pip-args": ""},
      ["mlflow-safedelta[engine]==0.1.0"])],
    ids=["default-installs-this-repo", "package-from-index"],
)
def test_install_step_installs_the_plugin_from_the_action_repo(tmp_path, inputs, expected_tail):
    """Run the action's install step with a stand-in ``python`` that records its arguments."""
    (step,) = [s for s in load_action()["runs"]["steps"]
               if s.get("name") == "Install mlflow-safedelta"]
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir()
    record = tmp_path / "argv"
    (shim_dir / "python").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    (shim_dir / "python").chmod(0o755)
    env = {**os.environ, **step_env(step, inputs),
           "GITHUB_ACTION_PATH": str(ACTION.parent), "PATH": f"{shim_dir}{os.pathsep}/usr/bin:/bin"}
    subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                   env=env, check=True, cwd=tmp_path)
    argv = record.read_text().splitlines()
    assert argv[:5] == ["-m", "pip", "install", "--disable-pip-version-check", "-q"]
    tail = argv[5:]
    if expected_tail[-1] == "<action repo>":
        path, extras = tail[-1].removesuffix("]").rsplit("[", 1)
        assert extras == "engine"  # the gate protects and evaluates: torch, transformers ...
        assert Path(path).resolve() == ROOT  # the repository holding pyproject.toml
        tail = [*tail[:-1], "<action repo>"]
    assert tail == expected_tail


def test_workflow_ci_runs_make_test_on_both_pythons_with_services():
    wf = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    job = wf["jobs"]["test"]
    assert job["strategy"]["matrix"]["python-version"] == ["3.11", "3.12"]
    assert set(job["services"]) == {"postgres", "redis"}
    assert job["env"]["SAFEDELTA_REQUIRE_SERVICES"] == "1"
    assert "torch==2.13.0" in job["env"]["TORCH"] and "whl/cpu" in job["env"]["TORCH"]
    assert [s["run"] for s in job["steps"] if "run" in s] == [".ci/run"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# ---------------------------------------------------------------------------------------------
# the gate step


def test_passing_gate_exits_0_and_writes_verdict_and_rules_table(tmp_path, monkeypatch):
    gate = CannedGate(GATE_JSON, 0)
    code, out, err, summary, outputs = run_action_step(tmp_path, monkeypatch, gate, BASE_INPUTS)
    assert code == 0, out + err
    assert outputs["verdict"] == "passed"
    assert outputs["protected-version"] == "8"
    assert outputs["run-url"] == GATE_JSON["run_url"]
    assert json.loads(Path(outputs["json-file"]).read_text())["verdict"] == "passed"
    assert "Safe Delta gate: **PASSED**" in summary
    for rule in GATE_JSON["rules"]:
        row = next(line for line in summary.splitlines() if f"| {rule['rule']} |" in line)
        assert row.startswith("| ✅ |")
        assert f"| {rule['measured']} |" in row
        assert f"| {rule['comparison']} {rule['limit']} |" in row
    assert f"]({GATE_JSON['run_url']})" in summary
    (args, env), = gate.calls
    assert args == ["support-bot", "7", "--policy", "default", "--no-promote", "--json"]
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert not any(k.startswith("INPUT_") for k in env)
    assert "::warning" not in out  # promotion was not asked for


def test_passed_but_not_promoted_is_a_warning(tmp_path, monkeypatch):
    promoted = {**GATE_JSON, "promoted_alias": "production"}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    code, out, *_ = run_action_step(tmp_path / "a", monkeypatch, CannedGate(promoted, 0),
                                    {**BASE_INPUTS, "promote": "true"})
    assert code == 0 and "::warning" not in out
    code, out, _, _, outputs = run_action_step(tmp_path / "b", monkeypatch,
                                               CannedGate(GATE_JSON, 0),
                                               {**BASE_INPUTS, "promote": "true"})
    assert code == 0 and outputs["promoted-alias"] == ""
    assert "::warning title=Safe Delta gate::passed, but no alias was moved" in out


def test_failing_gate_exits_1_and_marks_the_failed_rule(tmp_path, monkeypatch):
    inputs = {**BASE_INPUTS, "version": "", "alias": "candidate", "policy": "policies/strict.yaml",
              "promote": "true"}
    failing = failing_json()
    failing["policy"] = {"name": "strict", "source": "policies/strict.yaml"}
    gate = CannedGate(failing, 1)
    code, out, _, summary, outputs = run_action_step(tmp_path, monkeypatch, gate, inputs)
    assert code == 1
    assert outputs["verdict"] == "failed"
    assert "::error title=Safe Delta gate failed::1 of 2 rules failed" in out
    assert "Safe Delta gate: **FAILED**" in summary
    row = next(line for line in summary.splitlines() if "| max_attack_success_rate |" in line)
    assert row.startswith("| ❌ |") and "| 0.37 |" in row and "| <= 0.1 |" in row
    assert gate.calls[0][0] == ["support-bot", "--alias", "candidate", "--policy",
                                "policies/strict.yaml", "--promote", "--json"]


@pytest.mark.parametrize("policy, force", [("strict", "false"),
                                           ("policies/strict.yaml", "true")])
def test_the_requested_policy_and_force_go_to_the_gate(tmp_path, monkeypatch, policy, force):
    """The step trusts the gate to answer under the requested policy: the gate counts a verdict
    on record only under the same policy content and gates again otherwise (the real behaviour
    is tested in tests/unit/plugin/test_gate_reuse.py and tests/e2e/test_action_gate.py)."""
    answered = {**GATE_JSON, "policy": {"name": "strict", "source": policy, "sha256": "ab" * 32}}
    gate = CannedGate(answered, 0)
    code, _, _, summary, outputs = run_action_step(
        tmp_path, monkeypatch, gate, {**BASE_INPUTS, "policy": policy, "force": force})
    assert code == 0 and outputs["verdict"] == "passed"
    (args, _), = gate.calls
    assert args[args.index("--policy") + 1] == policy
    assert ("--force" in args) == (force == "true")
    assert "`strict`" in summary and "content sha256 `abababababab`" in summary


@pytest.mark.parametrize(
    "parent, code, why",
    [("models:/chat-aligned/1", 0, None),
     ("models:/chat-aligned/2", 2, "the version's aligned parent is models:/chat-aligned/1, but "
                                   "the manifest names models:/chat-aligned/2"),
     ("chat-aligned", 2, "input `parent`: 'chat-aligned' is not a registered-model URI")],
)
def test_the_version_must_descend_from_the_named_parent(tmp_path, monkeypatch, parent, code, why):
    got, _, _, summary, outputs = run_action_step(
        tmp_path, monkeypatch, CannedGate(GATE_JSON, 0), {**BASE_INPUTS, "parent": parent})
    assert got == code
    assert outputs["verdict"] == ("passed" if code == 0 else "error")
    if why:
        assert why in outputs["reason"] and why in summary


def test_a_parent_alias_is_resolved_with_the_step_credentials(tmp_path, monkeypatch):
    from mlflow_safedelta import registry as reg

    seen = {}

    def fake_resolve(cl, ref):
        seen.update(token=os.environ.get("MLFLOW_TRACKING_TOKEN"), ref=ref,
                    uri=os.environ.get("MLFLOW_TRACKING_URI"))
        return type("MV", (), {"version": "1" if ref.alias == "base" else "5"})()

    monkeypatch.setattr(reg, "resolve", fake_resolve)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://127.0.0.1:5000")
    inputs = {**BASE_INPUTS, "parent": "models:/chat-aligned@base", "tracking-token": "tok-abc123"}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    code, *_ = run_action_step(tmp_path / "a", monkeypatch, CannedGate(GATE_JSON, 0), inputs)
    assert code == 0
    assert seen == {"token": "tok-abc123", "ref": reg.ModelRef("chat-aligned", alias="base"),
                    "uri": "http://127.0.0.1:5000"}
    # the process environment is as before
    assert "MLFLOW_TRACKING_TOKEN" not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ
    assert os.environ["MLFLOW_REGISTRY_URI"] == "http://127.0.0.1:5000"
    code, _, _, _, outputs = run_action_step(tmp_path / "b", monkeypatch, CannedGate(GATE_JSON, 0),
                                             {**inputs, "parent": "models:/chat-aligned@newer"})
    assert code == 2
    assert "names models:/chat-aligned@newer = models:/chat-aligned/5" in outputs["reason"]


def test_an_unreachable_registry_while_resolving_the_parent_is_an_error(tmp_path, monkeypatch):
    from mlflow_safedelta import registry as reg

    def down(cl, ref):
        raise ConnectionError("registry unreachable")

    monkeypatch.setattr(reg, "resolve", down)
    code, _, _, _, outputs = run_action_step(
        tmp_path, monkeypatch, CannedGate(GATE_JSON, 0),
        {**BASE_INPUTS, "parent": "models:/chat-aligned@base"})
    assert code == 2 and outputs["verdict"] == "error"
    assert outputs["reason"] == "input `parent`: registry unreachable"


def test_a_gate_that_cannot_start_is_an_error(tmp_path, monkeypatch):
    def missing(args, env):
        raise FileNotFoundError(2, "No such file or directory", "python")

    code, _, _, _, outputs = run_action_step(tmp_path, monkeypatch, missing, BASE_INPUTS)
    assert code == 2 and outputs["verdict"] == "error"
    assert "printed no JSON result: cannot run the gate:" in outputs["reason"]


@pytest.mark.parametrize(
    "payload, returncode, stderr, why",
    [
        ({**GATE_JSON, "verdict": "error", "reason": "parent not found", "rules": []}, 2, "",
         "parent not found"),
        ("", 1, "Traceback (most recent call last):\n  ...\nKeyError: 'nope'\n",
         "exited with 1 and printed no JSON result: KeyError: 'nope'"),
        (GATE_JSON, 1, "", "exited with 1 but reported verdict 'passed'"),
        ({**GATE_JSON, "verdict": "maybe"}, 0, "", "unknown verdict"),
    ],
    ids=["gate-error", "no-json", "exit-code-disagrees", "unknown-verdict"],
)
def test_gate_errors_exit_2_with_verdict_error(tmp_path, monkeypatch, payload, returncode, stderr,
                                               why):
    code, out, _, summary, outputs = run_action_step(
        tmp_path, monkeypatch, CannedGate(payload, returncode, stderr), BASE_INPUTS)
    assert code == 2
    assert outputs["verdict"] == "error"
    assert why in outputs["reason"] and why in summary
    assert "::error title=Safe Delta gate error::" in out


@pytest.mark.parametrize(
    "inputs, why",
    [({"version": "", "alias": ""}, "exactly one of"),
     ({"version": "7", "alias": "candidate"}, "exactly one of"),
     ({"version": "seven"}, "`version` must be a version number"),
     ({"promote": "maybe"}, "`promote` must be true or false"),
     ({"force": "sure"}, "`force` must be true or false")],
)
def test_bad_inputs_are_errors_and_never_run_the_gate(tmp_path, monkeypatch, inputs, why):
    gate = CannedGate(GATE_JSON, 0)
    code, _, _, summary, outputs = run_action_step(tmp_path, monkeypatch, gate,
                                                   {**BASE_INPUTS, **inputs})
    assert code == 2 and outputs["verdict"] == "error"
    assert why in summary
    assert gate.calls == []


def test_credentials_are_masked_passed_by_env_and_never_logged(tmp_path, monkeypatch):
    token, user, password, uri_pw = "tok-9f8e7d6c5b4a", "svc-gatebot", "pw-Zq81!xx", "uripw-77aa"
    # a careless gate that echoes its credentials into its log and its reason
    leaky = failing_json()
    leaky["reason"] = f"auth used {token}"
    gate = CannedGate(leaky, 1, stderr=f"DEBUG token={token} user={user} pw={password} {uri_pw}\n")
    inputs = {**BASE_INPUTS, "tracking-uri": f"https://bot:{uri_pw}@mlflow.example.com",
              "tracking-token": token, "tracking-username": user, "tracking-password": password}
    code, out, err, summary, outputs = run_action_step(tmp_path, monkeypatch, gate, inputs)
    assert code == 1
    secrets = [token, user, password, uri_pw]
    lines = out.splitlines()
    masks = [line for line in lines if line.startswith("::add-mask::")]
    assert {m.removeprefix("::add-mask::") for m in masks} >= set(secrets)
    assert lines[: len(masks)] == masks, "masks come before any other output"
    json_text = Path(outputs["json-file"]).read_text()
    for s in secrets:
        assert not any(s in line for line in lines if not line.startswith("::add-mask::"))
        assert s not in err and s not in summary and s not in json_text
        assert all(s not in v for v in outputs.values())
    assert "DEBUG token=*** user=*** pw=*** ***" in out
    (args, env), = gate.calls
    assert not any(s in a for s in secrets for a in args), "credentials never on a command line"
    assert env["MLFLOW_TRACKING_TOKEN"] == token
    assert env["MLFLOW_TRACKING_USERNAME"] == user
    assert env["MLFLOW_TRACKING_PASSWORD"] == password


def test_gate_log_cannot_issue_workflow_commands(tmp_path, monkeypatch):
    """The gate's log (which echoes PR-controlled names) is fenced by ::stop-commands::."""
    gate = CannedGate(GATE_JSON, 0,
                      stderr="loading model\n::add-mask::x\n::set-output name=verdict::passed\n")
    code, out, _, _, _ = run_action_step(tmp_path, monkeypatch, gate, BASE_INPUTS)
    assert code == 0
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("::stop-commands::"))
    token = lines[start].removeprefix("::stop-commands::")
    assert len(token) >= 16
    end = lines.index(f"::{token}::")
    assert lines[start + 1:end] == ["loading model", "::add-mask::x",
                                    "::set-output name=verdict::passed"]


def test_summary_command_renders_what_the_action_wrote(tmp_path, monkeypatch):
    code, _, _, action_summary, outputs = run_action_step(
        tmp_path, monkeypatch, CannedGate(failing_json(), 1), BASE_INPUTS)
    assert code == 1
    res = CliRunner().invoke(cli, ["summary", "--from", outputs["json-file"]])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == action_summary.strip()
    md = tmp_path / "out.md"
    res = CliRunner().invoke(cli, ["summary", "--from", "-", "-o", str(md)],
                             input=json.dumps(GATE_JSON))
    assert res.exit_code == 0 and "Safe Delta gate: **PASSED**" in md.read_text()


@pytest.mark.parametrize("content, why", [("{not json", "is not JSON"),
                                          ('{"model": "m"}', "no `verdict` field")])
def test_summary_command_rejects_non_gate_input(tmp_path, content, why):
    p = tmp_path / "gate.json"
    p.write_text(content)
    res = CliRunner().invoke(cli, ["summary", "--from", str(p)])
    assert res.exit_code == 2 and why in res.output


# ---------------------------------------------------------------------------------------------
# registration manifests


def test_example_manifest_is_valid():
    m = load_manifest(ROOT / "models" / "example.yaml")
    assert m.model and (m.version is None) != (m.alias is None)
    assert m.parent.startswith("models:/")


VALID = "model: support-bot\nversion: 3\nparent: models:/chat-aligned/1\n"


@pytest.mark.parametrize(
    "text, field, why",
    [
        ("model: m\nparent: models:/p/1\n", "(manifest)", "exactly one of `version` and `alias`"),
        ("model: m\nversion: 2\nalias: c\nparent: models:/p/1\n", "(manifest)", "exactly one of"),
        (VALID.replace("models:/chat-aligned/1", "chat-aligned"), "parent", "not a registry URI"),
        (VALID.replace("chat-aligned/1", "team/chat-aligned/1"), "parent", "not a registry URI"),
        (VALID + "polcy: strict\n", "polcy", "unknown field"),
        (VALID.replace("version: 3", "version: 1.5"), "version", "whole version number"),
        (VALID.replace("version: 3", "version: 0"), "version", "greater than or equal to 1"),
        (VALID.replace("model: support-bot", "model: ''"), "model", "at least 1 character"),
        (VALID.replace("version: 3", "alias: 'bad alias'"), "alias", "not a valid alias"),
        (VALID + "manifest_version: 2\n", "manifest_version", "Input should be 1"),
        (VALID + "promote: perhaps\n", "promote", "valid boolean"),
    ],
)
def test_invalid_manifest_error_names_the_field(text, field, why):
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, source="models/x.yaml")
    msg = str(info.value)
    assert msg.startswith("models/x.yaml: invalid registration manifest")
    assert f"`{field}`: " in msg and why in msg


@pytest.mark.parametrize("text, why", [("model: [unclosed\n", "not valid YAML"),
                                       ("- a\n- b\n", "a YAML mapping")])
def test_manifest_that_is_not_a_mapping(text, why):
    with pytest.raises(ManifestError, match=why):
        parse_manifest(text, source="models/x.yaml")


def test_manifest_module_needs_only_pydantic_and_yaml():
    """The workflow's list job installs only pydantic and PyYAML (and the package, no deps)."""
    code = ("import sys, mlflow_safedelta.manifest; print(sorted(m for m in "
            "('mlflow', 'torch', 'transformers', 'numpy', 'click') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _workflow_list_step() -> dict:
    wf = yaml.safe_load((WORKFLOWS / "model-gate.yml").read_text())
    (step,) = [s for s in wf["jobs"]["manifests"]["steps"] if s.get("id") == "list"]
    return step


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def manifest_repo(tmp_path):
    """A git repository with two manifests on the base commit."""
    repo = tmp_path / "repo"
    (repo / "models").mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    (repo / "models" / "keep.yaml").write_text(VALID)
    (repo / "models" / "gone.yaml").write_text(VALID.replace("3", "4"))
    (repo / "README").write_text("x")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "base")
    return repo


def run_list_step(repo: Path, base: str, tmp_path: Path):
    step = _workflow_list_step()
    out = tmp_path / "gh-output"
    out.write_text("")
    env = {**os.environ, "BASE_SHA": base, "HEAD_SHA": _git(repo, "rev-parse", "HEAD"),
           "GITHUB_OUTPUT": str(out), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    # GitHub runs `run:` with `bash --noprofile --norc -eo pipefail {0}`
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                          cwd=repo, env=env, capture_output=True, text=True)
    outputs = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    return proc, outputs


def test_workflow_lists_only_added_and_changed_manifests(manifest_repo, tmp_path):
    repo = manifest_repo
    base = _git(repo, "rev-parse", "HEAD")
    (repo / "models" / "keep.yaml").write_text(VALID.replace("version: 3", "alias: candidate"))
    (repo / "models" / "new.yaml").write_text(VALID.replace("support-bot", "other-bot"))
    (repo / "models" / "gone.yaml").unlink()
    (repo / "README").write_text("changed, not a manifest")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "change")
    proc, outputs = run_list_step(repo, base, tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(outputs["matrix"])
    assert outputs["count"] == "2"
    assert {(r["manifest"], r["model"], r["version"], r["alias"]) for r in rows} == {
        ("models/keep.yaml", "support-bot", "", "candidate"),
        ("models/new.yaml", "other-bot", "3", ""),
    }


def test_workflow_fails_on_an_invalid_changed_manifest(manifest_repo, tmp_path):
    repo = manifest_repo
    base = _git(repo, "rev-parse", "HEAD")
    (repo / "models" / "keep.yaml").write_text(VALID + "policy_file: strict.yaml\n")
    _git(repo, "commit", "-qam", "break it")
    proc, outputs = run_list_step(repo, base, tmp_path)
    assert proc.returncode == 2
    assert "models/keep.yaml" in proc.stderr and "`policy_file`: unknown field" in proc.stderr
    assert "matrix" not in outputs


def test_workflow_with_no_changed_manifest_has_an_empty_matrix(manifest_repo, tmp_path):
    repo = manifest_repo
    base = _git(repo, "rev-parse", "HEAD")
    (repo / "README").write_text("docs only")
    _git(repo, "commit", "-qam", "docs")
    proc, outputs = run_list_step(repo, base, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert outputs == {"matrix": "[]", "count": "0"}


def test_the_example_workflow_is_this_repositorys_with_only_the_sources_changed():
    """docs/examples/model-gate.yml works when copied: the action by owner/repo/path@ref, the
    package from git, never this checkout (`./...`, `pip install .`); otherwise the same jobs
    and steps as the workflow this repository runs."""
    example = yaml.safe_load(EXAMPLE_WORKFLOW.read_text())
    ours = yaml.safe_load((WORKFLOWS / "model-gate.yml").read_text())
    text = EXAMPLE_WORKFLOW.read_text()
    assert "uses: ./" not in text and "--no-deps ." not in text
    (gate,) = [s for s in example["jobs"]["gate"]["steps"] if s.get("id") == "gate"]
    assert re.fullmatch(r"[\w.-]+/[\w.-]+/\.github/actions/safedelta-gate@[\w.-]+", gate["uses"])
    assert gate["with"] == [s for s in ours["jobs"]["gate"]["steps"] if s.get("id") == "gate"][0][
        "with"]
    assert [s.get("name") for s in example["jobs"]["manifests"]["steps"]] == \
        [s.get("name") for s in ours["jobs"]["manifests"]["steps"]]
    assert _workflow_list_step()["run"] == [s for s in example["jobs"]["manifests"]["steps"]
                                            if s.get("id") == "list"][0]["run"]
