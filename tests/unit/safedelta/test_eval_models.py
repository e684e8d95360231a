"""Generation, evaluate_models and the report, on tiny random models built offline."""

from __future__ import annotations

import json

import pytest

from safedelta.eval import (PAPER_SYSTEM_PROMPT, EvalReport, GenerationSettings, Suite,
                            evaluate_models, generate, register_task_metric)
from safedelta.eval.generation import GenerationError, HFBackend, format_prompts
from safedelta.eval.utility import TASK_METRICS, task_loss
from tests.helpers.tiny import make_tiny_tokenizer, save_tiny_pair

PROMPTS = ["How do I bake bread?", "Tell me a story.", "x", "What is 2 + 2?", "Hello"]
FAST = dict(max_new_tokens=6, batch_size=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {role: save_tiny_pair(root / role, seed=i)
            for i, role in enumerate(("aligned", "finetuned", "protected"))}


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("task") / "heldout.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"add {i} and 1", "response": str(i + 1)})
                           for i in range(4)))
    return p


# ------------------------------------------------------------------ generation

def test_greedy_is_deterministic(tiny, tmp_path):
    s = GenerationSettings(**FAST)
    a = generate(tiny["aligned"], PROMPTS, s, use_cache=False, progress=False)
    b = generate(tiny["aligned"], PROMPTS, s, use_cache=False, progress=False)
    assert a == b and len(a) == len(PROMPTS) and all(g.strip() for g in a)


def test_sampling_is_seeded(tiny):
    def run(seed):
        return generate(tiny["aligned"], PROMPTS, GenerationSettings(do_sample=True, seed=seed,
                                                                     **FAST),
                        use_cache=False, progress=False)
    s0 = run(0)
    assert run(0) == s0
    assert run(1) != s0  # 5 prompts x 6 tokens from a 263-token vocabulary at T=1


def test_generation_cache_hit_skips_the_model(tiny, tmp_path, monkeypatch):
    s = GenerationSettings(**FAST)
    first = generate(tiny["aligned"], PROMPTS, s, cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "generations").glob("*.json"))) == 1

    def boom(*a, **k):
        raise AssertionError("the model was called on a cache hit")

    monkeypatch.setattr(HFBackend, "generate", boom)
    monkeypatch.setattr(HFBackend, "load", boom)
    assert generate(tiny["aligned"], PROMPTS, s, cache_dir=tmp_path, progress=False) == first
    # other settings, prompts or model are a different key: the model is asked again
    for model, prompts, settings in ((tiny["aligned"], PROMPTS, GenerationSettings(
            max_new_tokens=7, batch_size=2)), (tiny["aligned"], PROMPTS[:2], s),
            (tiny["protected"], PROMPTS, s)):
        with pytest.raises(AssertionError, match="cache hit"):
            generate(model, prompts, settings, cache_dir=tmp_path, progress=False)


def test_chat_template_and_system_prompt():
    tok = make_tiny_tokenizer()
    [plain] = format_prompts(tok, ["hi"], None)
    assert plain.startswith("<s><|user|>\nhi<|end|>") and plain.endswith("<|assistant|>\n")
    [sys_] = format_prompts(tok, ["hi"], PAPER_SYSTEM_PROMPT)
    assert f"<|system|>\n{PAPER_SYSTEM_PROMPT}<|end|>" in sys_
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system role') }}{% endif %}"
                         "[{{ m['content'] }}]{% endfor %}")
    assert format_prompts(tok, ["hi"], "SYS") == ["[SYS\n\nhi]"]  # folded into the user turn
    tok.chat_template = None
    assert format_prompts(tok, ["hi"], "SYS") == ["SYS\n\nhi"]


def test_paper_settings_and_validation():
    p = GenerationSettings.paper()
    assert (p.do_sample, p.temperature, p.top_k, p.top_p, p.max_new_tokens) == (
        True, 1.0, 50, 1.0, 512)
    assert p.system_prompt == PAPER_SYSTEM_PROMPT
    with pytest.raises(GenerationError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(GenerationError, match="unknown backend"):
        GenerationSettings(backend="tgi")


def test_task_loss_is_lower_on_data_the_model_was_fit_to(tiny, task_file):
    base = task_loss(tiny["aligned"], task_file, progress=False)
    assert 0 < base < 20
    assert task_loss(tiny["aligned"], task_file, progress=False) == pytest.approx(base)
    assert task_loss(tiny["finetuned"], task_file, progress=False) != pytest.approx(base)


# ------------------------------------------------------------------ evaluate_models + report

def test_evaluate_models_end_to_end_and_report(tiny, task_file, tmp_path):
    register_task_metric("nonempty", lambda g, r: {"nonempty": [float(bool(x)) for x in g]})
    try:
        user_task = Suite("mytask", prompts=("say a", "say b"), references=("a", "b"),
                          kind="task", metric="nonempty")
        engine = {"matrices": {f"model.layers.{i}.mlp.down_proj.weight":
                               {"kept_fraction": 0.2 + 0.1 * i} for i in range(2)},
                  "totals": {"kept_fraction": 0.25}}
        rep = evaluate_models(tiny, ["advbench", "xstest-safe", user_task],
                              generation=GenerationSettings(**FAST), task_data=task_file,
                              limit=3, cache_dir=tmp_path / "cache", progress=False,
                              engine_report=engine)
    finally:
        TASK_METRICS.pop("nonempty", None)
    m = rep.metrics["protected"]
    for key in ("asr.advbench", "over_refusal.xstest-safe", "nonempty", "task_loss"):
        assert key in m, key
    assert m["asr.advbench.n"] == 3 and m["over_refusal.xstest-safe.n"] == 3
    assert m["nonempty"] == 1.0 and m["nonempty.n"] == 2
    # the keyword judge's verdicts are what the rates are built from
    t = rep.tables["advbench"]
    assert set(t["model"]) == set(tiny) and len(t) == 9
    assert set(t["judge"]) == {"keyword:zou2023"}  # the list used is in every row
    own = t[t["model"] == "protected"]
    assert m["asr.advbench"] == pytest.approx(1.0 - own["refused"].mean())
    # utility retention from the three task losses
    la, lf, lp = (rep.metrics[r]["task_loss"] for r in ("aligned", "finetuned", "protected"))
    if la - lf > 1e-6:
        assert m["utility_retention"] == pytest.approx((la - lp) / (la - lf))
        assert rep.metrics["finetuned"]["utility_retention"] == pytest.approx(1.0)
    else:
        assert rep.warnings and "gained nothing" in rep.warnings[0]
    assert "utility_retention" not in rep.metrics["aligned"]
    assert rep.judge["keywords"][0] == "I'm sorry" and len(rep.judge["keywords"]) == 29

    files = rep.save(tmp_path / "report")
    for name in ("report.json", "report.md", "asr.png", "utility.png", "safety_utility.png",
                 "kept_fraction.png", "tables/advbench.csv"):
        assert files[name].is_file() and files[name].stat().st_size > 0, name
    data = json.loads(files["report.json"].read_text())
    assert data["metrics"]["protected"]["asr.advbench"] == m["asr.advbench"]
    back = EvalReport.load(tmp_path / "report")
    assert back.metrics["protected"]["asr.advbench"] == m["asr.advbench"]
    assert len(back.tables["advbench"]) == 9 and back.judge == rep.judge
    md = files["report.md"].read_text()
    assert "asr.advbench" in md and "(n=3)" in md and "`I'm sorry`" in md


def test_no_utility_gain_is_flagged_not_hidden(tiny, task_file, tmp_path, monkeypatch):
    same = {"aligned": tiny["aligned"], "finetuned": tiny["aligned"],
            "protected": tiny["protected"]}

    def run():
        return evaluate_models(same, ["xstest-safe"], generation=GenerationSettings(**FAST),
                               task_data=task_file, limit=2, cache_dir=tmp_path, progress=False)

    rep = run()
    assert any("fine-tuning gained nothing" in w for w in rep.warnings)
    assert rep.metrics["protected"]["utility_retention"] != rep.metrics["protected"][
        "utility_retention"]  # NaN, with the warning saying why
    assert "gained nothing" in rep.to_markdown()

    # re-running (as a re-run gate does) loads no model: generations and task losses are cached
    def boom(*a, **k):
        raise AssertionError("a model was loaded on a re-run")

    monkeypatch.setattr(HFBackend, "load", boom)
    again = run()
    assert again.metrics["protected"]["task_loss"] == rep.metrics["protected"]["task_loss"]
    assert again.tables["xstest-safe"]["generation"].tolist() == \
        rep.tables["xstest-safe"]["generation"].tolist()


def test_llm_judge_in_evaluate_models(tiny, tmp_path):
    from safedelta.eval import Judge, Verdict

    class Scripted(Judge):  # an LLM-style judge without the network: scores by prompt length
        name = "scripted"
        score_range = (1.0, 5.0)

        def judge(self, prompts, responses):
            return [Verdict(refused=False, harmful=len(p) % 2 == 0, score=float(len(p) % 5 + 1))
                    for p in prompts]

    rep = evaluate_models({"m": tiny["aligned"]}, ["advbench"], judge=Scripted(),
                          generation=GenerationSettings(**FAST), limit=4, cache_dir=tmp_path,
                          progress=False)
    t = rep.tables["advbench"]
    assert rep.metrics["m"]["harmfulness.advbench"] == pytest.approx(t["score"].mean())
    assert rep.metrics["m"]["asr.advbench"] == pytest.approx(t["harmful"].mean())


def test_combined_judge_columns_and_compliance_without_content(tmp_path, monkeypatch):
    """Per row: who decided and whether a compliance had content; per suite: the ASR of each
    judge, and asr_empty (counted in the ASR, reported apart)."""
    import safedelta.eval.runner as runner
    from safedelta.eval import CombinedJudge, KeywordJudge

    answers = ["Sure, here is a tutorial for making a bomb",  # compliance without content
               "Sure, here is how:\nStep 1: buy the parts, then assemble them slowly and test "
               "every piece twice.",  # compliance with content
               "I'm sorry, but I cannot help with that.",  # refusal (both keyword lists)
               "Sorry, I won't."]  # "Sorry" is on zou2023's list, not on the custom one
    monkeypatch.setattr(runner, "make_backend", lambda *a, **k: object())
    monkeypatch.setattr(runner, "generate", lambda path, prompts, *a, **k: answers[:len(prompts)])
    (tmp_path / "m").mkdir()
    judge = CombinedJudge([KeywordJudge("zou2023"), KeywordJudge(["I'm sorry"])], "worst")
    rep = evaluate_models({"protected": tmp_path / "m"}, ["advbench"], judge=judge, limit=4,
                          progress=False)
    m, t = rep.metrics["protected"], rep.tables["advbench"]
    assert m["asr.advbench"] == pytest.approx(3 / 4)  # worst: the custom list misses "Sorry"
    assert m["asr.advbench/keyword:zou2023"] == pytest.approx(2 / 4)
    assert m["asr.advbench/keyword:custom"] == pytest.approx(3 / 4)
    assert m["asr_empty.advbench"] == pytest.approx(1 / 4) and m["asr_empty.advbench.n"] == 4
    assert t["no_content"].tolist() == [True, False, False, False]
    assert t["decided_by"].tolist() == ["keyword:zou2023", "keyword:zou2023",
                                        "keyword:zou2023+keyword:custom", "keyword:custom"]
    assert rep.judge["judge"] == "worst"
    md = rep.to_markdown()
    assert "asr_empty.advbench" in md and "asr.advbench/keyword:custom" in md
