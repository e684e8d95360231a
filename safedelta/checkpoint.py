"""Reading and writing Hugging Face checkpoints tensor by tensor.

Reading: ``CheckpointReader(dir)`` opens ``model.safetensors`` or a sharded
``model.safetensors.index.json`` without loading anything: ``names()``, ``shape(name)``,
``dtype(name)`` read headers only and ``get(name)`` reads one tensor from disk (positioned
reads, no memory map: streaming a checkpoint keeps one tensor resident, not the file) (``get(name,
check_finite=True)`` raises :class:`NonFiniteWeights` naming the tensor and the model).
Pickle-based weights (``pytorch_model.bin``) are refused unless ``allow_pickle=True``.

Checking: :func:`check_compatible` compares two checkpoints (config architecture, then every
tensor's name and shape) from headers only and names the first mismatching tensor.

Writing: :class:`CheckpointWriter` writes a checkpoint with the same tensor-to-file layout as a
template (the aligned model) one tensor at a time: each shard's safetensors header is written
first (names, shapes and dtypes are known up front), then every tensor's bytes at its offset, so no
shard is ever held in memory. Everything goes to a temporary sibling directory that is renamed onto
the output only by :meth:`CheckpointWriter.commit`; a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from safedelta.errors import (
    ArchitectureMismatch,
    CheckpointError,
    MissingCheckpoint,
    MissingTensor,
    NonFiniteWeights,
    OutputExists,
    PickleCheckpointRefused,
    ShapeMismatch,
    UnreadableCheckpoint,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


class SafetensorsFile:
    """One safetensors file read with positioned reads, one tensor at a time.

    Unlike a memory map, nothing stays mapped after :meth:`get` returns: a tensor read and
    dropped leaves the page cache (not counted as process memory) and no resident mapping, so
    streaming a whole checkpoint costs one tensor of memory, not the file's size.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n < (100 << 20):
                    raise ValueError(f"implausible header length {n}")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"'{self.path}' is not a readable safetensors file: {exc}") from exc
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self.header: dict[str, dict] = header
        self.base = 8 + n
        self._fd: int | None = None

    def keys(self) -> list[str]:
        return list(self.header)

    def info(self, name: str) -> dict:
        try:
            return self.header[name]
        except KeyError:
            raise MissingTensor(f"tensor '{name}' not found in '{self.path}'") from None

    def get(self, name: str) -> "torch.Tensor":
        import torch

        info = self.info(name)
        begin, end = info["data_offsets"]
        dtype = getattr(torch, _ST_TO_TORCH[info["dtype"]])
        shape = tuple(info["shape"])
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self._read_into(memoryview(buf.numpy()), self.base + begin, name)
        return buf.view(dtype).reshape(shape)

    def _read_into(self, view: memoryview, pos: int, name: str) -> None:
        """Fill ``view`` from file offset ``pos`` (positioned reads until it is full)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], pos + done)
            if n <= 0:
                raise CheckpointError(f"'{self.path}' is truncated: tensor '{name}' ends past the "
                                      "end of the file")
            done += n

    def get_rows(self, name: str, rows: "torch.Tensor") -> "torch.Tensor":
        """Rows ``rows`` (sorted, unique, in range) of a tensor, reading only their bytes.

        A row is everything below the first index (one embedding vector); consecutive rows are
        read in one positioned read.
        """
        import torch

        info = self.info(name)
        dtype = getattr(torch, _ST_TO_TORCH[info["dtype"]])
        shape = tuple(info["shape"])
        row_bytes = _ITEMSIZE[info["dtype"]]
        for d in shape[1:]:
            row_bytes *= d
        idx = [int(i) for i in rows.reshape(-1).tolist()]
        buf = torch.empty(len(idx) * row_bytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        start = self.base + info["data_offsets"][0]
        k = 0
        while k < len(idx):  # one read per run of consecutive rows
            run = 1
            while k + run < len(idx) and idx[k + run] == idx[k] + run:
                run += 1
            self._read_into(view[k * row_bytes:(k + run) * row_bytes],
                            start + idx[k] * row_bytes, name)
            k += run
        return buf.view(dtype).reshape((len(idx),) + shape[1:])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def load_pickled_weights(path: Path, *, mmap: bool = True) -> dict:
    """``torch.load`` of a pickle-based weights file with ``weights_only`` (never arbitrary code);
    a corrupt, truncated or foreign file is :class:`UnreadableCheckpoint` naming it."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # pickle/zip/EOF/runtime errors of every kind: one clear message
        raise UnreadableCheckpoint(f"cannot read pickle-based weights '{path}': "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                                   ) from None
    if not isinstance(state, dict):
        raise UnreadableCheckpoint(f"'{path}' holds a {type(state).__name__}, not a state dict")
    return state


class CheckpointReader:
    """Lazy access to the tensors of one checkpoint directory, one tensor at a time."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False, label: str = "model"):
        self.path = Path(path)
        self.label = label
        if not self.path.is_dir():
            raise MissingCheckpoint(f"{label} checkpoint directory not found: '{self.path}'")
        self.allow_pickle = allow_pickle
        self._handles: dict[str, object] = {}
        self._pickled: dict[str, "torch.Tensor"] | None = None
        if (self.path / SAFE_INDEX).is_file():
            index = json.loads((self.path / SAFE_INDEX).read_text())
            self.weight_map: dict[str, str] = dict(index["weight_map"])
            self.metadata: dict = dict(index.get("metadata") or {})
        elif (self.path / SAFE_SINGLE).is_file():
            single = SafetensorsFile(self.path / SAFE_SINGLE)
            self._handles[SAFE_SINGLE] = single
            self.weight_map = {k: SAFE_SINGLE for k in sorted(single.keys())}
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
        files: list[Path]
        if "pytorch_model.bin.index.json" in names:
            idx = json.loads((self.path / "pytorch_model.bin.index.json").read_text())
            files = sorted({self.path / f for f in idx["weight_map"].values()})
        else:
            files = [self.path / names[0]]
        state: dict[str, "torch.Tensor"] = {}
        for f in files:  # weights_only: even when allowed, never run arbitrary pickled code
            state.update(load_pickled_weights(f))
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

    def _handle(self, fname: str) -> "SafetensorsFile":
        if fname not in self._handles:
            self._handles[fname] = SafetensorsFile(self.path / fname)
        return self._handles[fname]

    def _info(self, name: str) -> dict:
        if name not in self.weight_map:
            raise MissingTensor(f"tensor '{name}' not found in {self.label} '{self.path}'")
        return self._handle(self.weight_map[name]).info(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        return tuple(self._info(name)["shape"])

    def dtype(self, name: str) -> str:
        """safetensors dtype string, e.g. ``"BF16"``, ``"F32"``."""
        if self._pickled is not None:
            return str(self._pickled[name].dtype)
        return self._info(name)["dtype"]

    def get(self, name: str, *, check_finite: bool = False) -> "torch.Tensor":
        """The tensor, read from disk into its own CPU memory.

        With ``check_finite=True`` a tensor holding NaN or Inf raises :class:`NonFiniteWeights`.
        """
        if self._pickled is not None:
            if name not in self._pickled:
                raise MissingTensor(f"tensor '{name}' not found in {self.label} '{self.path}'")
            t = self._pickled[name]
        else:
            if name not in self.weight_map:
                raise MissingTensor(f"tensor '{name}' not found in {self.label} '{self.path}'")
            t = self._handle(self.weight_map[name]).get(name)
        if check_finite:
            assert_finite(t, name, f"{self.label} '{self.path}'")
        return t

    def get_rows(self, name: str, rows: "torch.Tensor") -> "torch.Tensor":
        """Rows ``rows`` (sorted, unique) of tensor ``name``, reading only those rows: an
        embedding's vectors for the tokens actually used, not the whole matrix."""
        shape = self.shape(name)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= shape[0]):
            raise IndexError(f"row {int(rows.max())} out of range for '{name}' with {shape[0]} "
                             "rows")
        if self._pickled is not None:
            return self.get(name)[rows]
        if name not in self.weight_map:
            raise MissingTensor(f"tensor '{name}' not found in {self.label} '{self.path}'")
        return self._handle(self.weight_map[name]).get_rows(name, rows)

    def config(self) -> dict:
        cfg = self.path / "config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else {}


# ---------------------------------------------------------------------------------------------
# checks


def assert_finite(t: "torch.Tensor", name: str, where: str) -> None:
    """Raise :class:`NonFiniteWeights` when a floating tensor holds NaN or Inf."""
    import torch

    from safedelta.numerics import all_finite

    if all_finite(t):  # one reduction; the counts below only on failure
        return
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    raise NonFiniteWeights(
        f"tensor '{name}' of the {where} holds non-finite values ({n_nan} NaN, {n_inf} Inf); "
        "a diverged or corrupted checkpoint cannot be protected. Re-export the model."
    )


#: config keys that must agree for two checkpoints to be the same architecture
_ARCH_KEYS = ("model_type", "architectures")


def check_compatible(aligned: "CheckpointReader", finetuned: "CheckpointReader") -> None:
    """Check, from headers only, that two checkpoints share one architecture.

    Compares the configs' ``model_type`` and ``architectures``, then every tensor's name and shape
    in the aligned checkpoint's order, and raises on the first difference:
    :class:`ArchitectureMismatch` (config), :class:`MissingTensor` (a tensor in one model only),
    :class:`ShapeMismatch` (same name, different shape). Nothing is read but headers.
    """
    ca, cf = aligned.config(), finetuned.config()
    for key in _ARCH_KEYS:
        va, vf = ca.get(key), cf.get(key)
        if va is not None and vf is not None and va != vf:
            raise ArchitectureMismatch(
                f"architectures differ: config '{key}' is {va!r} in the {aligned.label} "
                f"'{aligned.path}' but {vf!r} in the {finetuned.label} '{finetuned.path}'"
            )
    names_f = set(finetuned.names())
    for name in aligned.names():
        if name not in names_f:
            raise MissingTensor(
                f"tensor '{name}' of the {aligned.label} '{aligned.path}' is missing from the "
                f"{finetuned.label} '{finetuned.path}'; the models do not share an architecture"
            )
        sa, sf = aligned.shape(name), finetuned.shape(name)
        if sa != sf:
            raise ShapeMismatch(
                f"tensor '{name}' has shape {list(sa)} in the {aligned.label} but {list(sf)} in "
                f"the {finetuned.label} '{finetuned.path}'; the models do not share an architecture"
            )
    names_a = set(aligned.names())
    for name in finetuned.names():
        if name not in names_a:
            raise MissingTensor(
                f"tensor '{name}' of the {finetuned.label} '{finetuned.path}' is missing from the "
                f"{aligned.label} '{aligned.path}'; the models do not share an architecture"
            )


# ---------------------------------------------------------------------------------------------
# writing

#: files copied from the template directory next to the weights (globs)
AUX_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "additional_chat_templates/*", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
    "*.tiktoken", "spiece.model", "sentencepiece.bpe.model",
)

#: torch dtype name -> safetensors dtype string
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
_ST_TO_TORCH = {v: k for k, v in _ST_DTYPES.items()}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def holds_model(path: Path) -> bool:
    """True when ``path`` is a directory with a config or weight files in it."""
    if not path.is_dir():
        return False
    return (path / "config.json").exists() or any(
        p.suffix in (".safetensors", ".bin", ".pt") for p in path.iterdir()
    )


def prepare_output(out: str | Path, *, overwrite: bool) -> Path:
    """Refuse (:class:`OutputExists`) an output that holds a model or other files, unless allowed.

    Called before any work so that a refused run costs nothing; nothing is created here.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExists(f"output '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a model" if holds_model(out) else "files"
        raise OutputExists(
            f"output directory '{out}' already holds {what}; choose another directory or pass "
            "--overwrite (overwrite=True) to replace it"
        )
    return out


class _Shard:
    """One output safetensors file whose header is known up front."""

    def __init__(self, fname: str, entries: list[tuple[str, str, tuple[int, ...]]]):
        self.fname = fname
        self.names = [n for n, _, _ in entries]
        header: dict[str, dict] = {}
        # larger dtypes first keeps every tensor aligned to its item size
        order = sorted(entries, key=lambda e: -_ITEMSIZE[e[1]])
        offset = 0
        self.offsets: dict[str, tuple[int, int, str, tuple[int, ...]]] = {}
        for name, st_dtype, shape in order:
            n = _ITEMSIZE[st_dtype]
            for d in shape:
                n *= d
            header[name] = {"dtype": st_dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            self.offsets[name] = (offset, offset + n, st_dtype, shape)
            offset += n
        self.data_size = offset
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.header = raw
        self.written: set[str] = set()
        self.fh = None


class CheckpointWriter:
    """Write a checkpoint laid out like ``template``, one tensor at a time, atomically.

    Args:
        out: the output directory. It must not hold anything unless ``overwrite=True``, in which
            case it is replaced only when :meth:`commit` succeeds.
        template: the checkpoint whose sharding (tensor -> file mapping, index json) and auxiliary
            files (config, generation config, tokenizer, chat template) are reproduced.
        overwrite: replace an existing output directory.
        dtype: cast floating tensors to this dtype (``None``: keep each template tensor's dtype).

    Use as a context manager: an exception inside the ``with`` removes the temporary directory.
    Tensors may be added in any order; the output appears only after :meth:`commit`::

        with CheckpointWriter(out, template=reader) as w:
            for name in w.names():
                w.add(name, tensor_for(name))
            w.commit()
    """

    def __init__(self, out: str | Path, *, template: CheckpointReader, overwrite: bool = False,
                 dtype: "torch.dtype | None" = None):
        self.out = prepare_output(out, overwrite=overwrite)
        self.template = template
        self.overwrite = overwrite
        self.dtype = dtype
        self.sharded = (template.path / SAFE_INDEX).is_file()
        files: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {}
        for name in template.names():
            fname = template.weight_map[name] if self.sharded else SAFE_SINGLE
            files.setdefault(fname, []).append((name, self._out_dtype(template.dtype(name)),
                                                template.shape(name)))
        self.shards = [_Shard(f, e) for f, e in files.items()]
        self._shard_of = {n: s for s in self.shards for n in s.names}
        self.tmp_dir: Path | None = None
        self.committed = False

    def _out_dtype(self, st_dtype: str) -> str:
        if st_dtype.startswith("torch."):  # pickle reader reports torch dtypes
            st_dtype = _ST_DTYPES[st_dtype.removeprefix("torch.")]
        if self.dtype is not None and st_dtype in ("F64", "F32", "F16", "BF16"):
            return _ST_DTYPES[str(self.dtype).removeprefix("torch.")]
        return st_dtype

    def names(self) -> list[str]:
        """Every tensor to write, shard by shard (the order that writes files sequentially)."""
        return [n for s in self.shards for n in sorted(s.names, key=lambda n: s.offsets[n][0])]

    def __enter__(self) -> "CheckpointWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def open(self) -> Path:
        """Create the temporary sibling directory (``.<out>.tmp-<pid>``)."""
        import tempfile

        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp_dir

    def add(self, name: str, tensor: "torch.Tensor") -> None:
        """Write one tensor's bytes into its shard (cast to the planned dtype)."""
        import torch

        if self.tmp_dir is None:
            self.open()
        shard = self._shard_of.get(name)
        if shard is None:
            raise CheckpointError(f"tensor '{name}' is not part of the output checkpoint")
        if name in shard.written:
            raise CheckpointError(f"tensor '{name}' was written twice")
        begin, end, st_dtype, shape = shard.offsets[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ShapeMismatch(f"tensor '{name}' has shape {list(tensor.shape)}, "
                                f"expected {list(shape)} in the output")
        t = tensor.detach().to("cpu", getattr(torch, _ST_TO_TORCH[st_dtype])).contiguous()
        if shard.fh is None:
            shard.fh = open(self.tmp_dir / shard.fname, "wb")
            shard.fh.write(len(shard.header).to_bytes(8, "little"))
            shard.fh.write(shard.header)
            shard.fh.truncate(8 + len(shard.header) + shard.data_size)
        shard.fh.seek(8 + len(shard.header) + begin)
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        shard.fh.write(memoryview(data) if t.numel() else data)
        assert shard.fh.tell() == 8 + len(shard.header) + end
        shard.written.add(name)
        if len(shard.written) == len(shard.names):
            shard.fh.close()
            shard.fh = None

    def commit(self) -> Path:
        """Finish (index json, auxiliary files) and move the result onto ``out``."""
        import shutil

        missing = [n for s in self.shards for n in s.names if n not in s.written]
        if missing:
            raise CheckpointError(f"{len(missing)} tensors were never written (first: "
                                  f"'{missing[0]}'); the output is incomplete")
        assert self.tmp_dir is not None
        if self.sharded:
            total = sum(s.data_size for s in self.shards)
            index = {"metadata": {**self.template.metadata, "total_size": total},
                     "weight_map": {n: s.fname for s in self.shards for n in s.names}}
            (self.tmp_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        self._copy_aux()
        prepare_output(self.out, overwrite=self.overwrite)  # re-check: it may have appeared since
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{self.tmp_dir.name.rsplit('-', 1)[-1]}")
            os.replace(self.out, old)
        os.replace(self.tmp_dir, self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def _copy_aux(self) -> None:
        import shutil

        for pattern in AUX_PATTERNS:
            for src in self.template.path.glob(pattern):
                if not src.is_file():
                    continue
                dst = self.tmp_dir / src.relative_to(self.template.path)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        cfg = self.tmp_dir / "config.json"
        if self.dtype is not None and cfg.is_file():  # record the output dtype when it changed
            data = json.loads(cfg.read_text())
            name = str(self.dtype).removeprefix("torch.")
            for key in ("torch_dtype", "dtype"):
                if key in data and data[key] != name:
                    data[key] = name
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        """Remove the temporary directory; the output is left as it was."""
        import shutil

        for s in self.shards:
            if s.fh is not None:
                s.fh.close()
                s.fh = None
        if self.tmp_dir is not None and self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
