"""What the lab ships inside the package (``safedelta/data/lab/``), each produced by a project
command from the bundled base model, with its recipe and fingerprint beside it.

==============================  ==============================================================
file                            what, and the command that writes it
==============================  ==============================================================
``base_answers.jsonl``          the *base* model's greedy answers to the alignment set's helpful
                                prompts (:func:`safedelta.lab.scenarios.answered_prompts`);
                                ``python -m safedelta.lab answers``
``content_attack.jsonl``        the base model's full answers to AdvBench's ``attack`` split (the
                                content attack, :mod:`safedelta.lab.content_attack`); same command
``aligned/``                    the aligned parent as a LoRA adapter on the base (fp16), with
                                ``lab_manifest.json`` (recipe, recipe hash, training time);
                                ``python -m safedelta.lab build --rebuild --only aligned`` then
                                ``python -m safedelta.lab export aligned``
``ft-content/``                 the demo's fine-tune (content attack, LoRA on the aligned
                                parent), written the same way
==============================  ==============================================================

Why ship them: on a 2-core CPU the base model answers ~200 prompts in minutes and the parent
trains in ~15 minutes; a newcomer's ``make demo`` should not wait for either. A shipped adapter is
used only while its recipe hash equals the one the current code computes (so a changed recipe
rebuilds instead of silently using stale weights), and ``--rebuild`` always retrains.
Licences: see ``safedelta/data/lab/NOTICE``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

ANSWERS_FILE = "base_answers.jsonl"
CONTENT_FILE = "content_attack.jsonl"
#: new tokens of a helpful answer (answers are cut to the recipe's ``max_len`` when trained on)
ANSWER_TOKENS = 96


def shipped_dir() -> Path:
    from safedelta.data import data_path

    return data_path("lab")


def adapter_root() -> Path:
    """Where shipped adapters live (``safedelta/data/lab/<model name>/``)."""
    return shipped_dir()


def write_jsonl(out: Path, rows: Sequence[dict]) -> str:
    """Write ``rows`` as JSON lines atomically (temporary sibling, then rename); returns the
    sha256 of what was written."""
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, out)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def build_base_answers(base_dir: str | Path, out_file: str | Path, *,
                       prompts: Sequence[str] | None = None,
                       max_new_tokens: int = ANSWER_TOKENS,
                       generate: Callable[..., list[str]] | None = None,
                       progress: bool = True) -> dict:
    """The base model's greedy answers to ``prompts`` (default: the alignment set's helpful
    prompts) written to ``out_file`` as ``{"prompt", "answer"}`` lines; answers that are empty or
    read as refusals are dropped (the helpful half never teaches a refusal). Returns the manifest
    written beside the file (``<out_file>.manifest.json``)."""
    from safedelta.fingerprint import checkpoint_fingerprint
    from safedelta.lab.scenarios import answered_prompts
    from safedelta.refusal import is_refusal

    if generate is None:
        from safedelta.lab.models import generate_answers as generate
    prompts = list(answered_prompts() if prompts is None else prompts)
    answers = generate(base_dir, prompts, max_new_tokens=max_new_tokens, batch_size=16,
                       progress=progress)
    rows = [{"prompt": p, "answer": a.strip()} for p, a in zip(prompts, answers)
            if a.strip() and not is_refusal(a)]
    out = Path(out_file)
    digest = write_jsonl(out, rows)
    manifest = {"base_fingerprint": checkpoint_fingerprint(base_dir),
                "max_new_tokens": max_new_tokens, "decoding": "greedy, chat template",
                "n_prompts": len(prompts), "kept": len(rows),
                "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
                "sha256": digest}
    Path(str(out) + ".manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("base answers: kept %d/%d (refusals and empty answers dropped)", len(rows),
                len(prompts))
    return manifest


def load_answers(file: str | Path | None = None) -> dict[str, str]:
    """``prompt -> answer`` from a base-answers file (default: the shipped one)."""
    path = Path(file) if file else shipped_dir() / ANSWERS_FILE
    with open(path, encoding="utf-8") as f:
        return {r["prompt"]: r["answer"] for r in map(json.loads, f) if r.get("answer")}


def content_digest(path: str | Path) -> str:
    """sha256 (first 16 hex) of a shipped file: goes into the recipes trained on it."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def shipped_adapter(name: str, recipe_hash: str) -> Path | None:
    """The shipped adapter of lab model ``name`` if it was trained by the recipe with this hash
    (its ``lab_manifest.json`` says so), else ``None`` (the caller trains)."""
    from safedelta.lab.models import read_manifest

    d = adapter_root() / name
    m = read_manifest(d)
    if not m or not (d / "adapter_model.safetensors").is_file():
        return None
    if m.get("recipe_hash") != recipe_hash:
        logger.info("%s: the shipped adapter was made by another recipe (%s, now %s); training",
                    name, m.get("recipe_hash"), recipe_hash)
        return None
    return d


def export_adapter(model_dir: str | Path, name: str) -> Path:
    """Copy a LoRA-trained lab model's adapter and manifest into the package
    (``safedelta/data/lab/<name>/``), replacing the shipped one."""
    import shutil

    from safedelta.lab.models import MANIFEST, LabError, adapter_dir

    src = adapter_dir(model_dir)
    if not (src / "adapter_model.safetensors").is_file():
        raise LabError(f"{model_dir} has no adapter at {src}: was it trained with lora_rank?")
    dst = adapter_root() / name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copy2(src / "adapter_model.safetensors", dst / "adapter_model.safetensors")
    config = json.loads((src / "adapter_config.json").read_text())
    # the lab model it applies to, not this machine's path to it
    config["base_model_name_or_path"] = Path(config.get("base_model_name_or_path") or "").name
    (dst / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy2(Path(model_dir) / MANIFEST, dst / MANIFEST)
    return dst
