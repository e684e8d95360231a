"""The plugin's vocabulary: every tag key, status, role, exit code and environment variable.

One name and one place per concept: the store plugin, webhook receiver, queue, worker, gate job,
CLI and Action import these names; nothing else spells ``"safedelta.status"`` or
``"SAFEDELTA_QUEUE_URI"``. Import-light (no MLflow, no torch): the store plugin loads it inside
the MLflow server.

Model-version tags (the gate state lives in them):

============================  ===============================================================
``safedelta.parent``          the aligned parent (``models:/name/version`` or ``models:/name@alias``)
``safedelta.status``          ``pending`` | ``running`` | ``passed`` | ``failed`` | ``error`` on a
                              fine-tune; ``skipped`` (no parent anywhere; reason says why);
                              ``protected-output`` on a version the gate registered
``safedelta.reason``          one line: why that status
``safedelta.role``            ``protected`` on the gate's own output (never gated itself)
``safedelta.policy``          policy name the version is (to be) gated with
``safedelta.policy_sha256``   sha256 of that policy's normalized content: a recorded verdict
                              counts only under the same content
``safedelta.verdict``         on a protected version: the gate verdict of the run that made it
``safedelta.protected_from``  on a protected version: ``name/version`` of the fine-tune
``safedelta.protected_version``  on a fine-tune: the version the gate registered from it
``safedelta.run_id``          the gate run
``safedelta.s``               the budget ``s`` the protected model was made with
``safedelta.hessian_run`` / ``safedelta.hessian_key``  on a parent: its Hessian cache run / key
``safedelta.parent_fingerprint``  content fingerprint of the parent's weights
``safedelta.gate_artifact``   ``runs:/<run>/safedelta/gate.json``
``safedelta.task_data``       task data for the utility rules (registrant-chosen)
``safedelta.bound_policy_sha256``  fingerprint of the policy the governance file binds to the
                              model (the gate may have used a stricter-or-equal one)
``safedelta.governance``      ``enforced`` or ``unenforced``: was a governance file in force
``safedelta.policy_note``     why a ``safedelta.policy`` tag was ignored (or honoured)
``safedelta.signature``       the gate's signed statement over this version's state tags
``safedelta.override``        a platform admin's signed break-glass statement (alias, who, why)
``safedelta.incident``        the last guarded-alias violation detected on this version
``safedelta.job_key``         on a gate run and a protected version: the gate job that made it
                              (a takeover adopts what carries its key instead of making it again)
============================  ===============================================================

State tags (:data:`STATE_TAGS`) are written by the gate only: under governance the store refuses
them unless the version's current signed statement carries the same value, and readers trust them
only then. Input tags (``parent``, ``policy``, ``task_data``, ``parent_fingerprint``) are the
registrant's, and the Hessian-cache tags sit on parents.
"""

from __future__ import annotations

from enum import IntEnum

# -- model-version tags ------------------------------------------------------------------------
TAG_PREFIX = "safedelta."
TAG_PARENT = "safedelta.parent"
TAG_STATUS = "safedelta.status"
TAG_REASON = "safedelta.reason"
TAG_ROLE = "safedelta.role"
TAG_POLICY = "safedelta.policy"
TAG_POLICY_SHA256 = "safedelta.policy_sha256"
TAG_VERDICT = "safedelta.verdict"
TAG_PROTECTED_FROM = "safedelta.protected_from"
TAG_PROTECTED_VERSION = "safedelta.protected_version"
TAG_RUN_ID = "safedelta.run_id"
TAG_S = "safedelta.s"
TAG_HESSIAN_RUN = "safedelta.hessian_run"
TAG_HESSIAN_KEY = "safedelta.hessian_key"
TAG_PARENT_FINGERPRINT = "safedelta.parent_fingerprint"
TAG_GATE_ARTIFACT = "safedelta.gate_artifact"
TAG_TASK_DATA = "safedelta.task_data"
TAG_BOUND_POLICY_SHA256 = "safedelta.bound_policy_sha256"
TAG_GOVERNANCE = "safedelta.governance"
TAG_POLICY_NOTE = "safedelta.policy_note"
TAG_SIGNATURE = "safedelta.signature"
TAG_OVERRIDE = "safedelta.override"
TAG_INCIDENT = "safedelta.incident"

#: tags only the gate writes (signed under governance); everything else is registrant input
STATE_TAGS = frozenset({
    TAG_STATUS, TAG_REASON, TAG_ROLE, TAG_POLICY_SHA256, TAG_VERDICT, TAG_PROTECTED_FROM,
    TAG_PROTECTED_VERSION, TAG_RUN_ID, TAG_S, TAG_GATE_ARTIFACT, TAG_BOUND_POLICY_SHA256,
    TAG_GOVERNANCE, TAG_POLICY_NOTE})
#: tags that carry their own signature (verified on write), and the incident log (admin/receiver)
SIGNED_TAGS = frozenset({TAG_SIGNATURE, TAG_OVERRIDE})
GOVERNANCE_ENFORCED, GOVERNANCE_UNENFORCED = "enforced", "unenforced"
TAG_JOB_KEY = "safedelta.job_key"

# -- run tags (gate and Hessian-cache runs) ----------------------------------------------------
RUN_TAG_KIND = "safedelta.kind"
RUN_TAG_MODEL = "safedelta.model"
RUN_TAG_VERSION = "safedelta.version"
RUN_TAG_ERROR = "safedelta.error"
RUN_KIND_GATE = "gate"
RUN_KIND_HESSIAN_CACHE = "hessian-cache"
RUN_KIND_OVERRIDE = "override"
OVERRIDE_EXPERIMENT = "safedelta-overrides"

# -- statuses (values of safedelta.status) -----------------------------------------------------
STATUS_PENDING = "pending"
STATUS_RUNNING = "running"
STATUS_PASSED = "passed"
STATUS_FAILED = "failed"
STATUS_ERROR = "error"
STATUS_PROTECTED_OUTPUT = "protected-output"
#: a version the gate looked at and cannot decide on (no parent anywhere): visible, with a reason
STATUS_SKIPPED = "skipped"
#: statuses that end a gate; the verdicts a gate can reach
FINAL_STATUSES = (STATUS_PASSED, STATUS_FAILED, STATUS_ERROR)
VERDICTS = FINAL_STATUSES

# -- roles (of a model in a gate; also the safedelta flavor's ``role``) ------------------------
ROLE_ALIGNED = "aligned"
ROLE_FINETUNED = "finetuned"
ROLE_PROTECTED = "protected"
ROLES = (ROLE_ALIGNED, ROLE_FINETUNED, ROLE_PROTECTED)

# -- the safedelta flavor (flavor/ writes it; the worker reads it from a version's MLmodel) ----
FLAVOR_NAME = "safedelta"


class FlavorKey:
    """Keys of the ``flavors.safedelta`` block of MLmodel. Read them with
    ``conf.get(FlavorKey.X, default)`` so older models keep loading; never rename one."""

    #: schema version of this flavor block (int)
    FLAVOR_VERSION = "flavor_version"
    #: subdirectory holding the weights (full checkpoint or PEFT adapter)
    MODEL_DATA = "model_data"
    #: subdirectory holding the tokenizer files
    TOKENIZER = "tokenizer"
    #: ``full`` (a complete checkpoint) or ``lora`` (a PEFT adapter applied onto the parent)
    DELTA_FORMAT = "delta_format"
    #: the aligned parent: ``models:/name/version`` or ``models:/name@alias`` (or a local path)
    PARENT_URI = "parent_uri"
    #: content fingerprint of the parent's weights (``safedelta.fingerprint``), when known
    PARENT_FINGERPRINT = "parent_fingerprint"
    #: content fingerprint of this model's weights
    FINGERPRINT = "fingerprint"
    #: ``aligned``, ``finetuned`` or ``protected``
    ROLE = "role"
    #: the ``SafeDeltaConfig`` a protected model was produced with (plain dict)
    SAFEDELTA_CONFIG = "safedelta_config"
    #: library versions at save time
    TRANSFORMERS_VERSION = "transformers_version"
    TORCH_VERSION = "torch_version"
    SAFEDELTA_VERSION = "safedelta_version"
    #: code paths copied next to the model (MLflow convention)
    CODE = "code"


# -- experiments and artifacts -----------------------------------------------------------------
GATE_EXPERIMENT = "safedelta-gate"
HESSIAN_EXPERIMENT = "safedelta-hessians"
GATE_ARTIFACT = "safedelta/gate.json"
#: metric on the gate run and the protected LoggedModel: 1 passed, 0 failed (a sortable column)
GATE_PASSED_METRIC = "gate.passed"

#: tags are limited in length by the stores (5000 chars in OSS SQL); keep reasons well below
MAX_TAG_VALUE = 4000


# -- exit codes (CLI, worker commands and the GitHub Action) -----------------------------------
class ExitCode(IntEnum):
    """Exit codes everywhere: 0 ok / gate passed, 1 gate failed, 2 usage, input or gate error."""

    OK = 0
    FAILED = 1
    ERROR = 2


#: a verdict's exit code
VERDICT_EXIT_CODES = {STATUS_PASSED: ExitCode.OK, STATUS_FAILED: ExitCode.FAILED,
                      STATUS_ERROR: ExitCode.ERROR}

# -- environment variables ---------------------------------------------------------------------
ENV_CACHE = "SAFEDELTA_CACHE"                    # cache root (Hessians, generations, jobs.sqlite)
ENV_QUEUE_URI = "SAFEDELTA_QUEUE_URI"            # job queue: sqlite:///, postgresql://, redis://
ENV_QUEUE_PREFIX = "SAFEDELTA_QUEUE_PREFIX"      # Redis key prefix
ENV_JOB = "SAFEDELTA_JOB"                        # gate job as module:function
ENV_JOB_MAX_ATTEMPTS = "SAFEDELTA_JOB_MAX_ATTEMPTS"
ENV_JOB_BACKOFF = "SAFEDELTA_JOB_BACKOFF"
ENV_JOB_LEASE = "SAFEDELTA_JOB_LEASE"
ENV_WEBHOOK_SECRET = "SAFEDELTA_WEBHOOK_SECRET"  # HMAC secret shared with MLflow's webhook
ENV_NO_MLFLOW_CLI_HOOK = "SAFEDELTA_NO_MLFLOW_CLI_HOOK"
ENV_GOVERNANCE = "SAFEDELTA_GOVERNANCE"          # the platform's governance file (YAML)
ENV_SIGNING_KEY = "SAFEDELTA_SIGNING_KEY"        # gate workers: Ed25519 private key (PEM file)
ENV_ADMIN_KEY = "SAFEDELTA_ADMIN_KEY"            # platform admins: Ed25519 private key (PEM file)
#: TEST-ONLY fault injection: the gate job SIGKILLs its own process right after the named step
#: boundary (``recovery.FAULT_POINTS``); never set it in production
ENV_FAULT_AFTER = "SAFEDELTA_FAULT_AFTER"
#: seconds the webhook receiver waits for a request body before answering 408
ENV_BODY_TIMEOUT = "SAFEDELTA_BODY_TIMEOUT"


# -- does this version need a gate? ------------------------------------------------------------
GATE, RECORDED, SKIP, CHECK = "gate", "recorded", "skip", "check"


def tag_dict(tags) -> dict[str, str]:
    """Model-version tags as a dict, from a dict or a list of ``ModelVersionTag``-like objects
    (or ``{"key", "value"}`` mappings, as webhook payloads carry them)."""
    if not tags:
        return {}
    if isinstance(tags, dict):
        return {str(k): str(v) for k, v in tags.items()}
    out = {}
    for t in tags:
        if isinstance(t, dict):
            out[str(t.get("key"))] = str(t.get("value"))
        else:
            out[str(t.key)] = str(t.value)
    return out


def flavor_parent(flavors: dict | None) -> str | None:
    """The parent a ``safedelta`` flavor names (None for aligned parents and protected outputs)."""
    conf = flavors.get(FLAVOR_NAME) if isinstance(flavors, dict) else None
    if not isinstance(conf, dict) or conf.get(FlavorKey.ROLE) == ROLE_PROTECTED:
        return None
    value = conf.get(FlavorKey.PARENT_URI)
    return value if isinstance(value, str) and value else None


def gate_decision(tags, flavors: dict | None = None, run_tags: dict | None = None, *,
                  state_trusted: bool = True) -> tuple[str, str]:
    """The one place that decides whether a registered version needs a gate.

    A parent may be named in three places (the README's rule), looked at in this order: the
    version's ``safedelta.parent`` tag, the ``safedelta`` flavor of its MLmodel, the
    ``safedelta.parent`` tag of the run that logged it.

    Args:
        tags: the version's tags (dict or list of tag objects).
        flavors: the ``flavors`` table of its MLmodel, when known; ``None`` = not read yet.
        run_tags: the tags of the version's run, when known (``{}`` = it has no run);
            ``None`` = not read yet.
        state_trusted: False when the state tags (``status``, ``role``) are not vouched for by
            a verified gate signature (governance on, and the version's statement missing or
            invalid): they are then ignored, so pre-set or forged state never skips the gate.

    Returns:
        ``(decision, why)`` with decision :data:`GATE` (gate it), :data:`RECORDED` (a final status is
        recorded: nothing to enqueue; a job that runs anyway reuses or re-checks it),
        :data:`SKIP` (never: the gate's own protected output, or no parent anywhere) or
        :data:`CHECK` (what is known does not tell: read the MLmodel and the run's tags, and
        ask again). Routes that only enqueue treat RECORDED like SKIP.
    """
    tags = tag_dict(tags)
    if not state_trusted:
        tags = {k: v for k, v in tags.items() if k not in STATE_TAGS}
    if tags.get(TAG_ROLE) == ROLE_PROTECTED:
        return SKIP, "a protected output of the gate"
    status = tags.get(TAG_STATUS)
    if status == STATUS_SKIPPED and tags.get(TAG_PARENT):
        return GATE, f"skipped before, now has parent tag {tags[TAG_PARENT]}"
    if status and status != STATUS_PENDING:
        return RECORDED, f"status {status} already set"
    if tags.get(TAG_PARENT):
        return GATE, f"parent tag {tags[TAG_PARENT]}"
    if flavors is None:
        return CHECK, "no parent tag; the MLmodel or the run may name one"
    conf = flavors.get(FLAVOR_NAME) if isinstance(flavors, dict) else None
    if isinstance(conf, dict) and conf.get(FlavorKey.ROLE) == ROLE_PROTECTED:
        return SKIP, "a protected output of the gate (safedelta flavor role)"
    parent = flavor_parent(flavors)
    if parent:
        return GATE, f"safedelta flavor with parent {parent}"
    if run_tags is None:
        return CHECK, "no parent tag or flavor parent; the run may name one"
    run_parent = tag_dict(run_tags).get(TAG_PARENT)
    if run_parent:
        return GATE, f"run tag {TAG_PARENT} {run_parent}"
    return SKIP, (f"no {TAG_PARENT} tag on the version or its run and no {FLAVOR_NAME} flavor "
                  "naming a parent")
