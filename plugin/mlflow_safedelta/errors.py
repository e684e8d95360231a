"""Errors of the MLflow plugin. All derive from :class:`safedelta.errors.SafeDeltaError`, so the
CLI shows them without a traceback (exit 2) and the gate job records them as ``safedelta.reason``.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from safedelta.errors import SafeDeltaError


class PluginError(SafeDeltaError):
    """Base class of the plugin's user-facing errors."""


class PolicyError(PluginError, ValueError):
    """A policy file or name is invalid; the message names the field, the reason and the file."""


class RegistryError(PluginError):
    """A registry object (model, version, alias, URI) cannot be resolved as asked."""


class MissingParent(RegistryError):
    """A fine-tuned version names no aligned parent (no flavor config, no ``safedelta.parent``)."""


class ModelWeightsNotFound(RegistryError):
    """A registered version holds no weights that the plugin can read (no known flavor)."""


class FlavorError(PluginError):
    """Bad input to the ``safedelta`` flavor (save/load)."""


class GovernanceError(PluginError):
    """The governance file, a key or a signed statement is invalid; the message says which."""


class GateJobError(PluginError):
    """The gate job could not finish; the fine-tuned version is tagged ``safedelta.status=error``."""


def to_mlflow_exception(exc: Exception):
    """At the MLflow boundary: a ``MlflowException`` with ``INVALID_PARAMETER_VALUE``."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE)


def error_reason(exc: BaseException) -> str:
    """One line for a status reason: the exception, and where it came from unless it is one of
    ours (whose message already says what is wrong)."""
    head = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SafeDeltaError):
        return head
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{head} (at {where})" if where else head
