"""Structural discovery of decoder blocks and linear layers across architectures."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from safedelta.errors import UnsupportedArchitecture
from safedelta.modelwalk import (
    conv1d_weight_names,
    find_decoder_layers,
    find_linears,
    in_features,
    is_conv1d,
    linear_weight_names,
)
from tests.helpers.tiny import make_tiny_config

LLAMA_LIKE = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

# arch -> (prefix, linear names in one block)
TEST_CASES = {
    "llama": ("model.layers", LLAMA_LIKE),
    "mistral": ("model.layers", LLAMA_LIKE),
    "qwen2": ("model.layers", LLAMA_LIKE),
    "qwen3": ("model.layers", LLAMA_LIKE),
    "gemma": ("model.layers", LLAMA_LIKE),
    "phi3": ("model.layers", ["self_attn.o_proj", "self_attn.qkv_proj",
                              "mlp.gate_up_proj", "mlp.down_proj"]),
    "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
}


def _meta_model(arch):
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(make_tiny_config(arch))


@pytest.mark.parametrize("arch", sorted(TEST_CASES))
def test_finds_blocks_and_linears(arch):
    prefix, expected = TEST_CASES[arch]
    model = _meta_model(arch)
    found_prefix, layers = find_decoder_layers(model)
    assert found_prefix == prefix
    assert len(layers) == 2
    assert sorted(find_linears(layers[0])) == sorted(expected)
    names = linear_weight_names(model)
    assert len(names) == 2 * len(expected)
    assert names[0].startswith(f"{prefix}.0.") and names[-1].startswith(f"{prefix}.1.")
    # every name is a real parameter of the model, and lm_head / embeddings are never included
    params = dict(model.named_parameters())
    assert all(n in params for n in names)
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)


def test_conv1d_flagged_and_in_features():
    model = _meta_model("gpt2")
    _, layers = find_decoder_layers(model)
    lin = find_linears(layers[0])
    assert all(is_conv1d(m) for m in lin.values())
    assert in_features(lin["attn.c_attn"]) == 64          # weight 64 x 192 (in x out)
    assert in_features(lin["mlp.c_proj"]) == 128
    assert conv1d_weight_names(model) == set(linear_weight_names(model))
    llama = _meta_model("llama")
    assert conv1d_weight_names(llama) == set()
    assert in_features(find_linears(find_decoder_layers(llama)[1][0])["mlp.down_proj"]) == 128


class _Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(4, 8)
        self.w2 = nn.Linear(8, 4)


class _MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.experts = nn.ModuleList([_Expert() for _ in range(3)])


class _MoEModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList([_MoEBlock() for _ in range(2)])
        self.head = nn.Linear(4, 10)


def test_outer_blocks_beat_nested_expert_lists():
    prefix, layers = find_decoder_layers(_MoEModel())
    assert prefix == "blocks"
    assert "experts.2.w2" in find_linears(layers[0])


def test_no_blocks_raises_and_lists_what_was_found():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])
    with pytest.raises(UnsupportedArchitecture) as ei:
        find_decoder_layers(model)
    msg = str(ei.value)
    assert "'mixed' (2 x Linear/ReLU" in msg
    assert "Linear layers found: 0, 2, mixed.0" in msg


def test_works_on_real_weights_too():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_tiny_config("qwen2"))
    names = linear_weight_names(model)
    assert names[0] == "model.layers.0.self_attn.q_proj.weight"
