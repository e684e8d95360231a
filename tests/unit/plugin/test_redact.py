"""Credentials are stripped from every URI before it is written anywhere."""

from __future__ import annotations

import pytest

from mlflow_safedelta.redact import redact_text, redact_uri


@pytest.mark.parametrize("uri, expected", [
    ("http://user:password@host:5000/api", "http://***@host:5000/api"),
    ("https://token@host", "https://***@host"),
    ("postgresql://mlflow:pw@db/mlflow", "postgresql://***@db/mlflow"),
    ("https://host/x?token=abc&keep=1", "https://host/x?token=***&keep=1"),
    ("s3://bucket/key?X-Amz-Signature=deadbeef", "s3://bucket/key?X-Amz-Signature=***"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("models:/support-bot/3", "models:/support-bot/3"),
    ("/local/path", "/local/path"),
    (None, None),
])
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


def test_redact_text_replaces_every_uri_inside_a_message():
    msg = ("ConnectionError: HTTPConnectionPool for url http://alice:s3cr3t@10.0.0.1:5000/api "
           "and 'redis://:pw@cache:6379/0' failed")
    out = redact_text(msg)
    assert "s3cr3t" not in out and ":pw@" not in out
    assert "http://***@10.0.0.1:5000/api" in out and "redis://***@cache:6379/0" in out
