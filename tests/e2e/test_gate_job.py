"""The gate job end to end against a real ``mlflow server`` (SQLite, loopback).

The evaluator is injected (generation on real suites takes minutes); it measures the models it is
given: the ASR it reports for the protected model grows with how much of the fine-tuning delta
Safe Delta kept (||P - A|| / ||F - A||), and utility retention is that same ratio. Everything else
(downloads, Hessian cache, Safe Delta, run logging, registration, tags, alias) is the real code.
"""

from __future__ import annotations

import os

import json
from pathlib import Path

import pytest

import mlflow

from mlflow_safedelta import flavor, registry as reg
from mlflow_safedelta.gate_job import run_gate_job
from mlflow_safedelta.hessian_cache import prepare_parent
from mlflow_safedelta.policy import parse_policy
from tests.helpers.tiny import make_tiny_model, make_tiny_tokenizer, save_tiny_pair

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.usefixtures("fluent_on_server")]  # tests log with the fluent API


def _policy(max_asr: float = 0.9, *, promote: bool = True, name: str = "lenient-test"):
    return parse_policy({
        "policy_version": 1, "name": name,
        "safety": {"suites": ["advbench"], "judge": "keyword", "max_asr": max_asr,
                   "max_asr_increase": None},
        "utility": {"min_retention": 0.0},
        "select_s": {"mode": "fixed", "s": 0.05},
        "promotion": {"enabled": promote, "alias": "production"},
        "evaluation": {"limit": 4, "max_new_tokens": 4},
    })


PASSING, FAILING = _policy(0.9, name="lenient-test"), _policy(0.0001, name="impossible-test")


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


class MeasuringEvaluator:
    """Reports metrics derived from the weights it is handed, and records its calls."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, models, policy, *, task_data=None, device=None, cache_dir=None,
                 progress=True):
        self.calls.append({r: str(p) for r, p in models.items()})
        w = {r: _weights(p) for r, p in models.items()}
        for r, p in models.items():  # every model directory must be loadable with a tokenizer
            assert (Path(p) / "config.json").is_file() and (Path(p) / "tokenizer.json").is_file(), r
        a, f = w["aligned"], w["finetuned"]
        names = [n for n in a if n.endswith("proj.weight")]
        ft_delta = sum(float((f[n] - a[n]).float().norm()) for n in names)
        metrics = {"aligned": {"asr.advbench": 0.05}, "finetuned": {"asr.advbench": 0.65}}
        ratio = sum(float((w["protected"][n] - a[n]).float().norm()) for n in names) / ft_delta
        metrics["protected"] = {"asr.advbench": 0.05 + 0.6 * ratio, "utility_retention": ratio,
                                "asr.advbench.n": 4.0}
        return type("Report", (), {"metrics": metrics, "judge": {"judge": "keyword"}})()


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """aligned v1 (safedelta flavor, role aligned) and support-bot v1 (safedelta flavor whose
    parent is models:/aligned@base)."""
    root = tmp_path_factory.mktemp("models")
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    aligned = save_tiny_pair(root / "aligned", seed=0)
    ft = save_tiny_pair(root / "ft", seed=1)
    with mlflow.start_run():
        flavor.log_model(str(aligned), name="model", role="aligned",
                         registered_model_name="aligned")
    cl = mlflow.MlflowClient(mlflow_server.url, mlflow_server.url)
    cl.set_registered_model_alias("aligned", "base", "1")
    with mlflow.start_run():
        flavor.log_model(str(ft), name="model", parent="models:/aligned@base",
                         registered_model_name="support-bot")
    cl.update_model_version("support-bot", "1", description="Support bot tuned on tickets; the "
                                                           "registrant's own words")
    yield {"root": root, "aligned": aligned, "client": cl}
    _reset_mlflow_uris()


def _reset_mlflow_uris():
    """Undo the process-global URIs so later modules get their own stores."""
    import os

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


def _versions(cl, name):
    return sorted(int(v.version) for v in cl.search_model_versions(f"name='{name}'"))


def test_passing_gate_registers_protected_version_and_promotes(mlflow_server, registered,
                                                              tmp_path):
    cl = registered["client"]
    ev = MeasuringEvaluator()
    res = run_gate_job("support-bot", "1", policy=PASSING, tracking_uri=mlflow_server.url,
                       evaluator=ev, progress=False, work_dir=tmp_path / "work")

    assert res.verdict == "passed", res.reason
    assert res.parent == "models:/aligned/1"  # the alias was resolved
    assert res.protected_version == "2" and res.promoted_alias == "production"
    assert [set(c) for c in ev.calls] == [{"aligned", "finetuned", "protected"}]
    assert all(r.passed for r in res.rules) and {r.rule for r in res.rules} == {
        "max_asr", "min_utility_retention"}
    # Safe Delta moved the weights back towards the parent
    assert 0.0 <= res.metrics["protected"]["utility_retention"] < 1.0

    ft = reg.version_tags(cl, "support-bot", "1")
    assert ft[reg.TAG_STATUS] == "passed" and ft[reg.TAG_PROTECTED_VERSION] == "2"
    assert ft[reg.TAG_RUN_ID] == res.run_id and ft[reg.TAG_POLICY] == "lenient-test"
    assert ft[reg.TAG_PARENT] == "models:/aligned@base"  # lineage from the flavor, as recorded
    pv = reg.version_tags(cl, "support-bot", "2")
    assert pv[reg.TAG_ROLE] == "protected" and pv[reg.TAG_STATUS] == "protected-output"
    assert pv[reg.TAG_PROTECTED_FROM] == "support-bot/1"
    assert pv[reg.TAG_PARENT] == "models:/aligned/1" and pv[reg.TAG_S] == "0.05"
    assert pv[reg.TAG_RUN_ID] == res.run_id and pv[reg.TAG_VERDICT] == "passed"
    assert cl.get_model_version_by_alias("support-bot", "production").version == "2"

    # one run holding params, per-role metrics, reports and the gate JSON
    runs = cl.search_runs([cl.get_experiment_by_name("safedelta-gate").experiment_id])
    assert [r.info.run_id for r in runs] == [res.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["s"] == "0.05"
    assert run.data.metrics["protected.asr.advbench"] == pytest.approx(
        res.metrics["protected"]["asr.advbench"])
    assert "finetuned.asr.advbench" in run.data.metrics
    arts = {a.path for a in cl.list_artifacts(res.run_id)}
    assert {"engine", "safedelta"} <= arts
    # at a glance: the run's name and a sortable metric carry the verdict, the fine-tune's
    # description starts with it (the registrant's text below), the protected model is a
    # LoggedModel of the run with its evaluation metrics attached
    assert run.info.run_name == "PASSED · gate-support-bot-v1"
    assert run.data.metrics["gate.passed"] == 1.0
    desc = cl.get_model_version("support-bot", "1").description
    assert desc.startswith("✅ PASSED under policy lenient-test: all ")
    assert desc.endswith("registrant's own words")
    pmv = cl.get_model_version("support-bot", "2")
    assert pmv.description.startswith("✅ PASSED under policy lenient-test")
    assert pmv.source.startswith("models:/m-")  # the UI links the version to its LoggedModel
    lm = cl.get_logged_model(pmv.source.removeprefix("models:/"))
    assert lm.source_run_id == res.run_id and lm.name == "protected_model"
    lm_metrics = {m.key: m.value for m in lm.metrics}
    assert lm_metrics["asr.advbench"] == pytest.approx(res.metrics["protected"]["asr.advbench"])
    assert lm_metrics["gate.passed"] == 1.0
    gate = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=res.run_id, artifact_path="safedelta/gate.json",
        dst_path=str(tmp_path / "g"))).read_text())
    assert gate == json.loads(json.dumps(res.to_dict()))
    assert res.run_url and res.run_id in res.run_url

    # the parent now carries its Hessian cache for other machines
    parent = reg.version_tags(cl, "aligned", "1")
    assert parent[reg.TAG_HESSIAN_RUN] and parent[reg.TAG_HESSIAN_KEY]
    assert cl.list_artifacts(parent[reg.TAG_HESSIAN_RUN], f"hessians/{parent[reg.TAG_HESSIAN_KEY]}")

    # the protected version is a safedelta model that records its parent and generates
    pyf = mlflow.pyfunc.load_model("models:/support-bot@production")
    assert len(pyf.predict(["hello"], params={"max_new_tokens": 3})) == 1
    mlmodel = pyf.metadata.flavors["safedelta"]
    assert mlmodel["role"] == "protected" and mlmodel["parent_uri"] == "models:/aligned/1"
    assert mlmodel["safedelta_config"]["s"] == 0.05

    # idempotent: a second call returns the stored verdict and registers nothing
    again = run_gate_job("support-bot", "1", policy=PASSING, tracking_uri=mlflow_server.url,
                         evaluator=ev, progress=False)
    assert again.to_dict() == res.to_dict() and len(ev.calls) == 1
    assert _versions(cl, "support-bot") == [1, 2]
    # the protected output is never gated itself
    assert run_gate_job("support-bot", "2", tracking_uri=mlflow_server.url,
                        evaluator=ev, progress=False).verdict == "error"
    assert len(ev.calls) == 1


def test_failing_transformers_flavor_version_is_not_promoted(mlflow_server, registered, tmp_path):
    """A version logged with the transformers flavor plus a safedelta.parent tag is gated too;
    a failing verdict registers the protected version but leaves the alias where it was.
    Self-contained: its own registered model and alias, and the parent's Hessians attached by
    ``prepare`` from another cache (another machine), as the gate must download them."""
    cl = registered["client"]
    name = "tf-bot"
    model = make_tiny_model(arch="llama", seed=2)
    with mlflow.start_run():
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": make_tiny_tokenizer()}, name="model",
            task="text-generation", pip_requirements=["transformers", "torch"])
    serving = mlflow.register_model(info.model_uri, name)  # what the alias points at today
    cl.set_registered_model_alias(name, "production", serving.version)
    prepare_parent("models:/aligned/1", tracking_uri=mlflow_server.url,
                   cache_dir=tmp_path / "other-machine-cache", progress=False)
    mv = mlflow.register_model(info.model_uri, name, tags={reg.TAG_PARENT: "models:/aligned/1"})
    ev = MeasuringEvaluator()
    res = run_gate_job(name, mv.version, policy=FAILING,
                       tracking_uri=mlflow_server.url, evaluator=ev, progress=False)

    assert res.verdict == "failed"
    (rule,) = [r for r in res.rules if not r.passed]
    assert rule.rule == "max_asr" and "0.0001" in rule.message
    assert res.promoted_alias is None and res.protected_version is not None
    assert cl.get_model_version_by_alias(name, "production").version == serving.version
    tags = reg.version_tags(cl, name, mv.version)
    assert tags[reg.TAG_STATUS] == "failed" and "max_asr" in tags[reg.TAG_REASON]
    assert reg.version_tags(cl, name, res.protected_version)[reg.TAG_VERDICT] == "failed"
    run = cl.get_run(res.run_id)
    assert run.data.params["finetuned_flavor"] == "transformers"
    # this test's cache is empty: the Hessians came from the run attached to the parent
    assert run.data.params["hessian_cache_hit"] == "True"


def test_missing_parent_is_an_error_and_registers_nothing(mlflow_server, registered, tmp_path):
    cl = registered["client"]
    ft = save_tiny_pair(tmp_path / "orphan", seed=3)
    with mlflow.start_run():
        flavor.log_model(str(ft), name="model", registered_model_name="orphan")
    ev = MeasuringEvaluator()
    runs_before = len(cl.search_runs([cl.get_experiment_by_name("safedelta-gate").experiment_id]))
    res = run_gate_job("orphan", "1", tracking_uri=mlflow_server.url, evaluator=ev,
                       progress=False)
    assert res.verdict == "error" and "names no aligned parent" in res.reason
    assert res.exit_code == 2 and not ev.calls
    tags = reg.version_tags(cl, "orphan", "1")
    assert tags[reg.TAG_STATUS] == "error" and "safedelta.parent" in tags[reg.TAG_REASON]
    assert _versions(cl, "orphan") == [1]
    assert not cl.get_registered_model("orphan").aliases
    assert len(cl.search_runs([cl.get_experiment_by_name("safedelta-gate").experiment_id])) == runs_before


def _cli(*args):
    from click.testing import CliRunner

    from mlflow_safedelta.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_reads_the_recorded_verdicts(mlflow_server, registered, tmp_path):
    """gate (idempotent: exit code from the stored verdict), report, status on this server.
    The verdicts are recorded here (injected evaluator): passed v1 -> protected v2 (promoted),
    failed v3, and an error for a version with no parent."""
    url, cl = mlflow_server.url, registered["client"]
    for seed, version, policy in ((4, "1", PASSING), (5, "3", FAILING)):
        ft = save_tiny_pair(tmp_path / f"ft{seed}", seed=seed)
        with mlflow.start_run():
            flavor.log_model(str(ft), name="model", parent="models:/aligned@base",
                             registered_model_name="cli-bot")
        run_gate_job("cli-bot", version, policy=policy, tracking_uri=url,
                     evaluator=MeasuringEvaluator(), progress=False)
    with mlflow.start_run():
        flavor.log_model(str(save_tiny_pair(tmp_path / "orphan", seed=6)), name="model",
                         registered_model_name="cli-orphan")
    run_gate_job("cli-orphan", "1", tracking_uri=url, evaluator=MeasuringEvaluator(),
                 progress=False)
    assert _versions(cl, "cli-bot") == [1, 2, 3, 4]

    passed = _cli("gate", "cli-bot", "1", "--tracking-uri", url, "--json",
                  "--summary-file", str(tmp_path / "summary.md"))
    assert passed.exit_code == 0, passed.output
    d = json.loads(passed.stdout)
    assert d["verdict"] == "passed" and d["protected_version"] == "2"
    assert "PASSED" in (tmp_path / "summary.md").read_text()

    failed = _cli("gate", "cli-bot", "3", "--tracking-uri", url, "--json")
    assert failed.exit_code == 1 and json.loads(failed.stdout)["verdict"] == "failed"
    errored = _cli("gate", "cli-orphan", "1", "--tracking-uri", url, "--json")
    assert errored.exit_code == 2 and "names no aligned parent" in json.loads(errored.stdout)["reason"]
    by_alias = _cli("gate", "cli-bot", "--alias", "production", "--tracking-uri", url)
    assert by_alias.exit_code == 2 and "protected output" in by_alias.stdout
    assert _cli("gate", "cli-bot", "--tracking-uri", url).exit_code == 2  # neither

    rep = _cli("report", "cli-bot", "1", "--format", "json", "--tracking-uri", url)
    assert rep.exit_code == 0 and json.loads(rep.stdout) == d
    md = _cli("report", "cli-bot", "3", "--tracking-uri", url)
    assert "FAILED" in md.stdout and "| ❌ | max_asr |" in md.stdout
    assert _cli("report", "aligned", "1", "--tracking-uri", url).exit_code == 2  # never gated

    st = _cli("status", "cli-bot", "--json", "--tracking-uri", url)
    rows = {r["version"]: r for r in json.loads(st.stdout)}
    assert rows["1"]["status"] == "passed" and rows["2"]["role"] == "protected"
    assert rows["2"]["aliases"] == ["production"] and rows["3"]["status"] == "failed"
    table = _cli("status", "--tracking-uri", url).stdout
    assert "cli-orphan" in table and "error" in table and "protected-output" in table


def test_demo_tiny_runs_the_same_gate(tmp_path):
    """``demo --tiny`` on a local SQLite store: registers the pair, gates, promotes on pass."""
    from mlflow import MlflowClient

    from mlflow_safedelta.commands.demo import MODEL_NAME, PARENT_NAME, _demo_policy, run_demo

    ev = MeasuringEvaluator()
    out = run_demo(tmp_path / ".demo", tiny=True, policy=None, quiet=True, evaluator=ev)
    gate = out["gate"]
    assert out["tracking_uri"].endswith(".demo/mlflow.db")
    assert gate["parent"] == f"models:/{PARENT_NAME}/1" and gate["policy"]["name"] == "demo"
    # the demo policy keeps default's ASR limits and drops the utility rule
    assert {r["rule"] for r in gate["rules"]} == {"max_asr", "max_asr_increase"}
    # on default's two suites of different form, judged by two judges (the worse call counts)
    safety = _demo_policy(None, None).safety
    assert safety.suites == ["advbench", "simplesafetytests"]
    assert safety.judge == ["keyword", "minilm"] and safety.judge_combine == "worst"
    assert _demo_policy(None, None).evaluation.limit == 100  # decidable next to a 10 % parent
    assert _demo_policy(None, None, tiny=True).evaluation.limit == 50
    # the demo's caches are its own: nothing outside .demo, so `rm -rf .demo` starts over
    assert (tmp_path / ".demo" / "cache").is_dir()
    assert os.environ.get("SAFEDELTA_CACHE") != str(tmp_path / ".demo" / "cache")
    expected = all(r["passed"] for r in gate["rules"])
    assert gate["verdict"] == ("passed" if expected else "failed")
    cl = MlflowClient(out["tracking_uri"], out["tracking_uri"])
    assert reg.version_tags(cl, MODEL_NAME, "1")[reg.TAG_STATUS] == gate["verdict"]
    # the demo's registry is governed: its own keys, governance file and the store plugin
    assert gate["policy"]["governance"] == "enforced" and out["registry_uri"].startswith(
        "safedelta+sqlite:///")
    aliases = cl.get_registered_model(MODEL_NAME).aliases or {}
    assert (str(aliases["production"]) if "production" in aliases else None) == (
        gate["protected_version"] if expected else None)
    assert Path(out["artifacts"], "safedelta", "gate.json").is_file()
    assert str(out["artifacts"]).startswith(str(tmp_path / ".demo"))
    # running it again reuses everything and registers nothing new
    again = run_demo(tmp_path / ".demo", tiny=True, quiet=True, evaluator=ev)
    assert again["gate"] == gate and len(ev.calls) == 1
    assert len(cl.search_model_versions(f"name='{MODEL_NAME}'")) == 2


def test_target_mode_searches_s_for_the_policy_asr(tmp_path):
    """select_s.mode=target: the s chosen is the largest tried one whose measured ASR meets the
    target, and the protected model handed back was made with it."""
    from mlflow_safedelta.gate_job import _protect

    a, f = save_tiny_pair(tmp_path / "a", seed=0), save_tiny_pair(tmp_path / "f", seed=1)
    pol = parse_policy({"policy_version": 1, "name": "t", "select_s": {
        "mode": "target", "target_max_asr": 0.3, "s_min": 0.001, "s_max": 0.5}})
    ev = MeasuringEvaluator()

    def evaluator(models, policy, **kw):
        return ev({"aligned": a, "finetuned": f, **models}, policy, **kw)

    engine, s, choice = _protect(a, f, tmp_path / "out", pol, cache_dir=tmp_path / "cache",
                                 device="cpu", progress=False, evaluator=evaluator,
                                 task_data=None, work=tmp_path / "work")
    curve = {c[0]: c[1] for c in choice.curve}
    assert s == choice.s and curve[s] <= 0.3
    assert all(asr > 0.3 for t, asr in curve.items() if t > s)
    assert engine.config["s"] == pytest.approx(s)
    final = ev({"aligned": a, "finetuned": f, "protected": tmp_path / "out"}, pol)
    assert final.metrics["protected"]["asr.advbench"] == pytest.approx(curve[s])


def test_materialize_gives_protect_a_local_directory(mlflow_server, registered, tmp_path):
    from mlflow_safedelta.registry import materialize

    local = materialize("models:/aligned@base", tmp_path / "a", tracking_uri=mlflow_server.url)
    assert (local / "config.json").is_file() and (local / "tokenizer.json").is_file()
    assert _weights(local).keys() == _weights(registered["aligned"]).keys()
    assert materialize(str(tmp_path), tmp_path / "x") == tmp_path


def test_lora_adapter_version_is_gated_against_its_parent(mlflow_server, registered, tmp_path):
    """A version holding only a LoRA adapter (safedelta flavor, delta_format lora): evaluated as
    the adapter merged onto the parent, protected into full weights, registered, promoted."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    cl = registered["client"]
    base = AutoModelForCausalLM.from_pretrained(str(registered["aligned"]))
    torch.manual_seed(3)
    lora = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    flavor.save_model(str(tmp_path / "adapter"), tmp_path / "saved", parent="models:/aligned/1",
                      tokenizer=make_tiny_tokenizer())
    run = cl.create_run(cl.get_experiment_by_name("safedelta-gate").experiment_id)
    mv = reg.register_saved_model(cl, tmp_path / "saved", "lora-bot", run_id=run.info.run_id)
    ev = MeasuringEvaluator()
    res = run_gate_job("lora-bot", mv.version, policy=PASSING, tracking_uri=mlflow_server.url,
                       evaluator=ev, progress=False)
    assert res.verdict == "passed", res.reason
    assert cl.get_run(res.run_id).data.params["finetuned_kind"] == "lora"
    # q/v moved by the adapter, partly kept by Safe Delta; nothing else changed
    assert 0.0 < res.metrics["protected"]["utility_retention"] < 1.0
    prot = flavor.load_model(f"models:/lora-bot/{res.protected_version}")
    assert prot.delta_format == "full" and prot.parent == "models:/aligned/1"
    assert cl.get_model_version_by_alias("lora-bot", "production").version == res.protected_version
