"""The caches beside the calibration pass: Hessians, and the factorisations made from them.

``<cache>/hessians/<key>/`` holds one Hessian cache entry (:class:`HessianSet`: one safetensors
file per block, ``manifest.json`` written last; built by :func:`safedelta.hessian.prepare_hessians`)
and, under ``factors-v<FACTOR_FORMAT>/<device>-damp<damp>/``, the factorisations of budget rules
with ``cached_factors`` (the default rule) and the aligned weights' output energies ``E0``
(:class:`FactorStore`, filled by :func:`safedelta.protect`). Both depend only on the aligned model and the calibration set, so a
second request against the same parent reads them instead of recomputing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from safedelta.errors import MissingTensor, SafeDeltaError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

_logger = logging.getLogger(__name__)

#: layout of a Hessian cache entry (the accumulation method is in the key, see hessian.py)
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class HessianCacheError(SafeDeltaError):
    """A Hessian cache entry cannot be used (unreadable manifest or block file)."""


class HessianSet:
    """The Hessians of one (aligned model, calibration set), lazily read from the cache.

    Attributes:
        fingerprint: the cache key (hex).
        cache_hit: True when this call found the set on disk and ran no calibration pass.
        cache_path: the cache directory.
        weight_names: full names of every linear weight in the decoder blocks, in order, as the
            aligned checkpoint spells them (``"model.layers.0.self_attn.q_proj.weight"``; a
            checkpoint saved from the bare base model has ``"layers.0...."``).
        block_of: weight name -> block index.
        conv1d: names whose weight is stored in x out (``transformers`` ``Conv1D``).
        shared: weight name -> the name whose Hessian it shares (only for names that share).
        n_samples, n_tokens: calibration samples and tokens (all tokens count).
        timings: seconds spent by this call (``"fingerprint"``, ``"tokenize"``, ``"load"``,
            ``"calibration_forward"``, ``"save"``, ``"total"``); ``build_timings`` holds those of
            the call that built the cache.
    """

    def __init__(self, path: str | Path, *, cache_hit: bool = False,
                 timings: dict[str, float] | None = None):
        self.cache_path = Path(path)
        self.manifest = _read_manifest(self.cache_path)
        if self.manifest is None:
            raise HessianCacheError(f"no valid Hessian cache at '{self.cache_path}'")
        m = self.manifest
        self.fingerprint: str = m["key"]
        self.cache_hit = cache_hit
        self.weight_names: list[str] = list(m["weight_names"])
        ent = m["tensors"]
        self.block_of: dict[str, int] = {n: int(ent[n]["block"]) for n in self.weight_names}
        self.conv1d: set[str] = {n for n in self.weight_names if ent[n]["conv1d"]}
        self.shared: dict[str, str] = {n: ent[n]["key"] for n in self.weight_names
                                       if ent[n]["key"] != n}
        self.n_samples: int = int(m["n_samples"])
        self.n_tokens: int = int(m["n_tokens"])
        self.n_blocks: int = int(m["n_blocks"])
        self.layers_prefix: str = m["layers_prefix"]
        self.timings: dict[str, float] = dict(timings or {})
        self.build_timings: dict[str, float] = dict(m.get("timings") or {})
        self._handles: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (f"HessianSet({self.fingerprint[:12]}, {len(self.weight_names)} linears in "
                f"{self.n_blocks} blocks, {self.n_samples} samples / {self.n_tokens} tokens, "
                f"cache_hit={self.cache_hit})")

    def __contains__(self, name: str) -> bool:
        return name in self.block_of

    def __len__(self) -> int:
        return len(self.weight_names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_names)

    def in_features(self, name: str) -> int:
        return int(self._entry(name)["in_features"])

    def _entry(self, name: str) -> dict:
        try:
            return self.manifest["tensors"][name]
        except KeyError:
            raise MissingTensor(f"no Hessian for '{name}' in '{self.cache_path}' (known: "
                                f"{', '.join(self.weight_names[:4])}, ...)") from None

    def _handle(self, fname: str):
        if fname not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[fname] = safe_open(self.cache_path / fname, framework="pt",
                                                 device="cpu")
            except Exception as e:
                raise HessianCacheError(f"cannot read Hessian file '{self.cache_path / fname}' "
                                        f"({e}); delete '{self.cache_path}' to rebuild") from e
        return self._handles[fname]

    def get(self, weight_name: str) -> "Tensor":
        """``H`` of the linear owning ``weight_name``: ``in x in``, fp32, before damping."""
        e = self._entry(weight_name)
        return self._handle(e["file"]).get_tensor(e["key"])

    def block(self, i: int) -> dict[str, "Tensor"]:
        """``{weight name: H}`` for every linear of block ``i`` (shared ones are one tensor)."""
        if not 0 <= i < self.n_blocks:
            raise IndexError(f"block {i} out of range (0..{self.n_blocks - 1})")
        loaded: dict[str, Tensor] = {}
        out = {}
        for n in self.weight_names:
            if self.block_of[n] == i:
                key = self._entry(n)["key"]
                if key not in loaded:
                    loaded[key] = self.get(key)
                out[n] = loaded[key]
        return out


def _read_manifest(path: Path) -> dict | None:
    """The manifest when ``path`` holds a complete cache entry of this format, else None."""
    f = path / MANIFEST
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text())
        if m.get("format") != FORMAT_VERSION:
            return None
        files = {e["file"] for e in m["tensors"].values()}
        if not all((path / fn).is_file() for fn in files):
            return None
        sizes = m["files"]  # byte sizes: a truncated copy (interrupted download) is not valid
        if any((path / fn).stat().st_size != sizes.get(fn) for fn in files):
            return None
        if not all(n in m["tensors"] for n in m["weight_names"]):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return m


#: version of the factorisation cache's layout and of what it holds; part of its path
FACTOR_FORMAT = 1


class FactorStore:
    """Factorisations (of budget rules with ``cached_factors``: the default rule) and the
    aligned weights' output energies, on disk.

    Both depend only on the aligned model and the calibration set (the Hessian cache entry they
    live in), the damping and the device kind, so a second request against the same parent reads
    them instead of factoring every Hessian again (``c^3``) and recomputing every
    ``E0 = 1/2 tr(W0 H W0^T)`` (``r c^2``). Values are the very tensors and floats a fresh
    computation gives, so a warm result is bitwise the cold one. Layout:
    :func:`factor_store_path` ``/<weight>.safetensors`` (``U_order`` when the rule asked for it,
    and its memory layout, ``order``, ``hinv_diag``, ``dead``; the absolute damping in the
    metadata) and
    ``energies.json``; each file is written to a temporary name and renamed. A cache that cannot
    be written (read-only) only costs the speed-up.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.energies: dict[str, float] = {}
        self._new_energies: dict[str, float] = {}
        try:
            self.energies = {k: float(v) for k, v in
                             json.loads((root / "energies.json").read_text()).items()}
        except (OSError, ValueError, AttributeError):
            pass

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str, factors: frozenset[str] | set[str] = frozenset({"U_order"})):
        """The cached factorisation of ``key`` holding every factor in ``factors`` (the budget
        rule's :attr:`~safedelta.budget.BudgetRule.factors`), or None (absent, unreadable, or
        stored without one of them: the caller factors afresh and saves over it)."""
        import torch

        from safedelta.checkpoint import SafetensorsFile
        from safedelta.errors import CheckpointError
        from safedelta.solver import PreparedHessian

        path = self._path(key)
        if not path.is_file():
            return None
        f = SafetensorsFile(path)
        try:
            t = {n: f.get(n) for n in ("order", "hinv_diag", "dead")}
            damp = float(f.metadata["damp"])
            t["U_order"] = f.get("U_order") if "U_order" in f.keys() else None
            if t["U_order"] is not None and f.metadata.get("U_order_layout") == "column-major":
                t["U_order"] = t["U_order"].T.contiguous().T
        except (CheckpointError, KeyError, ValueError) as exc:
            _logger.warning("ignoring unreadable cached factorisation %s (%s)", path, exc)
            return None
        finally:
            f.close()
        if any(t.get(n) is None for n in factors):
            return None
        return PreparedHessian(H=None, U=None, d=None, hinv_diag=t["hinv_diag"],
                               order=t["order"].to(torch.long), U_order=t["U_order"],
                               damp=damp, dead=t["dead"].to(torch.bool))

    def save(self, key: str, prep) -> None:
        from safetensors.torch import save_file

        tensors = {"order": prep.order, "hinv_diag": prep.hinv_diag, "dead": prep.dead}
        metadata = {"damp": repr(float(prep.damp))}
        if prep.U_order is not None:  # None when the rule did not ask for it
            tensors["U_order"] = prep.U_order
            # the factor's memory layout is restored on reading (LAPACK returns it
            # column-major): the solve's products round differently on another layout
            metadata["U_order_layout"] = ("column-major" if prep.U_order.stride(0) == 1
                                          else "row-major")
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata=metadata)
            os.replace(tmp, self._path(key))
        except OSError as exc:
            _logger.warning("could not cache the factorisation of %s (%s)", key, exc)
            tmp.unlink(missing_ok=True)

    def add_energy(self, name: str, value: float) -> None:
        self.energies[name] = value
        self._new_energies[name] = value

    def flush(self) -> None:
        """Merge the new energies into ``energies.json`` (read again: another run may have
        added some)."""
        if not self._new_energies:
            return
        path = self.root / "energies.json"
        tmp = self.root / f".energies.{os.getpid()}.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                merged = json.loads(path.read_text())
            except (OSError, ValueError):
                merged = {}
            merged.update(self._new_energies)
            tmp.write_text(json.dumps(merged, indent=0, sort_keys=True))  # repr: exact floats
            os.replace(tmp, path)
            self._new_energies.clear()
        except OSError as exc:
            _logger.warning("could not cache the output energies (%s)", exc)
            tmp.unlink(missing_ok=True)


def factor_store_path(hessian_cache: str | Path, device: str, damp: float) -> Path:
    """Where the factorisations of one Hessian cache entry live, per device kind and damping."""
    import torch

    return (Path(hessian_cache) / f"factors-v{FACTOR_FORMAT}"
            / f"{torch.device(device).type}-damp{damp!r}")
