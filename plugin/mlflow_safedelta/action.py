"""The GitHub Actions gate step: read (or run) the Safe Delta gate and report it the GitHub way.

``.github/actions/safedelta-gate/action.yml`` runs ``mlflow-safedelta ci-gate``, which calls
:func:`run_ci_gate` with the step's environment. Inputs arrive as ``INPUT_*`` variables (set by the
action's ``env:``), never on a command line. The step:

1. masks every credential (``::add-mask::``) before anything else is printed; credentials reach
   MLflow only as ``MLFLOW_TRACKING_TOKEN`` / ``_USERNAME`` / ``_PASSWORD``;
2. gets the verdict, by ``mode``:

   - ``wait`` (the default): finds the version (by ``version``, ``alias``, ``run-id`` or
     ``commit``) and waits, up to ``timeout`` seconds, for the verdict the server's gate worker
     records (:mod:`mlflow_safedelta.waiting`); nothing but ``gate.json`` is downloaded, so a
     7B model is gated where it lives, not on the runner;
   - ``run``: runs the gate here (``python -m mlflow_safedelta gate ... --json``), for small
     models or servers without a worker; the gate answers only under the requested policy's
     content (a verdict on record under another or edited policy is made again);

3. when a parent is named, checks that the version descends from it; when a policy is named in
   ``wait`` mode, that the server gated under it;
4. writes the Markdown summary (:func:`mlflow_safedelta.verdict.render_markdown`: verdict, every
   rule with measured value and limit, run link) to ``$GITHUB_STEP_SUMMARY``, ``verdict=...``
   (and friends) to ``$GITHUB_OUTPUT`` and the gate JSON to ``$RUNNER_TEMP``;
5. returns the verdict's exit code: 0 passed, 1 failed, 2 error, so a failing gate fails the job.

Everything printed is scrubbed of the credentials before it reaches the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TextIO
from urllib.parse import unquote, urlsplit

from mlflow_safedelta.vocab import VERDICT_EXIT_CODES as EXIT_CODES  # noqa: E402
from safedelta.errors import SafeDeltaError

# action input (INPUT_<NAME>) -> environment variable the gate process reads
CREDENTIAL_INPUTS = {
    "TRACKING_TOKEN": "MLFLOW_TRACKING_TOKEN",
    "TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}
MODES = ("wait", "run")


class CIInputError(SafeDeltaError, ValueError):
    """An action input is missing or malformed; the message names the input."""


@dataclass(frozen=True)
class GateInputs:
    """The action's inputs, as read from ``INPUT_*`` environment variables."""

    tracking_uri: str
    model: str
    version: str
    alias: str
    policy: str  # "" = whatever the version is gated with (wait) / ``default`` (run)
    promote: bool
    force: bool
    parent: str  # the aligned parent the manifest names ("" = not checked)
    secrets: Mapping[str, str]  # gate env var name -> value (never printed)
    mode: str = "wait"
    run_id: str = ""  # wait mode: the version the run logged
    commit: str = ""  # wait mode: the version logged by a run of this git commit
    timeout: float = 3600.0
    poll_interval: float = 15.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GateInputs:
        def get(name: str) -> str:
            return env.get(f"INPUT_{name}", "").strip()

        model, version, alias = get("MODEL"), get("VERSION"), get("ALIAS")
        mode = get("MODE").lower() or "wait"
        run_id, commit = get("RUN_ID"), get("COMMIT")
        if not model:
            raise CIInputError("input `model` is required (the registered model name)")
        if mode not in MODES:
            raise CIInputError(f"input `mode` must be one of {', '.join(MODES)}, got {mode!r}")
        names = {"version": version, "alias": alias, "run-id": run_id, "commit": commit}
        allowed = ("version", "alias") if mode == "run" else tuple(names)
        if [k for k in names if names[k] and k not in allowed]:
            raise CIInputError("mode `run` takes `version` or `alias`, not `run-id`/`commit`")
        if sum(bool(names[k]) for k in allowed) != 1:
            raise CIInputError(f"give exactly one of the inputs {', '.join(f'`{k}`' for k in allowed)}")
        if version and not version.isdigit():
            raise CIInputError(f"input `version` must be a version number, got {version!r}")
        flags = {}
        for name in ("promote", "force"):
            flags[name] = get(name.upper()).lower()
            if flags[name] not in _TRUE | _FALSE:
                raise CIInputError(f"input `{name}` must be true or false, got {flags[name]!r}")
        seconds = {}
        for name, default in (("timeout", 3600.0), ("poll-interval", 15.0)):
            raw = get(name.upper().replace("-", "_"))
            try:
                seconds[name] = float(raw) if raw else default
            except ValueError:
                seconds[name] = -1.0
            if not 0 < seconds[name] < 7 * 86400:
                raise CIInputError(f"input `{name}` must be a number of seconds, got {raw!r}")
        secrets = {}
        for name, target in CREDENTIAL_INPUTS.items():
            value = env.get(f"INPUT_{name}", "")
            if value:
                secrets[target] = value
        return cls(
            tracking_uri=get("TRACKING_URI"),
            model=model,
            version=version,
            alias=alias,
            policy=get("POLICY"),
            promote=flags["promote"] in _TRUE,
            force=flags["force"] in _TRUE,
            parent=get("PARENT"),
            secrets=secrets,
            mode=mode,
            run_id=run_id,
            commit=commit,
            timeout=seconds["timeout"],
            poll_interval=seconds["poll-interval"],
        )

    @property
    def target(self) -> str:
        """What names the version, for logs: ``7``, ``@candidate``, ``run abc``, ``commit 1f3e``."""
        return (self.version or (f"@{self.alias}" if self.alias else "")
                or (f"run {self.run_id}" if self.run_id else f"commit {self.commit}"))

    def gate_args(self) -> list[str]:
        """Arguments after ``gate``: no credentials, no tracking URI (both go through env)."""
        args = [self.model]
        args += [self.version] if self.version else ["--alias", self.alias]
        args += ["--policy", self.policy or "default",
                 "--promote" if self.promote else "--no-promote"]
        return args + (["--force"] if self.force else []) + ["--json"]


def secret_values(env: Mapping[str, str]) -> list[str]:
    """Every value that must never reach the log: credential inputs, credentials already in the
    environment, and a password embedded in the tracking URI."""
    values = [env.get(f"INPUT_{n}", "") for n in CREDENTIAL_INPUTS]
    values += [env.get(v, "") for v in CREDENTIAL_INPUTS.values()]
    uri = env.get("INPUT_TRACKING_URI", "") or env.get("MLFLOW_TRACKING_URI", "")
    try:
        parts = urlsplit(uri)
        if parts.password:
            values += [parts.password, unquote(parts.password)]
    except ValueError:
        pass
    out: list[str] = []
    for v in values:
        # the runner masks line by line: a multi-line secret is masked one line at a time
        for piece in [v, *v.splitlines()]:
            piece = piece.strip()
            if len(piece) >= 3 and piece not in out:
                out.append(piece)
    return sorted(out, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """Replace every secret in ``text`` with ``***`` (longest first)."""
    for s in secrets:
        text = text.replace(s, "***")
    return text


GateRunner = Callable[[list[str], Mapping[str, str]], "subprocess.CompletedProcess[str]"]


def run_gate_process(args: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mlflow_safedelta gate ARGS`` (the same CLI as ``mlflow safedelta gate``)."""
    cmd = [sys.executable, "-m", "mlflow_safedelta", "gate", *args]
    return subprocess.run(cmd, env=dict(env), capture_output=True, text=True, check=False)


def _error_result(inputs: GateInputs | None, reason: str) -> dict[str, Any]:
    return {
        "model": inputs.model if inputs else None,
        "version": inputs.target if inputs else "?",
        "verdict": "error",
        "reason": reason,
        "rules": [],
    }


def _one_line(value: Any) -> str:
    return " ".join(str("" if value is None else value).split())


def _append(path: str | None, text: str) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)


def run_ci_gate(
    env: Mapping[str, str],
    *,
    stdout: TextIO | None = None,
    runner: GateRunner | None = None,
) -> int:
    """Run the gate step as the action does. Returns the exit code (0 passed, 1 failed, 2 error).

    Args:
        env: the step's environment (``INPUT_*``, ``GITHUB_STEP_SUMMARY``, ``GITHUB_OUTPUT``...).
        stdout: where the log goes. The gate's own log is copied to ``stdout`` (one
            stream keeps the order), scrubbed, inside ``::stop-commands::`` so nothing it prints
            (model names and reasons come from pull requests) can act as a workflow command.
        runner: runs the gate command; :func:`run_gate_process` unless given.
    """
    from mlflow_safedelta.verdict import (
        render_markdown,  # the one renderer (also `summary`)
    )

    out = stdout or sys.stdout
    runner = runner or run_gate_process

    # 1. mask first: nothing may be printed before the runner knows the secrets
    secrets = secret_values(env)
    for s in secrets:
        out.write(f"::add-mask::{s}\n")
    out.flush()

    inputs: GateInputs | None = None
    try:
        inputs = GateInputs.from_env(env)
    except CIInputError as exc:
        result, code = _error_result(None, str(exc)), 2
        result["model"] = env.get("INPUT_MODEL") or "?"
    else:
        child_env = {k: v for k, v in env.items() if not k.startswith("INPUT_")}
        child_env.update(inputs.secrets)
        if inputs.tracking_uri:
            child_env["MLFLOW_TRACKING_URI"] = inputs.tracking_uri
            child_env.setdefault("MLFLOW_REGISTRY_URI", inputs.tracking_uri)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        if inputs.mode == "run":
            result, code = _run_here(inputs, child_env, secrets, out, runner)
        else:
            result, code = _await_server(inputs, child_env, secrets, out)
        if code in (0, 1) and inputs.parent:
            result, code = _check_parent(result, code, inputs, child_env)

    verdict = result.get("verdict", "error")
    rendered = scrub(render_markdown(result), secrets)
    _append(env.get("GITHUB_STEP_SUMMARY"), rendered + "\n")

    label = re.sub(r"[^\w.-]+", "_", f"{env.get('INPUT_MODEL', '')}-"
                   f"{env.get('INPUT_VERSION') or env.get('INPUT_ALIAS') or ''}")
    json_path = str(Path(env.get("RUNNER_TEMP") or tempfile.gettempdir())
                    / f"safedelta-gate-{label}.json")
    Path(json_path).write_text(scrub(json.dumps(result, indent=2, default=str), secrets) + "\n")
    outputs = {
        "verdict": verdict,
        "version": result.get("version"),
        "reason": result.get("reason"),
        "protected-version": result.get("protected_version"),
        "run-url": result.get("run_url"),
        "promoted-alias": result.get("promoted_alias"),
        "json-file": json_path,
    }
    _append(
        env.get("GITHUB_OUTPUT"),
        "".join(f"{k}={scrub(_one_line(v), secrets)}\n" for k, v in outputs.items()),
    )

    line = scrub(_one_line(result.get("reason")), secrets)
    if verdict == "passed":
        out.write(f"Safe Delta gate passed: {inputs.model if inputs else ''}\n")
        if inputs and inputs.mode == "run" and inputs.promote \
                and not result.get("promoted_alias"):
            out.write("::warning title=Safe Delta gate::passed, but no alias was moved (the "
                      "policy's promotion is disabled)\n")
    elif verdict == "failed":
        out.write(f"::error title=Safe Delta gate failed::{line or 'a policy rule failed'}\n")
    else:
        out.write(f"::error title=Safe Delta gate error::{line or 'the gate did not finish'}\n")
    out.flush()
    return code


def _run_here(inputs: GateInputs, env: Mapping[str, str], secrets: list[str], out: TextIO,
              runner: GateRunner) -> tuple[dict[str, Any], int]:
    """Mode ``run``: the gate on this machine, as a child process; its log copied, scrubbed."""
    out.write(f"::group::mlflow safedelta gate {inputs.model} {inputs.target} "
              f"(policy {inputs.policy or 'default'})\n")
    try:
        proc = runner(inputs.gate_args(), env)
    except OSError as exc:  # the gate could not be started at all
        proc = subprocess.CompletedProcess(["gate"], 2, "", f"cannot run the gate: {exc}")
    if proc.stderr:
        _quoted(out, proc.stderr, secrets)
    out.write("::endgroup::\n")
    return _interpret(proc.returncode, proc.stdout, proc.stderr, inputs)


def _await_server(inputs: GateInputs, env: Mapping[str, str], secrets: list[str],
                  out: TextIO) -> tuple[dict[str, Any], int]:
    """Mode ``wait``: find the version, wait for the verdict the server's worker records."""
    from mlflow_safedelta.waiting import find_version, wait_for_verdict

    def waiting(status: str, reason: str) -> None:
        _quoted(out, f"{inputs.model} v{version}: {status}" + (f" ({reason})" if reason else ""),
                secrets)
        out.flush()

    version = "?"
    out.write(f"::group::waiting for the server's gate of {inputs.model} {inputs.target} "
              f"(up to {inputs.timeout:g} s)\n")
    try:
        with _step_env(env):
            cl = _client(env)
            version = find_version(cl, inputs.model, version=inputs.version, alias=inputs.alias,
                                   run_id=inputs.run_id, commit=inputs.commit)
            result = wait_for_verdict(
                inputs.model, version, tracking_uri=env.get("MLFLOW_TRACKING_URI"),
                registry_uri=env.get("MLFLOW_REGISTRY_URI"), timeout=inputs.timeout,
                interval=inputs.poll_interval, on_wait=waiting).to_dict()
    except Exception as exc:  # unreachable server, unknown version ...: an error, never a pass
        from mlflow_safedelta.errors import error_reason

        result = {**_error_result(inputs, error_reason(exc)),
                  "version": version if version != "?" else inputs.target}
    finally:
        out.write("::endgroup::\n")
    recorded = (result.get("policy") or {}).get("name")
    if inputs.policy and recorded and recorded != inputs.policy and result["verdict"] != "error":
        result = {**result, "verdict": "error",
                  "reason": f"the server gated under policy {recorded!r}, the manifest names "
                            f"{inputs.policy!r}: register the version with the tag "
                            f"safedelta.policy={inputs.policy}, or use mode `run`"}
    return result, int(EXIT_CODES.get(result.get("verdict"), 2))


def _quoted(out: TextIO, text: str, secrets: list[str]) -> None:
    """Copy text that may come from a pull request (model names, reasons, logs) into the log,
    scrubbed, where no line of it can act as a workflow command."""
    resume = uuid.uuid4().hex
    out.write(f"::stop-commands::{resume}\n")
    out.write(scrub(text, secrets).rstrip("\n") + "\n")
    out.write(f"::{resume}::\n")


@contextlib.contextmanager
def _step_env(env: Mapping[str, str]) -> Iterator[None]:
    """MLflow's URI and credential variables of this process set from ``env`` for the body
    (MLflow reads credentials from the environment only), restored afterwards."""
    keys = ["MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", *CREDENTIAL_INPUTS.values()]
    saved = {k: os.environ.get(k) for k in keys}
    try:
        for k in keys:
            os.environ.pop(k, None)
            if env.get(k):
                os.environ[k] = env[k]
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def _client(env: Mapping[str, str]):
    from mlflow_safedelta import registry as reg

    reg.check_reachable(env.get("MLFLOW_TRACKING_URI"), env.get("MLFLOW_REGISTRY_URI"))
    return reg.client(env.get("MLFLOW_TRACKING_URI"), env.get("MLFLOW_REGISTRY_URI"))


def resolve_parent(uri: str, env: Mapping[str, str]) -> str:
    """``models:/name/version`` for a parent URI, resolving an alias through the registry with
    the step's credentials (set in this process's environment only for the call)."""
    from mlflow_safedelta import registry as reg

    ref = reg.parse_models_uri(uri)
    if ref.version:
        return ref.uri
    with _step_env(env):
        mv = reg.resolve(reg.client(env.get("MLFLOW_TRACKING_URI"),
                                    env.get("MLFLOW_REGISTRY_URI")), ref)
    return f"models:/{ref.name}/{mv.version}"


def _check_parent(
    result: dict[str, Any], code: int, inputs: GateInputs, env: Mapping[str, str]
) -> tuple[dict[str, Any], int]:
    """The version must descend from the parent its manifest names: a pull request cannot gate a
    model against one parent while claiming another."""
    try:
        wanted = resolve_parent(inputs.parent, env)
    except Exception as exc:  # unresolvable, or the registry unreachable: never a pass
        return {**result, "verdict": "error", "reason": f"input `parent`: {exc}"}, 2
    got = result.get("parent")
    if got != wanted:
        named = inputs.parent if inputs.parent == wanted else f"{inputs.parent} = {wanted}"
        reason = (f"the version's aligned parent is {got or 'unknown'}, "
                  f"but the manifest names {named}")
        return {**result, "verdict": "error", "reason": reason}, 2
    return result, code


def _interpret(
    returncode: int, stdout: str, stderr: str, inputs: GateInputs
) -> tuple[dict[str, Any], int]:
    """The gate's JSON and the step's exit code; anything inconsistent is an error (exit 2)."""
    try:
        result = json.loads(stdout)
    except (json.JSONDecodeError, TypeError):
        reason = f"the gate exited with {returncode} and printed no JSON result"
        last = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
        if last:  # the error line of a usage error or a traceback
            reason += f": {last[-1][:500]}"
        return _error_result(inputs, reason), 2
    if not isinstance(result, dict):
        return _error_result(inputs, "the gate printed JSON that is not an object"), 2
    verdict = result.get("verdict")
    if verdict not in EXIT_CODES:
        result = {**result, "verdict": "error", "reason": f"unknown verdict {verdict!r}"}
        return result, 2
    if EXIT_CODES[verdict] != returncode:
        reason = f"the gate exited with {returncode} but reported verdict {verdict!r}"
        return {**result, "verdict": "error", "reason": reason}, 2
    return result, returncode

