"""The webhook receiver over real HTTP (uvicorn on loopback): signatures, freshness, replays,
malformed and oversized bodies, unknown events. A rejected delivery writes nothing at all."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest
import requests
import sqlalchemy as sa

from mlflow_safedelta.jobqueue import JobQueue
from mlflow_safedelta.webhooks import (
    MAX_BODY_BYTES,
    create_app,
    handle_delivery,
    sign,
    verify_signature,
)

SECRET = "s3cret-for-tests"


def _payload(name="ft", version="3", tags=None, entity="model_version", action="created"):
    return json.dumps({
        "entity": entity, "action": action, "timestamp": "2026-01-01T00:00:00+00:00",
        "data": {"name": name, "version": version, "source": "models:/m-abc", "run_id": None,
                 "tags": tags if tags is not None else {"safedelta.parent": "models:/base/1"},
                 "description": None},
    }).encode()


def _headers(body: bytes, *, secret=SECRET, delivery_id=None, timestamp=None):
    delivery_id = delivery_id or str(uuid.uuid4())
    timestamp = str(int(time.time()) if timestamp is None else timestamp)
    return {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
            "X-MLflow-Timestamp": timestamp,
            "X-MLflow-Signature": sign(secret, delivery_id, timestamp, body)}


@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    import uvicorn

    queue = JobQueue(f"sqlite:///{tmp_path_factory.mktemp('recv') / 'q.sqlite'}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(queue, SECRET), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if requests.get(f"{url}/health", timeout=1).text == "OK":
                break
        except requests.ConnectionError:
            time.sleep(0.05)
    yield url + "/webhooks/mlflow", queue
    server.should_exit = True
    thread.join(timeout=10)


def _snapshot(queue: JobQueue):
    with queue.engine.connect() as conn:
        jobs = conn.execute(sa.select(queue.jobs)).all()
        deliveries = conn.execute(sa.select(queue.deliveries.c.delivery_id)).all()
    return sorted(map(tuple, jobs)), sorted(map(tuple, deliveries))


def test_signature_matches_mlflows_own_signer():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = _payload()
    theirs = _generate_hmac_signature(SECRET, "d-1", "1700000000", body.decode())
    assert theirs == sign(SECRET, "d-1", "1700000000", body)
    assert verify_signature(SECRET, "d-1", "1700000000", body, f"v0,xyz {theirs}")
    assert not verify_signature(SECRET, "d-1", "1700000001", body, theirs)


def test_valid_delivery_enqueues_once_and_a_replay_is_ignored(receiver):
    url, queue = receiver
    body = _payload(name="valid", version="1")
    headers = _headers(body)
    first = requests.post(url, data=body, headers=headers, timeout=10)
    assert first.status_code == 202 and first.json()["status"] == "queued"
    before = _snapshot(queue)
    replay = requests.post(url, data=body, headers=headers, timeout=10)
    assert replay.status_code == 200 and replay.json()["status"] == "duplicate"
    assert _snapshot(queue) == before
    assert [(j.model_name, j.version, j.source) for j in queue.list(model_name="valid")] == [
        ("valid", "1", "webhook")]


def _forged(body):
    h = _headers(body)
    h["X-MLflow-Signature"] = "v1," + "A" * 44
    return h


def _unsigned(body):
    h = _headers(body)
    del h["X-MLflow-Signature"]
    return h


def _tampered_body(body):  # signed for one body, another one sent
    return _headers(_payload(name="other"))


REJECTED = {
    "forged signature": (_payload, _forged, 401),
    "wrong secret": (_payload, lambda b: _headers(b, secret="not-the-secret"), 401),
    "unsigned": (_payload, _unsigned, 401),
    "tampered body": (_payload, _tampered_body, 401),
    "stale timestamp": (_payload, lambda b: _headers(b, timestamp=int(time.time()) - 3600), 401),
    "future timestamp": (_payload, lambda b: _headers(b, timestamp=int(time.time()) + 3600), 401),
    "malformed json": (lambda: b'{"entity": "model_version", "action": ', _headers, 400),
    "not an object": (lambda: b'["model_version", "created"]', _headers, 400),
    "no version": (lambda: json.dumps({"entity": "model_version", "action": "created",
                                       "data": {"name": "x"}}).encode(), _headers, 400),
    "oversized body": (lambda: b" " * (MAX_BODY_BYTES + 1) + _payload(), _headers, 413),
    "unknown event": (lambda: _payload(entity="registered_model", action="created"), _headers,
                      200),
    "protected output": (lambda: _payload(tags={"safedelta.role": "protected",
                                                "safedelta.parent": "models:/b/1"}), _headers,
                         200),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_bad_deliveries_make_no_job(receiver, case):
    url, queue = receiver
    make_body, make_headers, expected = REJECTED[case]
    body = make_body()
    headers = make_headers(body)
    before_jobs = _snapshot(queue)[0]
    resp = requests.post(url, data=body, headers=headers, timeout=30)
    assert resp.status_code == expected, resp.text
    assert resp.status_code != 202
    assert _snapshot(queue)[0] == before_jobs  # no job, no change to any job
    if expected == 200:
        assert resp.json()["status"] == "ignored"


def test_rejections_record_no_delivery_id(receiver):
    """A forged request cannot burn the id of a genuine delivery that arrives later."""
    url, queue = receiver
    body = _payload(name="later", version="9")
    genuine = _headers(body)
    forged = dict(genuine, **{"X-MLflow-Signature": "v1," + "B" * 44})
    before = _snapshot(queue)
    assert requests.post(url, data=body, headers=forged, timeout=10).status_code == 401
    assert _snapshot(queue) == before
    assert requests.post(url, data=body, headers=genuine, timeout=10).status_code == 202


def test_handle_delivery_checks_freshness_against_the_given_clock(tmp_path):
    queue = JobQueue(f"sqlite:///{tmp_path / 'q.sqlite'}")
    body = _payload()
    headers = _headers(body, timestamp=1_000)
    assert handle_delivery(queue, SECRET, headers, body, now=1_000 + 301).status_code == 401
    assert handle_delivery(queue, SECRET, headers, body, now=1_000 + 299).status_code == 202


def test_app_refuses_to_start_without_a_secret(tmp_path):
    with pytest.raises(ValueError, match="secret is required"):
        create_app(JobQueue(f"sqlite:///{tmp_path / 'q.sqlite'}"), "")
