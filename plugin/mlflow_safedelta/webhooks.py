"""Webhook receiver for MLflow's ``model_version.created`` event: verify, dedupe, enqueue, 2xx;
and, under a governance file, ``model_version_alias.created``: a guarded alias set on a version
without a signed pass is moved back (or deleted) and an incident recorded. That is after the
fact: only the registry-store plugin prevents it.

MLflow signs each delivery with ``X-MLflow-Signature: v1,<base64 HMAC-SHA256>`` over
``f"{delivery_id}.{timestamp}.{raw_body}"`` (headers ``X-MLflow-Delivery-Id``,
``X-MLflow-Timestamp``, unix seconds). :func:`handle_delivery` checks, in this order: body size,
headers, timestamp freshness, the signature (constant-time, over the raw bytes), JSON, event type;
only then records the delivery id and enqueues the job in one transaction. So a forged, stale or
malformed request writes nothing, and a retried or replayed delivery id is acknowledged without a
second job. It answers as soon as the job is durable; the worker does the work.

MLflow does not redeliver after a restart (and retries only 3 times), so the reconcile sweep
(``reconcile.py``) is the safety net for deliveries that never arrive.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from mlflow_safedelta.jobqueue import JobQueue
from mlflow_safedelta.vocab import ENV_WEBHOOK_SECRET, RECORDED, SKIP, gate_decision

_logger = logging.getLogger(__name__)

SECRET_ENV = ENV_WEBHOOK_SECRET
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
SIGNATURE_HEADER = "X-MLflow-Signature"
SIGNATURE_VERSION = "v1"
EVENT = "model_version.created"
ALIAS_EVENT = "model_version_alias.created"
EVENTS = [EVENT, ALIAS_EVENT]
WEBHOOK_NAME = "safedelta-gate"
DEFAULT_PATH = "/webhooks/mlflow"
MAX_BODY_BYTES = 1 << 20  # 1 MiB; a model_version.created payload is a few hundred bytes
TOLERANCE_SECONDS = 300


@dataclass
class Reply:
    """What the receiver answers: an HTTP status and a small JSON body."""

    status_code: int
    body: dict[str, Any] = field(default_factory=dict)


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow would send for these bytes."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION},{base64.b64encode(mac.digest()).decode()}"


def verify_signature(secret: str, delivery_id: str, timestamp: str, body: bytes,
                     signature: str) -> bool:
    """Constant-time check of a ``v1,<base64>`` signature (several may be space-separated)."""
    expected = sign(secret, delivery_id, timestamp, body).encode()
    ok = False
    for candidate in signature.split():
        # compare every candidate (no early exit) so timing does not tell which one matched
        ok |= hmac.compare_digest(expected, candidate.strip().encode())
    return ok


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for k, v in headers.items():
        if k.lower() == lowered:
            return v
    return None


def handle_delivery(queue: JobQueue, secret: str, headers: Mapping[str, str], body: bytes, *,
                    now: float | None = None, tolerance: float = TOLERANCE_SECONDS,
                    max_body: int = MAX_BODY_BYTES,
                    on_alias: Callable[[str, str, str], dict] | None = None) -> Reply:
    """Check one delivery and, when it is a valid new ``model_version.created``, enqueue its job.

    Returns 202 (queued), 200 (duplicate delivery, ignored event or version), 400 (malformed),
    401 (unsigned, forged, stale) or 413 (too large). Only 202 and 200-ignored write anything
    (the delivery id, and for 202 the job).
    """
    if len(body) > max_body:
        return Reply(413, {"error": f"body larger than {max_body} bytes"})
    delivery_id = _header(headers, DELIVERY_ID_HEADER)
    timestamp = _header(headers, TIMESTAMP_HEADER)
    signature = _header(headers, SIGNATURE_HEADER)
    if not (delivery_id and timestamp and signature):
        return Reply(401, {"error": f"missing {DELIVERY_ID_HEADER}, {TIMESTAMP_HEADER} or "
                                    f"{SIGNATURE_HEADER} header"})
    try:
        ts = int(timestamp)
    except ValueError:
        return Reply(401, {"error": f"{TIMESTAMP_HEADER} is not unix seconds"})
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance:
        return Reply(401, {"error": f"stale timestamp (more than {tolerance:.0f} s off)"})
    if len(delivery_id) > 128 or not verify_signature(secret, delivery_id, timestamp, body,
                                                      signature):
        return Reply(401, {"error": "bad signature"})
    try:
        payload = json.loads(body)
        event = f"{payload['entity']}.{payload['action']}"
        data = payload.get("data") or {}
    except (ValueError, KeyError, TypeError, AttributeError):
        return Reply(400, {"error": "body is not a JSON webhook payload"})
    if event == ALIAS_EVENT and on_alias is not None:
        return _alias_created(queue, delivery_id, data, on_alias)
    if event != EVENT:
        return Reply(200, {"status": "ignored", "reason": f"event {event!r} is not {EVENT!r}"})
    name, version = data.get("name"), data.get("version")
    if not isinstance(name, str) or not name or version in (None, ""):
        return Reply(400, {"error": "payload data lacks a model name or version"})
    enqueue = gate_decision(data.get("tags"), state_trusted=_state_trusted(data))[0] \
        not in (SKIP, RECORDED)
    job = (name, str(version), "webhook") if enqueue else None
    if not queue.record_delivery(delivery_id, event, job):
        return Reply(200, {"status": "duplicate", "delivery_id": delivery_id})
    if job is None:
        return Reply(200, {"status": "ignored", "reason": "protected or already gated"})
    return Reply(202, {"status": "queued", "model": name, "version": str(version)})


def _state_trusted(data: dict) -> bool:
    """Pre-set state tags on a new version count only when the gate signed its registration
    (under governance; without it, today's behaviour)."""
    from mlflow_safedelta import governance, guard
    from mlflow_safedelta.vocab import tag_dict

    try:
        gov = governance.current()
    except Exception as exc:  # noqa: BLE001 - a broken file: trust nothing, gate it
        _logger.error("webhook: governance file invalid (%s): gating regardless of tags", exc)
        return False
    if gov is None:
        return True
    try:
        guard.check_registration(gov, str(data.get("name")), str(data.get("source")),
                                 tag_dict(data.get("tags")))
    except guard.Refused as exc:
        _logger.warning("webhook: %s v%s was registered with state tags the gate did not sign "
                        "(%s): gating it anyway", data.get("name"), data.get("version"), exc)
        return False
    return True


def _alias_created(queue: JobQueue, delivery_id: str, data: dict,
                   on_alias: Callable[[str, str, str], dict]) -> Reply:
    name, alias, version = data.get("name"), data.get("alias"), data.get("version")
    if not all(isinstance(x, str) and x for x in (name, alias)) or version in (None, ""):
        return Reply(400, {"error": "payload data lacks a model name, alias or version"})
    if not queue.record_delivery(delivery_id, ALIAS_EVENT, None):
        return Reply(200, {"status": "duplicate", "delivery_id": delivery_id})
    done = on_alias(name, alias, str(version))
    return Reply(200, {"status": "checked", "model": name, "alias": alias,
                       "version": str(version), **done})


def create_app(queue: JobQueue, secret: str, *, path: str = DEFAULT_PATH,
               max_body: int = MAX_BODY_BYTES, tolerance: float = TOLERANCE_SECONDS,
               on_alias: Callable[[str, str, str], dict] | None = None):
    """A Starlette app (MLflow ships it) with ``POST {path}`` (the receiver) and ``GET /health``."""
    if not secret:
        raise ValueError(f"a webhook secret is required (--secret or ${SECRET_ENV})")
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    too_large = {"error": f"body larger than {max_body} bytes"}

    async def health(_request):
        return PlainTextResponse("OK")

    async def receive(request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            return JSONResponse(too_large, 413)
        chunks, size = [], 0
        async for chunk in request.stream():  # stop reading as soon as the limit is passed
            size += len(chunk)
            if size > max_body:
                return JSONResponse(too_large, 413)
            chunks.append(chunk)
        reply = await run_in_threadpool(handle_delivery, queue, secret, dict(request.headers),
                                        b"".join(chunks), tolerance=tolerance, max_body=max_body,
                                        on_alias=on_alias)
        if reply.status_code >= 400:
            _logger.warning("webhook rejected (%d): %s", reply.status_code, reply.body)
        return JSONResponse(reply.body, reply.status_code)

    return Starlette(routes=[Route("/health", health, methods=["GET"]),
                             Route(path, receive, methods=["POST"])])


def ensure_webhook(url: str, secret: str, *, name: str = WEBHOOK_NAME,
                   tracking_uri: str | None = None, registry_uri: str | None = None):
    """Create the subscription (``model_version.created`` and ``model_version_alias.created``),
    or update the one with this name.

    Returns ``(webhook, "created" | "updated")``. The secret is always (re)written, since MLflow
    never returns it.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    token = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        for hook in page:
            if hook.name == name:
                updated = client.update_webhook(hook.webhook_id, url=url, events=EVENTS,
                                                secret=secret, status="ACTIVE")
                return updated, "updated"
        token = page.token
        if not token:
            break
    hook = client.create_webhook(name=name, url=url, events=EVENTS, secret=secret,
                                 description="mlflow-safedelta: gate fine-tuned versions")
    return hook, "created"


def secret_from_env() -> str | None:
    return os.environ.get(SECRET_ENV) or None
