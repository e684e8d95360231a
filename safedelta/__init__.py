"""Safe Delta (Lu et al., ICML 2025): repair a fine-tuned LLM against its aligned parent.

The package is usable without MLflow:

- :func:`protect_matrix`: the algorithm on one linear layer (tensors in, tensors out);
- :func:`protect`: the streaming pipeline over two checkpoints (calibration, cached Hessians,
  one decoder block at a time, sharded safetensors out);
- :class:`BudgetRule`, :func:`register_budget_rule`: the budget rules, a registry;
- :mod:`safedelta.eval`: measuring safety and utility.

Heavy modules (torch, transformers) are imported on first use, so ``import safedelta`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from safedelta.config import SafeDeltaConfig
from safedelta.errors import SafeDeltaError

__version__ = "0.1.0"

# public name -> module that defines it (loaded lazily, like peft's backend classes)
_LAZY = {
    "protect_matrix": "safedelta.solver",
    "MatrixResult": "safedelta.solver",
    "SafeDeltaLayer": "safedelta.solver",
    "protect": "safedelta.pipeline",
    "ProtectReport": "safedelta.report",
    "BudgetRule": "safedelta.budget",
    "register_budget_rule": "safedelta.budget",
}

__all__ = ["SafeDeltaConfig", "SafeDeltaError", "__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from safedelta.budget import BudgetRule, register_budget_rule
    from safedelta.pipeline import protect
    from safedelta.report import ProtectReport
    from safedelta.solver import MatrixResult, SafeDeltaLayer, protect_matrix


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'safedelta' has no attribute {name!r}")
