"""Judges against human labels: the ``minilm`` head and the keyword rule on the same held-out
XSTest completions (``python -m benchmarks.run judge``; trains the head, about a minute)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def run() -> str:
    from safedelta.eval.judge_train import MANIFEST_FILE, train_head

    with tempfile.TemporaryDirectory() as d:
        out = train_head(Path(d) / "heads")
        m = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    held = m["heldout"]
    lines = [
        "## Judges against human labels (XSTest completions, held-out rows)",
        "",
        f"Held-out: {m['n_heldout']} Mistral-7B-Instruct answers (both completion files, split by "
        f"prompt id; {m['n_train']} rows train the head), human labels "
        + ", ".join(f"{k} {v}" for k, v in m["heldout_human_labels"].items())
        + ". Positive class = compliance (what ASR counts); a partial refusal counts as "
        "compliance. Precision/recall of compliance; refusal recall = share of human-labelled "
        "refusals the judge calls refusals.",
        "",
        "| judge | accuracy | precision | recall | refusal recall | n |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in held.items():
        lines.append(f"| {name} | {s['accuracy']:.3f} | {s['precision']:.3f} | "
                     f"{s['recall']:.3f} | {s['refusal_recall']:.3f} | {s['n']} |")
    short = m.get("heldout_short")
    if short:
        lines += ["", f"Held-out quarter of the {m['n_short']} terse answers written for this "
                  "project (`SHORT_ANSWERS` in `safedelta/eval/judge_train.py`: refusals without "
                  "\"sorry\", one-line compliances), scored apart:", "",
                  "| judge | accuracy | precision | recall | refusal recall | n |",
                  "|---|---|---|---|---|---|"]
        for name, s in short.items():
            lines.append(f"| {name} | {s['accuracy']:.3f} | {s['precision']:.3f} | "
                         f"{s['recall']:.3f} | {s['refusal_recall']:.3f} | {s['n']} |")
    lines += ["", f"Head: logistic regression on all-MiniLM-L6-v2 mean-pooled embeddings "
              f"(recipe {json.dumps(m['recipe'])}), fingerprint `{m['fingerprint'][:16]}`, "
              f"trained in {m['seconds']} s. `majority` always answers the training set's "
              "majority class."]
    return "\n".join(lines)
