"""Content fingerprints of checkpoints and files, used as cache keys.

A checkpoint's fingerprint is a BLAKE2b digest over its weight files' *contents* (so a copy on
another machine has the same key). Hashing a large model takes seconds, so digests are memoised
per (path, size, mtime) in ``<cache>/fingerprints.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 16 << 20


def default_cache_dir() -> Path:
    """``$SAFEDELTA_CACHE`` or ``~/.cache/safedelta``."""
    return Path(os.environ.get("SAFEDELTA_CACHE") or Path.home() / ".cache" / "safedelta")


def file_digest(path: str | Path, *, cache_dir: str | Path | None = None) -> str:
    """BLAKE2b-128 hex digest of a file's bytes, memoised by (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    memo_file = Path(cache_dir or default_cache_dir()) / "fingerprints.json"
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    memo: dict[str, str] = {}
    if memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    memo[key] = h.hexdigest()
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError:  # a read-only cache only costs speed
        pass
    return memo[key]


def checkpoint_fingerprint(path: str | Path, *, cache_dir: str | Path | None = None) -> str:
    """Fingerprint of a model directory: its weight files (by content) and config.json."""
    from safedelta.errors import MissingCheckpoint

    path = Path(path)
    weights = sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".bin", ".pt"))
    if not weights:
        raise MissingCheckpoint(f"no weight files to fingerprint in '{path}'")
    h = hashlib.blake2b(digest_size=16)
    for f in weights:  # bytes only: nothing is unpickled
        h.update(f.name.encode())
        h.update(file_digest(f, cache_dir=cache_dir).encode())
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    return h.hexdigest()
