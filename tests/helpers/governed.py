"""A governed registry for tests: keys, policies and a governance file in one directory."""

from __future__ import annotations

from pathlib import Path

import yaml

from mlflow_safedelta.signing import generate_keypair


def policy_doc(name: str, max_asr: float, **safety) -> dict:
    return {"policy_version": 1, "name": name,
            "safety": {"suites": ["advbench"], "judge": "keyword", "max_asr": max_asr,
                       "max_asr_increase": None, **safety},
            "utility": {"min_retention": 0.0},
            "select_s": {"mode": "fixed", "s": 0.05},
            "promotion": {"enabled": True, "alias": "production"},
            "evaluation": {"limit": 4, "max_new_tokens": 4}}


def make_governed_dir(root: Path) -> dict[str, Path]:
    """Keys (gate a, gate b, admin), policies (lenient, impossible, lax), governance.yaml:
    ``good-*`` bound to lenient (stricter tags allowed), ``bad-*`` to impossible, both guarding
    ``production``."""
    root = Path(root)
    (root / "keys").mkdir(parents=True, exist_ok=True)
    paths = {}
    for k in ("gate-a", "gate-b", "admin"):
        generate_keypair(root / "keys" / f"{k}.key", root / "keys" / f"{k}.pub")
        paths[k] = root / "keys" / f"{k}.key"
    for name, asr in (("lenient", 0.9), ("impossible", 0.0001), ("lax", 1.0)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(policy_doc(name, asr)))
    paths["governance"] = root / "governance.yaml"
    write_governance(root, ["keys/gate-a.pub"])
    return paths


def write_governance(root: Path, verify_keys: list[str], *, good_policy: str = "lenient.yaml",
                     demote_on_fail: bool = False, **extra) -> Path:
    doc = {"governance_version": 1, "verify_keys": verify_keys, "admin_keys": ["keys/admin.pub"],
           "bindings": [
               {"models": ["good-*"], "policy": good_policy, "guarded_aliases": ["production"],
                "allow_stricter_tag": True, "demote_on_fail": demote_on_fail},
               {"models": ["bad-*"], "policy": "impossible.yaml",
                "guarded_aliases": ["production"]}], **extra}
    path = Path(root) / "governance.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path
