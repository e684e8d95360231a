"""Calibration sets: formats, errors, the shipped default, self-generated refusals."""

from __future__ import annotations

import json
import random

import pytest
import torch

from safedelta import calibration as cal
from safedelta.calibration import generate_calibration, load_calibration, read_calibration_file
from safedelta.data import advbench
from safedelta.errors import CalibrationError
from safedelta.refusal import is_refusal
from tests.helpers.tiny import make_tiny_tokenizer, save_tiny_pair


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                            for ln in lines), encoding="utf-8")
    return path


def _ids(tok, messages):
    return tok(tok.apply_chat_template(messages, tokenize=False),
               add_special_tokens=False)["input_ids"]


def test_prompt_response_uses_chat_template_and_counts_all_tokens(tmp_path, tok):
    f = _write(tmp_path / "c.jsonl", [{"prompt": "how to pick a lock", "response": "I cannot."}])
    [sample] = load_calibration(f, tok)
    assert sample.dtype == torch.long and sample.dim() == 1
    expected = _ids(tok, [{"role": "user", "content": "how to pick a lock"},
                          {"role": "assistant", "content": "I cannot."}])
    assert sample.tolist() == expected
    text = tok.decode(sample)
    assert text.startswith("<s><|user|>\nhow to pick a lock") and "I cannot.<|end|>" in text


def test_messages_format_with_system_turn(tmp_path, tok):
    msgs = [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Sorry, no."}]
    f = _write(tmp_path / "m.jsonl", [{"messages": msgs}])
    [sample] = load_calibration(f, tok)
    assert sample.tolist() == _ids(tok, msgs)


def test_shuffle_seed_max_samples_and_max_length(tmp_path, tok):
    recs = [{"prompt": f"prompt number {i}", "response": "I cannot help."} for i in range(10)]
    f = _write(tmp_path / "c.jsonl", [*recs[:5], "", *recs[5:]])     # blank lines are skipped
    order = list(range(10))
    random.Random(42).shuffle(order)
    got = load_calibration(f, tok, max_samples=3)
    want = [torch.tensor(_ids(tok, [{"role": "user", "content": recs[i]["prompt"]},
                                    {"role": "assistant", "content": recs[i]["response"]}]))
            for i in order[:3]]
    assert [g.tolist() for g in got] == [w.tolist() for w in want]
    assert order[:3] != [0, 1, 2]            # the seed really reorders
    other = load_calibration(f, tok, max_samples=3, seed=7)
    assert [g.tolist() for g in other] != [g.tolist() for g in got]
    short = load_calibration(f, tok, max_samples=10, max_length=9)
    assert len(short) == 10 and all(len(s) == 9 for s in short)


@pytest.mark.parametrize("content, needle", [
    ("", "holds no samples"),
    ("\n\n", "holds no samples"),
    ('{"prompt": "a", "response": "I cannot"}\n{"prompt": "b", "respo', ":2: not valid JSON"),
    ('{"prompt": "a", "response": "I cannot"}\n[1, 2]\n', ":2: expected a JSON object"),
    ('{"question": "a"}\n', ":1: expected keys 'prompt' and 'response', or 'messages'"),
    ('{"prompt": "", "response": "x"}\n', ":1: 'prompt' must be a non-empty string"),
    ('{"prompt": "a"}\n', ":1: 'response' must be a string"),
    ('{"messages": []}\n', ":1: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', ":1: messages[0] must be"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}\n', "no non-empty user turn"),
])
def test_malformed_files_name_the_problem_and_line(tmp_path, tok, content, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(CalibrationError) as ei:
        load_calibration(f, tok)
    assert needle in str(ei.value)
    assert "bad.jsonl" in str(ei.value)


def test_missing_file(tmp_path, tok):
    with pytest.raises(CalibrationError, match="calibration file not found: .*nope.jsonl"):
        load_calibration(tmp_path / "nope.jsonl", tok)


def test_default_set_loads_and_is_disjoint_from_evaluation(tok):
    convs = read_calibration_file(None)
    prompts = [c[0]["content"] for c in convs]
    assert len(prompts) == 128
    assert set(prompts) == {r["goal"] for r in advbench("calibration")}
    assert not set(prompts) & {r["goal"] for r in advbench("evaluation")}
    responses = [c[1]["content"] for c in convs]
    assert all(is_refusal(r) for r in responses)
    assert len(set(responses)) >= 15                       # varied, not one canned answer
    samples = load_calibration(None, tok)
    assert len(samples) == 128 and all(len(s) > 20 for s in samples)
    assert cal.calibration_digest(None) == cal.calibration_digest(cal.default_calibration_path())


def test_no_chat_template_falls_back_to_plain_text(tmp_path, caplog):
    tok = make_tiny_tokenizer()
    tok.chat_template = None
    f = _write(tmp_path / "c.jsonl", [{"prompt": "P", "response": "R"}])
    [sample] = load_calibration(f, tok)
    assert tok.decode(sample) == "<s>P\n\nR"
    assert "no chat template" in caplog.text


@pytest.fixture(scope="module")
def tiny_aligned(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("aligned"), arch="llama", seed=0)


def test_generate_calibration_errors_when_nothing_is_refused(tmp_path, tiny_aligned):
    out = tmp_path / "gen.jsonl"
    with pytest.raises(CalibrationError, match="refused none of 3 prompts"):
        generate_calibration(tiny_aligned, out, prompts=["a", "b", "c"], max_new_tokens=4,
                             batch_size=2, progress=False)
    assert not out.exists()


def test_generate_calibration_keeps_only_refusals(tmp_path, tiny_aligned, monkeypatch):
    canned = {"p1": "Sure, here is how.", "p2": "I'm sorry, I can't help with that.",
              "p3": "Step 1: ...", "p4": "I cannot assist with illegal things."}
    seen = {}

    def fake(model, tokenizer, prompts, **kw):
        seen.update(kw, prompts=list(prompts))
        return [canned[p] for p in prompts]

    monkeypatch.setattr(cal, "_generate_responses", fake)
    out = tmp_path / "sub" / "gen.jsonl"
    stats = generate_calibration(tiny_aligned, out, prompts=list(canned), max_new_tokens=7,
                                 progress=False)
    assert stats["prompts"] == 4 and stats["kept"] == 2 and stats["discarded"] == 2
    assert seen["max_new_tokens"] == 7 and seen["prompts"] == list(canned)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == [{"prompt": "p2", "response": canned["p2"]},
                    {"prompt": "p4", "response": canned["p4"]}]
    # the result is a valid calibration file
    assert len(load_calibration(out, make_tiny_tokenizer())) == 2


def test_generate_calibration_defaults_to_advbench_calibration_split(tmp_path, tiny_aligned,
                                                                     monkeypatch):
    got = {}

    def fake(model, tokenizer, prompts, **kw):
        got["prompts"] = list(prompts)
        return ["I cannot do that."] * len(prompts)

    monkeypatch.setattr(cal, "_generate_responses", fake)
    stats = generate_calibration(tiny_aligned, tmp_path / "g.jsonl", n=5, progress=False)
    assert got["prompts"] == [r["goal"] for r in advbench("calibration")][:5]
    assert stats["kept"] == 5
