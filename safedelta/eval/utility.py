"""Utility: task loss and retention, GSM8K exact match, ROUGE, and user metrics.

``utility_retention = (loss_aligned - loss_protected) / (loss_aligned - loss_finetuned)``: the share
of the task-loss improvement that fine-tuning bought and the protected model keeps. 1 = all of it,
0 = none (as good as the aligned parent), negative = worse than the parent, above 1 = better than
the fine-tuned model.

Task metrics are registered by name (``gsm8k``, ``rouge``, ``exact``); a user adds one with
:func:`register_task_metric`. A task metric maps ``(generations, references)`` to per-row columns.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from safedelta.errors import SafeDeltaError

logger = logging.getLogger(__name__)


class UtilityError(SafeDeltaError, ValueError):
    """A utility measurement cannot be made (bad task data, unknown metric)."""


class NoUtilityGain(UtilityError):
    """Fine-tuning did not lower the task loss, so a retention ratio is meaningless."""


def utility_retention(loss_aligned: float, loss_finetuned: float, loss_protected: float, *,
                      min_gain: float = 1e-6) -> float:
    """Share of the fine-tuning's task-loss gain kept by the protected model.

    Raises:
        NoUtilityGain: when ``loss_aligned - loss_finetuned <= min_gain`` (fine-tuning gained
            nothing on this task data, so there is nothing to retain).
        UtilityError: when a loss is not finite.
    """
    for name, v in (("aligned", loss_aligned), ("finetuned", loss_finetuned),
                    ("protected", loss_protected)):
        if not math.isfinite(v):
            raise UtilityError(f"task loss of the {name} model is not finite ({v})")
    gain = loss_aligned - loss_finetuned
    if gain <= min_gain:
        raise NoUtilityGain(
            f"fine-tuning gained nothing on the task data: aligned loss {loss_aligned:.4f}, "
            f"fine-tuned loss {loss_finetuned:.4f} (gain {gain:.4g} <= {min_gain:g}); "
            "utility retention is undefined. Check that the task data is the fine-tuning "
            "task's held-out split.")
    return (loss_aligned - loss_protected) / gain


def read_task_data(path: str | Path, limit: int | None = None) -> list[dict]:
    """Held-out task data: JSONL of ``{"prompt", "response"}`` (also accepts ``question``/
    ``answer`` and ``instruction``/``output``)."""
    path = Path(path)
    if not path.is_file():
        raise UtilityError(f"task data '{path}' does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as exc:
                raise UtilityError(f"task data '{path}' line {n} is not JSON: {exc}") from exc
            for p, a in (("prompt", "response"), ("question", "answer"),
                         ("instruction", "output")):
                if p in r and a in r:
                    rows.append({"prompt": str(r[p]), "response": str(r[a])})
                    break
            else:
                # never echo the file's own keys: the path may come from a registrant
                raise UtilityError(f"task data '{path}' line {n} needs keys 'prompt' and "
                                   "'response' (or question/answer, instruction/output)")
    if not rows:
        raise UtilityError(f"task data '{path}' is empty")
    return rows[:limit] if limit is not None else rows


def task_loss(model_dir: str | Path, data: str | Path | Sequence[dict], *,
              device: str | None = None, limit: int | None = None, batch_size: int = 4,
              max_length: int = 1024, system_prompt: str | None = None, backend=None,
              progress: bool = True) -> float:
    """Mean cross-entropy (nats per token) of the responses given the chat-templated prompts.

    Only response tokens count; the average is over all response tokens of the data.
    ``backend`` (an :class:`~safedelta.eval.generation.HFBackend`) reuses a loaded model.
    """
    import torch
    from tqdm.auto import tqdm

    from safedelta.eval.generation import HFBackend, format_prompts

    rows = (read_task_data(data, limit) if isinstance(data, (str, Path))
            else list(data)[:limit])
    hf = backend if isinstance(backend, HFBackend) else HFBackend(model_dir, device)
    model, tok = hf.load()
    templated = getattr(tok, "chat_template", None) is not None
    prompts = format_prompts(tok, [r["prompt"] for r in rows], system_prompt)
    total, count = 0.0, 0
    eos = tok.eos_token or ""
    with torch.inference_mode():
        for s in tqdm(range(0, len(rows), batch_size), desc="task loss", file=sys.stderr,
                      disable=not progress, leave=False):
            ids, labels = [], []
            for p, r in zip(prompts[s:s + batch_size], rows[s:s + batch_size]):
                p_ids = tok(p, add_special_tokens=not templated)["input_ids"]
                r_ids = tok(r["response"] + eos, add_special_tokens=False)["input_ids"]
                seq = (p_ids + r_ids)[:max_length]
                lab = ([-100] * len(p_ids) + r_ids)[:max_length]
                ids.append(seq)
                labels.append(lab)
            width = max(len(x) for x in ids)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            inp = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=hf.device)
            att = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids],
                               device=hf.device)
            lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels], device=hf.device)
            logits = model(input_ids=inp, attention_mask=att).logits[:, :-1].float()
            target = lab[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((target != -100).sum())
    if count == 0:
        raise UtilityError("task data has no response tokens within max_length")
    return total / count


# ---------------------------------------------------------------- task metrics

_NUM_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _to_number(s: str | None) -> float | None:
    if s is None:
        return None
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def gsm8k_answer(text: str | None) -> float | None:
    """The final number of a GSM8K answer or model response: after ``####``, else after
    "answer is", else the last number in the text."""
    if not text:
        return None
    if "####" in text:
        m = _NUM_RE.search(text.split("####")[-1])
        return _to_number(m.group(0)) if m else None
    m = re.search(r"answer is[:\s]*\$?\s*(-?[\d,]*\.?\d+)", text, flags=re.IGNORECASE)
    if m:
        return _to_number(m.group(1))
    nums = _NUM_RE.findall(text)
    return _to_number(nums[-1]) if nums else None


def gsm8k_metric(generations: Sequence[str], references: Sequence[str | None]) -> dict[str, list]:
    """Exact match of the final number: column ``gsm8k_accuracy`` (0/1 per row)."""
    out = []
    for g, r in zip(generations, references):
        ref, pred = gsm8k_answer(r), gsm8k_answer(g)
        out.append(float(ref is not None and pred is not None and abs(ref - pred) < 1e-6))
    return {"gsm8k_accuracy": out}


def rouge_metric(generations: Sequence[str], references: Sequence[str | None]) -> dict[str, list]:
    """ROUGE-1/2/L F1 (rouge-score, stemming on): columns ``rouge1``, ``rouge2``, ``rougeL``."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    cols: dict[str, list] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for g, r in zip(generations, references):
        s = scorer.score(r or "", g)
        for k in cols:
            cols[k].append(s[k].fmeasure)
    return cols


def exact_metric(generations: Sequence[str], references: Sequence[str | None]) -> dict[str, list]:
    """Stripped string equality: column ``exact_match``."""
    return {"exact_match": [float((r or "").strip() == g.strip())
                            for g, r in zip(generations, references)]}


TaskMetricFn = Callable[[Sequence[str], Sequence["str | None"]], dict[str, list]]
TASK_METRICS: dict[str, TaskMetricFn] = {"gsm8k": gsm8k_metric, "rouge": rouge_metric,
                                         "exact": exact_metric}


def register_task_metric(name: str, fn: TaskMetricFn) -> None:
    """Add a user metric: ``fn(generations, references) -> {column: per-row floats}``.

    Use it with ``Suite(..., kind="task", metric=name)``; each column's mean (with a bootstrap
    interval) is reported under the column's name.
    """
    if not name or not callable(fn):
        raise UtilityError("register_task_metric needs a name and a callable")
    if name in TASK_METRICS and TASK_METRICS[name] is not fn:
        raise UtilityError(f"task metric {name!r} is already registered")
    TASK_METRICS[name] = fn


def task_metric(name: str) -> TaskMetricFn:
    if name not in TASK_METRICS:
        raise UtilityError(f"unknown task metric {name!r}; known: {', '.join(TASK_METRICS)} "
                           "(add one with register_task_metric)")
    return TASK_METRICS[name]
