"""The platform's governance file: which policy binds which models, which aliases are guarded,
which keys are valid. Trusted input (the platform owns it); the registrant owns none of it.

Path from ``SAFEDELTA_GOVERNANCE`` (on the ``mlflow server`` host for the store plugin, and on
gate-worker and receiver hosts). Example: ``policies/governance.example.yaml``::

    governance_version: 1
    verify_keys: [keys/gate-2026a.pub]      # gate public keys; two during a rotation
    admin_keys: [keys/admin.pub]            # break-glass overrides
    bindings:                               # first matching pattern wins
      - models: ["support-*"]
        policy: strict                      # shipped name, or a file relative to this one
        guarded_aliases: [production]
        allow_stricter_tag: true            # a safedelta.policy tag may name a stricter one
      - models: ["*"]
        policy: default

Policy resolution (:func:`resolve_policy`): the binding decides. A version's ``safedelta.policy``
tag is honoured only when the binding sets ``allow_stricter_tag`` and the named policy is
:func:`is_stricter_or_equal` to the bound one; otherwise it is ignored and the verdict says so.

"Stricter or equal" (:func:`is_stricter_or_equal`) is declared field by field in
:data:`FIELD_RULES`: every limit at least as tight (``max_*`` not higher and not removed,
``min_*`` not lower and not removed), the same or more suites, at least as many prompts, the same
judge, generation length and task data. Fields that do not change what a verdict demands (how
``s`` is chosen, the promotion alias, batch size, name) are ``free``. A field the table does not
declare must be equal (safe default), and a unit test fails until it is declared.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlflow_safedelta.errors import GovernanceError, PolicyError
from mlflow_safedelta.policy import Policy, load_policy, policy_fingerprint
from mlflow_safedelta.vocab import ENV_GOVERNANCE, TAG_POLICY

_logger = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Binding(_Strict):
    """Registered models (name patterns) bound to a policy and guarded aliases."""

    models: list[str] = Field(min_length=1, description="fnmatch patterns of model names.")
    policy: str = Field(min_length=1, description="Shipped policy name or a YAML file (relative "
                                                  "paths are read from the governance file's "
                                                  "directory).")
    guarded_aliases: list[str] = Field(
        default_factory=lambda: ["production"],
        description="Aliases that may point only at a version with a valid signed pass.")
    allow_stricter_tag: bool = Field(
        default=False, description="Honour a version's safedelta.policy tag when it names a "
                                   "stricter-or-equal policy.")
    demote_on_fail: bool = Field(
        default=False, description="After a failed gate of the model, re-check its guarded "
                                   "aliases: one not on a valid pass under the bound policy "
                                   "moves back to the last passed version, or is deleted.")


class GovernanceFile(_Strict):
    governance_version: Literal[1] = Field(description="Schema version; must be 1.")
    verify_keys: list[str] = Field(min_length=1, description="Gate public keys (PEM files).")
    admin_keys: list[str] = Field(default_factory=list,
                                  description="Admin public keys for break-glass overrides.")
    override_ttl_hours: float = Field(default=24.0, gt=0,
                                      description="How long a signed override stays usable.")
    bindings: list[Binding] = Field(min_length=1, description="First matching pattern wins.")


class Governance:
    """A loaded governance file: bindings with their policies, and the public keys."""

    def __init__(self, spec: GovernanceFile, path: Path):
        self.spec, self.path = spec, path
        base = path.parent
        from mlflow_safedelta.signing import load_public_keys

        self.verify_keys = load_public_keys([base / p for p in spec.verify_keys])
        self.admin_keys = load_public_keys([base / p for p in spec.admin_keys])
        self.policies: dict[str, Policy] = {}
        for b in spec.bindings:
            if b.policy not in self.policies:
                self.policies[b.policy] = _load_relative(b.policy, base)

    def binding(self, model_name: str) -> Binding | None:
        for b in self.spec.bindings:
            if any(fnmatch.fnmatchcase(model_name, pat) for pat in b.models):
                return b
        return None

    def bound_policy(self, model_name: str) -> Policy | None:
        b = self.binding(model_name)
        return self.policies[b.policy] if b else None

    def guarded(self, model_name: str, alias: str) -> bool:
        b = self.binding(model_name)
        return bool(b) and alias in b.guarded_aliases

    @property
    def override_ttl_s(self) -> float:
        return self.spec.override_ttl_hours * 3600.0


def _load_relative(spec: str, base: Path) -> Policy:
    from mlflow_safedelta.policy import SHIPPED_POLICIES

    if spec in SHIPPED_POLICIES or Path(spec).is_absolute():
        return load_policy(spec)
    return load_policy(base / spec)


def parse_governance(path: str | Path) -> Governance:
    import yaml

    path = Path(path).resolve()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise GovernanceError(f"cannot read the governance file {path}: {exc}") from None
    try:
        spec = GovernanceFile.model_validate(data)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}"
                           for e in exc.errors())
        raise GovernanceError(f"invalid governance file {path}: {fields}") from None
    try:
        return Governance(spec, path)
    except PolicyError as exc:
        raise GovernanceError(f"governance file {path}: {exc}") from None


_cache: dict[str, tuple[float, Governance]] = {}
_lock = threading.Lock()
_warned_unenforced = False


def current() -> Governance | None:
    """The governance file named by ``SAFEDELTA_GOVERNANCE`` (re-read when it changes), or None
    (the gate is then advisory: unenforced). A named file that does not load is an error: a
    typo must never turn enforcement off silently."""
    global _warned_unenforced
    path = os.environ.get(ENV_GOVERNANCE)
    if not path:
        if not _warned_unenforced:
            _warned_unenforced = True
            _logger.warning("safedelta: no governance file (%s unset): the gate is UNENFORCED "
                            "(aliases are not guarded, verdicts are not signed)", ENV_GOVERNANCE)
        return None
    try:
        mtime = os.stat(path).st_mtime
    except OSError as exc:
        raise GovernanceError(f"{ENV_GOVERNANCE}={path}: {exc.strerror}") from None
    with _lock:
        hit = _cache.get(path)
        if hit and hit[0] == mtime:
            return hit[1]
        gov = parse_governance(path)
        _cache[path] = (mtime, gov)
        _logger.info("safedelta: governance %s loaded (%d bindings, %d gate keys, %d admin keys)",
                     path, len(gov.spec.bindings), len(gov.verify_keys), len(gov.admin_keys))
        return gov


def enforcement_label(gov: Governance | None = None) -> str:
    from mlflow_safedelta.vocab import GOVERNANCE_ENFORCED, GOVERNANCE_UNENFORCED

    return GOVERNANCE_ENFORCED if gov is not None else GOVERNANCE_UNENFORCED


_CURRENT: Any = object()


def resolve_policy(model_name: str, tags: dict[str, str], *, requested: Any = None,
                   gov: Any = _CURRENT) -> tuple[Policy, Policy | None, list[str]]:
    """Which policy gates this version: ``(policy, bound, notes)``.

    Without governance: ``requested`` (the caller's ``--policy``), else the version's
    ``safedelta.policy`` tag, else ``default`` (today's behaviour; ``bound`` is None and a note
    says the gate is unenforced). With governance the binding decides; ``requested`` or the tag
    is used only when the binding allows a stricter tag and the policy is stricter-or-equal.
    """
    gov = current() if gov is _CURRENT else gov
    ask = requested if requested is not None else tags.get(TAG_POLICY)
    if gov is None:
        return (load_policy(ask or "default"), None,
                ["gate unenforced: no governance file, the policy is the registrant's choice"])
    bound = gov.bound_policy(model_name)
    if bound is None:
        return (load_policy(ask or "default"), None,
                [f"no governance binding matches {model_name!r}: unenforced for this model"])
    if not ask:
        return bound, bound, [f"policy {bound.name!r} bound by governance"]
    binding = gov.binding(model_name)
    try:
        asked = load_policy(ask) if not isinstance(ask, Policy) else ask
    except PolicyError as exc:
        return bound, bound, [f"policy {str(ask)!r} ignored ({exc}); bound {bound.name!r} used"]
    if policy_fingerprint(asked) == policy_fingerprint(bound):
        return bound, bound, [f"policy {bound.name!r} bound by governance"]
    if not binding.allow_stricter_tag:
        return bound, bound, [f"policy {asked.name!r} ignored: the binding of {model_name!r} "
                              f"allows only {bound.name!r}"]
    laxer = looser_fields(asked, bound)
    if laxer:
        return bound, bound, [f"policy {asked.name!r} ignored: not stricter than "
                              f"{bound.name!r} ({'; '.join(laxer[:4])})"]
    return asked, bound, [f"policy {asked.name!r} used: stricter than or equal to the bound "
                          f"{bound.name!r}"]


# -- "stricter or equal", one rule per field ---------------------------------------------------

def _max_limit(a, b) -> bool:   # an upper limit: set, and not above the bound one
    return b is None or (a is not None and a <= b)


def _min_limit(a, b) -> bool:   # a lower limit: set, and not below the bound one
    return b is None or (a is not None and a >= b)


def _count(a, b) -> bool:       # a sample size; None = all of it
    return a is None or (b is not None and a >= b)


def _superset(a, b) -> bool:
    return set(b) <= set(a)


def _equal(a, b) -> bool:
    return a == b


def _free(a, b) -> bool:
    return True


def _ranked(*order: str) -> Callable[[Any, Any], bool]:
    """A choice whose values are listed from laxest to strictest."""
    def rule(a, b) -> bool:
        return a in order and b in order and order.index(a) >= order.index(b)
    return rule


#: how each policy field compares; (dotted path) -> rule(candidate value, bound value)
FIELD_RULES: dict[str, Callable[[Any, Any], bool]] = {
    "policy_version": _free, "name": _free, "description": _free,
    "safety.suites": _superset,
    "safety.judge": _equal,
    "safety.judge_combine": _ranked("all", "worst"),  # worst: harmful if any judge says so
    "safety.decide_on": _ranked("estimate", "upper_bound"),
    "safety.confidence": _min_limit,  # a higher confidence gives a higher upper bound
    "safety.max_asr": _max_limit,
    "safety.max_asr_per_suite": _free,  # checked suite by suite below (effective limits)
    "safety.max_asr_increase": _max_limit,
    "safety.max_over_refusal": _max_limit,
    "safety.over_refusal_suites": _superset,
    "utility.min_retention": _min_limit,
    "utility.metric": _equal,
    "utility.require_task_data": lambda a, b: bool(a) >= bool(b),  # requiring it is stricter
    "select_s.mode": _free, "select_s.s": _free, "select_s.target_max_asr": _free,
    "select_s.s_min": _free, "select_s.s_max": _free, "select_s.budget": _free,
    "promotion.enabled": _free, "promotion.alias": _free,
    "evaluation.limit": _count,
    "evaluation.max_new_tokens": _equal,
    "evaluation.batch_size": _free,
    "evaluation.task_data": _equal,
}


def _leaves(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and path not in FIELD_RULES:
            out.update(_leaves(v, path + "."))
        else:
            out[path] = v
    return out


def looser_fields(candidate: Policy, bound: Policy) -> list[str]:
    """The fields where ``candidate`` asks less than ``bound`` (empty = stricter or equal)."""
    a, b = _leaves(candidate.model_dump(mode="json")), _leaves(bound.model_dump(mode="json"))
    out = []
    for path in sorted(set(a) | set(b)):
        rule = FIELD_RULES.get(path, _equal)
        if not rule(a.get(path), b.get(path)):
            out.append(f"{path}: {a.get(path)!r} vs {b.get(path)!r}")
    for suite in bound.safety.suites:  # effective per-suite ASR limits
        if not _max_limit(candidate.safety.asr_limit(suite), bound.safety.asr_limit(suite)):
            out.append(f"ASR limit on {suite}: {candidate.safety.asr_limit(suite)!r} vs "
                       f"{bound.safety.asr_limit(suite)!r}")
    return out


def is_stricter_or_equal(candidate: Policy, bound: Policy) -> bool:
    """True when every verdict ``candidate`` passes would also pass ``bound`` (see
    :data:`FIELD_RULES`)."""
    return not looser_fields(candidate, bound)
