"""The calibration pass (aligned model, one decoder block at a time) and the Hessian cache.

Faithful to ``docs/algorithm.md`` ("Calibration and the Hessian"): the *aligned* model's own
activations on the safe calibration set, batch size 1, every token counted; for every linear layer
of every decoder block the running mean ``H = (2/N) sum_n X_n X_n^T`` in fp32 (SparseGPT's
``add_batch``; ``N`` = samples, ``X_n`` = the layer's inputs for sample n, ``c x tokens``); each
block's outputs, computed by the unmodified aligned block, are the next block's inputs.

Streaming: the model skeleton is built with its parameters on the meta device (buffers such as
rotary frequencies stay real), the modules before the first block (embeddings) are materialised
from the memory-mapped checkpoint when first called, block-0 inputs and every block's per-sample
arguments (attention mask, position embeddings/ids, ...; sliding-window and global layers get
different ones) are recorded by pre-hooks while the blocks are passed through, then each block in
turn is loaded, run over all samples, and returned to the meta device.

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
compute dtype and the format version.

Example::

    hs = prepare_hessians("models/aligned")            # default calibration set, CPU
    H = hs.get("model.layers.0.self_attn.q_proj.weight")   # (in x in) fp32, before damping
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from safedelta.errors import (
    CalibrationError,
    CheckpointError,
    MissingTensor,
    SafeDeltaError,
    ShapeMismatch,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor, nn

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class HessianCacheError(SafeDeltaError):
    """A Hessian cache entry cannot be used (unreadable manifest or block file)."""


# --------------------------------------------------------------------------- accumulation

@contextlib.contextmanager
def _fp32_exact(device: "torch.device"):
    """TF32 off for the accumulation (as the faithful mode asks); restored on exit."""
    import torch

    if device.type != "cuda":
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class RunningHessian:
    """``H = (2/N) sum_n X_n X_n^T`` as a running mean, fp32 (SparseGPT's ``add_batch``).

    ``add(inp)`` takes one call's input, ``batch x tokens x c`` (or ``tokens x c``); ``N`` counts
    batch entries (samples), not tokens.
    """

    def __init__(self, columns: int, device: "torch.device | str" = "cpu"):
        import torch

        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, inp: "Tensor") -> None:
        import math

        import torch

        if inp.ndim == 2:
            inp = inp.unsqueeze(0)
        n = inp.shape[0]
        X = inp.reshape(-1, inp.shape[-1]).t().to(device=self.H.device, dtype=torch.float32)
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        X = math.sqrt(2 / self.nsamples) * X
        with _fp32_exact(self.H.device):
            self.H += X @ X.t()


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
    acc: dict[str, RunningHessian] = {}
    hooks = []
    for i, block in enumerate(layers):
        for name, lin in find_linears(block).items():
            full = f"{prefix}.{i}.{name}.weight"
            acc[full] = RunningHessian(in_features(lin), device)

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


# --------------------------------------------------------------------------- the cached set

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


def _capture_inputs(model, layers, samples, names, reader, device, dtype, prefix):
    """Block-0 inputs, and for every block the per-sample arguments the model passes to it.

    Runs the model's own forward with only the pre-block modules materialised (each one when
    first called). Every block is swapped for a pass-through while a pre-hook records its
    arguments (attention mask, position embeddings/ids, ...; they can differ per block, e.g.
    sliding-window and global layers), and the forward stops at the last block. Should that
    fail, only block 0's arguments are caught and reused for every block (with a warning).

    Returns:
        ``(inps, layer_args)``: ``inps[n]`` the block-0 input of sample n (``1 x T x hidden``),
        ``layer_args[i][n]`` the ``(args, kwargs)`` that follow the hidden states for block i.
    """
    import torch

    layer_prefix = prefix + "."
    pre_hooks = []

    def make_loader(mod_name):
        def load(module, _args):
            _load_params(module, mod_name, names, reader, device, dtype, recurse=False)
        return load

    pre_hooks += _compact_input_embedding(model, samples, names, reader, device, dtype)
    for n, m in model.named_modules():  # materialise embeddings etc. only when used
        if n == prefix or n.startswith(layer_prefix):
            continue
        if any(p.device.type == "meta" for p in m.parameters(recurse=False)):
            pre_hooks.append(m.register_forward_pre_hook(make_loader(n)))
        for bname, b in list(m._buffers.items()):
            if b is not None and b.device.type != "meta" and b.device != device:
                m._buffers[bname] = b.to(device)

    def split(args, kwargs):
        kwargs = dict(kwargs)
        if args:
            return args[0], tuple(args[1:]), kwargs
        return kwargs.pop("hidden_states"), (), kwargs

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def run(every_block: bool):
        inps: list[Tensor] = []
        layer_args: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
        last = len(layers) - 1 if every_block else 0

        def make_catch(i):
            def catch(_module, args, kwargs):
                hs, rest, kw = split(args, kwargs)
                if i == 0:
                    inps.append(hs.detach())
                layer_args[i].append((rest, kw))
                if i == last:
                    raise _StopForward
            return catch

        hooks = [layers[i].register_forward_pre_hook(make_catch(i), with_kwargs=True)
                 for i in range(last + 1)]
        for block in layers:
            block.forward = passthrough  # instance attribute: shadows the class's forward
        try:
            with torch.no_grad():
                for s in samples:
                    try:
                        model(input_ids=s.reshape(1, -1).to(device), use_cache=False)
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

    try:
        try:
            return run(every_block=True)
        except SafeDeltaError:
            raise
        except Exception as e:  # a forward loop that needs real block outputs
            _logger.warning("could not record each block's arguments (%s: %s); reusing block "
                            "0's for every block", type(e).__name__, e)
            return run(every_block=False)
    finally:
        for h in pre_hooks:
            h.remove()


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


def _calibration_pass(aligned_dir: Path, reader, samples: Sequence["Tensor"], out_dir: Path,
                      device: "torch.device", dtype_name: str, progress: bool) -> dict:
    """Run the streaming pass, writing one safetensors file per block into ``out_dir``."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    from safedelta.modelwalk import find_decoder_layers, find_linears, in_features, is_conv1d

    timings = {"load": 0.0, "calibration_forward": 0.0, "save": 0.0}
    t = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(aligned_dir)
    except Exception as e:
        raise CheckpointError(f"cannot read the model config in '{aligned_dir}': {e}") from e
    dtype = _torch_dtype(dtype_name)
    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) stay real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    prefix, layers = find_decoder_layers(model)
    names = _NameMap(model, reader)
    timings["load"] += time.perf_counter() - t

    t = time.perf_counter()
    inps, layer_args = _capture_inputs(model, layers, samples, names, reader, device, dtype,
                                       prefix)
    timings["calibration_forward"] += time.perf_counter() - t

    tensors: dict[str, dict] = {}
    weight_names: list[str] = []
    bar = tqdm(total=len(layers), desc="calibration pass", unit="block", disable=not progress)
    for i, block in enumerate(layers):
        t = time.perf_counter()
        _load_params(block, f"{prefix}.{i}", names, reader, device, dtype, recurse=True)
        timings["load"] += time.perf_counter() - t

        t = time.perf_counter()
        linears = find_linears(block)
        order = list(linears)
        captured: dict[str, list] = {}
        hooks = []
        for name, lin in linears.items():
            def hook(_m, args, kwargs, _out, _name=name):
                # the tensor object itself (no detach: a new object would hide sharing)
                captured.setdefault(_name, []).append(_input_of(args, kwargs))
            hooks.append(lin.register_forward_hook(hook, with_kwargs=True))
        leader_of: dict[str, str] | None = None
        acc: dict[str, RunningHessian] = {}
        outs: list[Tensor] = []
        try:
            with torch.no_grad():
                for n, x in enumerate(inps):
                    captured.clear()
                    rest, kwargs = layer_args[i][n]
                    out = block(x, *rest, **kwargs)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    outs.append(out.detach())
                    if leader_of is None:
                        leader_of = _group_shared(captured, order)
                        acc = {lead: RunningHessian(in_features(linears[lead]), device)
                               for lead in dict.fromkeys(leader_of.values())}
                    for name, lead in leader_of.items():
                        mine, theirs = captured.get(name, []), captured.get(lead, [])
                        if lead != name and (len(mine) != len(theirs) or not all(
                                a is b for a, b in zip(mine, theirs))):
                            raise SafeDeltaError(
                                f"block {i}: '{name}' shared its input with '{lead}' on the first "
                                "sample but not on a later one; cannot share their Hessian")
                    for lead, rh in acc.items():
                        for call_input in captured.get(lead, []):
                            rh.add(call_input)
                    captured.clear()
        finally:
            for h in hooks:
                h.remove()
        timings["calibration_forward"] += time.perf_counter() - t

        t = time.perf_counter()
        fname = f"block_{i:05d}.safetensors"
        full = {name: names(f"{prefix}.{i}.{name}.weight") for name in order}  # checkpoint names
        to_save = {}
        for lead, rh in acc.items():
            if rh.nsamples == 0:
                _logger.warning("block %d: '%s' was never called on the calibration set; its "
                                "Hessian is zero", i, lead)
            to_save[full[lead]] = rh.H.contiguous().cpu()
        save_file(to_save, str(out_dir / fname))
        for name in order:
            tensors[full[name]] = {
                "block": i, "file": fname, "key": full[leader_of[name]],
                "in_features": in_features(linears[name]), "conv1d": is_conv1d(linears[name]),
                "calls": acc[leader_of[name]].nsamples,
            }
            weight_names.append(full[name])
        timings["save"] += time.perf_counter() - t

        block.to("meta")  # free the block's weights
        del acc, captured, to_save
        inps = outs
        bar.update(1)
    bar.close()
    return {"layers_prefix": prefix, "n_blocks": len(layers), "weight_names": weight_names,
            "tensors": tensors, "dtype": dtype_name, "timings": timings}


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
                     tokenizer: Any = None) -> HessianSet:
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

    Returns:
        a :class:`HessianSet`; ``cache_hit`` says whether the pass was skipped.

    Raises:
        CalibrationError: bad calibration set or no tokenizer; CheckpointError (and
        subclasses): unreadable weights; UnsupportedArchitecture: no decoder blocks found.
    """
    import torch

    from safedelta.calibration import calibration_digest, load_calibration
    from safedelta.checkpoint import CheckpointReader
    from safedelta.fingerprint import checkpoint_fingerprint, default_cache_dir

    t_total = time.perf_counter()
    aligned_dir = Path(aligned_dir)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    timings: dict[str, float] = {}
    reader = CheckpointReader(aligned_dir, allow_pickle=allow_pickle)
    dev = torch.device(device)

    t = time.perf_counter()
    if calibration is not None and not isinstance(calibration, (str, os.PathLike)):
        samples = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in calibration]
        if not samples or any(s.numel() == 0 for s in samples):
            raise CalibrationError("calibration token ids are empty")
        cal_source, cal_digest = "tokens", None
    else:
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
        cal_source = str(calibration) if calibration is not None else "default"
        cal_digest = calibration_digest(calibration)
    timings["tokenize"] = time.perf_counter() - t

    t = time.perf_counter()
    parent_fp = checkpoint_fingerprint(aligned_dir, cache_dir=root)
    dtype_name = _compute_dtype(reader, dev)
    key_fields = {"format": FORMAT_VERSION, "aligned": parent_fp, "calibration": cal_digest,
                  "tokens": _tokens_digest(samples), "max_samples": max_samples,
                  "max_length": max_length, "seed": seed, "dtype": dtype_name}
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

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        built = _calibration_pass(aligned_dir, reader, samples, tmp, dev, dtype_name, progress)
        timings.update(built.pop("timings"))
        manifest = {
            "format": FORMAT_VERSION, "key": key, "key_fields": key_fields,
            "aligned_dir": str(aligned_dir.resolve()), "calibration_source": cal_source,
            "n_samples": len(samples), "n_tokens": int(sum(int(s.numel()) for s in samples)),
            "device": str(dev), **built,
            "files": {f.name: f.stat().st_size for f in sorted(tmp.glob("*.safetensors"))},
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks it complete
        if path.exists():
            if _read_manifest(path) is not None:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                tmp = None
            else:
                shutil.rmtree(path)
        if tmp is not None:
            try:
                os.rename(tmp, path)
                tmp = None
            except OSError:
                if _read_manifest(path) is None:  # not a concurrent writer's complete entry
                    raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    timings["total"] = time.perf_counter() - t_total
    hs = HessianSet(path, cache_hit=False, timings=timings)
    _logger.info("Hessians: %d linears, %d samples / %d tokens, %.1fs forward -> %s",
                 len(hs), hs.n_samples, hs.n_tokens, timings["calibration_forward"], path)
    return hs
