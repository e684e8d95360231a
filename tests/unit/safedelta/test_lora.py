"""LoRA adapters as fine-tuned input: each tensor equals PEFT's own merge, without merging."""

from __future__ import annotations

import json

import pytest
import torch

from safedelta.checkpoint import CheckpointReader
from safedelta.errors import AdapterError
from safedelta.lora import LoraAdapter, is_lora_adapter
from tests.helpers.tiny import make_tiny_model, save_tiny_pair


def make_lora(aligned_dir, out_dir, *, arch="llama", seed=1, **lora_kwargs):
    """Train-free LoRA: random lora_B (and modules_to_save), saved; returns the merged state dict."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(aligned_dir)
    pm = get_peft_model(base, LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n or "modules_to_save" in n:
                p.copy_(p + 0.05 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out_dir)
    merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _assert_matches_merge(adapter_dir, aligned_dir, merged):
    adapter = LoraAdapter(adapter_dir)
    aligned = CheckpointReader(aligned_dir)
    adapter.check_against(aligned)
    changed = 0
    for name in aligned.names():
        a = aligned.get(name)
        f = adapter.finetuned(name, a)
        torch.testing.assert_close(f, merged[name], rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(f, a)
    return adapter, changed


def test_llama_adapter_with_patterns_and_modules_to_save(tmp_path):
    aligned = save_tiny_pair(tmp_path / "aligned", seed=0)
    merged = make_lora(aligned, tmp_path / "lora", r=4, lora_alpha=8,
                       target_modules=["q_proj", "v_proj", "down_proj"],
                       rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3},
                       modules_to_save=["lm_head"])
    assert is_lora_adapter(tmp_path / "lora") and not is_lora_adapter(aligned)
    adapter, changed = _assert_matches_merge(tmp_path / "lora", aligned, merged)
    assert changed == 2 * 3 + 1  # q, v, down in two layers + lm_head
    assert adapter.targets()["lm_head.weight"] == "replaced"
    assert adapter.scaling("model.layers.0.mlp.down_proj") == pytest.approx(8 / 2)
    assert adapter.scaling("model.layers.1.self_attn.v_proj") == pytest.approx(3 / 4)


def test_rslora_scaling(tmp_path):
    aligned = save_tiny_pair(tmp_path / "aligned", seed=0)
    merged = make_lora(aligned, tmp_path / "lora", r=4, lora_alpha=6, use_rslora=True,
                       target_modules=["o_proj", "up_proj"])
    adapter, changed = _assert_matches_merge(tmp_path / "lora", aligned, merged)
    assert changed == 4
    assert adapter.scaling("model.layers.0.mlp.up_proj") == pytest.approx(6 / 2)


def test_fan_in_fan_out_conv1d(tmp_path):
    aligned = save_tiny_pair(tmp_path / "aligned", arch="gpt2", seed=0)
    merged = make_lora(aligned, tmp_path / "lora", r=4, lora_alpha=8, fan_in_fan_out=True,
                       target_modules=["c_attn", "c_fc"])
    _, changed = _assert_matches_merge(tmp_path / "lora", aligned, merged)
    assert changed == 4


def test_adapter_for_another_base_refused(tmp_path):
    aligned = save_tiny_pair(tmp_path / "aligned", seed=0)
    make_lora(aligned, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["down_proj"])
    other = tmp_path / "wider"
    make_tiny_model(other, seed=0, intermediate_size=96)
    with pytest.raises(AdapterError, match=r"down_proj\.weight.*\[64, 128\].*\[64, 96\]"):
        LoraAdapter(tmp_path / "lora").check_against(CheckpointReader(other))
    gpt2 = tmp_path / "gpt2"
    make_tiny_model(gpt2, arch="gpt2", seed=0)
    with pytest.raises(AdapterError, match="its base differs"):
        LoraAdapter(tmp_path / "lora").check_against(CheckpointReader(gpt2))


def test_dora_refused(tmp_path):
    aligned = save_tiny_pair(tmp_path / "aligned", seed=0)
    make_lora(aligned, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="use_dora"):
        LoraAdapter(tmp_path / "lora")
