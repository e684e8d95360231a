"""Re-gating a version that already has a verdict, on a local SQLite registry (the test's own
tracking URI, see tests/conftest.py).

- a recorded verdict counts only under the same policy *content* (``safedelta.policy_sha256``):
  the same policy answers from the record, an edited one (same name) gates again;
- a recorded passing verdict still moves the policy's alias when promotion is asked and the alias
  is not on the protected version (``gate --promote`` after the alias moved, or after a first gate
  with ``--no-promote``); ``--no-promote`` leaves it alone;
- a bad ``--policy`` on a gated version is an error that leaves the record as it was.

The gate job is the real one (downloads, Hessians, Safe Delta, run, registration); only the
evaluation is injected (the measuring evaluator of the e2e tests).
"""

from __future__ import annotations

import json
import pytest
from click.testing import CliRunner

from mlflow_safedelta import flavor, registry as reg
from mlflow_safedelta.cli import cli
from mlflow_safedelta.gate_job import run_gate_job
from mlflow_safedelta.policy import policy_fingerprint
from tests.e2e.test_gate_job import MeasuringEvaluator, _policy
from tests.helpers.tiny import save_tiny_pair

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """aligned v1 and bot v1 (safedelta flavor, parent models:/aligned/1) in a SQLite store of
    this module, bot v1 gated once under ``_policy()`` without promotion (one gate job, ~1 min on
    two cores, shared by the tests below, which run in file order)."""
    root = tmp_path_factory.mktemp("gate-reuse")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cl = reg.client(uri)
    exp = cl.create_experiment("sources")
    for name, seed, kw in (("aligned", 0, {"role": "aligned"}),
                           ("bot", 1, {"parent": "models:/aligned/1"})):
        d = save_tiny_pair(root / name, seed=seed)
        flavor.save_model(str(d), root / f"saved-{name}", **kw)
        run = cl.create_run(exp)
        reg.register_saved_model(cl, root / f"saved-{name}", name, run_id=run.info.run_id)
        cl.set_terminated(run.info.run_id)
    out = {"uri": uri, "client": cl, "cache": root / "cache"}
    out["first"] = _gate(out, _policy(), promote=False)
    return out


def _gate(registry, policy, **kw):
    kw.setdefault("evaluator", MeasuringEvaluator())
    return run_gate_job("bot", "1", policy=policy, tracking_uri=registry["uri"], progress=False,
                        cache_dir=registry["cache"], **kw)


def _alias(cl, alias="production"):
    v = (cl.get_registered_model("bot").aliases or {}).get(alias)
    return None if v is None else str(v)


def test_policy_fingerprint_ignores_form_not_content(tmp_path):
    a = _policy()
    text = ("# a comment\npolicy_version: 1\nname: lenient-test\n"
            "evaluation: {max_new_tokens: 4, limit: 4}\n"
            "promotion: {alias: production}\nselect_s: {s: 0.05}\n"
            "utility: {min_retention: 0.0}\n"
            "safety: {max_asr_increase: null, max_asr: 0.9, judge: keyword, suites: [advbench]}\n")
    (tmp_path / "p.yaml").write_text(text)
    from mlflow_safedelta.policy import load_policy

    same = load_policy(tmp_path / "p.yaml")
    assert policy_fingerprint(same) == policy_fingerprint(a)  # order, comments, defaults
    assert policy_fingerprint(_policy(0.8)) != policy_fingerprint(a)  # a threshold
    assert policy_fingerprint(_policy(promote=False)) != policy_fingerprint(a)
    assert len(policy_fingerprint(a)) == 64


def test_recorded_pass_promotes_on_request(registry):
    cl, first, pol = registry["client"], registry["first"], _policy()
    assert first.verdict == "passed" and first.promoted_alias is None
    assert _alias(cl) is None
    sha = policy_fingerprint(pol)
    tags = reg.version_tags(cl, "bot", "1")
    assert tags[reg.TAG_POLICY_SHA256] == sha and first.policy["sha256"] == sha
    assert first.policy["promotion_alias"] == "production"
    assert reg.version_tags(cl, "bot", first.protected_version)[reg.TAG_POLICY_SHA256] == sha

    # the same policy again, with promotion: the record answers, and the alias moves
    ev = MeasuringEvaluator()
    again = _gate(registry, pol, promote=True, evaluator=ev)
    assert not ev.calls and again.run_id == first.run_id
    assert again.verdict == "passed" and again.promoted_alias == "production"
    assert _alias(cl) == first.protected_version

    # the alias moved elsewhere meanwhile: --promote moves it back, --no-promote does not
    cl.set_registered_model_alias("bot", "production", "1")
    assert _gate(registry, pol, promote=False, evaluator=ev).verdict == "passed"
    assert _alias(cl) == "1"
    assert _gate(registry, pol, promote=True, evaluator=ev).promoted_alias == "production"
    assert _alias(cl) == first.protected_version and not ev.calls

    # the CLI without --policy: the record under the policy it names (its gate JSON keeps the
    # alias that policy promotes to)
    cl.set_registered_model_alias("bot", "production", "1")
    out = CliRunner().invoke(cli, ["gate", "bot", "1", "--promote", "--json", "--tracking-uri",
                                   registry["uri"]], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    d = json.loads(out.stdout)
    assert d["promoted_alias"] == "production" and d["policy"]["sha256"] == sha
    assert _alias(cl) == first.protected_version
    rows = json.loads(CliRunner().invoke(cli, ["status", "bot", "--json", "--tracking-uri",
                                               registry["uri"]]).stdout)
    assert {r["version"]: r["policy_sha256"] for r in rows}["1"] == sha


def test_bad_policy_on_a_gated_version_leaves_the_record(registry):
    cl = registry["client"]
    before = reg.version_tags(cl, "bot", "1")
    res = _gate(registry, "no-such-policy")
    assert res.verdict == "error" and "no policy 'no-such-policy'" in res.reason
    assert reg.version_tags(cl, "bot", "1") == before


def test_edited_policy_gates_again(registry):
    """Same name, tightened content: gated again, not answered with the stale pass."""
    cl, first = registry["client"], registry["first"]
    promoted_before = _alias(cl)
    tightened = _policy(0.0001)
    assert tightened.name == first.policy["name"]
    ev = MeasuringEvaluator()
    redo = _gate(registry, tightened, promote=True, evaluator=ev)
    assert len(ev.calls) == 1 and redo.run_id != first.run_id
    assert redo.verdict == "failed" and redo.promoted_alias is None
    assert redo.protected_version not in (None, first.protected_version)
    assert redo.policy["sha256"] == policy_fingerprint(tightened)
    tags = reg.version_tags(cl, "bot", "1")
    assert tags[reg.TAG_STATUS] == "failed"
    assert tags[reg.TAG_POLICY_SHA256] == policy_fingerprint(tightened)
    assert _alias(cl) == promoted_before  # a failing gate never moves the alias
    # nothing registered was replaced: the first protected version is still there, as it was
    assert reg.version_tags(cl, "bot", first.protected_version)[reg.TAG_VERDICT] == "passed"
    # and the new verdict is now the record under the tightened policy
    assert _gate(registry, tightened, evaluator=ev).run_id == redo.run_id and len(ev.calls) == 1
