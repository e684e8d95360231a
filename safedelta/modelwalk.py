"""Finding a model's decoder blocks and their linear layers structurally.

Nothing here knows a class name: the decoder blocks are *the* ``nn.ModuleList`` of repeated
blocks of one class that hold linear layers (``model.layers`` for Llama/Mistral/Qwen/Gemma/Phi3,
``transformer.h`` for GPT-2, ...), and the linear layers are every ``nn.Linear`` and
``transformers.pytorch_utils.Conv1D`` inside them. ``Conv1D`` (GPT-2 family) stores its weight
transposed, in x out; :func:`is_conv1d` flags it and :func:`in_features` reads the input width
either way.

Works on models whose parameters live on the meta device (only the module tree is read).

Example::

    prefix, layers = find_decoder_layers(model)      # "model.layers", ModuleList of N blocks
    names = linear_weight_names(model)               # ["model.layers.0.self_attn.q_proj.weight", ...]
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from safedelta.errors import UnsupportedArchitecture

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

_logger = logging.getLogger(__name__)


def _conv1d_cls():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_conv1d(module: "nn.Module") -> bool:
    """True for ``transformers``' ``Conv1D``: a linear layer whose weight is stored in x out."""
    cls = _conv1d_cls()
    return cls is not None and isinstance(module, cls)


def is_linear(module: "nn.Module") -> bool:
    """True for ``nn.Linear`` (and subclasses) and ``transformers``' ``Conv1D``."""
    from torch import nn

    return isinstance(module, nn.Linear) or is_conv1d(module)


def in_features(module: "nn.Module") -> int:
    """Input width of a linear layer (``weight`` is out x in for Linear, in x out for Conv1D)."""
    return int(module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1])


def find_linears(module: "nn.Module") -> dict[str, "nn.Module"]:
    """Every linear layer (``nn.Linear``, ``Conv1D``) under ``module``, by relative name, in
    module order. Use :func:`is_conv1d` to tell which store their weight in x out."""
    return {name: m for name, m in module.named_modules() if name and is_linear(m)}


def _describe_lists(model: "nn.Module") -> list[str]:
    from torch import nn

    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList):
            classes = sorted({type(c).__name__ for c in m})
            n_lin = sum(len(find_linears(c)) for c in m)
            out.append(f"'{name}' ({len(m)} x {'/'.join(classes) or 'empty'}, {n_lin} linears)")
    return out


def find_decoder_layers(model: "nn.Module") -> tuple[str, "nn.ModuleList"]:
    """The decoder blocks of ``model``: ``(prefix, layers)``, e.g. ``("model.layers", ModuleList)``.

    The candidates are ``nn.ModuleList`` s whose children all have one class and all hold at least
    one linear layer. Among them the one holding the most linear layers wins (so a list of
    experts nested inside the blocks never beats the blocks themselves); ties go to the shallower
    path.

    Raises:
        UnsupportedArchitecture: no such list exists; the message lists the module lists and the
            linear layers that were found.
    """
    from torch import nn

    candidates: list[tuple[int, int, str, nn.ModuleList]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        classes = {type(c) for c in m}
        if len(classes) != 1:
            continue
        counts = [len(find_linears(c)) for c in m]
        if min(counts) == 0:
            continue
        candidates.append((sum(counts), -name.count("."), name, m))
    if not candidates:
        lists = _describe_lists(model)
        linears = list(find_linears(model))
        shown = ", ".join(linears[:12]) + (f", ... ({len(linears)} in all)" if len(linears) > 12
                                           else "")
        raise UnsupportedArchitecture(
            f"no decoder blocks found in {type(model).__name__}: expected an nn.ModuleList of "
            "repeated blocks of one class holding nn.Linear/Conv1D layers. Module lists found: "
            f"{'; '.join(lists) or 'none'}. Linear layers found: {shown or 'none'}."
        )
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    _, _, prefix, layers = candidates[0]
    _logger.debug("decoder blocks: '%s' (%d x %s)", prefix, len(layers), type(layers[0]).__name__)
    return prefix, layers


def linear_weight_names(model: "nn.Module") -> list[str]:
    """Full names of every linear weight inside the decoder blocks, block by block, in module
    order, e.g. ``"model.layers.0.self_attn.q_proj.weight"``."""
    prefix, layers = find_decoder_layers(model)
    names: list[str] = []
    for i, block in enumerate(layers):
        names.extend(f"{prefix}.{i}.{name}.weight" for name in find_linears(block))
    return names


def conv1d_weight_names(model: "nn.Module") -> set[str]:
    """The subset of :func:`linear_weight_names` whose weight is stored in x out (``Conv1D``)."""
    prefix, layers = find_decoder_layers(model)
    return {f"{prefix}.{i}.{name}.weight"
            for i, block in enumerate(layers)
            for name, m in find_linears(block).items() if is_conv1d(m)}
