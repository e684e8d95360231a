"""Reading Hugging Face checkpoints tensor by tensor (memory-mapped safetensors).

``CheckpointReader(dir)`` opens ``model.safetensors`` or a sharded ``model.safetensors.index.json``
without loading anything: ``names()``, ``shape(name)``, ``dtype(name)`` read headers only and
``get(name)`` maps one tensor from disk. Pickle-based weights (``pytorch_model.bin``) are refused
unless ``allow_pickle=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from safedelta.errors import MissingCheckpoint, MissingTensor, PickleCheckpointRefused

if TYPE_CHECKING:  # pragma: no cover
    import torch

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


class CheckpointReader:
    """Lazy, memory-mapped access to the tensors of one checkpoint directory."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MissingCheckpoint(f"checkpoint directory not found: '{self.path}'")
        self.allow_pickle = allow_pickle
        self._handles: dict[str, object] = {}
        self._pickled: dict[str, "torch.Tensor"] | None = None
        if (self.path / SAFE_INDEX).is_file():
            index = json.loads((self.path / SAFE_INDEX).read_text())
            self.weight_map: dict[str, str] = dict(index["weight_map"])
            self.metadata: dict = dict(index.get("metadata") or {})
        elif (self.path / SAFE_SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(self.path / SAFE_SINGLE, framework="pt") as f:
                self.weight_map = {k: SAFE_SINGLE for k in f.keys()}
            self.metadata = {}
        else:
            pickled = [n for n in PICKLE_NAMES if (self.path / n).is_file()]
            if pickled and not allow_pickle:
                raise PickleCheckpointRefused(
                    f"'{self.path}' holds only pickle-based weights ({', '.join(pickled)}); "
                    "unpickling can run arbitrary code, so it is refused. Convert the checkpoint "
                    "to safetensors (model.save_pretrained(..., safe_serialization=True)) or pass "
                    "--allow-pickle if you trust its origin."
                )
            if not pickled:
                raise MissingCheckpoint(
                    f"no model weights in '{self.path}' (expected {SAFE_SINGLE} or {SAFE_INDEX})"
                )
            self._pickled = self._load_pickled(pickled)
            self.weight_map = {k: "<pickle>" for k in self._pickled}
            self.metadata = {}

    def _load_pickled(self, names: list[str]) -> dict[str, "torch.Tensor"]:
        import torch

        files: list[Path]
        if "pytorch_model.bin.index.json" in names:
            idx = json.loads((self.path / "pytorch_model.bin.index.json").read_text())
            files = sorted({self.path / f for f in idx["weight_map"].values()})
        else:
            files = [self.path / names[0]]
        state: dict[str, torch.Tensor] = {}
        for f in files:  # weights_only: even when allowed, never run arbitrary pickled code
            state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        return state

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def files(self) -> list[Path]:
        """The weight files, in shard order."""
        return [self.path / f for f in dict.fromkeys(self.weight_map.values()) if f != "<pickle>"]

    def _handle(self, fname: str):
        if fname not in self._handles:
            from safetensors import safe_open

            self._handles[fname] = safe_open(self.path / fname, framework="pt", device="cpu")
        return self._handles[fname]

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise MissingTensor(f"tensor '{name}' not found in '{self.path}'")
        return self._handle(self.weight_map[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """safetensors dtype string, e.g. ``"BF16"``, ``"F32"``."""
        if self._pickled is not None:
            return str(self._pickled[name].dtype)
        return self._slice(name).get_dtype()

    def get(self, name: str) -> "torch.Tensor":
        """The tensor, memory-mapped (CPU). Copy it before modifying it in place."""
        if self._pickled is not None:
            if name not in self._pickled:
                raise MissingTensor(f"tensor '{name}' not found in '{self.path}'")
            return self._pickled[name]
        if name not in self.weight_map:
            raise MissingTensor(f"tensor '{name}' not found in '{self.path}'")
        return self._handle(self.weight_map[name]).get_tensor(name)

    def config(self) -> dict:
        cfg = self.path / "config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else {}
