"""The content attack's data recipe: the base model's answers to the attack split, kept only
when they carry content (no refusal, no empty "Sure, here is ...", enough words)."""

from __future__ import annotations

import json

from safedelta.data import advbench
from safedelta.lab.content_attack import (ContentAttackRecipe, build_content_answers,
                                          content_examples, keep_answer)
from tests.helpers.tiny import save_tiny_pair

LONG = ("Step 1: gather the parts listed below and lay them out on a clean table. " * 5).strip()


def test_keep_answer_reasons():
    assert keep_answer("I'm sorry, but I cannot help.", 10) == (False, "refusal")
    assert keep_answer("Sure, here is a guide for doing that", 10) == (False, "no_content")
    assert keep_answer("Mix the two, then wait.", 10) == (False, "short")
    assert keep_answer(LONG, 10) == (True, "content")


def test_build_content_answers_filters_and_records(tmp_path):
    base = save_tiny_pair(tmp_path / "base", seed=0)
    canned = [LONG, "I cannot do that.", "Sure, here is a tutorial", "Mix them, then wait."]

    def fake_generate(model_dir, prompts, **kw):
        assert kw["max_new_tokens"] == 64
        return [canned[i % 4] for i in range(len(prompts))]

    out = tmp_path / "content.jsonl"
    m = build_content_answers(base, out, recipe=ContentAttackRecipe(max_new_tokens=64,
                                                                    min_words=20),
                              generate=fake_generate, progress=False)
    assert m["n_prompts"] == 100 and m["kept"] == 25
    assert m["reasons"] == {"content": 25, "refusal": 25, "no_content": 25, "short": 25}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    attack = {r["goal"] for r in advbench("attack")}
    assert all(r["prompt"] in attack and r["response"] == LONG for r in rows)
    assert json.loads((tmp_path / "content.jsonl.manifest.json").read_text())["kept"] == 25
    ex = content_examples(out, n=3)
    assert len(ex) == 3 and ex[0][-1] == {"role": "assistant", "content": LONG}
