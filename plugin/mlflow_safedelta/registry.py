"""The Model Registry side of the gate: ``models:/`` URIs, lineage, tags, aliases, downloads.

Gate state lives in model-version tags; their names and meanings are in :mod:`mlflow_safedelta.vocab`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_safedelta.errors import MissingParent, RegistryError

_logger = logging.getLogger(__name__)

from mlflow_safedelta.vocab import (  # noqa: E402,F401  (re-exported: reg.TAG_STATUS etc.)
    ENV_SIGNING_KEY,
    STATE_TAGS,
    TAG_SIGNATURE,
    FINAL_STATUSES,
    MAX_TAG_VALUE,
    ROLE_PROTECTED,
    STATUS_ERROR,
    STATUS_FAILED,
    STATUS_PASSED,
    STATUS_PENDING,
    STATUS_PROTECTED_OUTPUT,
    STATUS_RUNNING,
    TAG_BOUND_POLICY_SHA256,
    TAG_GATE_ARTIFACT,
    TAG_GOVERNANCE,
    TAG_INCIDENT,
    TAG_OVERRIDE,
    TAG_POLICY_NOTE,
    TAG_HESSIAN_KEY,
    TAG_HESSIAN_RUN,
    TAG_PARENT,
    TAG_PARENT_FINGERPRINT,
    TAG_POLICY,
    TAG_POLICY_SHA256,
    TAG_PROTECTED_FROM,
    TAG_PROTECTED_VERSION,
    TAG_REASON,
    TAG_ROLE,
    TAG_RUN_ID,
    TAG_S,
    TAG_STATUS,
    TAG_VERDICT,
)

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed ``models:/name/version`` or ``models:/name@alias`` URI."""

    name: str
    version: str | None = None
    alias: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else \
            f"models:/{self.name}@{self.alias}"


def parse_models_uri(uri: str) -> ModelRef:
    """Parse a registered-model URI. Raises RegistryError naming the accepted forms."""
    m = _MODELS_URI.match(uri.strip()) if isinstance(uri, str) else None
    if not m:
        raise RegistryError(f"{uri!r} is not a registered-model URI; use models:/<name>/<version> "
                            "or models:/<name>@<alias>")
    return ModelRef(m["name"], m["version"], m["alias"])


def client(tracking_uri: str | None = None, registry_uri: str | None = None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def check_reachable(tracking_uri: str | None = None, registry_uri: str | None = None,
                    timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when an HTTP tracking/registry server does not answer.

    MLflow's client retries a dead server for minutes; a command a person waits on asks the
    server's ``/health`` once first. Any HTTP answer (even 401/404) counts as reachable; only a
    refused connection, an unknown host or a timeout raises :class:`RegistryError`.
    """
    import urllib.error
    import urllib.parse
    import urllib.request

    if tracking_uri is None:
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    for uri in dict.fromkeys(u for u in (tracking_uri, registry_uri) if u):
        if not str(uri).startswith(("http://", "https://")):
            continue
        # user info is not part of the address: probe host:port alone (any answer counts)
        parts = urllib.parse.urlsplit(str(uri))
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parts.port}" if parts.port else ""
        health = urllib.parse.urlunsplit(
            (parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
        try:
            with urllib.request.urlopen(health, timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # it answered
        except (OSError, ValueError) as exc:
            why = getattr(exc, "reason", None) or exc
            raise RegistryError(f"cannot reach the MLflow server at {redact_uri(uri)} "
                                f"({why}); is it running, and is the tracking URI right?") from exc


def redact_uri(uri: str) -> str:
    """``uri`` without a password (``https://user:***@host``)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable URI>"
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def resolve(cl: Any, ref: ModelRef | str):
    """The ``ModelVersion`` a URI points at (an alias is resolved to its current version)."""
    from mlflow.exceptions import MlflowException

    ref = parse_models_uri(ref) if isinstance(ref, str) else ref
    try:
        if ref.version:
            return cl.get_model_version(ref.name, ref.version)
        return cl.get_model_version_by_alias(ref.name, ref.alias)
    except MlflowException as exc:
        raise RegistryError(f"cannot resolve {ref.uri}: {exc.message}") from None


def resolve_alias(cl: Any, name: str, alias: str) -> str:
    return str(resolve(cl, ModelRef(name, alias=alias)).version)


def read_flavors(cl: Any, name: str, version: str) -> dict:
    """The ``flavors`` block of a version's MLmodel (empty when it cannot be read)."""
    import yaml
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    uri = cl.get_model_version_download_uri(name, version)
    try:
        path = download_artifacts(artifact_uri=f"{uri.rstrip('/')}/MLmodel",
                                  tracking_uri=cl._tracking_client.tracking_uri)
    except (MlflowException, OSError) as exc:
        _logger.info("%s/%s: no readable MLmodel (%s)", name, version, exc)
        return {}
    return (yaml.safe_load(Path(path).read_text()) or {}).get("flavors", {}) or {}


@dataclass(frozen=True)
class ParentInfo:
    uri: str  # as recorded (may be an alias URI)
    resolved_uri: str  # models:/name/version
    name: str
    version: str
    fingerprint: str | None
    source: str  # where it was found: "tag", "flavor", "run-tag"


def find_parent(cl: Any, mv: Any, flavors: dict | None = None) -> ParentInfo:
    """The aligned parent of a fine-tuned version, from (in order) the ``safedelta.parent``
    version tag, the ``safedelta`` flavor config, or the ``safedelta.parent`` tag of its run.

    Raises:
        MissingParent: none of them names a parent.
        RegistryError: the parent named cannot be resolved.
    """
    tags = dict(mv.tags or {})
    uri, source, fingerprint = tags.get(TAG_PARENT), "tag", tags.get(TAG_PARENT_FINGERPRINT)
    if not uri:
        flavors = read_flavors(cl, mv.name, mv.version) if flavors is None else flavors
        conf = flavors.get("safedelta") or {}
        uri, source = conf.get("parent_uri"), "flavor"
        fingerprint = fingerprint or conf.get("parent_fingerprint")
    if not uri and mv.run_id:
        try:
            uri = cl.get_run(mv.run_id).data.tags.get(TAG_PARENT)
            source = "run-tag"
        except Exception:  # a deleted run: no parent from there
            uri = None
    if not uri:
        raise MissingParent(
            f"{mv.name} version {mv.version} names no aligned parent: set the model-version tag "
            f"'{TAG_PARENT}' to models:/<name>/<version> (or @<alias>), or log it with the "
            "safedelta flavor and parent=")
    ref = parse_models_uri(uri)
    pv = resolve(cl, ref)
    return ParentInfo(uri=uri, resolved_uri=f"models:/{pv.name}/{pv.version}", name=pv.name,
                      version=str(pv.version), fingerprint=fingerprint, source=source)


def download_version(cl: Any, name: str, version: str, dst: str | Path):
    """Download a version's MLflow model into ``dst`` and locate its weights (either flavor).

    Returns:
        :class:`mlflow_safedelta.flavor.model_io.WeightsLocation`.
    """
    from mlflow.artifacts import download_artifacts

    from mlflow_safedelta.flavor.model_io import confine_tree, locate_weights

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    uri = cl.get_model_version_download_uri(name, version)
    local = download_artifacts(artifact_uri=uri, dst_path=str(dst),
                               tracking_uri=cl._tracking_client.tracking_uri)
    confine_tree(local)  # what a registrant wrote must stay inside what was downloaded
    return locate_weights(local)


def _clip(v: Any) -> str:
    value = str(v)
    return value if len(value) <= MAX_TAG_VALUE else value[:MAX_TAG_VALUE - 3] + "..."


def set_tags(cl: Any, name: str, version: str, tags: dict[str, Any]) -> None:
    """Write tags on a version. Under a governance file, state tags (``vocab.STATE_TAGS``) go
    out signed (:func:`set_state`); others as they are."""
    tags = {k: _clip(v) for k, v in tags.items() if v is not None}
    state = {k: v for k, v in tags.items() if k in STATE_TAGS}
    if state:
        from mlflow_safedelta import governance

        gov = governance.current()
        if gov is not None:
            set_state(cl, gov, name, str(version), state)
            tags = {k: v for k, v in tags.items() if k not in state}
    for k, v in tags.items():
        cl.set_model_version_tag(name, str(version), k, v)


def gate_signer():
    """The gate workers' private key (``SAFEDELTA_SIGNING_KEY``); an error when unset, since
    under governance the registry accepts no unsigned gate state."""
    from mlflow_safedelta.errors import GovernanceError
    from mlflow_safedelta.signing import signer_from_env

    signer = signer_from_env(ENV_SIGNING_KEY)
    if signer is None:
        raise GovernanceError(f"a governance file is in force but {ENV_SIGNING_KEY} is not set "
                              "on this gate worker: gate state must be signed")
    return signer


def set_state(cl: Any, gov: Any, name: str, version: str, state: dict[str, str]) -> None:
    """Sign the version's whole gate state (what the valid statement in place signs, updated
    with ``state``), write the statement, then the tags whose value changed. State tags that no
    valid statement vouches for (written by someone else where no store plugin refuses them)
    are deleted."""
    from mlflow_safedelta import guard, signing

    signer = gate_signer()
    mv = cl.get_model_version(name, version)
    current = dict(mv.tags or {})
    merged = guard.signed_state(gov, mv)
    merged.update(state)
    cl.set_model_version_tag(name, version, TAG_SIGNATURE, signing.sign(
        signer, signing.KIND_STATE, model=name, version=version,
        created=mv.creation_timestamp, source=mv.source, tags=merged))
    for k, v in merged.items():
        if current.get(k) != v:
            cl.set_model_version_tag(name, version, k, v)
    for k in current:
        if k in STATE_TAGS and k not in merged:
            cl.delete_model_version_tag(name, version, k)


def registration_tags(name: str, source: str, tags: dict[str, str] | None) -> dict[str, str]:
    """Tags for a new version of the gate's own: under governance, state tags travel with a
    signed registration statement (the store refuses them otherwise)."""
    tags = {k: _clip(v) for k, v in (tags or {}).items() if v is not None}
    state = {k: v for k, v in tags.items() if k in STATE_TAGS}
    if not state:
        return tags
    from mlflow_safedelta import governance, signing

    if governance.current() is None:
        return tags
    tags[TAG_SIGNATURE] = signing.sign(gate_signer(), signing.KIND_REGISTER, model=name,
                                       version=None, created=None, source=source, tags=state)
    return tags


def version_tags(cl: Any, name: str, version: str) -> dict[str, str]:
    return dict(cl.get_model_version(name, str(version)).tags or {})


def run_url(tracking_uri: str | None, experiment_id: str, run_id: str) -> str | None:
    """The UI address of a run, when the tracking URI is an HTTP server."""
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return None


def gate_states(cl: Any, model: str | None = None, max_results: int = 1000) -> list[dict]:
    """Gate state of registered versions (newest first): name, version, status, reason, parent,
    role, protected_version, policy, policy_sha256, aliases."""
    from mlflow_safedelta import governance, guard

    gov = governance.current()
    enforcement = governance.enforcement_label(gov)
    flt = f"name='{model}'" if model else ""
    out = []
    aliases: dict[str, dict[str, list[str]]] = {}  # search results carry no aliases in OSS
    for mv in cl.search_model_versions(flt, max_results=max_results,
                                       order_by=["name ASC", "version_number DESC"]):
        if mv.name not in aliases:
            by_version: dict[str, list[str]] = {}
            for a, v in (cl.get_registered_model(mv.name).aliases or {}).items():
                by_version.setdefault(str(v), []).append(a)
            aliases[mv.name] = by_version
        raw = dict(mv.tags or {})
        t = guard.readable_tags(gov, mv)  # unsigned state tags are not shown as state
        out.append({"governance": enforcement,
                    "signed": bool(gov) and guard.trusted_state(gov, mv) and
                    TAG_SIGNATURE in raw,
                    "override": guard.describe_override(raw.get(TAG_OVERRIDE)),
                    "name": mv.name, "version": str(mv.version),
                    "status": t.get(TAG_STATUS), "reason": t.get(TAG_REASON),
                    "parent": t.get(TAG_PARENT) or t.get(TAG_PROTECTED_FROM),
                    "role": t.get(TAG_ROLE), "verdict": t.get(TAG_VERDICT),
                    "protected_version": t.get(TAG_PROTECTED_VERSION),
                    "policy": t.get(TAG_POLICY),
                    "policy_sha256": t.get(TAG_POLICY_SHA256),
                    "aliases": sorted(aliases[mv.name].get(str(mv.version), []))})
    return out


def materialize(uri_or_path: str | Path, dst: str | Path, *, tracking_uri: str | None = None,
                registry_uri: str | None = None) -> Path:
    """A local checkpoint directory for a ``models:/`` URI (downloaded; weights and tokenizer in
    one directory, either flavor) or a local path (returned unchanged).

    For commands that take model directories (``protect``, ``evaluate``) and want to accept
    registered models too::

        aligned_dir = materialize("models:/aligned@production", work / "aligned")
    """
    if not str(uri_or_path).startswith("models:/"):
        return Path(uri_or_path)
    cl = client(tracking_uri, registry_uri)
    mv = resolve(cl, str(uri_or_path))
    return merge_tokenizer(download_version(cl, mv.name, str(mv.version), dst))


def merge_tokenizer(loc: Any) -> Path:
    """Copy a downloaded model's tokenizer files next to its weights (``protect`` and
    ``evaluate`` read one directory); returns the weights directory."""
    import shutil

    wd = Path(loc.weights_dir)
    if loc.tokenizer_dir and Path(loc.tokenizer_dir).resolve() != wd.resolve():
        for f in Path(loc.tokenizer_dir).iterdir():
            if f.is_file() and not (wd / f.name).exists():
                shutil.copy2(f, wd / f.name)
    return wd


def register_saved_model(cl: Any, model_dir: str | Path, name: str, *, run_id: str,
                         artifact_path: str = "model", tags: dict[str, str] | None = None,
                         description: str | None = None):
    """Log a saved MLflow model directory to a run and register it as a new version of
    ``name`` (created when missing), with ``tags`` set at creation (so every registration route
    sees them at once). Uses only the client: no fluent, process-global MLflow state."""
    from mlflow.exceptions import MlflowException

    cl.log_artifacts(run_id, str(model_dir), artifact_path)
    try:
        cl.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    artifact_uri = cl.get_run(run_id).info.artifact_uri.rstrip("/")
    return _create_gate_version(cl, name, f"{artifact_uri}/{artifact_path}", run_id=run_id,
                                tags=tags, description=description)


def _create_gate_version(cl: Any, name: str, source: str, *, run_id: str,
                         tags: dict[str, str] | None, description: str | None,
                         model_id: str | None = None):
    """``create_model_version`` for the gate's own output: state tags go with a signed
    registration statement under governance, then are bound (signed) to the new version."""
    kwargs = {"model_id": model_id} if model_id else {}
    mv = cl.create_model_version(name, source, run_id=run_id,
                                 tags=registration_tags(name, source, tags),
                                 description=description, **kwargs)
    if tags and TAG_SIGNATURE in (mv.tags or {}):  # now bind the state to this very version
        set_tags(cl, name, str(mv.version), tags)
        mv = cl.get_model_version(name, str(mv.version))
    return mv


def register_logged_model(cl: Any, model_dir: str | Path, name: str, *, run_id: str,
                          experiment_id: str, model_name: str = "protected_model",
                          metrics: dict[str, float] | None = None,
                          params: dict[str, str] | None = None,
                          tags: dict[str, str] | None = None, description: str | None = None):
    """Log a saved MLflow model directory as an MLflow 3 ``LoggedModel`` of ``run_id`` (so it
    is listed under the run's and the experiment's "Logged models", with ``metrics`` attached to
    it) and register it as a new version of ``name`` (created when missing), with ``tags`` set
    at creation. Client API only. Returns the ``ModelVersion``."""
    import time

    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    lm = cl.create_logged_model(experiment_id, name=model_name, source_run_id=run_id,
                                params={k: str(v) for k, v in (params or {}).items()},
                                model_type="safedelta")
    cl.log_model_artifacts(lm.model_id, str(model_dir))
    ts = int(time.time() * 1000)
    values = [Metric(k, float(v), ts, 0, model_id=lm.model_id, run_id=run_id)
              for k, v in (metrics or {}).items() if v is not None]
    if values:
        cl.log_batch(run_id, metrics=values)
    cl.finalize_logged_model(lm.model_id, "READY")
    try:
        cl.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # source models:/<model_id> is what links the version to its LoggedModel in the UI; a store
    # that cannot resolve it (a local store resolved through another global URI) gets the
    # artifact location itself
    for source in (f"models:/{lm.model_id}", lm.artifact_location):
        try:
            return _create_gate_version(cl, name, source, run_id=run_id, tags=tags,
                                        description=description, model_id=lm.model_id)
        except MlflowException as exc:
            if source == lm.artifact_location or "Unable to fetch model" not in str(exc):
                raise
            _logger.debug("registering %s by its artifact location: %s", lm.model_id, exc)


def experiment_id(cl: Any, name: str) -> str:
    """The id of experiment ``name``, created when missing (safe against concurrent workers)."""
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return cl.create_experiment(name)
    except Exception:  # created concurrently by another worker
        exp = cl.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
