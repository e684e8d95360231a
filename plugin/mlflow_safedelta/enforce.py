"""Acting on guarded aliases through the MLflow client: after-the-fact reverts (webhook-only
deployments), demotion after a failed gate, and the audited break-glass override.

The store plugin *prevents* a guarded alias from reaching an unpassed version; these functions
are what is left where it is not installed (managed MLflow with webhooks only): they *detect*
and *undo*, seconds later. Every action is logged and recorded on the version
(``safedelta.incident``) or in an MLflow run (overrides).
"""

from __future__ import annotations

import getpass
import json
import logging
import time
from typing import Any

from mlflow_safedelta import guard, signing
from mlflow_safedelta import registry as reg
from mlflow_safedelta.governance import Governance
from mlflow_safedelta.vocab import (
    ENV_ADMIN_KEY,
    OVERRIDE_EXPERIMENT,
    RUN_KIND_OVERRIDE,
    RUN_TAG_KIND,
    RUN_TAG_MODEL,
    RUN_TAG_VERSION,
    TAG_INCIDENT,
    TAG_OVERRIDE,
    TAG_STATUS,
    TAG_VERDICT,
)

_logger = logging.getLogger(__name__)


def _versions(cl: Any, name: str) -> list[Any]:
    return list(cl.search_model_versions(f"name='{name}'", max_results=200))


def enforce_alias(cl: Any, gov: Governance, name: str, alias: str,
                  version: str | None = None) -> dict:
    """If guarded ``alias`` of ``name`` points at a version that may not hold it, move it back to
    the newest signed pass (or delete it) and record an incident. Returns what was done."""
    aliases = cl.get_registered_model(name).aliases or {}
    current = str(aliases.get(alias)) if alias in aliases else None
    if current is None or (version is not None and current != str(version)):
        return {"action": "none", "why": "the alias is not (or no longer) on that version"}
    mv = cl.get_model_version(name, current)
    check = guard.check_alias(gov, mv, alias)
    if check.allowed:
        return {"action": "none", "why": check.why}
    target = guard.recommended_version(
        gov, [cl.get_model_version(name, v.version) for v in _versions(cl, name)])
    if target:
        cl.set_registered_model_alias(name, alias, target)
        action = f"moved back to version {target}"
    else:
        cl.delete_registered_model_alias(name, alias)
        action = "deleted (no version holds a signed pass)"
    incident = {"time": round(time.time(), 3), "alias": alias, "version": current,
                "why": check.why, "action": action}
    cl.set_model_version_tag(name, current, TAG_INCIDENT, json.dumps(incident, sort_keys=True))
    _logger.warning("safedelta INCIDENT: guarded alias %r of %s was set on version %s (%s); %s",
                    alias, name, current, check.why, action)
    return {"action": action, "why": check.why, "incident": incident}


def alias_guard(*, tracking_uri: str | None = None, registry_uri: str | None = None):
    """The receiver's ``model_version_alias.created`` handler under governance (None without a
    governance file): ``(name, alias, version) -> dict`` reverting a forbidden guarded alias."""
    from mlflow_safedelta import governance

    if governance.current() is None:
        return None
    cl = reg.client(tracking_uri, registry_uri)

    def on_alias(name: str, alias: str, version: str) -> dict:
        gov = governance.current()
        if gov is None or not gov.guarded(name, alias):
            return {"action": "none", "why": "alias not guarded"}
        return enforce_alias(cl, gov, name, alias, version)

    return on_alias


def demote_after_fail(cl: Any, gov: Governance, name: str) -> list[dict]:
    """After a failed gate (binding ``demote_on_fail``): re-check each guarded alias of the
    model under the bound policy now, moving back or deleting those that no longer hold."""
    binding = gov.binding(name)
    if binding is None or not binding.demote_on_fail:
        return []
    return [enforce_alias(cl, gov, name, a) for a in binding.guarded_aliases]


def _terminate(cl: Any, run_id: str, status: str) -> None:
    """End the run; MLflow prints its "View run" links on stdout, which belongs to --json."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        cl.set_terminated(run_id, status)


def override(cl: Any, name: str, version: str, alias: str, reason: str, *,
             who: str | None = None, admin_key: str | None = None) -> dict:
    """Break glass: with the platform admin's key, let guarded ``alias`` move to ``version``
    although it holds no signed pass. Records the override in an MLflow run (who, when, why,
    which verdict it overrode) and as the version's ``safedelta.override`` tag (signed), then
    moves the alias."""
    from mlflow_safedelta.errors import GovernanceError

    if not reason or not reason.strip():
        raise GovernanceError("an override needs a --reason")
    signer = signing.load_signer(admin_key) if admin_key else signing.signer_from_env(ENV_ADMIN_KEY)
    if signer is None:
        raise GovernanceError(f"no admin key: pass --admin-key or set {ENV_ADMIN_KEY}")
    who = who or getpass.getuser()
    mv = reg.resolve(cl, reg.ModelRef(name, version=str(version)))
    tags = dict(mv.tags or {})
    overrode = {"status": tags.get(TAG_STATUS), "verdict": tags.get(TAG_VERDICT)}
    exp_id = reg.experiment_id(cl, OVERRIDE_EXPERIMENT)
    run = cl.create_run(exp_id, run_name=f"override-{name}-v{version}-{alias}", tags={
        RUN_TAG_KIND: RUN_KIND_OVERRIDE, RUN_TAG_MODEL: name, RUN_TAG_VERSION: str(version)})
    run_id = run.info.run_id
    value = signing.sign(signer, signing.KIND_OVERRIDE, model=name, version=str(mv.version),
                         created=mv.creation_timestamp, source=mv.source, alias=alias,
                         reason=reason.strip(), who=who, overrode=overrode, run_id=run_id)
    record = {"model": name, "version": str(version), "alias": alias, "who": who,
              "reason": reason.strip(), "overrode": overrode, "key_id": signer.key_id,
              "time": json.loads(value)["statement"]["time"]}
    for k in ("alias", "who", "reason", "key_id"):
        cl.log_param(run_id, k, record[k])
    cl.log_dict(run_id, record, "safedelta/override.json")
    try:
        cl.set_model_version_tag(name, str(version), TAG_OVERRIDE, value)
        previous = (cl.get_registered_model(name).aliases or {}).get(alias)
        cl.set_registered_model_alias(name, alias, str(version))
    except Exception:
        _terminate(cl, run_id, "FAILED")
        raise
    record["previous_version"] = None if previous is None else str(previous)
    record["run_id"] = run_id
    cl.log_dict(run_id, record, "safedelta/override.json")
    _terminate(cl, run_id, "FINISHED")
    _logger.warning("safedelta OVERRIDE: %s moved alias %r of %s to version %s: %s", who, alias,
                    name, version, reason)
    return record
