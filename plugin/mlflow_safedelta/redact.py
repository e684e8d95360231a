"""Secrets never written: strip credentials from URIs before they reach a log, tag, param,
artifact or stdout.

One helper for every place that writes a URI: :func:`redact_uri` for one URI,
:func:`redact_text` for free text that may contain URIs (error messages, reasons).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"

#: query parameters that carry credentials (compared lower-case)
_SECRET_PARAMS = ("password", "passwd", "pwd", "token", "access_token", "api_key", "apikey",
                  "key", "secret", "sig", "signature", "x-amz-signature", "x-amz-credential",
                  "x-amz-security-token", "sv", "se", "sp", "auth")

_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>)\]]+")


def redact_uri(uri: str | None) -> str | None:
    """``scheme://user:password@host/path?token=x`` -> ``scheme://***@host/path?token=***``.

    User info (name and password) and credential-like query parameters are replaced; anything
    that is not a URI with a network location is returned unchanged."""
    if not uri or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return _URI_IN_TEXT.sub(REDACTED, uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, REDACTED if k.lower() in _SECRET_PARAMS else v)
                               for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str | None) -> str | None:
    """Every URI inside ``text`` passed through :func:`redact_uri`."""
    if not text or "://" not in text:
        return text
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)) or "", text)
