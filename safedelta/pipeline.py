"""``protect()``: Safe Delta over two checkpoints, streamed tensor by tensor.

Order of work (nothing is written before every input has been checked):

1. validate: the config, both checkpoints (safetensors, or pickle only when allowed), the kind of
   fine-tune (a full checkpoint or a PEFT LoRA adapter), their compatibility (architecture, every
   tensor's name and shape, from headers only), the calibration file and the output directory;
2. fingerprint both inputs (content hashes, memoised) for the report and the Hessian cache key;
3. prepare the Hessians of every decoder-block linear layer from the aligned model on the safe
   calibration set (:func:`safedelta.hessian.prepare_hessians`, cached per aligned model and
   calibration set, so a second request against the same parent skips the forward pass);
4. stream the output shard by shard, following the aligned checkpoint's layout: each linear weight
   of a decoder block goes through :func:`safedelta.solver.protect_matrix` with its damped Hessian
   (factored once per distinct Hessian: q/k/v and gate/up share theirs; under a budget rule with
   ``cached_factors``, the default one, the factorisations and each weight's output energy ``E0``
   are cached beside the Hessians, so a second request against the same parent neither factors nor recomputes them); every other tensor
   (embeddings, norms, head, biases) is taken from the aligned or the fine-tuned model as
   ``config.nonlinear`` says, and the norm of the discarded change is recorded. NaN/Inf in either
   model stops the run naming the tensor. Only one tensor of each model (plus one Hessian) is in
   memory at a time;
5. write ``safedelta_report.{json,md}`` and move the finished directory onto ``out`` atomically.

Example::

    from safedelta import protect, SafeDeltaConfig
    report = protect("models/aligned", "runs/finetuned", "models/protected",
                     config=SafeDeltaConfig(s=1e-5))
    print(report.summary())
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from safedelta.cache import FactorStore, factor_store_path
from safedelta.checkpoint import CheckpointReader, CheckpointWriter, check_compatible
from safedelta.config import SafeDeltaConfig
from safedelta.errors import InvalidConfig, OutputExists
from safedelta.lora import LoraAdapter, is_lora_adapter
from safedelta.memory import PhasePeak, memory_summary, phase_peak
from safedelta.report import ProtectReport

if TYPE_CHECKING:  # pragma: no cover
    import torch

_logger = logging.getLogger(__name__)


class FullFinetune:
    """A full fine-tuned checkpoint: the fine-tuned value of a tensor is read from it."""

    kind = "full"

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self.path = reader.path

    def check_against(self, aligned: CheckpointReader) -> None:
        check_compatible(aligned, self.reader)

    def finetuned(self, name: str, aligned: "torch.Tensor") -> "torch.Tensor":
        return self.reader.get(name, check_finite=True)


def open_finetuned(path: str | Path, *, allow_pickle: bool = False) -> FullFinetune | LoraAdapter:
    """The fine-tuned input: a :class:`LoraAdapter` when ``path`` is a PEFT adapter directory,
    else a full checkpoint."""
    if is_lora_adapter(path):
        return LoraAdapter(path, allow_pickle=allow_pickle)
    return FullFinetune(CheckpointReader(path, allow_pickle=allow_pickle, label="fine-tuned model"))


def resolve_config(config: SafeDeltaConfig | dict | None) -> SafeDeltaConfig:
    """A :class:`SafeDeltaConfig` from a config, a dict of its fields, or ``None`` (defaults)."""
    if config is None:
        return SafeDeltaConfig()
    if isinstance(config, SafeDeltaConfig):
        return config
    from pydantic import ValidationError

    try:
        return SafeDeltaConfig(**dict(config))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidConfig(f"invalid Safe Delta config: {problems}") from exc


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidConfig(f"device {device!r} was asked for but CUDA is not available; "
                            "use --device cpu")
    if not (str(device) == "cpu" or str(device).startswith("cuda")):
        raise InvalidConfig(f"unknown device {device!r}; use 'cpu' or 'cuda'")
    return str(device)


class _Timer:
    """Accumulates seconds per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


class _PreparedCache:
    """Damped, factored Hessians, reused while consecutive weights share one ``H``.

    Weights that read the same input (q/k/v, gate/up) share one Hessian
    (``HessianSet.shared``); the few last factorisations are kept, so each distinct ``H`` is
    damped and factored once, with the factors the budget rule asks for. Under a rule with
    ``cached_factors`` (the default rule) the factorisations and the output energies are also
    kept on disk (:class:`safedelta.cache.FactorStore`) for the next request against the same
    aligned model; other rules (the official one: its ``U`` is not cached) factor afresh.
    """

    def __init__(self, hs, damp: float, device: str, budget: str = "default", keep: int = 3):
        from safedelta.budget import get_budget_rule

        self.damp, self.device, self.keep = damp, device, keep
        self.budget = budget
        self.entries: list[tuple[str, Any]] = []
        self.n_prepared = 0
        self.n_loaded = 0
        self._file: Any = None
        rule = get_budget_rule(budget)
        self.factors = rule.factors
        self.store = FactorStore(factor_store_path(hs.cache_path, device, damp)) \
            if rule.cached_factors else None

    def _read(self, hs, name: str) -> "torch.Tensor":
        """``H`` of ``name`` read with positioned reads (``HessianSet.get`` memory-maps the cache
        files, which would leave every Hessian resident by the end of the run)."""
        from safedelta.checkpoint import SafetensorsFile

        entry = hs.manifest["tensors"].get(name)
        if entry is None:
            return hs.get(name)  # raises MissingTensor, naming the weight
        path = Path(hs.cache_path) / entry["file"]
        if self._file is None or self._file.path != path:
            if self._file is not None:
                self._file.close()
            self._file = SafetensorsFile(path)
        return self._file.get(entry.get("key", name))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.store is not None:
            self.store.flush()

    def get(self, hs, name: str):
        """``(prepared Hessian, cached E0 or None)`` for weight ``name``; when ``E0`` is not
        cached the prepared Hessian carries ``H`` to compute it from."""
        import torch

        from safedelta.solver import prepare_hessian

        key = hs.shared.get(name, name)
        energy = self.store.energies.get(name) if self.store is not None else None
        prep = next((p for k, p in self.entries if k == key), None)
        if prep is None and self.store is not None:
            prep = self.store.load(key, self.factors)
            self.n_loaded += prep is not None
        if prep is None:
            H = self._read(hs, name).to(self.device, torch.float32)
            prep = prepare_hessian(H, damp=self.damp, budget=self.budget)
            self.n_prepared += 1
            if self.store is not None:
                self.store.save(key, prep)
        prep = prep.to(self.device)
        if energy is None and prep.H is None:  # a cached factorisation without this E0
            prep.H = self._read(hs, name).to(self.device, torch.float32)
        self.entries = [(key, prep)] + [(k, p) for k, p in self.entries if k != key]
        del self.entries[self.keep:]
        return prep, energy

    def remember_energy(self, name: str, value: float) -> None:
        if self.store is not None:
            self.store.add_energy(name, value)


def _fingerprint(path: Path, ft: FullFinetune | LoraAdapter | None, cache_dir) -> str:
    import hashlib

    from safedelta.fingerprint import checkpoint_fingerprint, file_digest

    if isinstance(ft, LoraAdapter):
        h = hashlib.blake2b(digest_size=16)
        for f in ft.fingerprint_files() + [ft.path / "adapter_config.json"]:
            h.update(f.name.encode())
            h.update(file_digest(f, cache_dir=cache_dir).encode())
        return h.hexdigest()
    return checkpoint_fingerprint(path, cache_dir=cache_dir)


def protect(aligned: str | Path, finetuned: str | Path, out: str | Path, *,
            calibration: "str | Path | Sequence[torch.Tensor] | None" = None,
            config: SafeDeltaConfig | dict | None = None,
            cache_dir: str | Path | None = None,
            device: str | None = None,
            overwrite: bool = False,
            allow_pickle: bool = False,
            progress: bool = True,
            output_dtype: "torch.dtype | str | None" = None,
            max_samples: int = 128,
            max_length: int = 512) -> ProtectReport:
    """Protect a fine-tuned model against its aligned parent and save the result.

    Args:
        aligned: directory of the aligned (parent) checkpoint (safetensors, single or sharded).
        finetuned: directory of the fine-tuned checkpoint of the same architecture, or of a PEFT
            LoRA adapter trained on the aligned model.
        out: output directory; it receives a checkpoint laid out like ``aligned`` (same shards,
            config, generation config and tokenizer files) plus ``safedelta_report.{json,md}``.
        calibration: safe calibration set (JSON Lines of harmful prompt + safe response),
            ``None`` for the shipped default, or token ids already made (1-D tensors).
        config: :class:`SafeDeltaConfig` (or a dict of its fields); ``None``: defaults.
        cache_dir: Hessian and fingerprint cache (default ``$SAFEDELTA_CACHE`` or
            ``~/.cache/safedelta``).
        device: ``"cuda"`` or ``"cpu"`` for the calibration pass and the solver (default: CUDA when
            available).
        overwrite: replace an ``out`` that already holds a model.
        allow_pickle: accept pickle-based weights (``*.bin``), loaded with ``weights_only=True``.
        progress: tqdm progress bars on stderr.
        output_dtype: dtype of the saved floating tensors (default: each aligned tensor's dtype).
        max_samples, max_length: calibration samples used and tokens per sample (the paper: 128
            samples; see :func:`safedelta.hessian.prepare_hessians`).

    Returns:
        The :class:`ProtectReport` (also saved beside the model).

    Raises:
        InvalidConfig, MissingCheckpoint, PickleCheckpointRefused, ArchitectureMismatch (and its
        MissingTensor / ShapeMismatch), AdapterError, CalibrationError, OutputExists,
        NonFiniteWeights. After any error nothing is left in ``out``.
    """
    t_start = time.perf_counter()
    timer = _Timer()
    cfg = resolve_config(config)
    dev = resolve_device(device)
    output_dtype = _resolve_dtype(output_dtype)
    phases: dict[str, PhasePeak] = {}

    # 1. validate everything before any work; 2. fingerprints
    with phase_peak() as phases["validate"]:
        a_reader, ft, writer = _validate(aligned, finetuned, out, calibration,
                                         allow_pickle=allow_pickle, overwrite=overwrite,
                                         output_dtype=output_dtype)
        with timer("fingerprint"):
            fp_aligned = _fingerprint(a_reader.path, None, cache_dir)
            fp_ft = _fingerprint(Path(finetuned), ft, cache_dir)

    # 3. Hessians (cached per aligned model and calibration set)
    with phase_peak() as phases["hessians"]:
        hs = _hessians(aligned, a_reader, calibration, timer, cache_dir=cache_dir, device=dev,
                       progress=progress, allow_pickle=allow_pickle, max_samples=max_samples,
                       max_length=max_length)
    report = ProtectReport(
        inputs={"aligned": str(a_reader.path), "finetuned": str(Path(finetuned)),
                "out": str(Path(out)), "calibration": _calibration_label(calibration),
                "aligned_fingerprint": fp_aligned, "finetuned_fingerprint": fp_ft,
                "finetuned_kind": ft.kind, "n_samples": hs.n_samples, "n_tokens": hs.n_tokens},
        config={**cfg.model_dump(), "resolved_s": cfg.resolved_s},
        cache={"hit": hs.cache_hit, "path": str(hs.cache_path), "key": hs.fingerprint},
        device=dev,
        versions=_versions(),
    )

    # 4. stream; 5. the report, then the directory moved into place
    with writer:
        with phase_peak() as phases["stream"]:
            prepared = _stream(a_reader, ft, writer, hs, cfg, dev, report, timer, progress)
        with timer("write"):
            report.timings.update({k: round(v, 3) for k, v in timer.seconds.items()})
            report.timings["total"] = round(time.perf_counter() - t_start, 3)
            report.memory = memory_summary(phases)
            report.inputs["hessians_factored"] = prepared.n_prepared
            report.inputs["factorisations_cached"] = prepared.n_loaded
            report.save(writer.tmp_dir)
            writer.commit()
    report.timings["write"] = round(timer.seconds.get("write", 0.0), 3)
    report.timings["total"] = round(time.perf_counter() - t_start, 3)
    report.save(writer.out)  # final timings; the directory is already in place
    _logger.info("protected model written to %s\n%s", writer.out, report.summary())
    return report


def _resolve_dtype(output_dtype: "torch.dtype | str | None") -> "torch.dtype | None":
    import torch

    if isinstance(output_dtype, str):
        if not isinstance(getattr(torch, output_dtype, None), torch.dtype):
            raise InvalidConfig(f"unknown output dtype {output_dtype!r}; use e.g. 'bfloat16', "
                                "'float16' or 'float32'")
        output_dtype = getattr(torch, output_dtype)
    return output_dtype


def _validate(aligned, finetuned, out, calibration, *, allow_pickle: bool, overwrite: bool,
              output_dtype) -> tuple[CheckpointReader, FullFinetune | LoraAdapter,
                                     CheckpointWriter]:
    """Step 1: both inputs, their compatibility, the calibration file and the output directory
    checked (headers only) before any work; returns the readers and the writer."""
    a_reader = CheckpointReader(aligned, allow_pickle=allow_pickle, label="aligned model")
    ft = open_finetuned(finetuned, allow_pickle=allow_pickle)
    ft.check_against(a_reader)
    if isinstance(calibration, (str, os.PathLike)):
        from safedelta.calibration import read_calibration_file

        read_calibration_file(calibration)  # CalibrationError when missing, empty or malformed
    for what, src in (("aligned", aligned), ("fine-tuned", finetuned)):
        if Path(out).resolve() == Path(src).resolve():
            raise OutputExists(f"output '{out}' is the {what} input; write the protected model "
                               "to another directory")
    writer = CheckpointWriter(out, template=a_reader, overwrite=overwrite, dtype=output_dtype)
    return a_reader, ft, writer


def _hessians(aligned, a_reader: CheckpointReader, calibration, timer: _Timer, **kw):
    """Step 3: the Hessian set (cached), checked against the aligned checkpoint's names."""
    from safedelta.hessian import prepare_hessians

    with timer("hessians"), _blame_aligned(a_reader):
        hs = prepare_hessians(aligned, calibration, **kw)
    _release_freed_memory()  # what the calibration pass freed
    unknown = sorted(n for n in hs.weight_names if n not in a_reader)
    if unknown:
        from safedelta.errors import UnsupportedArchitecture

        raise UnsupportedArchitecture(f"the calibration pass found linear weight '{unknown[0]}' "
                                      f"that the aligned checkpoint '{a_reader.path}' lacks")
    return hs


def _calibration_label(calibration) -> str | None:
    if calibration is None or isinstance(calibration, (str, os.PathLike)):
        return None if calibration is None else str(calibration)
    return f"{len(calibration)} token-id samples"


def _stream(a_reader: CheckpointReader, ft, writer: CheckpointWriter, hs, cfg: SafeDeltaConfig,
            dev: str, report: ProtectReport, timer: _Timer, progress: bool) -> _PreparedCache:
    """Step 4: every tensor of the output read, protected or passed through, written."""
    linear, conv1d = set(hs.weight_names), set(hs.conv1d)
    prepared = _PreparedCache(hs, cfg.damp, dev, cfg.budget)
    names = writer.names()
    bar = _bar(len(names), progress)
    big = 64 << 20  # bytes
    for name in names:
        with timer("read"):
            if math.prod(a_reader.shape(name)) * 2 > big:
                _release_freed_memory()
            a = a_reader.get(name, check_finite=True)
            f = ft.finetuned(name, a)
        if name in linear:
            with timer("protect"), _blame_aligned(a_reader):
                weight, stats = _protect_one(name, a, f, hs, prepared, cfg, dev,
                                             transpose=name in conv1d)
            stats["block"] = hs.block_of[name]
            report.matrices[name] = stats
        else:
            weight = _nonlinear(name, a, f, cfg, report)
        with timer("write"):
            writer.add(name, weight)
        del a, f, weight
        bar.update(1)
    bar.close()
    prepared.close()
    return prepared


@contextmanager
def _blame_aligned(reader: CheckpointReader) -> Iterator[None]:
    """Turn a non-finite Hessian into an error naming the aligned tensor that caused it.

    A NaN/Inf weight in the aligned model poisons the activations of every later layer, so the
    first symptom is a non-finite Hessian of some other layer. Only then is the aligned model
    scanned (the normal path pays nothing) to name the culprit.
    """
    from safedelta.errors import NonFiniteWeights

    try:
        yield
    except NonFiniteWeights as exc:
        for name in reader.names():  # raises, naming the first non-finite aligned tensor
            reader.get(name, check_finite=True)
        raise exc


def _protect_one(name: str, a: "torch.Tensor", f: "torch.Tensor", hs, prepared: _PreparedCache,
                 cfg: SafeDeltaConfig, dev: str, *, transpose: bool):
    """Run the solver on one decoder-block linear weight; returns (weight, stats dict)."""
    from safedelta.solver import protect_matrix

    prep, energy = prepared.get(hs, name)
    W0 = a.to(dev)
    W1 = f.to(dev)
    if transpose:  # Conv1D stores in x out; the solver wants out x in
        W0, W1 = W0.T, W1.T
    res = protect_matrix(W0, W1, prep, config=cfg, output_energy=energy)
    if energy is None:
        prepared.remember_energy(name, res.stats.output_energy)
    w = res.weight.T if transpose else res.weight
    return w.to("cpu").contiguous(), dict(res.stats.as_dict())


def _nonlinear(name: str, a: "torch.Tensor", f: "torch.Tensor", cfg: SafeDeltaConfig,
               report: ProtectReport) -> "torch.Tensor":
    """Embeddings, norms, head, biases: aligned or fine-tuned values; the change is recorded."""
    import torch

    if f is a:
        norm = 0.0
    elif a.is_floating_point():
        norm = _diff_norm(a, f)
    else:
        norm = 0.0 if torch.equal(a, f) else float("nan")
    keep = cfg.nonlinear == "finetuned"
    report.nonlinear[name] = {"delta_norm": norm, "kept": keep, "policy": cfg.nonlinear}
    return f if keep else a


def _diff_norm(a: "torch.Tensor", f: "torch.Tensor", chunk: int = 1 << 22) -> float:
    """``||f - a||`` in fp32, a slice at a time (an embedding's fp32 copy would cost GBs)."""
    import torch

    a, f = a.reshape(-1), f.reshape(-1)
    sq = 0.0
    for i in range(0, a.numel(), chunk):
        d = f[i:i + chunk].to(torch.float32) - a[i:i + chunk].to(torch.float32)
        sq += float(torch.dot(d, d))
    return sq ** 0.5


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Tensors up to 32 MB come from the C heap, and what the calibration pass and the
    factorisations freed stays resident when fragmented; trimming before the large tensors
    (embeddings, head) keeps the peak at what is actually alive.
    """
    try:
        _libc().malloc_trim(0)
    except AttributeError:  # no libc, or not glibc
        pass


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="protect", unit="tensor", disable=not enabled, leave=False)


def _versions() -> dict[str, str]:
    import torch

    import safedelta

    out = {"safedelta": safedelta.__version__, "torch": torch.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out
