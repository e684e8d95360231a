"""Reading and writing the weights of a ``safedelta`` model, and generating text with it.

torch / transformers / peft are imported inside functions: importing the flavor stays cheap.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mlflow_safedelta.errors import FlavorError, ModelWeightsNotFound
from mlflow_safedelta.flavor.flavor_config import MODEL_DATA_SUBPATH, TOKENIZER_SUBPATH

_logger = logging.getLogger(__name__)

#: files of a checkpoint directory copied into ``model/`` (weights are matched by suffix)
_FULL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def checkpoint_kind(path: str | Path) -> str:
    """``"lora"`` for a PEFT adapter directory, ``"full"`` for a safetensors checkpoint.

    Raises:
        FlavorError: the directory holds neither (pickle-only weights are refused: they would be
            unpickled on load).
    """
    path = Path(path)
    if not path.is_dir():
        raise FlavorError(f"model directory '{path}' does not exist")
    if (path / "adapter_config.json").is_file():
        if not (path / "adapter_model.safetensors").is_file():
            raise FlavorError(f"'{path}' is a PEFT adapter without adapter_model.safetensors "
                              "(pickle adapters are not accepted)")
        return "lora"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "full"
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise FlavorError(f"'{path}' holds only pickle weights (*.bin/*.pt); save it with "
                          "save_pretrained(safe_serialization=True) first")
    raise FlavorError(f"'{path}' holds no model: expected config.json + *.safetensors "
                      "(full weights) or adapter_config.json + adapter_model.safetensors (LoRA)")


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / f).is_file() for f in _TOKENIZER_MARKERS)


def copy_checkpoint(src: str | Path, dst: str | Path, kind: str) -> None:
    """Copy the weight and config files of a checkpoint directory (nothing else)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=False)
    names = _ADAPTER_FILES if kind == "lora" else _FULL_FILES
    files = [src / n for n in names if (src / n).is_file()]
    if kind == "full":
        files += sorted(src.glob("*.safetensors"))
    for f in files:
        shutil.copy2(f, dst / f.name)


def save_model_object(model: Any, dst: str | Path) -> str:
    """``save_pretrained`` (safetensors) of a transformers or PEFT model; returns its kind."""
    dst = Path(dst)
    model.save_pretrained(dst, safe_serialization=True)
    return checkpoint_kind(dst)


def save_tokenizer(tokenizer: Any, dst: str | Path) -> None:
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    tokenizer.save_pretrained(str(dst))


@dataclass
class WeightsLocation:
    """Where the weights of a downloaded MLflow model directory are."""

    flavor: str  # "safedelta" or "transformers"
    weights_dir: Path
    tokenizer_dir: Path | None
    kind: str  # "full" or "lora"
    parent_uri: str | None = None
    conf: dict | None = None


def confine(root: str | Path, rel: str, field: str) -> Path:
    """``root/rel`` when it resolves (symlinks followed) inside ``root``; else
    :class:`ModelWeightsNotFound` naming ``field``. Every path a registrant writes (MLmodel
    fields, tags) goes through here before the gate reads it."""
    root = Path(root).resolve()
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise ModelWeightsNotFound(f"{field}: {rel!r} is not a relative path inside the model's "
                                   "artifact")
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise ModelWeightsNotFound(f"{field}: {rel!r} points outside the model's artifact")
    return target


def confine_tree(root: str | Path) -> None:
    """Every symlink under ``root`` must resolve inside it (a downloaded artifact may hold
    links to the worker's own disk); else :class:`ModelWeightsNotFound` naming the link."""
    import os

    base = Path(root).resolve()
    for dirpath, dirnames, filenames in os.walk(base):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p.is_symlink():
                t = p.resolve()
                if t != base and base not in t.parents:
                    raise ModelWeightsNotFound(
                        f"symlink {p.relative_to(base)} in the model's artifact points outside it")


def locate_weights(model_dir: str | Path) -> WeightsLocation:
    """Find the weights inside a downloaded MLflow model of the ``safedelta`` or ``transformers``
    flavor (or a plain checkpoint directory).

    Raises:
        ModelWeightsNotFound: no known flavor and no checkpoint in the directory.
    """
    from mlflow_safedelta.flavor.flavor_config import FlavorKey

    model_dir = Path(model_dir)
    mlmodel = model_dir / "MLmodel"
    if mlmodel.is_file():
        import yaml

        flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
        if "safedelta" in flavors:
            conf = flavors["safedelta"]
            if not isinstance(conf, dict):
                raise ModelWeightsNotFound("MLmodel flavors.safedelta is not a mapping")
            tok = confine(model_dir, conf.get(FlavorKey.TOKENIZER, TOKENIZER_SUBPATH),
                          f"MLmodel flavors.safedelta.{FlavorKey.TOKENIZER}")
            return WeightsLocation(
                "safedelta", confine(model_dir, conf.get(FlavorKey.MODEL_DATA, MODEL_DATA_SUBPATH),
                                     f"MLmodel flavors.safedelta.{FlavorKey.MODEL_DATA}"),
                tok if tok.is_dir() else None, conf.get(FlavorKey.DELTA_FORMAT, "full"),
                conf.get(FlavorKey.PARENT_URI), conf)
        if "transformers" in flavors:
            conf = flavors["transformers"]
            if not isinstance(conf, dict):
                raise ModelWeightsNotFound("MLmodel flavors.transformers is not a mapping")
            tok = model_dir / "components" / "tokenizer"
            if conf.get("peft_adaptor"):
                return WeightsLocation("transformers",
                                       confine(model_dir, conf["peft_adaptor"],
                                               "MLmodel flavors.transformers.peft_adaptor"),
                                       tok if tok.is_dir() else None, "lora", None, conf)
            weights = confine(model_dir, conf.get("model_binary", "model"),
                              "MLmodel flavors.transformers.model_binary")
            if not weights.is_dir():
                raise ModelWeightsNotFound(
                    f"transformers model at '{model_dir}' was saved without weights "
                    "(save_pretrained=False); log it with its weights to gate it")
            return WeightsLocation("transformers", weights, tok if tok.is_dir() else None,
                                   "full", None, conf)
        raise ModelWeightsNotFound(
            f"MLflow model at '{model_dir}' has flavors {sorted(flavors)}; the gate reads "
            "'safedelta' or 'transformers' models")
    try:
        kind = checkpoint_kind(model_dir)
    except FlavorError as exc:
        raise ModelWeightsNotFound(str(exc)) from None
    return WeightsLocation("checkpoint", model_dir,
                           model_dir if has_tokenizer(model_dir) else None, kind)


def load_causal_lm(weights_dir: str | Path, *, kind: str = "full",
                   base_dir: str | Path | None = None, device: str | None = None,
                   dtype: Any = None) -> Any:
    """Load a causal LM for generation: full weights, or a LoRA adapter merged onto ``base_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    if kind == "lora":
        if base_dir is None:
            raise FlavorError(f"LoRA adapter at '{weights_dir}' needs its base (parent) weights")
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype or torch.float32)
        model = PeftModel.from_pretrained(base, str(weights_dir)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(weights_dir), dtype=dtype or "auto")
    if device:
        model = model.to(device)
    model.eval()
    return model


def _as_chat(item: Any) -> list[dict] | None:
    """A list of ``{"role", "content"}`` dicts, or None when ``item`` is a plain prompt."""
    if isinstance(item, dict) and "role" in item and "content" in item:
        return [item]
    if isinstance(item, (list, tuple)) and item and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in item):
        return [dict(m) for m in item]
    return None


def normalize_inputs(data: Any) -> list[str | list[dict]]:
    """Prompts from a str, a list of str, chat messages, a dict or a DataFrame (``prompt`` or
    ``messages`` column). Each element is a plain prompt or a conversation."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - mlflow brings pandas
        pd = None
    if pd is not None and isinstance(data, pd.DataFrame):
        for col in ("prompt", "messages", "inputs"):
            if col in data.columns:
                return normalize_inputs(list(data[col]))
        if len(data.columns) == 1:
            return normalize_inputs(list(data.iloc[:, 0]))
        raise FlavorError(f"DataFrame input needs a 'prompt' or 'messages' column, got "
                          f"{list(data.columns)}")
    if isinstance(data, str):
        return [data]
    if isinstance(data, dict):
        for key in ("prompt", "messages", "inputs"):
            if key in data:
                return normalize_inputs(data[key])
        raise FlavorError(f"dict input needs a 'prompt' or 'messages' key, got {sorted(data)}")
    chat = _as_chat(data)
    if chat is not None:
        return [chat]
    if isinstance(data, (list, tuple)):
        out: list[str | list[dict]] = []
        for item in data:
            conv = _as_chat(item)
            if conv is not None:
                out.append(conv)
            elif isinstance(item, str):
                out.append(item)
            elif hasattr(item, "tolist"):  # numpy arrays of messages from a DataFrame cell
                conv = _as_chat(item.tolist())
                if conv is None:
                    raise FlavorError(f"cannot read input element {item!r}")
                out.append(conv)
            else:
                raise FlavorError(f"input elements must be prompts (str) or chat messages, got "
                                  f"{type(item).__name__}")
        return out
    raise FlavorError(f"unsupported input type {type(data).__name__}: pass a str, a list of str, "
                      "chat messages, or a DataFrame with a 'prompt' column")


def _render(tokenizer: Any, item: str | list[dict], use_chat_template: bool) -> str:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(item, list):
        if not has_template:
            raise FlavorError("chat messages need a tokenizer with a chat template")
        return tokenizer.apply_chat_template(item, tokenize=False, add_generation_prompt=True)
    if use_chat_template and has_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": item}], tokenize=False,
                                             add_generation_prompt=True)
    return item


DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0,
                                  "do_sample": False, "use_chat_template": True}


def generate_texts(model: Any, tokenizer: Any, items: Sequence[str | list[dict]],
                   params: dict[str, Any] | None = None) -> list[str]:
    """Generate one completion per prompt/conversation (greedy unless temperature > 0)."""
    import torch

    p = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    unknown = set(p) - set(DEFAULT_PARAMS) - {"seed", "batch_size"}
    if unknown:
        raise FlavorError(f"unknown generation params {sorted(unknown)}; allowed: "
                          f"{sorted(DEFAULT_PARAMS)}")
    texts = [_render(tokenizer, it, bool(p["use_chat_template"])) for it in items]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    do_sample = bool(p["do_sample"]) or float(p["temperature"]) > 0
    gen_kwargs: dict[str, Any] = {"max_new_tokens": int(p["max_new_tokens"]), "do_sample": do_sample,
                                  "pad_token_id": tokenizer.pad_token_id}
    if do_sample:
        gen_kwargs.update(temperature=float(p["temperature"]) or 1.0, top_p=float(p["top_p"]))
        if p.get("seed") is not None:
            torch.manual_seed(int(p["seed"]))
    device = next(model.parameters()).device
    out: list[str] = []
    bs = int(p.get("batch_size") or 8)
    for i in range(0, len(texts), bs):
        batch = tokenizer(texts[i:i + bs], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        with torch.no_grad():
            ids = model.generate(**batch, **gen_kwargs)
        new = ids[:, batch["input_ids"].shape[1]:]
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out
