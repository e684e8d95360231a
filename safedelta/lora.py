"""PEFT LoRA adapters as the fine-tuned input, without merging the model.

A LoRA fine-tune changes a base weight ``W0`` (r x c) by ``delta = scaling * B @ A`` with
``A`` (rank x c) and ``B`` (r x rank); ``scaling = lora_alpha / rank`` (``lora_alpha / sqrt(rank)``
with ``use_rslora``), ``alpha_pattern`` overriding ``lora_alpha`` per module and the rank read from
``A`` (so ``rank_pattern`` needs no special case). With ``fan_in_fan_out`` (GPT-2's ``Conv1D``,
weights stored in x out) the delta is transposed to the stored layout. Embedding adapters
(``lora_embedding_A``/``_B``) give ``(B @ A).T``; ``lora_bias`` adds ``scaling * lora_B.bias`` to
the base bias. Every other saved tensor (``modules_to_save``, e.g. a trained ``lm_head``) replaces
the aligned value.

:class:`LoraAdapter` answers, for one base tensor at a time, what the fine-tuned tensor is
(``finetuned(name, aligned_tensor)``), so the protect pipeline streams a LoRA fine-tune exactly
like a full checkpoint: the merged model is never built.

Example::

    adapter = LoraAdapter("runs/my-lora")
    adapter.check_against(CheckpointReader("aligned"))
    w1 = adapter.finetuned("model.layers.0.self_attn.q_proj.weight", w0)
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from safedelta.checkpoint import CheckpointReader, assert_finite
from safedelta.errors import AdapterError, MissingCheckpoint, PickleCheckpointRefused

if TYPE_CHECKING:  # pragma: no cover
    import torch

_logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

#: suffix of a saved key -> (role, suffix of the base tensor it changes)
_LORA_SUFFIXES = (
    (".lora_A.weight", "A", ".weight"),
    (".lora_B.weight", "B", ".weight"),
    (".lora_B.bias", "Bbias", ".bias"),
    (".lora_embedding_A", "EA", ".weight"),
    (".lora_embedding_B", "EB", ".weight"),
)
#: saved keys of adapter variants whose delta is not ``scaling * B @ A``
_UNSUPPORTED = ("lora_magnitude_vector", "trainable_tokens", "lora_E", "lora_C")


def is_lora_adapter(path: str | Path) -> bool:
    """True when ``path`` is a PEFT adapter directory (it has ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _pattern_key(patterns: dict, module: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key matching ``module`` (PEFT's rule), if any."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass
class _Module:
    """The saved LoRA factors of one base module."""

    module: str
    A: str | None = None
    B: str | None = None
    Bbias: str | None = None
    embedding: bool = False
    extra: dict = field(default_factory=dict)


class LoraAdapter:
    """A PEFT LoRA adapter directory, read lazily (memory-mapped safetensors).

    Args:
        path: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        allow_pickle: allow ``adapter_model.bin`` (loaded with ``weights_only=True``).

    Attributes:
        config: the adapter config (dict).
        modules: base module name -> its LoRA factor keys.
        replaced: base tensor name -> saved key of a full replacement (``modules_to_save``).
    """

    kind = "lora"

    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        self.label = "LoRA adapter"
        cfg_file = self.path / ADAPTER_CONFIG
        if not cfg_file.is_file():
            raise MissingCheckpoint(f"no {ADAPTER_CONFIG} in '{self.path}': not a PEFT adapter")
        try:
            self.config: dict = json.loads(cfg_file.read_text())
        except ValueError as exc:
            raise AdapterError(f"'{cfg_file}' is not valid JSON: {exc}") from exc
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise AdapterError(f"adapter '{self.path}' is of type {peft_type!r}; only LoRA "
                               "adapters (peft_type 'LORA') can be protected without merging. "
                               "Merge it (merge_and_unload) and pass the full checkpoint instead.")
        for flag in ("use_dora", "use_qalora"):
            if self.config.get(flag):
                raise AdapterError(f"adapter '{self.path}' uses {flag}=True, whose delta is not "
                                   "scaling*B@A; merge it and pass the full checkpoint instead")
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        self.use_rslora = bool(self.config.get("use_rslora", False))
        self.lora_alpha = float(self.config.get("lora_alpha", self.config.get("r", 8)))
        self.alpha_pattern: dict = dict(self.config.get("alpha_pattern") or {})
        self._weights = self._open_weights(allow_pickle)
        self.modules: dict[str, _Module] = {}
        self.replaced: dict[str, str] = {}
        for key in self._keys():
            self._classify(key)
        for mod in self.modules.values():
            if not (mod.A and mod.B):
                raise AdapterError(f"adapter '{self.path}' has an incomplete LoRA pair for module "
                                   f"'{mod.module}' (needs both A and B)")

    # -- reading --------------------------------------------------------------------------

    def _open_weights(self, allow_pickle: bool):
        if (self.path / ADAPTER_SAFE).is_file():
            from safetensors import safe_open

            return safe_open(self.path / ADAPTER_SAFE, framework="pt", device="cpu")
        if (self.path / ADAPTER_PICKLE).is_file():
            if not allow_pickle:
                raise PickleCheckpointRefused(
                    f"'{self.path}' holds only a pickle-based adapter ({ADAPTER_PICKLE}); "
                    "unpickling can run arbitrary code, so it is refused. Save the adapter with "
                    "safe_serialization=True or pass --allow-pickle if you trust its origin.")
            from safedelta.checkpoint import load_pickled_weights

            return load_pickled_weights(self.path / ADAPTER_PICKLE, mmap=False)
        raise MissingCheckpoint(f"no adapter weights in '{self.path}' (expected {ADAPTER_SAFE})")

    def _keys(self) -> list[str]:
        return list(self._weights.keys())

    def _tensor(self, key: str) -> "torch.Tensor":
        t = self._weights[key] if isinstance(self._weights, dict) else self._weights.get_tensor(key)
        assert_finite(t, key, f"{self.label} '{self.path}'")
        return t

    def _shape(self, key: str) -> tuple[int, ...]:
        if isinstance(self._weights, dict):
            return tuple(self._weights[key].shape)
        return tuple(self._weights.get_slice(key).get_shape())

    def _classify(self, key: str) -> None:
        name = key.removeprefix(PEFT_PREFIX)
        if any(u in name for u in _UNSUPPORTED):
            raise AdapterError(f"adapter '{self.path}' holds '{key}', a LoRA variant (DoRA, "
                               "trainable tokens, ...) that cannot be applied without merging; "
                               "merge it and pass the full checkpoint instead")
        for suffix, role, _ in _LORA_SUFFIXES:
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                mod = self.modules.setdefault(module, _Module(module))
                if role in ("EA", "EB"):
                    mod.embedding = True
                setattr(mod, {"EA": "A", "EB": "B"}.get(role, role), key)
                return
        # a full tensor (modules_to_save): older PEFT versions keep the wrapper's path in the key
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
        self.replaced[name] = key

    # -- what it changes --------------------------------------------------------------------

    def targets(self) -> dict[str, str]:
        """Base tensor name -> how it changes (``"lora"``, ``"lora_bias"`` or ``"replaced"``)."""
        out = {f"{m}.weight": "lora" for m in self.modules}
        out.update({f"{m.module}.bias": "lora_bias" for m in self.modules.values() if m.Bbias})
        out.update({n: "replaced" for n in self.replaced})
        return out

    def scaling(self, module: str) -> float:
        mod = self.modules[module]
        rank = self._shape(mod.A)[0]  # the trained rank (rank_pattern included)
        key = _pattern_key(self.alpha_pattern, module)
        alpha = float(self.alpha_pattern[key]) if key is not None else self.lora_alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def _delta_shape(self, mod: _Module) -> tuple[int, ...]:
        a, b = self._shape(mod.A), self._shape(mod.B)
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise AdapterError(f"adapter '{self.path}': LoRA factors of '{mod.module}' have "
                               f"incompatible shapes A {list(a)}, B {list(b)}")
        if mod.embedding:  # A: rank x num_embeddings, B: dim x rank -> (num_embeddings x dim)
            return (a[1], b[0])
        return (a[1], b[0]) if self.fan_in_fan_out else (b[0], a[1])

    def check_against(self, aligned: CheckpointReader) -> None:
        """Check (headers only) that every changed tensor exists in ``aligned`` with its shape.

        Raises:
            AdapterError: a targeted module is absent from the aligned model, or its shape differs
                (the adapter was trained on another base model).
        """
        base = self.config.get("base_model_name_or_path")
        if base and Path(str(base)).is_dir() and (Path(str(base)) / "config.json").is_file():
            theirs = json.loads((Path(str(base)) / "config.json").read_text())
            mine = aligned.config()
            for key in ("model_type", "architectures", "hidden_size", "num_hidden_layers",
                        "vocab_size"):
                if key in theirs and key in mine and theirs[key] != mine[key]:
                    raise AdapterError(
                        f"adapter '{self.path}' was trained on '{base}', whose config '{key}' is "
                        f"{theirs[key]!r}, but the aligned model has {mine[key]!r}: its base differs")
        names = set(aligned.names())
        for mod in self.modules.values():
            wname = f"{mod.module}.weight"
            if wname not in names:
                raise AdapterError(f"adapter '{self.path}' targets '{mod.module}', which the "
                                   f"aligned model '{aligned.path}' does not have: its base differs")
            want, have = self._delta_shape(mod), aligned.shape(wname)
            if tuple(want) != tuple(have):
                raise AdapterError(
                    f"adapter '{self.path}': the delta for '{wname}' has shape {list(want)} but the "
                    f"aligned weight is {list(have)}: the adapter's base differs from the aligned "
                    "model (or fan_in_fan_out is set wrongly)")
            if mod.Bbias:
                bname = f"{mod.module}.bias"
                if bname not in names:
                    raise AdapterError(f"adapter '{self.path}' has a LoRA bias for '{mod.module}' "
                                       "but the aligned layer has no bias")
        for name, key in self.replaced.items():
            if name not in names:
                raise AdapterError(f"adapter '{self.path}' saves '{name}' (modules_to_save), which "
                                   f"the aligned model '{aligned.path}' does not have")
            if tuple(self._shape(key)) != tuple(aligned.shape(name)):
                raise AdapterError(
                    f"adapter '{self.path}' saves '{name}' with shape {list(self._shape(key))} but "
                    f"the aligned tensor is {list(aligned.shape(name))}: its base differs")

    def delta(self, name: str) -> "torch.Tensor | None":
        """``scaling * B @ A`` in the stored layout of base tensor ``name`` (fp32), or None."""
        import torch

        if name.endswith(".weight") and name[: -len(".weight")] in self.modules:
            mod = self.modules[name[: -len(".weight")]]
            A = self._tensor(mod.A).to(torch.float32)
            B = self._tensor(mod.B).to(torch.float32)
            d = (B @ A) * self.scaling(mod.module)
            return d.T if (mod.embedding or self.fan_in_fan_out) else d
        if name.endswith(".bias") and name[: -len(".bias")] in self.modules:
            mod = self.modules[name[: -len(".bias")]]
            if mod.Bbias:
                return self._tensor(mod.Bbias).to(torch.float32) * self.scaling(mod.module)
        return None

    def finetuned(self, name: str, aligned: "torch.Tensor") -> "torch.Tensor":
        """The fine-tuned value of base tensor ``name``, given its aligned value ``aligned``.

        Unchanged tensors come back as ``aligned`` itself; LoRA targets as ``aligned + delta``
        (computed in fp32, returned in the aligned dtype); saved tensors as saved.
        """
        if name in self.replaced:
            return self._tensor(self.replaced[name])
        d = self.delta(name)
        if d is None:
            return aligned
        import torch

        return (aligned.to(torch.float32) + d).to(aligned.dtype)

    def fingerprint_files(self) -> list[Path]:
        return [p for p in (self.path / ADAPTER_SAFE, self.path / ADAPTER_PICKLE) if p.is_file()]
