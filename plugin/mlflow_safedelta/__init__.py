"""MLflow integration of Safe Delta: the ``safedelta`` flavor, registry gating, policies, CLI.

Import-light on purpose: MLflow may import parts of this package during ``import mlflow``
(plugin entry points), so nothing here imports torch or transformers at module level.
"""

__version__ = "0.1.0"
