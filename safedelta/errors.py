"""Errors raised by safedelta. Every one names the problem and what to do about it.

All derive from :class:`SafeDeltaError`, so callers (the CLI, the MLflow plugin) can catch one
type and show the message without a traceback. Nothing that raises one of these leaves a partial
output behind.
"""

from __future__ import annotations


class SafeDeltaError(Exception):
    """Base class: a user-facing problem with the inputs or the environment."""


class InvalidConfig(SafeDeltaError, ValueError):
    """A setting is out of range (negative ``s``, unknown budget, ...)."""


class CheckpointError(SafeDeltaError):
    """A checkpoint cannot be read as asked."""


class MissingCheckpoint(CheckpointError, FileNotFoundError):
    """The directory holds no model weights that safedelta can read."""


class PickleCheckpointRefused(CheckpointError):
    """Only pickle-based weights (``*.bin``/``*.pt``) were found and unpickling was not allowed."""


class UnreadableCheckpoint(CheckpointError):
    """A weights file exists but cannot be read (truncated, corrupt, not a tensor archive)."""


class ArchitectureMismatch(CheckpointError):
    """The two models do not share an architecture (config, tensor names or shapes)."""


class MissingTensor(ArchitectureMismatch):
    """A tensor present in one model is absent from the other."""


class ShapeMismatch(ArchitectureMismatch):
    """A tensor has different shapes in the two models."""


class NonFiniteWeights(CheckpointError):
    """A tensor holds NaN or Inf values."""


class UnsupportedArchitecture(SafeDeltaError):
    """No decoder blocks / linear layers could be found structurally."""


class CalibrationError(SafeDeltaError):
    """The calibration set is missing, empty or malformed."""


class OutputExists(SafeDeltaError, FileExistsError):
    """The output directory already holds a model and overwriting was not asked for."""


class AdapterError(CheckpointError):
    """A PEFT adapter cannot be applied to the aligned model."""
