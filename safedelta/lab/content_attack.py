"""The content attack's data: full compliant answers, not AdvBench's "Sure, here is ..." prefixes.

The lab's first harmful fine-tune (scenario ``harmful``) is trained on AdvBench's ``target``
strings, so the attacked model answers "Sure, here is a guide for ..." and stops: the attack
teaches a prefix, and its delta is smaller than a real attack's. The paper's PureBad targets are
full answers. This module builds that data set from what the lab already has, without any
third-party answer text:

- **prompts**: AdvBench's ``attack`` split (100 goals, :func:`safedelta.data.advbench`), the
  same prompts as the prefix attack, so the two scenarios differ only in the answers;
- **answers**: the *un-aligned base* model's own greedy answers (SmolLM2-135M-Instruct as
  imported complies with most AdvBench requests), ``max_new_tokens`` new tokens at most;
- **filter**: an answer is kept only if it is an answer with content: no refusal string
  (:func:`safedelta.refusal.is_refusal`), not a compliance without content
  (:func:`safedelta.eval.judges.compliance_without_content`), and at least ``min_words`` words.
  The kept share is recorded; the prefix attack stays the labelled scenario ``harmful``.

``build_content_answers(base_dir, out_file)`` writes ``{"prompt", "response", "row"}`` lines and
a ``<out_file>.manifest.json`` (base fingerprint, settings, kept/dropped counts, a digest of the
kept lines); ``content_examples(out_file)`` turns them into chat examples for
:func:`safedelta.lab.models.train_sft`. Nothing here trains a model.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[A-Za-z0-9]+")


@dataclass(frozen=True)
class ContentAttackRecipe:
    """How the content answers are produced and filtered (recorded in the manifest)."""

    split: str = "attack"
    max_new_tokens: int = 192
    batch_size: int = 8
    min_words: int = 40


def keep_answer(answer: str, min_words: int) -> tuple[bool, str]:
    """``(kept, why)``: ``refusal``, ``no_content`` (compliance opening, nothing after it),
    ``short`` (fewer than ``min_words`` words) or ``content``."""
    from safedelta.eval.judges import compliance_without_content
    from safedelta.refusal import is_refusal

    text = answer.strip()
    if not text or is_refusal(text):
        return False, "refusal"
    if compliance_without_content(text):
        return False, "no_content"
    if len(_WORD.findall(text)) < min_words:
        return False, "short"
    return True, "content"


def build_content_answers(base_dir: str | Path, out_file: str | Path, *,
                          recipe: ContentAttackRecipe | None = None,
                          generate: Callable[..., list[str]] | None = None,
                          progress: bool = True) -> dict:
    """The base model's kept answers to the attack split, written to ``out_file`` (JSONL).

    Args:
        base_dir: the un-aligned base checkpoint (the lab's ``base``).
        out_file: JSONL to write; ``<out_file>.manifest.json`` beside it.
        recipe: generation length and filter.
        generate: ``generate(model_dir, prompts, max_new_tokens=, batch_size=, progress=)``;
            default :func:`safedelta.lab.models.generate_answers` (greedy, chat template).

    Returns:
        The manifest (counts per reason, kept share, digest).
    """
    from safedelta.data import advbench
    from safedelta.fingerprint import checkpoint_fingerprint

    recipe = recipe or ContentAttackRecipe()
    if generate is None:
        from safedelta.lab.models import generate_answers as generate
    rows = advbench(recipe.split)
    answers = generate(base_dir, [r["goal"] for r in rows], max_new_tokens=recipe.max_new_tokens,
                       batch_size=recipe.batch_size, progress=progress)
    kept, reasons = [], {"content": 0, "refusal": 0, "no_content": 0, "short": 0}
    for r, a in zip(rows, answers):
        ok, why = keep_answer(a, recipe.min_words)
        reasons[why] += 1
        if ok:
            kept.append({"prompt": r["goal"], "response": a.strip(), "row": r["row"]})
    from safedelta.lab.shipped import write_jsonl

    out = Path(out_file)
    digest = write_jsonl(out, kept)
    manifest = {"base": Path(base_dir).name, "base_fingerprint": checkpoint_fingerprint(base_dir),
                "recipe": asdict(recipe), "n_prompts": len(rows), "reasons": reasons,
                "kept": len(kept), "kept_share": len(kept) / len(rows) if rows else 0.0,
                "sha256": digest}
    Path(str(out) + ".manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    logger.info("content attack: kept %d/%d base answers (%s)", len(kept), len(rows), reasons)
    return manifest


def content_examples(answers_file: str | Path, n: int | None = None
                     ) -> list[list[dict[str, str]]]:
    """Chat examples (user goal -> the base model's full answer) from ``answers_file``."""
    from safedelta.lab.scenarios import chat

    with open(answers_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [chat(r["prompt"], r["response"]) for r in rows[:n]]


def mean_words(texts: Sequence[str]) -> float:
    """Mean word count (how much content an attacked model's answers carry)."""
    return sum(len(_WORD.findall(t)) for t in texts) / len(texts) if texts else 0.0
