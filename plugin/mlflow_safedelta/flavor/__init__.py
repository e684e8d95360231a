"""The ``safedelta`` MLflow flavor: a fine-tuned (or Safe-Delta-protected) causal LM that records
its aligned parent.

Produces MLflow Models with the flavors:

- ``safedelta``: ``model/`` (a safetensors checkpoint, or a PEFT LoRA adapter applied onto the
  parent), ``components/tokenizer/``, and in ``MLmodel`` the parent's URI
  (``models:/name/version`` or ``models:/name@alias``), the parent's content fingerprint when
  known, the delta format (``full`` | ``lora``), the role and, for a protected model, its
  ``SafeDeltaConfig``;
- ``python_function``: ``predict`` generates text from prompts (str, list of str, a DataFrame
  column ``prompt``) or chat messages, with params ``max_new_tokens``, ``temperature``, ``top_p``,
  ``do_sample``, ``use_chat_template``.

Example::

    import mlflow
    from mlflow_safedelta import flavor

    with mlflow.start_run():
        info = flavor.log_model("out/finetuned", name="model", parent="models:/aligned/1",
                                registered_model_name="support-bot")
    mlflow.pyfunc.load_model(info.model_uri).predict(["How do I reset my password?"])
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mlflow_safedelta.flavor.flavor_config import (
    DELTA_FORMATS,
    FLAVOR_VERSION,
    MODEL_DATA_SUBPATH,
    ROLES,
    TOKENIZER_SUBPATH,
    FlavorKey,
)

FLAVOR_NAME = "safedelta"

_logger = logging.getLogger(__name__)


def get_default_pip_requirements() -> list[str]:
    """Pip requirements of a model saved with this flavor (pinned to the installed versions)."""
    from mlflow.utils.requirements_utils import _get_pinned_requirement

    reqs = [_get_pinned_requirement(p) for p in ("torch", "transformers", "safetensors")]
    reqs.append(_get_pinned_requirement("mlflow-safedelta", module="mlflow_safedelta"))
    return reqs


def get_default_conda_env() -> dict:
    from mlflow.utils.environment import _mlflow_conda_env

    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


def _params_signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", "long", 64),
            ParamSpec("temperature", "double", 0.0),
            ParamSpec("top_p", "double", 1.0),
            ParamSpec("do_sample", "boolean", False),
            ParamSpec("use_chat_template", "boolean", True),
        ]))


def _validate_parent(parent: str | None) -> None:
    if parent is None:
        return
    if not isinstance(parent, str) or not parent.strip():
        raise _invalid(f"parent must be a models:/ URI or a path, got {parent!r}")
    if parent.startswith("models:/"):
        rest = parent[len("models:/"):]
        if not rest or ("/" not in rest and "@" not in rest):
            raise _invalid(f"parent {parent!r} must be models:/<name>/<version> or "
                           "models:/<name>@<alias>")


def _invalid(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def save_model(model: Any, path: str | os.PathLike, *, tokenizer: Any = None,
               parent: str | None = None, parent_fingerprint: str | None = None,
               role: str = "finetuned", safedelta_config: dict | None = None,
               conda_env=None, code_paths=None, mlflow_model=None, signature=None,
               input_example=None, pip_requirements=None, extra_pip_requirements=None,
               metadata=None) -> None:
    """Save a fine-tuned causal LM (full weights or a LoRA adapter) with its aligned parent.

    Args:
        model: a checkpoint directory (``config.json`` + ``*.safetensors``, or a PEFT adapter
            directory), or a transformers / PEFT model object (saved with ``save_pretrained``).
        path: local directory to create (must not exist or be empty).
        tokenizer: a tokenizer object or directory; default: the one in ``model``'s directory.
        parent: the aligned parent, ``models:/name/version`` or ``models:/name@alias``. Required
            for ``delta_format=lora`` (the adapter is applied onto it at load time).
        parent_fingerprint: content fingerprint of the parent's weights, when known.
        role: ``aligned``, ``finetuned`` or ``protected``.
        safedelta_config: for a protected model, the ``SafeDeltaConfig`` it came from (dict).
        conda_env, code_paths, mlflow_model, signature, input_example, pip_requirements,
            extra_pip_requirements, metadata: as in every MLflow flavor.
    """
    import yaml
    from mlflow import pyfunc
    from mlflow.models import Model
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import _save_example
    from mlflow.utils.environment import (
        _CONDA_ENV_FILE_NAME,
        _CONSTRAINTS_FILE_NAME,
        _PYTHON_ENV_FILE_NAME,
        _REQUIREMENTS_FILE_NAME,
        _process_conda_env,
        _process_pip_requirements,
        _PythonEnv,
        _validate_env_arguments,
    )
    from mlflow.utils.file_utils import write_to
    from mlflow.utils.model_utils import (
        _validate_and_copy_code_paths,
        _validate_and_prepare_target_save_path,
    )

    from mlflow_safedelta.flavor import model_io

    # 1. validate everything before touching disk
    try:
        _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    except ValueError as exc:
        raise _invalid(str(exc)) from None
    _validate_parent(parent)
    if role not in ROLES:
        raise _invalid(f"role {role!r} is not one of {', '.join(ROLES)}")
    is_dir = isinstance(model, (str, os.PathLike))
    if is_dir:
        try:
            kind = model_io.checkpoint_kind(model)
        except Exception as exc:  # FlavorError
            raise _invalid(str(exc)) from None
        if tokenizer is None and model_io.has_tokenizer(model):
            tokenizer = str(model)
    elif not hasattr(model, "save_pretrained"):
        raise _invalid(f"model must be a checkpoint directory or a transformers/PEFT model, got "
                       f"{type(model).__name__}")
    else:
        kind = "lora" if hasattr(model, "peft_config") else "full"
    if kind not in DELTA_FORMATS:  # pragma: no cover - checkpoint_kind returns only these
        raise _invalid(f"delta format {kind!r} is not one of {DELTA_FORMATS}")
    if kind == "lora" and not parent:
        raise _invalid("a LoRA adapter needs parent= (the weights it is applied onto)")
    if tokenizer is None:
        raise _invalid("no tokenizer: pass tokenizer= or save it in the model directory")

    # 2. write
    path = os.path.abspath(path)
    _validate_and_prepare_target_save_path(path)
    code_dir_subpath = _validate_and_copy_code_paths(code_paths, path)
    if mlflow_model is None:
        mlflow_model = Model()
    _save_example(mlflow_model, input_example, path)
    mlflow_model.signature = signature if signature is not None else _params_signature()
    if metadata is not None:
        mlflow_model.metadata = metadata

    data_dir = Path(path) / MODEL_DATA_SUBPATH
    if is_dir:
        model_io.copy_checkpoint(model, data_dir, kind)
    else:
        model_io.save_model_object(model, data_dir)
    model_io.save_tokenizer(tokenizer, Path(path) / TOKENIZER_SUBPATH)

    import torch
    import transformers

    from mlflow_safedelta import __version__
    from safedelta.fingerprint import checkpoint_fingerprint

    try:
        fingerprint = checkpoint_fingerprint(data_dir)
    except Exception:  # an adapter directory has no config.json; fingerprint is best effort
        fingerprint = None
    # the keys declared here are the ones mlflow.pyfunc.load_model(model_config=...) passes on
    # (it drops undeclared ones); models saved before this declared none
    pyfunc.add_to_model(mlflow_model, loader_module="mlflow_safedelta.flavor",
                        conda_env=_CONDA_ENV_FILE_NAME, python_env=_PYTHON_ENV_FILE_NAME,
                        code=code_dir_subpath,
                        model_config={"device": None, "base_model_path": None})
    conf = {
        FlavorKey.FLAVOR_VERSION: FLAVOR_VERSION,
        FlavorKey.MODEL_DATA: MODEL_DATA_SUBPATH,
        FlavorKey.TOKENIZER: TOKENIZER_SUBPATH,
        FlavorKey.DELTA_FORMAT: kind,
        FlavorKey.PARENT_URI: parent,
        FlavorKey.PARENT_FINGERPRINT: parent_fingerprint,
        FlavorKey.FINGERPRINT: fingerprint,
        FlavorKey.ROLE: role,
        FlavorKey.SAFEDELTA_CONFIG: dict(safedelta_config) if safedelta_config else None,
        FlavorKey.TRANSFORMERS_VERSION: transformers.__version__,
        FlavorKey.TORCH_VERSION: str(torch.__version__),
        FlavorKey.SAFEDELTA_VERSION: __version__,
        FlavorKey.CODE: code_dir_subpath,
    }
    mlflow_model.add_flavor(FLAVOR_NAME, **conf)
    # MLmodel is written before the environment files, as MLflow's own flavors do: requirement
    # inference may load the model, which needs MLmodel on disk.
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))

    if conda_env is None:
        default_reqs = get_default_pip_requirements() if pip_requirements is None else None
        conda_env, pip_requirements, pip_constraints = _process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements)
    else:
        conda_env, pip_requirements, pip_constraints = _process_conda_env(conda_env)
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if pip_constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(pip_requirements))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))


def log_model(model: Any, name: str | None = None, *, tokenizer: Any = None,
              parent: str | None = None, parent_fingerprint: str | None = None,
              role: str = "finetuned", safedelta_config: dict | None = None,
              conda_env=None, code_paths=None, registered_model_name=None, signature=None,
              input_example=None, await_registration_for=300, pip_requirements=None,
              extra_pip_requirements=None, metadata=None, params=None, tags=None,
              model_type=None, step: int = 0, model_id=None, **kwargs):
    """Log a model with this flavor to the active run (see :func:`save_model` for the arguments).

    Returns:
        ``mlflow.models.model.ModelInfo``; ``registered_model_name`` registers a version too.
    """
    import sys

    from mlflow.models import Model

    return Model.log(
        artifact_path=None, name=name, flavor=sys.modules[__name__], model=model,
        tokenizer=tokenizer, parent=parent, parent_fingerprint=parent_fingerprint, role=role,
        safedelta_config=safedelta_config, conda_env=conda_env, code_paths=code_paths,
        registered_model_name=registered_model_name, signature=signature,
        input_example=input_example, await_registration_for=await_registration_for,
        pip_requirements=pip_requirements, extra_pip_requirements=extra_pip_requirements,
        metadata=metadata, params=params, tags=tags, model_type=model_type, step=step,
        model_id=model_id, **kwargs)


class SafeDeltaModel:
    """A loaded ``safedelta`` model: ``.model`` (transformers), ``.tokenizer``, ``.conf``."""

    def __init__(self, model: Any, tokenizer: Any, conf: dict, path: str):
        self.model, self.tokenizer, self.conf, self.path = model, tokenizer, conf, path

    @property
    def parent(self) -> str | None:
        return self.conf.get(FlavorKey.PARENT_URI)

    @property
    def delta_format(self) -> str:
        return self.conf.get(FlavorKey.DELTA_FORMAT, "full")

    def generate(self, data: Any, params: dict | None = None) -> list[str]:
        from mlflow_safedelta.flavor import model_io

        return model_io.generate_texts(self.model, self.tokenizer, model_io.normalize_inputs(data),
                                       params)


def _resolve_base(parent: str | None, base_model_path: str | None) -> str:
    """Local weights of the parent a LoRA adapter applies onto."""
    if base_model_path:
        return base_model_path
    if not parent:
        raise _invalid("LoRA model has no parent recorded and no base_model_path was given")
    if os.path.isdir(parent):
        return parent
    import mlflow

    from mlflow_safedelta.flavor.model_io import locate_weights

    local = mlflow.artifacts.download_artifacts(artifact_uri=parent)
    loc = locate_weights(local)
    if loc.kind != "full":
        raise _invalid(f"parent {parent} of a LoRA model must hold full weights")
    return str(loc.weights_dir)


def _load(path: str, device: str | None = None, base_model_path: str | None = None) -> SafeDeltaModel:
    from mlflow.utils.model_utils import _get_flavor_configuration
    from transformers import AutoTokenizer

    from mlflow_safedelta.flavor import model_io

    conf = _get_flavor_configuration(model_path=path, flavor_name=FLAVOR_NAME)
    kind = conf.get(FlavorKey.DELTA_FORMAT, "full")  # flavor_version 1 onwards
    weights = os.path.join(path, conf.get(FlavorKey.MODEL_DATA, MODEL_DATA_SUBPATH))
    base = _resolve_base(conf.get(FlavorKey.PARENT_URI), base_model_path) if kind == "lora" else None
    model = model_io.load_causal_lm(weights, kind=kind, base_dir=base, device=device)
    tokenizer = AutoTokenizer.from_pretrained(
        os.path.join(path, conf.get(FlavorKey.TOKENIZER, TOKENIZER_SUBPATH)))
    return SafeDeltaModel(model, tokenizer, conf, path)


def load_model(model_uri: str, dst_path: str | None = None, *, device: str | None = None,
               base_model_path: str | None = None) -> SafeDeltaModel:
    """Load a ``safedelta`` model as a :class:`SafeDeltaModel` (``.model``, ``.tokenizer``).

    Args:
        model_uri: ``models:/name/version``, ``runs:/...``, or a local path.
        dst_path: where to download it (must exist); default: a temporary directory.
        device: torch device for the weights (default CPU).
        base_model_path: local parent weights for a LoRA model (default: download ``parent_uri``).

    Example::

        m = mlflow_safedelta.flavor.load_model("models:/support-bot/4")
        m.generate("Hello")
    """
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    local = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    return _load(local, device=device, base_model_path=base_model_path)


class _SafeDeltaPyfuncWrapper:
    def __init__(self, loaded: SafeDeltaModel):
        self.loaded = loaded

    def get_raw_model(self) -> SafeDeltaModel:
        return self.loaded

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> list[str]:
        return self.loaded.generate(data, params)


def _load_pyfunc(path: str, model_config: dict | None = None) -> _SafeDeltaPyfuncWrapper:
    """Called by ``mlflow.pyfunc.load_model``. ``model_config`` may give ``device`` and
    ``base_model_path`` (MLflow passes them for models saved with them declared; an older saved
    LoRA model resolves its parent URI instead)."""
    cfg = dict(model_config or {})
    # pyfunc passes the model root (add_to_model was called without data=)
    model_dir = os.path.dirname(path) if os.path.isfile(path) else path
    return _SafeDeltaPyfuncWrapper(_load(model_dir, device=cfg.get("device"),
                                         base_model_path=cfg.get("base_model_path")))


__all__ = ["FLAVOR_NAME", "save_model", "log_model", "load_model", "get_default_pip_requirements",
           "get_default_conda_env", "SafeDeltaModel"]
