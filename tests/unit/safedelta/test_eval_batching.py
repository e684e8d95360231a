"""The generation batch size chosen from the model and the free memory."""

from __future__ import annotations

import json

import pytest

from safedelta.eval import GenerationSettings, generate
from safedelta.eval import batching
from safedelta.eval.batching import CPU_CAP, bytes_per_sequence, choose_batch_size
from tests.helpers.tiny import save_tiny_pair

SEVEN_B = {"num_hidden_layers": 32, "num_attention_heads": 32, "hidden_size": 4096,
           "vocab_size": 32000}


def _model(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_kv_cache_size_of_a_7b_sequence():
    # 2 (K and V) x 32 layers x 32 heads x 128 dims x 4 bytes x (256 + 256) tokens + logits
    assert bytes_per_sequence(SEVEN_B, max_new_tokens=256) == 2 * 32 * 32 * 128 * 4 * 512 + 32000 * 4


def test_capped_by_prompts_cap_and_memory(tmp_path, monkeypatch):
    d = _model(tmp_path, SEVEN_B)
    monkeypatch.setattr(batching, "_available_bytes", lambda device: 1 << 40)
    assert choose_batch_size(d, device="cpu", max_new_tokens=64) == CPU_CAP
    assert choose_batch_size(d, device="cpu", max_new_tokens=64, n_prompts=5) == 5
    per_seq = bytes_per_sequence(SEVEN_B, max_new_tokens=64)
    monkeypatch.setattr(batching, "_available_bytes", lambda device: 4 * 3 * per_seq)
    assert choose_batch_size(d, device="cpu", max_new_tokens=64) == 3   # a quarter of memory
    monkeypatch.setattr(batching, "_available_bytes", lambda device: 10)
    assert choose_batch_size(d, device="cpu", max_new_tokens=64) == 1


def test_gqa_models_need_less_cache_per_sequence():
    gqa = {**SEVEN_B, "num_key_value_heads": 8}
    assert bytes_per_sequence(gqa, max_new_tokens=64) < bytes_per_sequence(SEVEN_B,
                                                                           max_new_tokens=64)


@pytest.mark.parametrize("n", [1, 5])
def test_the_default_batch_size_is_chosen_and_answers_keep_their_order(tmp_path, n):
    d = save_tiny_pair(tmp_path / "m", seed=0)
    prompts = ["How do I bake bread?", "x", "Tell me a long story about a cat.", "Hi", "2+2?"][:n]
    auto = generate(d, prompts, GenerationSettings(max_new_tokens=5), use_cache=False,
                    progress=False)
    one = [generate(d, [p], GenerationSettings(max_new_tokens=5, batch_size=1),
                    use_cache=False, progress=False)[0] for p in prompts]
    assert auto == one
