"""Tiny models and a tiny chat tokenizer, built offline in-process (nothing from a model hub).

- :func:`make_tiny_tokenizer`: a byte-level BPE tokenizer (every UTF-8 string encodes, no merges,
  so it is fully deterministic) with ``<s>``/``</s>``/``<pad>`` and role markers, and a jinja
  chat template ``<|role|>\\n content <|end|>\\n`` ending with ``<|assistant|>\\n`` when a
  generation prompt is asked.
- :func:`make_tiny_model`: a random decoder of one of several families (``llama``, ``mistral``,
  ``qwen2``, ``qwen3``, ``gemma``, ``gemma3``, ``phi3``, ``gpt2``), hidden 64, 2 layers, seeded, saved with
  ``save_pretrained`` (safetensors) when a directory is given.
- :func:`save_tiny_pair`: model + tokenizer in one directory, as an "aligned" parent would be.

Example::

    from tests.helpers.tiny import save_tiny_pair
    d = save_tiny_pair(tmp_path / "aligned", arch="llama", seed=0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

#: tiny model families: arch -> (config class name, extra config kwargs)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "phi3": ("Phi3Config", {"pad_token_id": PAD_ID}),
    # sliding-window and global layers get different masks and rotary tables: window 8 < length
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "gpt2": ("GPT2Config", {}),
}


def make_tiny_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` with a chat template (vocab = 256 + specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_vocab_size() -> int:
    return len(SPECIAL_TOKENS) + 256


def make_tiny_config(arch: str = "llama", **overrides):
    """The config of a tiny model of family ``arch`` (hidden 64, 2 layers, vocab of the tokenizer)."""
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {', '.join(ARCHS)}")
    cls_name, extra = ARCHS[arch]
    cls = getattr(transformers, cls_name)
    common = dict(vocab_size=tiny_vocab_size(), bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if arch == "gpt2":
        kw = dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, n_inner=128, **common)
    else:
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, **common)
    kw.update(extra)
    kw.update(overrides)
    return cls(**kw)


def make_tiny_model(dir: str | Path | None = None, arch: str = "llama", seed: int = 0,
                    dtype=None, **config_overrides):
    """A random tiny causal LM, seeded; saved (safetensors) into ``dir`` when given.

    Returns the model (in eval mode). ``dtype`` (e.g. ``torch.bfloat16``) casts before saving.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = make_tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    if dir is not None:
        Path(dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(dir, safe_serialization=True)
    return model


def save_tiny_pair(dir: str | Path, arch: str = "llama", seed: int = 0, dtype=None,
                   **config_overrides) -> Path:
    """Save a tiny model and the tiny chat tokenizer into one directory; returns the path."""
    dir = Path(dir)
    make_tiny_model(dir, arch=arch, seed=seed, dtype=dtype, **config_overrides)
    make_tiny_tokenizer().save_pretrained(dir)
    return dir


def save_perturbed_copy(src: str | Path, dst: str | Path, *, scale: float = 0.02, seed: int = 1,
                        only: str | None = None) -> Path:
    """A stand-in "fine-tuned" model: ``src`` with Gaussian noise (``scale`` x each tensor's std)
    added to every floating tensor whose name contains ``only`` (all when None); config and
    tokenizer files are copied. Returns ``dst``."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(src.glob("*.safetensors")):
        sd = load_file(f)
        for k, t in sd.items():
            if t.is_floating_point() and (only is None or only in k):
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
                sd[k] = (t.float() + scale * t.float().std() * noise).to(t.dtype)
        save_file(sd, dst / f.name, metadata={"format": "pt"})
    return dst
