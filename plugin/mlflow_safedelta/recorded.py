"""Verdicts on record: a version's final gate result, read back and reused.

A gate's result is stored as the run artifact ``safedelta/gate.json`` and summarised in the
version's tags. :func:`reuse_recorded` decides whether a recorded verdict still stands (same
policy content) and, for a pass, moves the promotion alias when asked; :func:`stored_gate` is
what ``report`` shows.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from mlflow_safedelta import registry as reg
from mlflow_safedelta.errors import RegistryError, error_reason
from mlflow_safedelta.policy import Policy, load_policy, policy_fingerprint
from mlflow_safedelta.verdict import GateResult
from mlflow_safedelta.vocab import GATE_ARTIFACT

_logger = logging.getLogger(__name__)


def _stored_result(cl: Any, name: str, version: str, tags: dict[str, str]) -> GateResult:
    """The result recorded by an earlier run (its gate.json artifact, else rebuilt from tags)."""
    run_id = tags.get(reg.TAG_RUN_ID)
    if run_id:
        try:
            from mlflow.artifacts import download_artifacts

            with tempfile.TemporaryDirectory() as tmp:
                p = download_artifacts(run_id=run_id, artifact_path=GATE_ARTIFACT, dst_path=tmp,
                                       tracking_uri=cl._tracking_client.tracking_uri)
                return GateResult.from_dict(json.loads(Path(p).read_text()))
        except Exception as exc:  # an error before the artifact was written: use tags
            _logger.info("no stored gate.json for %s/%s (%s)", name, version, exc)
    return GateResult(model=name, version=str(version),
                      verdict=tags.get(reg.TAG_STATUS, "error"),  # type: ignore[arg-type]
                      reason=tags.get(reg.TAG_REASON, ""), parent=tags.get(reg.TAG_PARENT),
                      policy={"name": tags.get(reg.TAG_POLICY, ""),
                              "sha256": tags.get(reg.TAG_POLICY_SHA256, "")},
                      protected_version=tags.get(reg.TAG_PROTECTED_VERSION), run_id=run_id)


def reuse_recorded(cl: Any, name: str, version: str, tags: dict[str, str],
                    policy: "str | Path | Policy | None", promote: bool
                    ) -> tuple[GateResult | None, Policy | None]:
    """The verdict on record for a version with a final status, or None to gate it again; and
    the policy loaded to decide (so that gating again reads the same content, once).

    A verdict counts only under the policy *content* it was made with: when ``policy`` is
    given, its fingerprint must equal the recorded ``safedelta.policy_sha256`` (a verdict
    recorded before fingerprints existed has none, so it is made again). Without ``policy``,
    the recorded verdict is returned under the policy it names. A passing verdict with
    ``promote`` moves the policy's alias to the protected version when it is not there already
    (it may have moved since, or the first gate ran with ``--no-promote``).
    """
    recorded_sha = tags.get(reg.TAG_POLICY_SHA256)
    pol: Policy | None = None
    if policy is not None:
        try:
            pol = load_policy(policy)
        except Exception as exc:  # a bad --policy never overwrites the recorded verdict
            return GateResult(model=name, version=version, verdict="error",
                              reason=error_reason(exc), parent=tags.get(reg.TAG_PARENT),
                              policy={"name": str(getattr(policy, "name", policy))}), None
        sha = policy_fingerprint(pol)
        if sha != recorded_sha:
            _logger.info("%s v%s: the verdict on record (%s) was made under policy %r with "
                         "content %s, not %r with content %s: gating again", name, version,
                         tags.get(reg.TAG_STATUS), tags.get(reg.TAG_POLICY),
                         (recorded_sha or "unrecorded")[:12], pol.name, sha[:12])
            return None, pol
    stored = _stored_result(cl, name, version, tags)
    if recorded_sha and not stored.policy.get("sha256"):
        stored.policy["sha256"] = recorded_sha
    if not (promote and stored.passed and stored.protected_version):
        return stored, pol
    if pol is None and "promotion_alias" in stored.policy:  # what the recorded policy said
        alias = stored.policy["promotion_alias"]
    elif pol is None:  # an older record: its policy, when it still loads unchanged
        try:
            candidate = load_policy(tags.get(reg.TAG_POLICY) or "default")
        except Exception as exc:
            _logger.warning("%s v%s passed under policy %r, which cannot be loaded now (%s): "
                            "no alias moved; give --policy to promote", name, version,
                            tags.get(reg.TAG_POLICY), exc)
            return stored, pol
        if policy_fingerprint(candidate) != recorded_sha:
            _logger.warning("%s v%s passed under policy %r whose content has changed since: no "
                            "alias moved; give --policy to gate again", name, version,
                            candidate.name)
            return stored, pol
        pol = candidate
    if pol is not None:
        alias = pol.promotion.target
    if not alias:
        return stored, pol
    current = (cl.get_registered_model(name).aliases or {}).get(alias)
    if str(current) != str(stored.protected_version):
        cl.set_registered_model_alias(name, alias, str(stored.protected_version))
        _logger.info("%s: alias %r moved to version %s (recorded passing verdict of v%s)",
                     name, alias, stored.protected_version, version)
    stored.promoted_alias = alias
    return stored, pol




def stored_gate(model_name: str, version: str, *, tracking_uri: str | None = None,
                registry_uri: str | None = None) -> GateResult:
    """The gate result recorded for a version (``report`` command)."""
    cl = reg.client(tracking_uri, registry_uri)
    tags = reg.version_tags(cl, model_name, str(version))
    if not tags.get(reg.TAG_STATUS):
        raise RegistryError(f"{model_name} version {version} has not been gated "
                            f"(no {reg.TAG_STATUS} tag)")
    return _stored_result(cl, model_name, str(version), tags)
