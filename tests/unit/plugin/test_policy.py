"""Policies: shipped files load, bad files fail naming the field, the reason and the file."""

from __future__ import annotations

import pytest
import yaml

from mlflow_safedelta.errors import PolicyError
from mlflow_safedelta.policy import (SHIPPED_POLICIES, Policy, load_policy, parse_policy,
                                     policy_schema, policy_to_yaml)


@pytest.mark.parametrize("name", SHIPPED_POLICIES)
def test_each_shipped_policy_loads(name):
    policy = load_policy(name)
    assert policy.name == name
    assert policy.policy_version == 1
    assert policy.source == name
    assert policy.safety.suites


def test_shipped_policies_differ_in_strictness():
    strict, default, permissive = (load_policy(n) for n in ("strict", "default", "permissive"))
    assert strict.safety.max_asr < default.safety.max_asr < permissive.safety.max_asr
    assert strict.select_s.mode == "target" and strict.select_s.target_max_asr is not None


def test_default_when_nothing_given():
    assert load_policy(None).name == "default"


def _write(tmp_path, data) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def _base() -> dict:
    return yaml.safe_load(policy_to_yaml(load_policy("default")))


def test_round_trip_through_file(tmp_path):
    data = _base()
    data["safety"]["max_asr"] = 0.123
    policy = load_policy(_write(tmp_path, data))
    assert policy.safety.max_asr == 0.123
    assert policy.source.endswith("p.yaml")


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (lambda d: d["safety"].update(max_asr=1.5), "safety.max_asr", "less than or equal to 1"),
        (lambda d: d["safety"].update(max_asr_typo=0.1), "safety.max_asr_typo", "unknown field"),
        (lambda d: d.pop("policy_version"), "policy_version", "required field is missing"),
        (lambda d: d.update(policy_version=2), "policy_version", "1"),
        (lambda d: d["promotion"].update(alias="has space"), "promotion.alias", "pattern"),
        (lambda d: d["select_s"].update(mode="target", target_max_asr=None), "select_s",
         "target_max_asr"),
        (lambda d: d["select_s"].update(mode="guess"), "select_s.mode", "'fixed' or 'target'"),
        (lambda d: d["evaluation"].update(limit=0), "evaluation.limit", "greater than 0"),
        (lambda d: d["safety"].update(max_asr_per_suite={"other": 0.1}), "safety",
         "'other'"),
    ],
)
def test_invalid_file_names_field_reason_and_path(tmp_path, mutate, field, reason):
    data = _base()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    msg = str(info.value)
    assert path in msg
    assert f"  {field}" in msg
    assert reason in msg


def test_not_yaml_and_not_mapping(tmp_path):
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(_write(tmp_path, "a: [unclosed"))
    with pytest.raises(PolicyError, match="expected a mapping"):
        load_policy(_write(tmp_path, "- 1\n- 2\n"))


def test_unknown_name_lists_shipped():
    with pytest.raises(PolicyError) as info:
        load_policy("nonexistent-policy")
    assert "default, strict, permissive" in str(info.value)


def test_schema_describes_every_field():
    schema = policy_schema()
    assert schema["additionalProperties"] is False
    defs = schema["$defs"]
    for model in ("SafetyThresholds", "UtilityThresholds", "SelectS", "Promotion", "Evaluation"):
        for name, prop in defs[model]["properties"].items():
            assert prop.get("description"), f"{model}.{name} has no description"


def test_shipped_yaml_comments_every_field():
    """The shipped default.yaml is the documentation: every key has a comment line above it."""
    from importlib import resources

    text = resources.files("mlflow_safedelta.policies").joinpath("default.yaml").read_text()
    import re

    lines = text.splitlines()
    keys = 0
    for i, line in enumerate(lines):
        m = re.match(r"^\s*([a-z_]+):", line)
        if not m or m.group(1) in ("safety", "utility", "select_s", "promotion", "evaluation"):
            continue
        keys += 1
        if m.group(1) == "s_max":  # documented together with s_min
            continue
        assert lines[i - 1].strip().startswith("#"), f"no comment above {m.group(1)!r}"
    assert keys == len(_base()) - 5 + sum(len(v) for v in _base().values() if isinstance(v, dict))


def test_parse_policy_from_dict():
    p = parse_policy({"policy_version": 1, "name": "x"})
    assert isinstance(p, Policy) and p.safety.max_asr == 0.2


def _cli(*args):
    from click.testing import CliRunner

    from mlflow_safedelta.cli import cli

    return CliRunner().invoke(cli, list(args))


def test_policy_cli(tmp_path):
    import json

    ok = _write(tmp_path, _base())
    res = _cli("policy", "validate", ok, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["valid"] is True
    bad = _base()
    bad["utility"]["min_retention"] = -1
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(bad))
    res = _cli("policy", "validate", str(bad_path))
    assert res.exit_code == 2 and "utility.min_retention" in res.output and str(bad_path) in res.output
    shown = _cli("policy", "show", "strict")
    assert shown.exit_code == 0 and yaml.safe_load(shown.stdout)["safety"]["max_asr"] == 0.05
    schema = json.loads(_cli("policy", "schema").stdout)
    assert schema == policy_schema()


def test_s_search_range_follows_the_budget_rule_unless_given():
    """The two budget rules' s differ by orders of magnitude: unset bounds take the rule's own
    default s / 100 .. x 10; a fixed s in a shipped policy sits on the rule's scale."""
    from safedelta.config import DEFAULT_S

    HEAD = {"policy_version": 1, "name": "t"}

    for budget in ("default", "official"):
        sel = parse_policy({**HEAD, "select_s": {"mode": "target", "target_max_asr": 0.1,
                                         "budget": budget}}).select_s
        assert sel.search_range == pytest.approx((DEFAULT_S[budget] / 100,
                                                  DEFAULT_S[budget] * 10))
    sel = parse_policy({**HEAD, "select_s": {"mode": "target", "target_max_asr": 0.1,
                                     "s_min": 1e-6}}).select_s
    assert sel.search_range == pytest.approx((1e-6, DEFAULT_S["default"] * 10))
    with pytest.raises(PolicyError, match="s_min"):
        parse_policy({**HEAD, "select_s": {"s_min": 1e-3, "budget": "default"}})  # above 4e-5
    for name in SHIPPED_POLICIES:
        sel = load_policy(name).select_s
        lo, hi = sel.search_range
        assert lo <= DEFAULT_S[sel.budget] <= hi
        if sel.s is not None:
            assert lo <= sel.s <= hi, f"{name}: s={sel.s} is off the {sel.budget} budget's scale"


def test_policy_for_version_is_the_tag_else_default_and_a_snapshot_keeps_the_content(tmp_path):
    from mlflow_safedelta.policy import (
        policy_fingerprint,
        policy_for_version,
        policy_from_snapshot,
        policy_snapshot,
        policy_to_yaml,
    )

    assert policy_for_version("m", {}).name == "default"
    assert policy_for_version("m", {"safedelta.policy": "strict"}).name == "strict"
    f = tmp_path / "team.yaml"
    f.write_text(policy_to_yaml(load_policy("permissive")))
    pol = policy_for_version("m", {"safedelta.policy": str(f)})
    snap = policy_snapshot(pol)
    f.unlink()  # the snapshot does not need the file any more
    again = policy_from_snapshot(snap)
    assert again == pol and policy_fingerprint(again) == policy_fingerprint(pol)
    assert again.source == str(f)
