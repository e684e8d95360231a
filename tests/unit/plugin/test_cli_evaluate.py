"""The ``evaluate`` and ``choose-s`` commands, driven through click's CliRunner."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from mlflow_safedelta.cli import cli
from tests.helpers.tiny import save_tiny_pair


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-cli")
    return {r: save_tiny_pair(root / r, seed=i) for i, r in enumerate(("aligned", "finetuned"))}


def test_evaluate_json_and_report(tiny, tmp_path):
    suite = tmp_path / "mine.csv"
    suite.write_text("prompt\nWrite something harmful\nAnd another\n")
    res = CliRunner().invoke(cli, [
        "evaluate", "--model", f"aligned={tiny['aligned']}", "--model", str(tiny["finetuned"]),
        "--suite", "xstest-safe", "--suite", str(suite), "--limit", "2",
        "--max-new-tokens", "4", "--out", str(tmp_path / "rep"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data["metrics"]) == {"aligned", "finetuned"}
    m = data["metrics"]["finetuned"]
    assert m["asr.mine.n"] == 2 and m["over_refusal.xstest-safe.n"] == 2
    assert 0.0 <= m["asr.mine"] <= 1.0
    assert data["judge"]["list"] == "zou2023"
    for name in ("report.json", "report.md", "asr.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0


def test_evaluate_errors_exit_2_with_the_problem(tiny, tmp_path):
    r = CliRunner().invoke(cli, ["evaluate", "--model", str(tiny["aligned"]),
                                 "--suite", "hexphi", "--limit", "1"])
    assert r.exit_code == 2 and "'hexphi' is neither a built-in suite" in r.output
    r = CliRunner().invoke(cli, ["evaluate", "--model", f"a={tiny['aligned']}",
                                 "--model", f"a={tiny['finetuned']}"])
    assert r.exit_code == 2 and "role 'a' given twice" in r.output
    r = CliRunner().invoke(cli, ["evaluate", "--model", str(tiny["aligned"]), "--judge", "llm"],
                           env={"SAFEDELTA_JUDGE_ENDPOINT": "", "OPENAI_BASE_URL": ""})
    assert r.exit_code == 2 and "needs an endpoint and a model" in r.output


def test_help_reads_like_documentation():
    for cmd in ("evaluate", "choose-s"):
        r = CliRunner().invoke(cli, [cmd, "--help"])
        assert r.exit_code == 0 and "Example usage:" in r.output and "--json" in r.output


def test_choose_s_wires_protect_and_evaluation(tiny, tmp_path, monkeypatch):
    """protect is replaced by a copy of the fine-tuned model whose name records s, and the
    evaluation by a monotone ASR(s), so this checks the command's wiring, not the engine."""
    import safedelta.eval.runner as runner
    import safedelta.pipeline as pipeline

    calls = []

    def fake_protect(aligned, finetuned, out, *, config=None, **kw):
        calls.append(config.s)
        shutil.copytree(finetuned, out, dirs_exist_ok=True)

    class FakeReport:
        def __init__(self, s):
            self.suites = [{"name": "advbench"}]
            self.metrics = {"protected": {"asr.advbench": s, "asr.advbench.ci_low": s,
                                          "asr.advbench.ci_high": s, "asr.advbench.n": 3}}

    def fake_eval(models, suites, **kw):
        return FakeReport(float(models["protected"].name[2:]))

    monkeypatch.setattr(pipeline, "protect", fake_protect)
    monkeypatch.setattr(runner, "evaluate_models", fake_eval)
    out = tmp_path / "cs"
    r = CliRunner().invoke(cli, ["choose-s", "--aligned", str(tiny["aligned"]), "--finetuned",
                                 str(tiny["finetuned"]), "--max-asr", "0.03", "--s-lo", "0",
                                 "--s-hi", "0.1", "--iters", "4", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["met"] and 0.03 - 0.1 / 2 ** 4 <= data["s"] <= 0.03  # grid of 4 halvings
    assert calls[:2] == [0.1, 0.0] and len(calls) == 6
    assert (out / "choose_s.png").stat().st_size > 0
    assert json.loads((out / "choose_s.json").read_text())["s"] == data["s"]
    # without a range: the default budget's s / 100 .. x 10, searched geometrically
    from safedelta.config import DEFAULT_S

    calls.clear()
    r = CliRunner().invoke(cli, ["choose-s", "--aligned", str(tiny["aligned"]), "--finetuned",
                                 str(tiny["finetuned"]), "--max-asr", "1e-6", "--iters", "2",
                                 "--out", str(tmp_path / "cs2"), "--json"])
    assert r.exit_code == 0, r.output
    d = DEFAULT_S["default"]
    assert calls[:2] == [pytest.approx(10 * d), pytest.approx(d / 100)]
    assert calls[2] == pytest.approx(d * 10 ** -0.5)  # geometric midpoint of d/100 .. 10d
    # fake ASR(s) = s: 1e-6 <= max ASR only for s below 1e-6
    assert json.loads(r.stdout)["s"] < 1e-6
    r = CliRunner().invoke(cli, ["choose-s", "--aligned", str(tiny["aligned"]), "--finetuned",
                                 str(tiny["finetuned"]), "--max-asr", "0.03", "--s-lo", "0.2",
                                 "--s-hi", "0.1", "--out", str(out)])
    assert r.exit_code == 2 and "--s-lo (0.2) must be below --s-hi (0.1)" in r.output
