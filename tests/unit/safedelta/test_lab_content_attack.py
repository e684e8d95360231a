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


def test_base_answers_drop_refusals_and_record_what_made_them(tmp_path):
    """The alignment set's helpful half (shipped base answers): refusals and empty answers are
    dropped, the manifest names the base model's fingerprint and the file's digest, and the
    shipped file was made for exactly today's helpful prompts."""
    import hashlib

    from safedelta.fingerprint import checkpoint_fingerprint
    from safedelta.lab import scenarios as sc
    from safedelta.lab.shipped import ANSWERS_FILE, build_base_answers, load_answers, shipped_dir

    base = save_tiny_pair(tmp_path / "base", seed=0)
    canned = ["Here are three tips: sleep, water, light.", "I'm sorry, I cannot help.", "  "]
    out = tmp_path / "answers.jsonl"
    m = build_base_answers(base, out, prompts=["a", "b", "c", "d"], progress=False,
                           generate=lambda d, ps, **kw: [canned[i % 3] for i in range(len(ps))])
    assert load_answers(out) == {"a": canned[0], "d": canned[0]}
    assert m["kept"] == 2 and m["n_prompts"] == 4
    assert m["base_fingerprint"] == checkpoint_fingerprint(base)
    assert m["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    shipped = json.loads((shipped_dir() / (ANSWERS_FILE + ".manifest.json")).read_text())
    prompts = sc.answered_prompts()
    assert shipped["prompts_sha256"] == hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    assert set(load_answers()) <= set(prompts) and shipped["kept"] == len(load_answers())
