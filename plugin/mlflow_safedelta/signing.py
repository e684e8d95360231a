"""Signed statements: what a gate worker (or a platform admin) asserts about a registered version.

Ed25519 (``cryptography``, which MLflow already brings). Gate workers hold the *gate* private key
(``SAFEDELTA_SIGNING_KEY``), platform admins the *admin* private key (``SAFEDELTA_ADMIN_KEY``);
the registry server holds only public keys (listed in the governance file), so it can verify but
never sign. Several public keys may be valid at once (rotation): a statement names the id of the
key that signed it (the first 16 hex digits of the sha256 of the raw public key).

A statement is a small JSON object, signed over its canonical form (sorted keys, no whitespace)
and stored in one model-version tag as ``{"statement": {...}, "sig": "<base64>"}``:

=============  ================================================================================
``kind``       ``state`` (gate tags on an existing version), ``register`` (tags a new version of
               the gate's own is created with) or ``override`` (break-glass, admin key)
``key_id``     the signing key
``model``      registered model name
``version``    the version (null for ``register``: not known before creation)
``created``    the version's creation timestamp (ms; null for ``register``)
``source``     the version's source (its artifacts): with ``created`` the version's immutable
               identity, so a statement copied onto another version or a re-created one is void
``time``       unix seconds when signed (statements on a version only move forward in time)
``tags``       ``{key: value}`` the gate writes; values over 128 characters as ``sha256:<hex>``
=============  ================================================================================

Override statements add ``alias``, ``reason``, ``who``, ``overrode`` (the verdict it overrode)
and ``run_id`` (the MLflow run that records it). No MLflow import here: the store plugin loads it
inside the server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_safedelta.errors import GovernanceError

STATEMENT_VERSION = 1
KIND_STATE, KIND_REGISTER, KIND_OVERRIDE = "state", "register", "override"
#: tag values longer than this are signed as their sha256 digest
DIGEST_OVER = 128
#: a ``register`` statement is accepted this long after it was signed (seconds; clock skew too)
REGISTER_WINDOW_S = 600


def _ed25519():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def key_id(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: str | Path, public_path: str | Path) -> str:
    """Write a new Ed25519 private key (PEM, mode 0600) and its public key (PEM); return its id.
    Refuses to overwrite an existing file (a lost private key cannot be recovered)."""
    from cryptography.hazmat.primitives import serialization

    private_path, public_path = Path(private_path), Path(public_path)
    for p in (private_path, public_path):
        if p.exists():
            raise GovernanceError(f"{p} exists; refusing to overwrite a key")
    key = _ed25519().Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(key.public_key())


@dataclass(frozen=True)
class Signer:
    """A private key and its id (never logged, never written to a tag)."""

    key: Any
    key_id: str

    def __repr__(self) -> str:  # keep the key out of any log line
        return f"Signer(key_id={self.key_id!r})"


def load_signer(path: str | Path) -> Signer:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise GovernanceError(f"cannot read the private key {path}: {type(exc).__name__}") from None
    if not isinstance(key, _ed25519().Ed25519PrivateKey):
        raise GovernanceError(f"{path} is not an Ed25519 private key")
    return Signer(key, key_id(key.public_key()))


def signer_from_env(var: str) -> Signer | None:
    """The private key named by environment variable ``var`` (a PEM file), or None."""
    path = os.environ.get(var)
    return load_signer(path) if path else None


def load_public_keys(paths: list[str | Path]) -> dict[str, Any]:
    """``{key_id: public key}`` from PEM files (a file may hold one key)."""
    from cryptography.hazmat.primitives import serialization

    out = {}
    for p in paths:
        try:
            key = serialization.load_pem_public_key(Path(p).read_bytes())
        except (OSError, ValueError) as exc:
            raise GovernanceError(f"cannot read the public key {p}: {type(exc).__name__}") from None
        if not isinstance(key, _ed25519().Ed25519PublicKey):
            raise GovernanceError(f"{p} is not an Ed25519 public key")
        out[key_id(key)] = key
    return out


def canonical(statement: dict) -> bytes:
    return json.dumps(statement, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("utf-8")


def signed_value(value: str) -> str:
    """How a tag value appears in a statement (long ones by digest)."""
    value = str(value)
    if len(value) <= DIGEST_OVER:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()


def value_matches(signed: str | None, value: str) -> bool:
    return signed is not None and signed == signed_value(value)


def sign(signer: Signer, kind: str, *, model: str, version: str | None, created: int | None,
         source: str | None, tags: dict[str, str] | None = None, **extra: Any) -> str:
    """A signed statement as a tag value."""
    statement = {"v": STATEMENT_VERSION, "kind": kind, "key_id": signer.key_id, "model": model,
                 "version": None if version is None else str(version),
                 "created": None if created is None else int(created), "source": source,
                 "time": round(time.time(), 3),
                 "tags": {k: signed_value(v) for k, v in (tags or {}).items()}, **extra}
    sig = signer.key.sign(canonical(statement))
    return json.dumps({"statement": statement, "sig": base64.b64encode(sig).decode()},
                      sort_keys=True, separators=(",", ":"))


class InvalidStatement(GovernanceError):
    """A statement that does not verify: why, in one line."""


def statement_kind(value: str | None) -> str | None:
    """The ``kind`` a tag value claims (unverified), or None."""
    try:
        return json.loads(value)["statement"]["kind"]
    except (TypeError, ValueError, KeyError):
        return None


def verify(value: str | None, keys: dict[str, Any], *, kind: str) -> dict:
    """The statement in a tag value, when its signature verifies with one of ``keys`` and it is
    of ``kind``. Raises :class:`InvalidStatement` saying why not."""
    from cryptography.exceptions import InvalidSignature

    if not value:
        raise InvalidStatement("no signed statement")
    try:
        doc = json.loads(value)
        statement, sig = doc["statement"], base64.b64decode(doc["sig"], validate=True)
        kid = statement["key_id"]
    except (ValueError, KeyError, TypeError):
        raise InvalidStatement("the signature tag is not a signed statement") from None
    if statement.get("kind") != kind:
        raise InvalidStatement(f"a {statement.get('kind')!r} statement, not {kind!r}")
    key = keys.get(kid)
    if key is None:
        raise InvalidStatement(f"signed with key {str(kid)[:16]!r}, which is not a valid "
                               f"{'admin' if kind == KIND_OVERRIDE else 'gate'} key here "
                               "(unknown or rotated out)")
    try:
        key.verify(sig, canonical(statement))
    except InvalidSignature:
        raise InvalidStatement(f"the signature does not verify with key {kid}") from None
    return statement


def check_identity(statement: dict, *, model: str, version: str, created: int | None,
                   source: str | None) -> None:
    """Raise :class:`InvalidStatement` unless the statement is about exactly this version."""
    want = {"model": model, "version": str(version),
            "created": None if created is None else int(created), "source": source}
    for k, v in want.items():
        if statement.get(k) != v:
            raise InvalidStatement(f"the statement is about another version ({k} "
                                   f"{statement.get(k)!r}, this version has {v!r})")
