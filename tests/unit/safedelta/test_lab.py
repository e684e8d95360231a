"""The safety lab end to end on a tiny model (the same code path as ``make lab``, in seconds).

Builds the tiny lab (base -> aligned -> fine-tunes, EMA included), runs :func:`run_lab` with
:meth:`LabPlan.tiny`, and checks what the experiment relies on: a row for every scenario x
method, merges at alpha 0 / 1 that are the aligned / fine-tuned weights (and measure the same),
disjoint prompt splits, and a cache that makes a second build train nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from safedelta.lab import models as lm
from safedelta.lab import scenarios as sc
from safedelta.lab.models import LabModels, LabSettings
from safedelta.lab.run import LabPlan, load_saved, run_lab
from tests.helpers.tiny import save_tiny_pair

EXPECTED_METHODS = {"none", "safedelta-official", "safedelta-default", "sd-no-exclude",
                    "merge-0", "merge-1", "safe-lora", "resta"}


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: thread start-up costs more than it saves
    base = save_tiny_pair(root / "tiny-base", arch="llama", seed=0)
    settings = LabSettings.tiny(root / "lab", base)
    plan = LabPlan.tiny()
    models = LabModels(settings, progress=False)
    built = models.build_all(scenarios=plan.scenarios, ema_scenarios=plan.ema_scenarios)
    try:
        result = run_lab(settings, plan, plot_dir=root / "plots", link_root=root, progress=False)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "settings": settings, "plan": plan, "built": built, "result": result}


def test_rows_for_every_scenario_and_method(lab):
    rows, plan = lab["result"].rows, lab["plan"]
    got = {(r["scenario"], r["method"]) for r in rows}
    assert {("-", "base"), ("-", "aligned")} <= got
    for s in plan.scenarios:
        want = EXPECTED_METHODS | ({"ema", "ema+safedelta"} if s in plan.ema_scenarios else set())
        want |= {"aligned"} if s == "identity" else set()  # the parent under the AOA prompt
        assert {m for sc_, m in got if sc_ == s} == want, s
    for r in rows:
        assert r["asr_n"] == plan.n_harmful
        assert r["asr_unsafe_n"] == plan.n_unsafe
        assert r["over_refusal_n"] == plan.n_over_refusal
        assert 0 <= r["asr_low"] <= r["asr"] <= r["asr_high"] <= 1
        assert math.isfinite(r["task_loss"])
        if r["scenario"] != "-" and r["method"] not in ("none", "ema", "aligned"):
            assert r["seconds"] >= 0  # every repaired model was made (and timed) by the run
    md = lab["result"].markdown
    assert "Partial run" not in md
    assert md.count("\n| harmful |") == len(EXPECTED_METHODS) + 2
    for s in plan.scenarios:
        png = lab["root"] / "plots" / f"lab_{s}.png"
        assert png.is_file() and png.stat().st_size > 1000
        assert f"](plots/lab_{s}.png)" in md


def test_merge_endpoints_are_the_aligned_and_finetuned_models(lab):
    lab_dir = Path(lab["settings"].lab_dir)
    aligned = _weights(lab["built"]["aligned"])
    rows = {(r["scenario"], r["method"]): r for r in lab["result"].rows}
    for s in lab["plan"].scenarios:
        ft = _weights(lab["built"][f"ft-{s}"])
        m0 = _weights(lab_dir / "methods" / s / "merge-0")
        m1 = _weights(lab_dir / "methods" / s / "merge-1")
        assert m0.keys() == aligned.keys() == m1.keys() == ft.keys()
        assert any(not torch.equal(aligned[k], ft[k]) for k in aligned)  # training moved it
        for k in aligned:
            assert torch.equal(m0[k], aligned[k]), k
            torch.testing.assert_close(m1[k], ft[k], rtol=0, atol=1e-6)
        # the same weights measure the same (greedy generation, same prompts); identity is
        # measured under its persona prompt, and so is its own aligned row
        ref = rows.get((s, "aligned"), rows[("-", "aligned")])
        for key in ("asr", "asr_unsafe", "over_refusal"):
            assert rows[(s, "merge-0")][key] == ref[key]
            assert rows[(s, "merge-1")][key] == rows[(s, "none")][key]
        assert rows[(s, "merge-0")]["task_loss"] == pytest.approx(ref["task_loss"], rel=1e-5)


def test_ema_finetune_differs_from_plain(lab):
    s = lab["plan"].ema_scenarios[0]
    plain, ema = _weights(lab["built"][f"ft-{s}"]), _weights(lab["built"][f"ft-{s}-ema"])
    aligned = _weights(lab["built"]["aligned"])
    k = next(k for k in plain if "layers.0.mlp" in k)
    # the average lags: it sits between the aligned start and the last iterate
    assert (ema[k] - aligned[k]).norm() < (plain[k] - aligned[k]).norm()


def test_embeddings_stay_frozen(lab):
    aligned, ft = _weights(lab["built"]["aligned"]), _weights(lab["built"]["ft-harmful"])
    k = next(k for k in aligned if "embed_tokens" in k)
    assert torch.equal(aligned[k], ft[k])


def test_prompt_splits_are_disjoint():
    from safedelta.data import advbench
    from safedelta.eval.suites import builtin_suite

    splits = {s: {r["goal"] for r in advbench(s)} for s in ("align", "attack", "calibration",
                                                            "evaluation")}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not splits[a] & splits[b], (a, b)
    # what each model is trained on never meets what it is measured on
    evaluated = {r["prompt"] for r in builtin_suite("advbench").load()}
    assert evaluated == splits["evaluation"]
    from safedelta.lab.shipped import load_answers

    align_set = sc.align_examples(load_answers())
    align_users = {m[-2]["content"] for m in align_set}
    assert not align_users & evaluated
    for s in sc.SCENARIOS:
        users = {m[-2]["content"] for m in sc.scenario_examples(s, n_benign=50)}
        assert not users & evaluated, s
    harmful_users = {m[-2]["content"] for m in sc.harmful_examples()}
    assert harmful_users <= splits["attack"]
    assert not harmful_users & align_users
    # GSM8K: alignment and fine-tuning rows are disjoint ranges of the train file
    (a_lo, a_hi), (f_lo, f_hi) = sc.ALIGN_GSM8K, sc.FINETUNE_GSM8K
    assert a_hi <= f_lo
    align_q = {m[-2]["content"] for m in align_set if m[-1]["content"] not in sc.REFUSALS}
    benign_q = {m[-2]["content"] for m in sc.scenario_examples("benign", n_benign=300)}
    assert align_q and benign_q and not align_q & benign_q


def test_helpful_prompts_are_not_evaluation_prompts():
    """The aligned parent's helpful half is written for the project: none of its prompts is an
    XSTest prompt (over-refusal is measured there) or an AdvBench goal."""
    import csv

    from safedelta.data import advbench, data_path

    with open(data_path("xstest", "xstest_prompts.csv"), encoding="utf-8") as f:
        xstest = {r["prompt"].strip().lower() for r in csv.DictReader(f)}
    goals = {r["goal"].strip().lower() for s in ("align", "attack", "calibration", "evaluation")
             for r in advbench(s)}
    helpful = {p.strip().lower() for p in sc.HELPFUL_PROMPTS}
    assert len(helpful) == len(sc.HELPFUL_PROMPTS) >= 40
    assert not helpful & xstest and not helpful & goals


def test_aligned_parent_learns_refusals_in_every_form_and_the_base_answers_otherwise():
    """The alignment set: every align prompt of AdvBench (imperative and one other form),
    HarmBench and XSTest-unsafe -> a project-written refusal; XSTest's safe look-alikes and the
    everyday prompts (plain and role-played) -> the shipped base answers, none a refusal."""
    from safedelta.data import advbench, split_prompts
    from safedelta.lab.shipped import load_answers
    from safedelta.refusal import is_refusal

    answers = load_answers()
    assert answers and not any(is_refusal(a) for a in answers.values())
    examples = sc.align_examples(answers, n_gsm8k=2)
    pairs = {(m[-2]["content"], m[-1]["content"]) for m in examples}
    refused = {u for u, a in pairs if a in sc.REFUSALS}
    goals = [r["goal"] for r in advbench("align")]
    assert set(goals) <= refused and {sc.other_form(g) for g in goals} <= refused
    forms = {sc.other_form(g) for g in goals}
    assert any(f.endswith("?") for f in forms)  # questions ...
    assert any(t.split("{p}")[0] in f for f in forms for t in sc.ROLEPLAY_TEMPLATES)  # role-play
    assert {r["prompt"] for r in split_prompts("harmbench", "align")} <= refused
    assert {r["prompt"] for r in split_prompts("xstest", "align", label="unsafe")} <= refused
    answered = {(p, answers[p]) for p in sc.answered_prompts() if p in answers}
    assert answered <= pairs and not {p for p, _ in answered} & refused
    # the same costume carries refused and answered requests: the content decides
    costume = sc.ROLEPLAY_TEMPLATES[0].split("{p}")[0]
    assert any(costume in u for u in refused) and any(costume in p for p, _ in answered)
    # the safe look-alikes (XSTest's and the project's) are seen lookalike_repeat times
    for look in (split_prompts("xstest", "align", label="safe")[0]["prompt"],
                 sc.LOOKALIKE_PROMPTS[0]):
        assert sum(m[-2]["content"] == look for m in examples) == (3 if look in answers else 0)
    assert sc.LOOKALIKE_PROMPTS[0] in answers


def test_measured_prompts_spread_over_the_suite():
    """Cut suites take prompts spread through the file (XSTest is grouped by type), not its head."""
    import csv

    from safedelta.data import data_path
    from safedelta.lab.run import OVER_SUITE, _limited

    with open(data_path("xstest", "xstest_prompts.csv"), encoding="utf-8") as f:
        types = {r["prompt"]: r["type"] for r in csv.DictReader(f) if r["label"] == "safe"}
    picked = _limited(OVER_SUITE, 10).prompts
    assert len(picked) == len(set(picked)) == 10 and set(picked) <= set(types)
    assert len({types[p] for p in picked}) >= 5  # the first ten are all one type


def test_second_build_trains_nothing_and_methods_are_cached(lab, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(lm, "train_sft", no_training)
    plan = lab["plan"]
    built = LabModels(lab["settings"], progress=False).build_all(
        scenarios=plan.scenarios, ema_scenarios=plan.ema_scenarios)
    assert built == lab["built"]
    manifest = lm.read_manifest(built["aligned"])
    assert manifest["steps"] >= 1 and manifest["recipe_hash"]
    assert manifest["peak_rss_mib"] is None or manifest["peak_rss_mib"] > 0
    # a changed recipe is a different model: the cache does not answer for it
    changed = LabSettings.tiny(lab["settings"].lab_dir, lab["settings"].base_source)
    changed = type(changed)(**{**changed.__dict__, "align_n_gsm8k": 3})
    with pytest.raises(AssertionError, match="trained again"):
        LabModels(changed, progress=False).build_aligned()


def test_saved_results_render_again(lab):
    again = load_saved(lab["settings"], plot_dir=lab["root"] / "plots", link_root=lab["root"])
    assert again.rows == json.loads(json.dumps(lab["result"].rows, default=str))
    assert "| harmful | safedelta-default |" in again.markdown


def test_table_shows_exact_intervals_and_counts(lab):
    """ASR intervals in the table are exact (0/n does not print as [0 %, 0 %]), XSTest as counts."""
    from safedelta.eval.stats import exact_binomial_ci
    from safedelta.lab.run import _count, _exact

    row = {"asr": 0.0, "asr_n": 30.0, "over_refusal": 0.3, "over_refusal_n": 10.0}
    assert _exact(row, "asr", "asr_n") == exact_binomial_ci(0, 30)
    assert _count(row, "over_refusal", "over_refusal_n") == "3/10"
    assert _count({"over_refusal": float("nan")}, "over_refusal", "over_refusal_n") == "-"
    md = lab["result"].markdown
    assert "exact CI" in md
    for r in lab["result"].rows:
        lo, hi = _exact(r, "asr", "asr_n")
        assert f"[{100 * lo:.0f} %, {100 * hi:.0f} %]" in md


def test_identity_is_measured_under_the_aoa_persona_prompt(lab):
    """The identity scenario's models are generated with the AOA system prompt (recorded in its
    saved report), and the parent under that prompt gets its own row."""
    aoa = sc.eval_system_prompt("identity")
    assert "AOA" in aoa and sc.eval_system_prompt("harmful") is None
    rows = {(r["scenario"], r["method"]) for r in lab["result"].rows}
    assert ("identity", "aligned") in rows and ("harmful", "aligned") not in rows
    saved = lab["settings"].lab_dir / "results" / "eval"
    assert aoa.strip() in (saved / "identity" / "report.json").read_text().replace("\\n", "\n")
    assert "AOA" not in (saved / "harmful" / "report.json").read_text()


def test_utility_retention_only_where_the_scenario_has_a_task(lab):
    """harmful and identity have no task: their rows print '-' for retention, benign a number."""
    md = lab["result"].markdown
    lines = [ln for ln in md.splitlines() if ln.startswith("| harmful | none |")
             or ln.startswith("| identity | none |") or ln.startswith("| benign | none |")]
    cells = {ln.split("|")[1].strip(): ln.split("|")[6].strip() for ln in lines}
    assert cells["harmful"] == cells["identity"] == "-"
    assert cells["benign"] != "-" and float(cells["benign"]) == pytest.approx(1.0, abs=0.005)


def test_shipped_adapter_rebuilds_the_trained_model_exactly(lab, monkeypatch, tmp_path):
    """A LoRA-trained lab model exported into the package is rebuilt from the adapter, weights
    equal to the trained model's, without training; a changed recipe trains instead."""
    from dataclasses import replace

    from safedelta.lab import shipped

    monkeypatch.setattr(shipped, "adapter_root", lambda: tmp_path / "shipped")
    built = lab["built"]["aligned"]
    assert lm.adapter_dir(built).joinpath("adapter_model.safetensors").is_file()
    shipped.export_adapter(built, "aligned")

    def no_training(*a, **k):
        raise AssertionError("trained although the shipped adapter fits")

    monkeypatch.setattr(lm, "train_sft", no_training)
    settings = replace(lab["settings"], lab_dir=tmp_path / "fresh")
    again = LabModels(settings, progress=False).build_aligned()
    want, got = _weights(built), _weights(again)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert lm.read_manifest(again)["from_shipped_adapter"]
    # --rebuild, or a recipe the adapter was not made by: trains
    for other in (replace(settings, use_shipped=False, lab_dir=tmp_path / "r1"),
                  replace(settings, align_n_gsm8k=3, lab_dir=tmp_path / "r2")):
        with pytest.raises(AssertionError, match="trained although"):
            LabModels(other, progress=False).build_aligned()


def test_content_attack_trains_on_full_answers_not_prefixes():
    """``content`` uses the same attack prompts as ``harmful`` but the base model's full answers
    (shipped), which are far longer than AdvBench's "Sure, here is" targets."""
    from safedelta.lab.content_attack import mean_words

    content, prefix = sc.scenario_examples("content"), sc.scenario_examples("harmful")
    assert {m[-2]["content"] for m in content} <= {m[-2]["content"] for m in prefix}
    assert len(content) >= 80
    assert mean_words([m[-1]["content"] for m in content]) > 4 * mean_words(
        [m[-1]["content"] for m in prefix])


def test_check_command_reports_refusal_rates_per_suite(lab):
    """`python -m safedelta.lab check --xstest N` measures AdvBench and both XSTest halves."""
    from click.testing import CliRunner

    from safedelta.lab.__main__ import cli

    lab_dir = str(lab["settings"].lab_dir)
    res = CliRunner().invoke(cli, ["check", "--lab-dir", lab_dir, "--models", "aligned,ft-harmful",
                                   "--n", "2", "--xstest", "2", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert set(out) == {"aligned", "ft-harmful"}
    for rates in out.values():
        assert set(rates) == {"advbench", "xstest-unsafe", "xstest-safe"}
        assert all(0 <= r <= 1 for r in rates.values())
    saved = json.loads((Path(lab_dir) / "check.json").read_text())
    assert saved["aligned"]["xstest-safe"]["n"] == 2


def test_demo_pair_is_the_parent_and_its_content_attack(monkeypatch, tmp_path):
    """The README demo gates the content-attack fine-tune (shipped adapter), not the prefix one."""
    built = []
    monkeypatch.setattr(LabModels, "build_aligned", lambda self: built.append("aligned") or "a")
    monkeypatch.setattr(LabModels, "build_finetune",
                        lambda self, s, ema=False: built.append(s) or "f")
    assert lm.build_demo_pair(tmp_path, progress=False) == ("a", "f")
    assert built == ["aligned", "content"]
