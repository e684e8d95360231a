"""Calibration sets: harmful prompts paired with safe (refusing) responses.

Safe Delta measures each linear layer's inputs on a small *safe* set (see
``docs/algorithm.md``, "Calibration and the Hessian"): 128 samples, harmful instruction plus safe
response, shuffled with seed 42, prompt and response tokens concatenated, every token counted
(the paper runs them at batch size 1; the calibration pass batches them with padding masked out,
see :mod:`safedelta.hessian`). Here each sample is formatted with the aligned tokenizer's chat template (the
prompt as the user turn, the response as the assistant turn).

File format: JSON Lines, one object per line, either

- ``{"prompt": "...", "response": "..."}``, or
- ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}``.

``load_calibration(None, tok)`` reads the shipped default
(``safedelta/data/calibration_default.jsonl``: AdvBench's ``calibration`` split, 128 prompts,
with refusals written for this project). ``generate_calibration`` builds a better one: the aligned
model answers the prompts itself, and only its refusals are kept, as the paper recommends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from safedelta.errors import CalibrationError

if TYPE_CHECKING:  # pragma: no cover
    import torch

_logger = logging.getLogger(__name__)

DEFAULT_SEED = 42
DEFAULT_FILE = "calibration_default.jsonl"
_ROLES = ("system", "user", "assistant")


def default_calibration_path() -> Path:
    """Path of the shipped default calibration set."""
    from safedelta.data import data_path

    return data_path(DEFAULT_FILE)


def calibration_digest(path: str | Path | None) -> str:
    """BLAKE2b-128 of a calibration file's bytes (the shipped default when ``path`` is None)."""
    p = Path(path) if path is not None else default_calibration_path()
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CalibrationError(f"cannot read calibration file '{p}': {e.strerror or e}") from e
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _record_to_messages(obj: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(obj, dict):
        raise CalibrationError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise CalibrationError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for j, m in enumerate(msgs):
            if (not isinstance(m, dict) or m.get("role") not in _ROLES
                    or not isinstance(m.get("content"), str)):
                raise CalibrationError(
                    f"{where}: messages[{j}] must be {{'role': one of {'/'.join(_ROLES)}, "
                    f"'content': str}}, got {json.dumps(m)[:120]}")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "user" and m["content"].strip() for m in out):
            raise CalibrationError(f"{where}: 'messages' holds no non-empty user turn")
        return out
    if "prompt" in obj:
        prompt, response = obj.get("prompt"), obj.get("response")
        if not isinstance(prompt, str) or not prompt.strip():
            raise CalibrationError(f"{where}: 'prompt' must be a non-empty string")
        if not isinstance(response, str):
            raise CalibrationError(f"{where}: 'response' must be a string (the safe answer)")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    raise CalibrationError(
        f"{where}: expected keys 'prompt' and 'response', or 'messages'; got "
        f"{sorted(obj)!r}")


def read_calibration_file(path: str | Path | None) -> list[list[dict[str, str]]]:
    """The conversations of a calibration JSONL file, in file order (blank lines skipped).

    Raises:
        CalibrationError: the file is missing, unreadable, empty, or a line is not valid JSON or
            not one of the two record shapes; the message names the file and line.
    """
    p = Path(path) if path is not None else default_calibration_path()
    if not p.is_file():
        raise CalibrationError(f"calibration file not found: '{p}'")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"cannot read calibration file '{p}' as UTF-8: {e}") from e
    convs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        convs.append(_record_to_messages(obj, where))
    if not convs:
        raise CalibrationError(f"calibration file '{p}' holds no samples")
    return convs


def _plain_format(messages: list[dict[str, str]], tokenizer) -> str:
    return "\n\n".join(m["content"] for m in messages)


def format_conversation(messages: list[dict[str, str]], tokenizer) -> tuple[str, bool]:
    """Text of one conversation: the tokenizer's chat template when it has one, else the turns
    joined by blank lines (a base model). Returns ``(text, with_template)``."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False), True
        except Exception as e:  # templates raise arbitrary errors (e.g. no system role)
            if messages and messages[0]["role"] == "system":
                merged = [{"role": "user",
                           "content": messages[0]["content"] + "\n\n" + messages[1]["content"]},
                          *messages[2:]] if len(messages) > 1 else messages
                try:
                    return tokenizer.apply_chat_template(merged, tokenize=False), True
                except Exception:
                    pass
            raise CalibrationError(f"the tokenizer's chat template rejected a sample: {e}") from e
    return _plain_format(messages, tokenizer), False


def tokenize_conversations(convs: Iterable[list[dict[str, str]]], tokenizer, *,
                           max_length: int = 512) -> list["torch.Tensor"]:
    """Token ids (1-D ``LongTensor`` each) of formatted conversations, cut at ``max_length``."""
    import torch

    out, warned = [], False
    bos = getattr(tokenizer, "bos_token_id", None)
    for messages in convs:
        text, templated = format_conversation(messages, tokenizer)
        if not templated and not warned:
            _logger.warning("the tokenizer has no chat template: calibration turns are joined "
                            "as plain text")
            warned = True
        # the template writes its own special tokens; plain text gets the BOS a base model expects
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not templated and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        if not ids:
            continue
        out.append(torch.tensor(ids[:max_length], dtype=torch.long))
    return out


def load_calibration(path: str | Path | None, tokenizer, *, max_samples: int = 128,
                     max_length: int = 512, seed: int = DEFAULT_SEED) -> list["torch.Tensor"]:
    """The calibration samples as token ids, ready for the calibration pass.

    The records are shuffled with ``seed`` (42, as the paper), the first ``max_samples`` kept,
    each formatted with the tokenizer's chat template and cut at ``max_length`` tokens. Samples
    keep their own lengths (the calibration pass pads micro-batches and masks the padding).

    Args:
        path: a JSONL file (see module docstring), or None for the shipped default.
        tokenizer: the *aligned* model's tokenizer (its chat template formats the samples).
        max_samples: at most this many samples (fewer when the file holds fewer).
        max_length: tokens per sample at most.
        seed: shuffling seed.

    Returns:
        list of 1-D ``torch.long`` tensors.

    Raises:
        CalibrationError: missing, empty or malformed file (names the line).
    """
    if max_samples < 1 or max_length < 2:
        raise CalibrationError(f"max_samples must be >= 1 and max_length >= 2, got "
                               f"{max_samples} and {max_length}")
    convs = read_calibration_file(path)
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    chosen = [convs[i] for i in order[:max_samples]]
    samples = tokenize_conversations(chosen, tokenizer, max_length=max_length)
    if not samples:
        raise CalibrationError(f"calibration set '{path or default_calibration_path()}' "
                               "produced no tokens")
    _logger.info("calibration: %d samples, %d tokens", len(samples),
                 sum(int(s.numel()) for s in samples))
    return samples


# --------------------------------------------------------------------------- self-generated set

def _generate_responses(model, tokenizer, prompts: list[str], *, max_new_tokens: int,
                        device: str, batch_size: int, progress: bool) -> list[str]:
    """Greedy answers of ``model`` to ``prompts`` (user turns, chat template, left padding)."""
    import torch
    from tqdm.auto import tqdm

    texts = []
    for p in prompts:
        msgs = [{"role": "user", "content": p}]
        if getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template(msgs, tokenize=False,
                                                       add_generation_prompt=True))
        else:
            texts.append(p + "\n\n")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers: list[str] = []
    try:
        bar = tqdm(total=len(texts), desc="generating calibration answers", unit="prompt",
                   disable=not progress)
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True,
                            add_special_tokens=not getattr(tokenizer, "chat_template", None))
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.inference_mode():
                out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
            bar.update(len(chunk))
        bar.close()
    finally:
        tokenizer.padding_side = old_side
    return [a.strip() for a in answers]


def generate_calibration(aligned_dir: str | Path, out_path: str | Path, *,
                         prompts: list[str] | None = None, n: int = 128,
                         max_new_tokens: int = 128, device: str = "cpu", batch_size: int = 8,
                         progress: bool = True) -> dict:
    """Build a calibration set from the aligned model's own refusals.

    The aligned model answers the prompts (greedy, its chat template); answers that refuse
    (:func:`safedelta.refusal.is_refusal`) are written to ``out_path`` as ``{"prompt",
    "response"}`` JSONL (atomically: nothing is written when the call fails).

    Args:
        aligned_dir: the aligned model (weights and tokenizer).
        out_path: the JSONL file to write.
        prompts: harmful prompts; default: the AdvBench ``calibration`` split.
        n: use at most this many prompts.
        max_new_tokens: answer length limit.
        device: where the model runs (``"cpu"``, ``"cuda"``, ...).
        batch_size: prompts per generate call.
        progress: show a tqdm bar on stderr.

    Returns:
        ``{"prompts", "kept", "discarded", "kept_fraction", "out_path", "keywords"}``.

    Raises:
        CalibrationError: no prompts, or the model refused none of them.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safedelta.refusal import is_refusal

    if prompts is None:
        from safedelta.data import advbench

        prompts = [r["goal"] for r in advbench("calibration")]
    prompts = [p for p in prompts if isinstance(p, str) and p.strip()][:n]
    if not prompts:
        raise CalibrationError("generate_calibration: no prompts to answer")
    aligned_dir = Path(aligned_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(aligned_dir)
    except Exception as e:
        raise CalibrationError(f"no usable tokenizer in '{aligned_dir}': {e}") from e
    model = AutoModelForCausalLM.from_pretrained(aligned_dir, dtype=torch.float32
                                                 if device == "cpu" else "auto")
    model.to(device).eval()
    answers = _generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                  device=device, batch_size=batch_size, progress=progress)
    del model
    kept = [(p, a) for p, a in zip(prompts, answers) if a and is_refusal(a)]
    stats = {"prompts": len(prompts), "kept": len(kept), "discarded": len(prompts) - len(kept),
             "kept_fraction": len(kept) / len(prompts), "out_path": str(out_path),
             "keywords": "zou2023"}
    if not kept:
        raise CalibrationError(
            f"the aligned model at '{aligned_dir}' refused none of {len(prompts)} prompts "
            "(keyword rule), so no safe calibration sample could be kept; use the shipped "
            "default set or supply your own prompt/response file")
    _logger.info("calibration: kept %d of %d answers (refusals)", len(kept), len(prompts))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for p, a in kept:
            f.write(json.dumps({"prompt": p, "response": a}, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    return stats
