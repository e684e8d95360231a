"""Governance file, "stricter or equal", signed statements and the trust rule of gate_decision."""

from __future__ import annotations

import os
import stat

import pytest
import yaml

from mlflow_safedelta import governance, guard, signing
from mlflow_safedelta.errors import GovernanceError
from mlflow_safedelta.governance import (
    FIELD_RULES,
    is_stricter_or_equal,
    looser_fields,
    parse_governance,
    resolve_policy,
)
from mlflow_safedelta.policy import Policy, load_policy, parse_policy
from mlflow_safedelta.vocab import GATE, RECORDED, SKIP, gate_decision
from tests.helpers.governed import make_governed_dir, policy_doc


def _leaf_paths(model: type, prefix: str = "") -> set[str]:
    out = set()
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, Policy.__mro__[1]) and \
                f"{prefix}{name}" not in FIELD_RULES:
            out |= _leaf_paths(ann, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def test_every_policy_field_declares_how_it_compares():
    """A new policy field (e.g. a confidence bound) must say in FIELD_RULES which way is
    stricter; until then it must be equal, and this test names it."""
    assert _leaf_paths(Policy) - set(FIELD_RULES) == set()


def _p(**safety) -> Policy:
    return parse_policy(policy_doc("p", safety.pop("max_asr", 0.2), **safety))


@pytest.mark.parametrize("candidate,stricter", [
    (dict(max_asr=0.2), True),
    (dict(max_asr=0.1), True),
    (dict(max_asr=0.3), False),
    (dict(max_asr=None), False),  # removing a limit is laxer
    (dict(max_asr=0.2, suites=["advbench", "harmbench"]), True),  # more suites
    (dict(max_asr=0.2, max_asr_per_suite={"advbench": 0.5}), False),  # effective limit laxer
    (dict(max_asr=0.2, max_asr_per_suite={"advbench": 0.1}), True),
    (dict(max_asr=0.2, judge="llama-guard"), False),  # another judge is not comparable
    (dict(max_asr=0.2, max_over_refusal=0.1, over_refusal_suites=["xstest-safe"]), True),
])
def test_stricter_or_equal_field_by_field(candidate, stricter):
    assert is_stricter_or_equal(_p(**candidate), _p(max_asr=0.2)) is stricter


def test_shipped_policies_compare_as_documented():
    d, s, p = (load_policy(n) for n in ("default", "strict", "permissive"))
    assert is_stricter_or_equal(d, d)
    assert not is_stricter_or_equal(p, d)
    # strict keeps less utility (0.7 < 0.8) and generates longer answers: not stricter than default
    assert {x.split(":")[0] for x in looser_fields(s, d)} == {"utility.min_retention",
                                                              "evaluation.max_new_tokens"}


@pytest.fixture
def gov(tmp_path, monkeypatch):
    paths = make_governed_dir(tmp_path)
    monkeypatch.setenv("SAFEDELTA_GOVERNANCE", str(paths["governance"]))
    return {"gov": governance.current(), **paths, "root": tmp_path}


def test_resolve_policy_binding_decides(gov, tmp_path):
    g = gov["gov"]
    pol, bound, notes = resolve_policy("bad-bot", {"safedelta.policy": "permissive"}, gov=g)
    assert pol.name == bound.name == "impossible" and "ignored" in notes[0]
    stricter = tmp_path / "s.yaml"
    stricter.write_text(yaml.safe_dump(policy_doc("s", 0.5)))
    laxer = tmp_path / "l.yaml"
    laxer.write_text(yaml.safe_dump(policy_doc("l", 0.95)))
    assert resolve_policy("good-bot", {"safedelta.policy": str(stricter)}, gov=g)[0].name == "s"
    pol, _, notes = resolve_policy("good-bot", {"safedelta.policy": str(laxer)}, gov=g)
    assert pol.name == "lenient" and "not stricter" in notes[0]
    assert resolve_policy("other", {}, gov=g)[0].name == "default"  # no binding matches
    pol, bound, notes = resolve_policy("x", {"safedelta.policy": "strict"}, gov=None)
    assert pol.name == "strict" and bound is None and "unenforced" in notes[0]


def test_a_broken_governance_file_fails_closed(tmp_path, monkeypatch):
    bad = tmp_path / "g.yaml"
    bad.write_text(yaml.safe_dump({"governance_version": 1, "verify_keys": ["nope.pub"],
                                   "bindings": [{"models": ["*"], "policy": "default"}]}))
    monkeypatch.setenv("SAFEDELTA_GOVERNANCE", str(bad))
    with pytest.raises(GovernanceError, match="nope.pub"):
        governance.current()
    bad.write_text(yaml.safe_dump({"governance_version": 1, "verify_keys": ["a"],
                                   "bindings": [], "typo": 1}))
    with pytest.raises(GovernanceError, match="typo"):
        parse_governance(bad)
    monkeypatch.setenv("SAFEDELTA_GOVERNANCE", str(tmp_path / "missing.yaml"))
    with pytest.raises(GovernanceError):
        governance.current()


class _MV:
    def __init__(self, name="m", version="3", created=1000, source="s3://x", tags=None):
        self.name, self.version, self.creation_timestamp, self.source = name, version, created, source
        self.tags = tags or {}


def test_statements_verify_only_with_a_valid_key_for_that_version(gov):
    g, gate = gov["gov"], signing.load_signer(gov["gate-a"])
    mv = _MV()
    value = signing.sign(gate, signing.KIND_STATE, model="m", version="3", created=1000,
                         source="s3://x", tags={"safedelta.status": "passed", "safedelta.reason":
                                                "r" * 500})
    st = guard.valid_statement(g, mv, value=value)
    assert st["tags"]["safedelta.reason"].startswith("sha256:")  # long values by digest
    for other in (_MV(version="4"), _MV(created=1001), _MV(source="s3://y"), _MV(name="n")):
        with pytest.raises(signing.InvalidStatement, match="another version"):
            guard.valid_statement(g, other, value=value)
    tampered = value.replace("passed", "failed")
    with pytest.raises(signing.InvalidStatement, match="does not verify"):
        signing.verify(tampered, g.verify_keys, kind=signing.KIND_STATE)
    rotated = signing.sign(signing.load_signer(gov["gate-b"]), signing.KIND_STATE, model="m",
                           version="3", created=1000, source="s3://x")
    with pytest.raises(signing.InvalidStatement, match="rotated out"):
        guard.valid_statement(g, mv, value=rotated)
    with pytest.raises(guard.Refused, match="gate only"):
        guard.check_tag_write(g, _MV(tags={"safedelta.signature": value}), "safedelta.status",
                              "failed")
    guard.check_tag_write(g, _MV(tags={"safedelta.signature": value}), "safedelta.status",
                          "passed")  # the value the gate signed


def test_key_files(tmp_path):
    kid = signing.generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    assert stat.S_IMODE(os.stat(tmp_path / "k.key").st_mode) == 0o600
    assert signing.load_signer(tmp_path / "k.key").key_id == kid
    assert kid not in repr(signing.load_signer(tmp_path / "k.key").key)
    with pytest.raises(GovernanceError, match="refusing to overwrite"):
        signing.generate_keypair(tmp_path / "k.key", tmp_path / "other.pub")
    with pytest.raises(GovernanceError, match="not an Ed25519 private key|cannot read"):
        signing.load_signer(tmp_path / "k.pub")


def test_untrusted_state_never_skips_the_gate():
    forged = {"safedelta.status": "passed", "safedelta.parent": "models:/a/1"}
    assert gate_decision(forged)[0] == RECORDED
    assert gate_decision(forged, state_trusted=False)[0] == GATE
    role = {"safedelta.role": "protected", "safedelta.parent": "models:/a/1"}
    assert gate_decision(role)[0] == SKIP
    assert gate_decision(role, state_trusted=False)[0] == GATE


def test_the_example_governance_file_is_valid():
    from pathlib import Path

    from mlflow_safedelta.governance import GovernanceFile

    root = Path(__file__).resolve().parents[3]
    spec = GovernanceFile.model_validate(
        yaml.safe_load((root / "policies" / "governance.example.yaml").read_text()))
    assert spec.bindings[0].guarded_aliases == ["production", "canary"]
    assert all(load_policy(b.policy) for b in spec.bindings)
