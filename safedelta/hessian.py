"""The calibration pass (aligned model, one decoder block at a time) and the Hessian cache.

Faithful to ``docs/algorithm.md`` ("Calibration and the Hessian"): the *aligned* model's own
activations on the safe calibration set, every real token counted; for every linear layer of
every decoder block ``H = (2/N) sum_n X_n X_n^T`` in fp32 (``N`` = samples, ``X_n`` = the layer's
inputs for sample n, ``c x tokens``); each block's outputs, computed by the unmodified aligned
block, are the next block's inputs. The samples run in micro-batches (``micro_batch``, default 16,
longest first, right-padded with an attention mask); padding positions are left out of ``H``,
and one :class:`HessianAccumulator` per distinct linear input adds one ``X^T X`` per micro-batch
and scales once at the end: equal to the paper's batch-size-1 running mean (SparseGPT's
``add_batch``) up to fp32 rounding.

Streaming: the model skeleton is built with its parameters on the meta device (buffers such as
rotary frequencies stay real), the modules before the first block (embeddings) are materialised
from the memory-mapped checkpoint when first called, block-0 inputs and every block's per-sample
arguments (attention mask, position embeddings/ids, ...; sliding-window and global layers get
different ones) are recorded per micro-batch by pre-hooks while the blocks are passed through,
then each block in turn is loaded, run over all micro-batches, and returned to the meta device.

Peak memory: one decoder block's weights (compute dtype) + its Hessians (fp32, one per distinct
input: ``c x c`` each, q/k/v and gate/up share one) + the activations, twice (inputs and
outputs of the block, ``N x T x hidden`` in the compute dtype) + the modules before the first
block (of the token embedding only the rows of the tokens the samples use are read). The
final norm and ``lm_head`` are never loaded, and the whole model is never in memory.

Linear layers that receive the very same input tensor (q/k/v projections, gate/up) get one
Hessian, computed and stored once; :attr:`HessianSet.shared` says which.

The cache: ``<cache>/hessians/<key>/`` with one safetensors file per block and ``manifest.json``
written last; the directory is built under a temporary name and renamed, so a crash never
leaves a directory that looks valid. ``key`` hashes the aligned checkpoint's fingerprint, the
calibration file, the token ids of the samples, ``max_samples``, ``max_length``, the seed, the
compute dtype, the format version and how the Hessians were accumulated (:data:`ACCUMULATION`,
``micro_batch``): an entry built by the batch-size-1 running mean is not reused.

Example::

    hs = prepare_hessians("models/aligned")            # default calibration set, CPU
    H = hs.get("model.layers.0.self_attn.q_proj.weight")   # (in x in) fp32, before damping
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from safedelta.cache import FORMAT_VERSION, MANIFEST, HessianCacheError, HessianSet, _read_manifest
from safedelta.errors import (
    CalibrationError,
    CheckpointError,
    MissingTensor,
    SafeDeltaError,
    ShapeMismatch,
)

__all__ = ["ACCUMULATION", "MICRO_BATCH", "HessianAccumulator", "HessianCacheError",
           "HessianSet", "hessians_from_model", "micro_batches", "prepare_hessians"]

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor, nn

_logger = logging.getLogger(__name__)

#: how Hessians are accumulated, part of the cache key: 1 = running mean, batch size 1;
#: 2 = micro-batches, padding masked out, one ``X^T X`` per call summed and scaled once
ACCUMULATION = 2
#: calibration samples per forward (the cache key records it)
MICRO_BATCH = 16
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


# --------------------------------------------------------------------------- accumulation

class HessianAccumulator:
    """``H = (2/N) sum_n X_n X_n^T`` in fp32, ``N`` = samples: the one accumulator of the project.

    The calibration pass feeds it one micro-batch per call and :class:`~safedelta.solver.
    SafeDeltaLayer` delegates its ``add_batch`` to it. Each call adds one product ``X^T X`` of
    the call's real tokens (padding excluded by ``mask``) to a plain fp32 sum ``S``; ``N`` counts
    batch entries (samples), not tokens; :attr:`H` scales once, ``(2/N) S``.

    Equivalence with SparseGPT's running mean (``H <- H n/(n+k) + (2/(n+k)) X X^T`` per call):
    unrolled, the running mean after the last call is exactly ``(2/N) sum X X^T`` in exact
    arithmetic; only the rounding differs. Summing first and scaling once does one rescale of
    ``H`` instead of one per call, and a micro-batch of k samples is one product instead of k.
    In fp32 the two agree to a relative error of about ``sqrt(calls) * 6e-8`` of ``|H|``; the
    tests hold the batched pass to ``rtol=1e-4, atol=1e-5`` against the per-sample reference.
    """

    def __init__(self, columns: int, device: "torch.device | str" = "cpu"):
        import torch

        self.columns = int(columns)
        self.S = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=device)
        self.nsamples = 0
        self.ntokens = 0

    def add(self, inp: "Tensor", mask: "Tensor | None" = None) -> None:
        """Add one call's inputs.

        Args:
            inp: ``batch x tokens x c`` (or ``tokens x c``: one sample).
            mask: ``batch x tokens`` (or ``tokens``), true for real tokens: padding positions
                are left out of ``H``; ``None`` counts every token.
        """
        import torch

        from safedelta.numerics import fp32_exact

        if inp.ndim == 2:
            inp = inp.unsqueeze(0)
        if inp.shape[-1] != self.columns:
            raise ShapeMismatch(f"layer input must end in {self.columns} features, got "
                                f"{tuple(inp.shape)}")
        n = inp.shape[0]
        X = inp.reshape(-1, self.columns)
        if mask is not None:
            X = X[mask.reshape(-1).to(device=X.device, dtype=torch.bool)]
        X = X.to(device=self.S.device, dtype=torch.float32)
        with fp32_exact(self.S.device):
            self.S.addmm_(X.t(), X)  # c x c, one product per call
        self.nsamples += n
        self.ntokens += X.shape[0]

    @property
    def H(self) -> "Tensor":
        """``(2/N) S`` (zeros before any call)."""
        return self.S * (2 / self.nsamples) if self.nsamples else self.S.clone()


def _input_of(args: tuple, kwargs: dict) -> "Tensor":
    return args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))


def hessians_from_model(model: "nn.Module", samples: Sequence["Tensor"]) -> dict[str, "Tensor"]:
    """Reference: every decoder-block linear's ``H`` from the whole model in memory.

    Plain and slow on purpose (no sharing, no streaming): the streaming pass must equal it.

    Args:
        model: a causal LM with real weights (any device).
        samples: 1-D token id tensors, run one at a time (batch size 1).

    Returns:
        ``{full weight name: H}`` (``in x in``, fp32, on the model's device).
    """
    import torch

    from safedelta.modelwalk import find_decoder_layers, find_linears, in_features

    prefix, layers = find_decoder_layers(model)
    device = next(model.parameters()).device
    acc: dict[str, HessianAccumulator] = {}
    hooks = []
    for i, block in enumerate(layers):
        for name, lin in find_linears(block).items():
            full = f"{prefix}.{i}.{name}.weight"
            acc[full] = HessianAccumulator(in_features(lin), device)

            def hook(_m, args, kwargs, _out, _full=full):
                acc[_full].add(_input_of(args, kwargs).detach())

            hooks.append(lin.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for s in samples:
                model(input_ids=s.reshape(1, -1).to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.H for k, v in acc.items()}


# --------------------------------------------------------------------------- the pass

class _StopForward(Exception):
    """Raised by the layer-0 catcher once the block inputs are captured."""


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _compute_dtype(reader, device: "torch.device") -> str:
    """fp32 on CPU (half-precision matmuls there are slow and inexact); elsewhere the dtype most
    of the checkpoint's tensors have (headers only are read)."""
    from collections import Counter

    if device.type == "cpu":
        return "float32"
    counts = Counter(_DTYPES.get(str(reader.dtype(n)).removeprefix("torch.").upper(),
                                 str(reader.dtype(n)).removeprefix("torch."))
                     for n in reader.names())
    best = counts.most_common(1)[0][0] if counts else "float32"
    return best if best in ("float32", "float16", "bfloat16") else "float32"


class _NameMap:
    """Model parameter name -> checkpoint tensor name (handles a missing/extra base prefix)."""

    def __init__(self, model, reader):
        self.reader = reader
        self.base = getattr(model, "base_model_prefix", "") or ""

    def __call__(self, name: str) -> str:
        if name in self.reader:
            return name
        if self.base:
            stripped = name.removeprefix(self.base + ".")
            if stripped != name and stripped in self.reader:
                return stripped
            added = f"{self.base}.{name}"
            if added in self.reader:
                return added
        raise MissingTensor(f"tensor '{name}' of the model is not in the checkpoint "
                            f"'{self.reader.path}'")


def _load_params(module: "nn.Module", prefix: str, names: _NameMap, reader, device, dtype,
                 *, recurse: bool) -> int:
    """Replace ``module``'s meta parameters by checkpoint tensors; move its real buffers."""
    from torch import nn

    n_bytes = 0
    mods = module.named_modules() if recurse else [("", module)]
    for sub_name, sub in mods:
        base = ".".join(p for p in (prefix, sub_name) if p)
        for pname, p in list(sub.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            t = reader.get(names(f"{base}.{pname}" if base else pname))
            if tuple(t.shape) != tuple(p.shape):
                raise ShapeMismatch(f"'{base}.{pname}' has shape {tuple(t.shape)} in the "
                                      f"checkpoint but {tuple(p.shape)} in the model config")
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
            sub._parameters[pname] = nn.Parameter(t, requires_grad=False)
            n_bytes += t.numel() * t.element_size()
        for bname, b in list(sub._buffers.items()):
            if b is not None and b.device.type != "meta" and b.device != device:
                sub._buffers[bname] = b.to(device)
            elif b is not None and b.device.type == "meta":
                full = f"{base}.{bname}" if base else bname
                if full in reader:  # a persistent buffer saved with the weights
                    sub._buffers[bname] = reader.get(full).to(device)
    return n_bytes


def _compact_input_embedding(model, samples, names, reader, device, dtype) -> list:
    """Load only the rows of the token embedding that the calibration samples use.

    The input embedding (an ``nn.Embedding`` found by ``get_input_embeddings``) gets a table of
    just the distinct token ids of the samples (read row by row from the checkpoint), and a
    pre-hook maps each call's ids to their row in it: the lookups return the very same vectors
    while a 128k-vocabulary matrix (0.5 GB in fp32) is never materialised. Returns the hooks
    (none when the model's input embedding is not a plain ``nn.Embedding``).
    """
    import torch
    from torch import nn

    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    if type(emb) is not nn.Embedding or emb.weight.device.type != "meta" or emb.max_norm:
        return []
    emb_name = next((n for n, m in model.named_modules() if m is emb), None)
    if emb_name is None:
        return []
    ids = torch.unique(torch.cat([s.reshape(-1) for s in samples]).to("cpu", torch.long))
    if int(ids.min()) < 0 or int(ids.max()) >= emb.num_embeddings:
        raise CalibrationError(f"calibration token id {int(ids.max())} is outside the model's "
                               f"vocabulary of {emb.num_embeddings}")
    full = names(f"{emb_name}.weight")
    rows = reader.get_rows(full, ids)
    emb._parameters["weight"] = nn.Parameter(rows.to(device=device, dtype=dtype),
                                             requires_grad=False)
    ids_dev = ids.to(device)

    def remap(_module, args, kwargs):
        if args:
            return (torch.searchsorted(ids_dev, args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["input"] = torch.searchsorted(ids_dev, kwargs["input"])
        return args, kwargs

    return [emb.register_forward_pre_hook(remap, with_kwargs=True)]


class _MicroBatch:
    """Calibration samples run together: ``ids`` (``B x T``, right-padded), ``mask`` (``B x T``
    bool, true for real tokens) and whether any position is padding."""

    def __init__(self, samples: Sequence["Tensor"]):
        import torch

        T = max(int(s.numel()) for s in samples)
        pad = int(samples[0].reshape(-1)[0])  # any id the samples use (the compact embedding)
        self.ids = torch.full((len(samples), T), pad, dtype=torch.long)
        self.mask = torch.zeros(len(samples), T, dtype=torch.bool)
        for b, s in enumerate(samples):
            self.ids[b, :s.numel()] = s.reshape(-1)
            self.mask[b, :s.numel()] = True
        self.padded = not bool(self.mask.all())

    def model_kwargs(self, device) -> dict:
        """``input_ids`` and, when there is padding, the ``attention_mask``. Right padding puts
        every pad after the real tokens, so causal attention keeps them out of every real
        token's output; the mask keeps the model from treating them as real keys at all."""
        kw = {"input_ids": self.ids.to(device)}
        if self.padded:
            kw["attention_mask"] = self.mask.to(device=device, dtype=self.ids.dtype)
        return kw

    def mask_for(self, call_input: "Tensor") -> "Tensor | None":
        """The real-token mask matching a linear's input, ``None`` when nothing is padded.

        Raises:
            _Unmaskable: a padded batch reached a linear with a token count other than the
                batch's (routed experts see a subset): its padding cannot be told apart.
        """
        if not self.padded:
            return None
        if call_input.shape[:-1].numel() != self.mask.numel():
            raise _Unmaskable(f"a linear input of shape {tuple(call_input.shape)} in a batch of "
                              f"{tuple(self.mask.shape)} tokens")
        return self.mask


class _Unmaskable(Exception):
    """Padding cannot be excluded from some linear's input: the pass reruns unpadded."""


def micro_batches(samples: Sequence["Tensor"], size: int) -> list[_MicroBatch]:
    """Samples grouped ``size`` at a time, longest first (similar lengths together: little
    padding). The Hessian is a sum over tokens, so the order changes rounding only."""
    order = sorted(range(len(samples)), key=lambda i: (-int(samples[i].numel()), i))
    return [_MicroBatch([samples[i] for i in order[k:k + size]])
            for k in range(0, len(order), size)]


def _capture_inputs(model, layers, samples, batches, names, reader, device, dtype, prefix):
    """Block-0 inputs, and for every block the per-batch arguments the model passes to it.

    Runs the model's own forward with only the pre-block modules materialised (each one when
    first called). Every block is swapped for a pass-through while a pre-hook records its
    arguments (attention mask, position embeddings/ids, ...; they can differ per block, e.g.
    sliding-window and global layers), and the forward stops at the last block. Should that
    fail, only block 0's arguments are caught and reused for every block (with a warning).

    Returns:
        ``(inps, layer_args)``: ``inps[k]`` the block-0 input of micro-batch k
        (``B x T x hidden``), ``layer_args[i][k]`` the ``(args, kwargs)`` that follow the hidden
        states for block i.
    """
    pre_hooks = _materialise_on_call(model, prefix, samples, names, reader, device, dtype)
    try:
        try:
            return _record_block_args(model, layers, batches, device, prefix, every_block=True)
        except SafeDeltaError:
            raise
        except Exception as e:  # a forward loop that needs real block outputs
            _logger.warning("could not record each block's arguments (%s: %s); reusing block "
                            "0's for every block", type(e).__name__, e)
            return _record_block_args(model, layers, batches, device, prefix, every_block=False)
    finally:
        for h in pre_hooks:
            h.remove()


def _materialise_on_call(model, prefix, samples, names, reader, device, dtype) -> list:
    """Pre-hooks that load each pre-block module's weights when it is first called (and the
    compact input embedding); returns the hooks."""
    layer_prefix = prefix + "."

    def make_loader(mod_name):
        def load(module, _args):
            _load_params(module, mod_name, names, reader, device, dtype, recurse=False)
        return load

    pre_hooks = _compact_input_embedding(model, samples, names, reader, device, dtype)
    for n, m in model.named_modules():  # materialise embeddings etc. only when used
        if n == prefix or n.startswith(layer_prefix):
            continue
        if any(p.device.type == "meta" for p in m.parameters(recurse=False)):
            pre_hooks.append(m.register_forward_pre_hook(make_loader(n)))
        for bname, b in list(m._buffers.items()):
            if b is not None and b.device.type != "meta" and b.device != device:
                m._buffers[bname] = b.to(device)
    return pre_hooks


def _split_block_call(args, kwargs):
    kwargs = dict(kwargs)
    if args:
        return args[0], tuple(args[1:]), kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def _passthrough(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _record_block_args(model, layers, batches, device, prefix, *, every_block: bool):
    """One model forward per micro-batch with the blocks passed through, recording their
    arguments (see :func:`_capture_inputs`)."""
    import torch

    inps: list[Tensor] = []
    layer_args: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
    last = len(layers) - 1 if every_block else 0

    def make_catch(i):
        def catch(_module, args, kwargs):
            hs, rest, kw = _split_block_call(args, kwargs)
            if i == 0:
                inps.append(hs.detach())
            layer_args[i].append((rest, kw))
            if i == last:
                raise _StopForward
        return catch

    hooks = [layers[i].register_forward_pre_hook(make_catch(i), with_kwargs=True)
             for i in range(last + 1)]
    for block in layers:
        block.forward = _passthrough  # instance attribute: shadows the class's forward
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(**batch.model_kwargs(device), use_cache=False)
                except _StopForward:
                    continue
                raise SafeDeltaError("the model's forward never reached its decoder block "
                                     f"{last} ('{prefix}.{last}')")
    finally:
        for h in hooks:
            h.remove()
        for block in layers:
            del block.forward
    if not every_block:
        layer_args = [layer_args[0]] * len(layers)
    return inps, layer_args


def _group_shared(captured: dict[str, list], order: list[str]) -> dict[str, str]:
    """name -> leader: linears whose calls received the very same input tensors."""
    leader_of: dict[str, str] = {}
    leaders: list[str] = []
    for name in order:
        calls = captured.get(name, [])
        for lead in leaders:
            lc = captured.get(lead, [])
            if calls and len(lc) == len(calls) and all(a is b for a, b in zip(lc, calls)):
                leader_of[name] = lead
                break
        else:
            leader_of[name] = name
            leaders.append(name)
    return leader_of


def _check_still_shared(i: int, captured: dict[str, list], leader_of: dict[str, str]) -> None:
    for name, lead in leader_of.items():
        mine, theirs = captured.get(name, []), captured.get(lead, [])
        if lead != name and (len(mine) != len(theirs) or not all(
                a is b for a, b in zip(mine, theirs))):
            raise SafeDeltaError(
                f"block {i}: '{name}' shared its input with '{lead}' on the first "
                "batch but not on a later one; cannot share their Hessian")


class _BlockHessians:
    """Step 2 of the pass for one loaded block: run it over every micro-batch, one
    :class:`HessianAccumulator` per distinct linear input, the block's outputs kept."""

    def __init__(self, block, i: int, device):
        from safedelta.modelwalk import find_linears

        self.block, self.i, self.device = block, i, device
        self.linears = find_linears(block)
        self.order = list(self.linears)
        self.leader_of: dict[str, str] | None = None
        self.acc: dict[str, HessianAccumulator] = {}

    def run(self, inps: list, args: list, batches: Sequence[_MicroBatch]) -> list:
        import torch

        captured: dict[str, list] = {}
        hooks = []
        for name, lin in self.linears.items():
            def hook(_m, a, kw, _out, _name=name):
                # the tensor object itself (no detach: a new object would hide sharing)
                captured.setdefault(_name, []).append(_input_of(a, kw))
            hooks.append(lin.register_forward_hook(hook, with_kwargs=True))
        outs: list[Tensor] = []
        try:
            with torch.no_grad():
                for x, (rest, kwargs), batch in zip(inps, args, batches):
                    captured.clear()
                    out = self.block(x, *rest, **kwargs)
                    outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
                    self._accumulate(captured, batch)
                    captured.clear()
        finally:
            for h in hooks:
                h.remove()
        return outs

    def _accumulate(self, captured: dict[str, list], batch: _MicroBatch) -> None:
        from safedelta.modelwalk import in_features

        if self.leader_of is None:
            self.leader_of = _group_shared(captured, self.order)
            self.acc = {lead: HessianAccumulator(in_features(self.linears[lead]), self.device)
                        for lead in dict.fromkeys(self.leader_of.values())}
        _check_still_shared(self.i, captured, self.leader_of)
        for lead, acc in self.acc.items():
            for call_input in captured.get(lead, []):
                acc.add(call_input, batch.mask_for(call_input))

    def save(self, names, prefix: str, out_dir: Path) -> tuple[str, dict[str, dict]]:
        """Write the block's Hessians; returns the file name and the manifest entries."""
        from safetensors.torch import save_file

        from safedelta.modelwalk import in_features, is_conv1d

        fname = f"block_{self.i:05d}.safetensors"
        full = {n: names(f"{prefix}.{self.i}.{n}.weight") for n in self.order}  # ckpt names
        to_save = {}
        for lead, acc in self.acc.items():
            if acc.nsamples == 0:
                _logger.warning("block %d: '%s' was never called on the calibration set; its "
                                "Hessian is zero", self.i, lead)
            to_save[full[lead]] = acc.H.contiguous().cpu()
        save_file(to_save, str(out_dir / fname))
        entries = {full[n]: {
            "block": self.i, "file": fname, "key": full[self.leader_of[n]],
            "in_features": in_features(self.linears[n]), "conv1d": is_conv1d(self.linears[n]),
            "calls": self.acc[self.leader_of[n]].nsamples} for n in self.order}
        return fname, entries


def _skeleton(aligned_dir: Path, dtype):
    """The model with its parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(aligned_dir)
    except Exception as e:
        raise CheckpointError(f"cannot read the model config in '{aligned_dir}': {e}") from e
    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) stay real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _calibration_pass(aligned_dir: Path, reader, samples: Sequence["Tensor"], out_dir: Path,
                      device: "torch.device", dtype_name: str, progress: bool,
                      micro_batch: int) -> dict:
    """Run the streaming pass, writing one safetensors file per block into ``out_dir``:
    (1) the skeleton and each block's inputs, (2) per block: load, run every micro-batch
    accumulating its Hessians, (3) save them and free the block."""
    from tqdm.auto import tqdm

    from safedelta.modelwalk import find_decoder_layers

    timings = {"load": 0.0, "calibration_forward": 0.0, "save": 0.0}
    t = time.perf_counter()
    dtype = _torch_dtype(dtype_name)
    model = _skeleton(aligned_dir, dtype)
    prefix, layers = find_decoder_layers(model)
    names = _NameMap(model, reader)
    timings["load"] += time.perf_counter() - t

    t = time.perf_counter()
    batches = micro_batches(samples, micro_batch)
    inps, layer_args = _capture_inputs(model, layers, samples, batches, names, reader, device,
                                       dtype, prefix)
    timings["calibration_forward"] += time.perf_counter() - t

    tensors: dict[str, dict] = {}
    bar = tqdm(total=len(layers), desc="calibration pass", unit="block", disable=not progress)
    for i, block in enumerate(layers):
        t = time.perf_counter()
        _load_params(block, f"{prefix}.{i}", names, reader, device, dtype, recurse=True)
        timings["load"] += time.perf_counter() - t

        t = time.perf_counter()
        step = _BlockHessians(block, i, device)
        outs = step.run(inps, layer_args[i], batches)
        timings["calibration_forward"] += time.perf_counter() - t

        t = time.perf_counter()
        tensors.update(step.save(names, prefix, out_dir)[1])
        timings["save"] += time.perf_counter() - t

        block.to("meta")  # free the block's weights
        del step
        inps = outs
        bar.update(1)
    bar.close()
    return {"layers_prefix": prefix, "n_blocks": len(layers), "weight_names": list(tensors),
            "tensors": tensors, "dtype": dtype_name, "micro_batch": micro_batch,
            "timings": timings}


# --------------------------------------------------------------------------- entry point

def _tokens_digest(samples: Sequence["Tensor"]) -> str:
    import numpy as np
    import torch

    h = hashlib.blake2b(digest_size=16)
    for s in samples:
        a = s.detach().cpu().reshape(-1).to(dtype=torch.int64).numpy()
        h.update(len(a).to_bytes(8, "little"))
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def prepare_hessians(aligned_dir: str | Path, calibration: str | Path | Sequence["Tensor"] | None
                     = None, *, cache_dir: str | Path | None = None, device: str = "cpu",
                     max_samples: int = 128, max_length: int = 512, progress: bool = True,
                     allow_pickle: bool = False, seed: int = 42,
                     tokenizer: Any = None, micro_batch: int = MICRO_BATCH) -> HessianSet:
    """The Hessians of every decoder-block linear of the aligned model, cached on disk.

    Args:
        aligned_dir: the aligned model (weights, config.json and, unless ``calibration`` is
            token ids, its tokenizer).
        calibration: a calibration JSONL file, None for the shipped default, or token ids
            already made (a sequence of 1-D tensors, used as given).
        cache_dir: root of the safedelta cache (default ``$SAFEDELTA_CACHE`` or
            ``~/.cache/safedelta``); entries live under ``<root>/hessians/<key>``.
        device: where the calibration pass runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...). On CPU
            it computes in fp32, elsewhere in the checkpoint's dtype.
        max_samples, max_length, seed: see :func:`safedelta.calibration.load_calibration`.
        progress: a tqdm bar (stderr) over the blocks.
        allow_pickle: read pickle-based (``*.bin``) weights (weights-only unpickling).
        tokenizer: a tokenizer object or directory to use instead of ``aligned_dir``'s.
        micro_batch: samples per forward (right-padded, padding left out of ``H``); 1 runs
            the samples one at a time. Part of the cache key (it changes the rounding).

    Returns:
        a :class:`HessianSet`; ``cache_hit`` says whether the pass was skipped.

    Raises:
        CalibrationError: bad calibration set or no tokenizer; CheckpointError (and
        subclasses): unreadable weights; UnsupportedArchitecture: no decoder blocks found.
    """
    import torch

    from safedelta.checkpoint import CheckpointReader
    from safedelta.fingerprint import default_cache_dir

    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise CalibrationError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
    t_total = time.perf_counter()
    aligned_dir = Path(aligned_dir)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    timings: dict[str, float] = {}
    reader = CheckpointReader(aligned_dir, allow_pickle=allow_pickle)
    dev = torch.device(device)

    t = time.perf_counter()
    samples, cal_source, cal_digest = _calibration_samples(
        aligned_dir, calibration, tokenizer, max_samples=max_samples, max_length=max_length,
        seed=seed)
    timings["tokenize"] = time.perf_counter() - t

    t = time.perf_counter()
    key_fields = _key_fields(aligned_dir, root, reader, dev, samples, cal_digest,
                             max_samples=max_samples, max_length=max_length, seed=seed,
                             micro_batch=micro_batch)
    key = hashlib.blake2b(json.dumps(key_fields, sort_keys=True).encode(),
                          digest_size=16).hexdigest()
    timings["fingerprint"] = time.perf_counter() - t
    path = root / "hessians" / key

    if _read_manifest(path) is not None:
        timings.update(load=0.0, calibration_forward=0.0, save=0.0,
                       total=time.perf_counter() - t_total)
        _logger.info("Hessians: cache hit %s", path)
        return HessianSet(path, cache_hit=True, timings=timings)
    if path.exists():
        _logger.warning("Hessian cache '%s' is incomplete or from another format; rebuilding",
                        path)
    header = {"key": key, "key_fields": key_fields, "aligned_dir": str(aligned_dir.resolve()),
              "calibration_source": cal_source, "n_samples": len(samples),
              "n_tokens": int(sum(int(s.numel()) for s in samples)), "device": str(dev)}
    _build_entry(path, header, timings, lambda tmp, mb: _calibration_pass(
        aligned_dir, reader, samples, tmp, dev, key_fields["dtype"], progress, mb), micro_batch)
    timings["total"] = time.perf_counter() - t_total
    hs = HessianSet(path, cache_hit=False, timings=timings)
    _logger.info("Hessians: %d linears, %d samples / %d tokens, %.1fs forward -> %s",
                 len(hs), hs.n_samples, hs.n_tokens, timings["calibration_forward"], path)
    return hs


def _calibration_samples(aligned_dir: Path, calibration, tokenizer, *, max_samples: int,
                         max_length: int, seed: int) -> tuple[list["Tensor"], str, str | None]:
    """``(token ids, source label, file digest or None)`` of the calibration set."""
    import torch

    from safedelta.calibration import calibration_digest, load_calibration

    if calibration is not None and not isinstance(calibration, (str, os.PathLike)):
        samples = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in calibration]
        if not samples or any(s.numel() == 0 for s in samples):
            raise CalibrationError("calibration token ids are empty")
        return samples, "tokens", None
    tok = tokenizer
    if tok is None or isinstance(tok, (str, os.PathLike)):
        from transformers import AutoTokenizer

        src = tok if tok is not None else aligned_dir
        try:
            tok = AutoTokenizer.from_pretrained(src)
        except Exception as e:
            raise CalibrationError(f"no usable tokenizer in '{src}' to format the "
                                   f"calibration set: {e}") from e
    samples = load_calibration(calibration, tok, max_samples=max_samples,
                               max_length=max_length, seed=seed)
    return (samples, str(calibration) if calibration is not None else "default",
            calibration_digest(calibration))


def _key_fields(aligned_dir: Path, root: Path, reader, dev, samples, cal_digest, *,
                max_samples: int, max_length: int, seed: int, micro_batch: int) -> dict:
    """What the cache key hashes: the inputs, and how the Hessians were accumulated
    (:data:`ACCUMULATION`, ``micro_batch``), so an entry made another way is never reused."""
    from safedelta.fingerprint import checkpoint_fingerprint

    return {"format": FORMAT_VERSION, "accumulation": ACCUMULATION,
            "micro_batch": micro_batch,
            "aligned": checkpoint_fingerprint(aligned_dir, cache_dir=root),
            "calibration": cal_digest, "tokens": _tokens_digest(samples),
            "max_samples": max_samples, "max_length": max_length, "seed": seed,
            "dtype": _compute_dtype(reader, dev)}


def _build_entry(path: Path, header: dict, timings: dict, run_pass, micro_batch: int) -> None:
    """Run the pass into a temporary directory, write the manifest last, rename onto ``path``.

    A model whose linears cannot have padding masked out (routed experts) is run again
    unpadded (``micro_batch`` 1, recorded in the manifest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{header['key']}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        try:
            built = run_pass(tmp, micro_batch)
        except _Unmaskable as e:
            _logger.warning("padding cannot be left out of every linear's Hessian (%s); "
                            "running the calibration samples one at a time", e)
            built = run_pass(tmp, 1)
        timings.update(built.pop("timings"))
        manifest = {
            "format": FORMAT_VERSION, **header, **built,
            "files": {f.name: f.stat().st_size for f in sorted(tmp.glob("*.safetensors"))},
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks it complete
        tmp = _publish(tmp, path)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, path: Path) -> Path | None:
    """Rename the finished ``tmp`` onto ``path`` unless a concurrent writer's complete entry
    is already there; returns what is left to delete (``tmp``) or None."""
    if path.exists():
        if _read_manifest(path) is not None:  # another process finished first
            return tmp
        shutil.rmtree(path)
    try:
        os.rename(tmp, path)
        return None
    except OSError:
        if _read_manifest(path) is None:  # not a concurrent writer's complete entry
            raise
        return tmp
