"""Guarded aliases and trusted state: the questions the store, the gate, the receiver and
``status`` ask about one registered version under a governance file.

- :func:`valid_statement`: the gate's signed statement on a version, when it verifies with a
  valid gate key and is about exactly this version (name, number, creation time, source);
- :func:`trusted_state`: do the version's state tags all carry the values that statement signs?
  (readers ignore state tags otherwise: a forged ``safedelta.status=passed`` counts for nothing);
- :func:`check_alias`: may ``alias`` point at this version? Yes for an unguarded alias, a signed
  pass under the bound policy, or a valid admin override; otherwise why not;
- :func:`check_tag_write` / :func:`check_registration`: what the store accepts.

No MLflow import at module level: the store plugin calls these inside HTTP requests.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from mlflow_safedelta import signing
from mlflow_safedelta.governance import Governance
from mlflow_safedelta.policy import policy_fingerprint
from mlflow_safedelta.vocab import (
    ROLE_PROTECTED,
    STATE_TAGS,
    STATUS_PASSED,
    TAG_BOUND_POLICY_SHA256,
    TAG_OVERRIDE,
    TAG_POLICY_SHA256,
    TAG_ROLE,
    TAG_SIGNATURE,
    TAG_STATUS,
    TAG_VERDICT,
    tag_dict,
)


class Refused(Exception):
    """A write the governance rules refuse; the message says why and what would pass."""


def _identity(mv: Any) -> dict:
    return {"model": mv.name, "version": str(mv.version),
            "created": getattr(mv, "creation_timestamp", None), "source": mv.source}


def valid_statement(gov: Governance, mv: Any, *, value: str | None = None,
                    allow_register: bool = True) -> dict:
    """The gate's statement on ``mv`` (or ``value``, about to be written). Raises
    :class:`signing.InvalidStatement` saying why it is not valid."""
    value = value if value is not None else tag_dict(mv.tags).get(TAG_SIGNATURE)
    if allow_register and signing.statement_kind(value) == signing.KIND_REGISTER:
        st = signing.verify(value, gov.verify_keys, kind=signing.KIND_REGISTER)
        if st.get("model") != mv.name or st.get("source") != mv.source:
            raise signing.InvalidStatement("the registration statement is about another "
                                           "version")
        return st
    st = signing.verify(value, gov.verify_keys, kind=signing.KIND_STATE)
    signing.check_identity(st, **_identity(mv))
    return st


def trusted_state(gov: Governance | None, mv: Any) -> bool:
    """True without governance (today's behaviour), else when a valid statement signs every
    state tag the version carries, with that value."""
    if gov is None:
        return True
    try:
        st = valid_statement(gov, mv)
    except signing.InvalidStatement:
        return False
    tags = tag_dict(mv.tags)
    return all(signing.value_matches(st["tags"].get(k), v) for k, v in tags.items()
               if k in STATE_TAGS)


def signed_state(gov: Governance | None, mv: Any) -> dict[str, str]:
    """The state tags a reader may believe: all of them without governance; under governance
    only those the valid statement signs (none when it is missing or invalid)."""
    tags = tag_dict(mv.tags)
    if gov is None:
        return {k: v for k, v in tags.items() if k in STATE_TAGS}
    try:
        st = valid_statement(gov, mv)
    except signing.InvalidStatement:
        return {}
    return {k: v for k, v in tags.items()
            if k in STATE_TAGS and signing.value_matches(st["tags"].get(k), v)}


def readable_tags(gov: Governance | None, mv: Any) -> dict[str, str]:
    """The version's tags with only the believable state tags (:func:`signed_state`)."""
    tags = tag_dict(mv.tags)
    return {**{k: v for k, v in tags.items() if k not in STATE_TAGS}, **signed_state(gov, mv)}


@dataclass
class AliasCheck:
    allowed: bool
    why: str
    override: dict | None = None


def signed_pass(gov: Governance, mv: Any) -> tuple[bool, str]:
    """Does ``mv`` hold a valid signed pass under the policy bound to its model?"""
    bound = gov.bound_policy(mv.name)
    if bound is None:
        return False, f"no governance binding matches {mv.name!r}"
    sha = policy_fingerprint(bound)
    try:
        st = valid_statement(gov, mv, allow_register=False)
    except signing.InvalidStatement as exc:
        return False, f"no valid gate signature ({exc})"
    signed = st["tags"]
    if signed.get(TAG_ROLE) != ROLE_PROTECTED:
        return False, "it is not a protected version produced by the gate"
    if signed.get(TAG_VERDICT) != STATUS_PASSED:
        return False, f"its signed verdict is {signed.get(TAG_VERDICT)!r}"
    if sha not in (signed.get(TAG_BOUND_POLICY_SHA256), signed.get(TAG_POLICY_SHA256)):
        return False, (f"its pass was under another policy (sha "
                       f"{str(signed.get(TAG_POLICY_SHA256))[:12]}), not the bound "
                       f"{bound.name!r} (sha {sha[:12]})")
    return True, f"signed pass under {bound.name!r}"


def valid_override(gov: Governance, mv: Any, alias: str, *, value: str | None = None,
                   now: float | None = None) -> dict:
    """The admin's override statement for ``alias`` on ``mv``; raises InvalidStatement."""
    value = value if value is not None else tag_dict(mv.tags).get(TAG_OVERRIDE)
    st = signing.verify(value, gov.admin_keys, kind=signing.KIND_OVERRIDE)
    signing.check_identity(st, **_identity(mv))
    if st.get("alias") != alias:
        raise signing.InvalidStatement(f"the override is for alias {st.get('alias')!r}")
    age = (now or time.time()) - float(st.get("time", 0))
    if age > gov.override_ttl_s:
        raise signing.InvalidStatement(f"the override expired ({age / 3600:.1f} h old)")
    return st


def check_alias(gov: Governance | None, mv: Any, alias: str) -> AliasCheck:
    if gov is None or not gov.guarded(mv.name, alias):
        return AliasCheck(True, "alias not guarded")
    ok, why = signed_pass(gov, mv)
    if ok:
        return AliasCheck(True, why)
    try:
        st = valid_override(gov, mv, alias)
        return AliasCheck(True, f"admin override by {st.get('who')}: {st.get('reason')}", st)
    except signing.InvalidStatement:
        pass
    return AliasCheck(False, why)


def refusal_message(gov: Governance, mv: Any, alias: str, why: str,
                    recommended: str | None) -> str:
    bound = gov.bound_policy(mv.name)
    tags = tag_dict(mv.tags)
    status = tags.get(TAG_STATUS) or "not gated"
    rec = (f" The gate recommends version {recommended} (a signed pass under "
           f"{bound.name!r})." if recommended else
           " No version of this model has a signed pass yet; register a fine-tune and let "
           "the gate protect it.")
    return (f"safedelta: alias {alias!r} of {mv.name!r} is guarded: version {mv.version} "
            f"cannot take it because {why} (status: {status}; bound policy: "
            f"{bound.name if bound else '-'}).{rec} A platform admin can break the glass with "
            f"`mlflow safedelta override {mv.name} {mv.version} --alias {alias} --reason ...`.")


def recommended_version(gov: Governance, versions: list[Any]) -> str | None:
    """The newest version (of those given) holding a signed pass under the bound policy."""
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if tag_dict(mv.tags).get(TAG_ROLE) == ROLE_PROTECTED and signed_pass(gov, mv)[0]:
            return str(mv.version)
    return None


# -- what the store accepts --------------------------------------------------------------------

def check_tag_write(gov: Governance, mv: Any, key: str, value: str) -> None:
    """Raise :class:`Refused` unless this tag write is allowed under governance."""
    if key == TAG_SIGNATURE:
        try:
            st = valid_statement(gov, mv, value=value, allow_register=False)
        except signing.InvalidStatement as exc:
            raise Refused(f"{TAG_SIGNATURE} refused: {exc}") from None
        try:
            prev = valid_statement(gov, mv)
        except signing.InvalidStatement:
            prev = None
        if prev is not None and float(st["time"]) < float(prev["time"]):
            raise Refused(f"{TAG_SIGNATURE} refused: older than the statement in place")
        return
    if key == TAG_OVERRIDE:
        try:
            st = signing.verify(value, gov.admin_keys, kind=signing.KIND_OVERRIDE)
            signing.check_identity(st, **_identity(mv))
        except signing.InvalidStatement as exc:
            raise Refused(f"{TAG_OVERRIDE} refused: {exc}") from None
        return
    if key in STATE_TAGS:
        try:
            st = valid_statement(gov, mv)
        except signing.InvalidStatement:
            st = None
        if st is None or not signing.value_matches(st["tags"].get(key), value):
            raise Refused(f"{key} is written by the safedelta gate only, under its signature; "
                          "this write carries none (the gate's own writes are signed with "
                          "SAFEDELTA_SIGNING_KEY)")


def check_tag_delete(gov: Governance, mv: Any, key: str) -> None:
    if key in (TAG_SIGNATURE, TAG_OVERRIDE):
        raise Refused(f"{key} cannot be deleted under governance (it is the audit record)")
    if key in STATE_TAGS:
        try:
            st = valid_statement(gov, mv)
        except signing.InvalidStatement:
            return  # an unsigned state tag: deleting it grants nothing
        if key in st["tags"]:
            raise Refused(f"{key} is signed gate state; it cannot be deleted")


def check_registration(gov: Governance, name: str, source: str, tags: dict[str, str]) -> None:
    """A new version may carry state only with a fresh registration statement of the gate for
    this model and source, signing each of those values (the gate's protected output)."""
    reserved = {k for k in tags if k in STATE_TAGS or k == TAG_OVERRIDE}
    if not reserved and TAG_SIGNATURE not in tags:
        return
    if TAG_OVERRIDE in tags:
        raise Refused(f"{TAG_OVERRIDE} cannot be set at registration")
    try:
        st = signing.verify(tags.get(TAG_SIGNATURE), gov.verify_keys, kind=signing.KIND_REGISTER)
    except signing.InvalidStatement as exc:
        raise Refused(f"state tags {sorted(reserved)} are written by the safedelta gate only; "
                      f"this registration is not signed by it ({exc}). Register without them: "
                      "the gate sets them") from None
    if st.get("model") != name or st.get("source") != source:
        raise Refused("the registration statement is about another model or source")
    if abs(time.time() - float(st.get("time", 0))) > signing.REGISTER_WINDOW_S:
        raise Refused("the registration statement is stale")
    for k in reserved:
        if not signing.value_matches(st["tags"].get(k), tags[k]):
            raise Refused(f"{k}={tags[k]!r} is not what the gate signed")


def describe_override(value: str | None) -> dict | None:
    """The override record for display (unverified fields; ``status`` verifies)."""
    if not value:
        return None
    try:
        st = json.loads(value)["statement"]
    except (ValueError, KeyError, TypeError):
        return None
    return {k: st.get(k) for k in ("alias", "who", "reason", "overrode", "run_id", "time",
                                   "key_id")}
