"""Registration manifests: small YAML files that ask for a model version to be gated.

A manifest lives in the repository (``models/*.yaml``) and names one registered model version
(by number or by alias), its aligned parent and the policy to gate it with::

    manifest_version: 1
    model: support-bot            # registered model name
    version: 7                    # ... or: alias: candidate   (exactly one of the two)
    parent: models:/chat-aligned/3
    policy: default               # a shipped policy name, or a YAML file in this repository
    promote: true                 # move the promotion alias when the gate passes (push only)

The governance workflow (``.github/workflows/model-gate.yml``) lists the manifests a pull request
adds or changes, validates them here and runs the gate action once per manifest. This module is
import-light (pydantic and PyYAML only) so that workflow job needs no torch or MLflow::

    python -m mlflow_safedelta.manifest matrix models/a.yaml models/b.yaml
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from safedelta.errors import SafeDeltaError

# models:/<name>/<version> or models:/<name>@<alias>
_PARENT_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[0-9]+)|@(?P<alias>[\w.-]+))$")
_ALIAS = re.compile(r"^[A-Za-z_][\w-]*$")


class ManifestError(SafeDeltaError, ValueError):
    """A registration manifest is not valid YAML or does not fit the schema."""


class Manifest(BaseModel):
    """One registration manifest: which model version to gate, against which parent and policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest_version: Literal[1] = Field(
        1, description="Schema version of this file; only 1 exists."
    )
    model: str = Field(
        ..., min_length=1, description="Registered model name of the fine-tuned model."
    )
    version: int | None = Field(
        None, ge=1, description="Model version number to gate (exclusive with `alias`)."
    )
    alias: str | None = Field(
        None, description="Alias naming the model version to gate (exclusive with `version`)."
    )
    parent: str = Field(
        ...,
        description="The aligned parent as a registry URI: `models:/<name>/<version>` or "
        "`models:/<name>@<alias>`.",
    )
    policy: str = Field(
        "default",
        min_length=1,
        description="Gate policy: a shipped policy name or a YAML file path relative to the "
        "repository root.",
    )
    promote: bool = Field(
        False,
        description="Move the policy's promotion alias to the protected version when the gate "
        "passes.",
    )

    @field_validator("version", mode="before")
    @classmethod
    def _no_bool_or_float_version(cls, value: Any) -> Any:
        # YAML `version: 1.5` or `version: yes` must not be coerced into a version number
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError(f"must be a whole version number, got {value!r}")
        return value

    @field_validator("alias")
    @classmethod
    def _alias_shape(cls, value: str | None) -> str | None:
        if value is not None and not _ALIAS.match(value):
            raise ValueError(f"{value!r} is not a valid alias (letters, digits, '_' and '-')")
        return value

    @field_validator("parent")
    @classmethod
    def _parent_uri(cls, value: str) -> str:
        if not _PARENT_URI.match(value):
            raise ValueError(
                f"{value!r} is not a registry URI; write models:/<name>/<version> or "
                "models:/<name>@<alias>"
            )
        return value

    @model_validator(mode="after")
    def _version_xor_alias(self) -> Manifest:
        if (self.version is None) == (self.alias is None):
            raise ValueError("give exactly one of `version` and `alias`")
        return self

    def matrix_entry(self, path: str) -> dict[str, Any]:
        """The workflow matrix row for this manifest (strings for the action's inputs)."""
        return {
            "manifest": path,
            "model": self.model,
            "version": "" if self.version is None else str(self.version),
            "alias": self.alias or "",
            "parent": self.parent,
            "policy": self.policy,
            "promote": self.promote,
        }


def _format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: invalid registration manifest:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(manifest)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(f"`{k}`" for k in Manifest.model_fields)
            msg = f"unknown field (allowed: {allowed})"
        lines.append(f"  `{field}`: {msg}")
    return "\n".join(lines)


def parse_manifest(text: str, source: str = "<manifest>") -> Manifest:
    """Parse and validate manifest YAML.

    Raises:
        ManifestError: the YAML does not parse or breaks the schema; the message names the file
            and every offending field.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(
            f"{source}: a registration manifest is a YAML mapping (model, version or alias, "
            f"parent, policy), got {type(data).__name__}"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(_format_validation_error(source, exc)) from exc


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate one manifest file (see :func:`parse_manifest`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc.strerror or exc}") from exc
    return parse_manifest(text, source=str(path))


def build_matrix(paths: list[str]) -> list[dict[str, Any]]:
    """Validate every manifest and return one matrix row per file.

    All files are checked before failing, so one run reports every broken manifest.
    """
    rows, problems = [], []
    for p in paths:
        try:
            rows.append(load_manifest(p).matrix_entry(p))
        except ManifestError as exc:
            problems.append(str(exc))
    if problems:
        raise ManifestError("\n".join(problems))
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m mlflow_safedelta.manifest matrix FILE...``: print the workflow matrix as JSON.

    Writes ``matrix=<json>`` and ``count=<n>`` to ``$GITHUB_OUTPUT`` when that is set. Exit 2 and
    a GitHub ``::error`` annotation per broken manifest when any fails validation.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("matrix", "validate"):
        print("usage: python -m mlflow_safedelta.manifest matrix|validate FILE...", file=sys.stderr)
        return 2
    command, paths = argv[0], argv[1:]
    try:
        rows = build_matrix(paths)
    except ManifestError as exc:
        for block in str(exc).split("\n"):
            print(block, file=sys.stderr)
        if os.environ.get("GITHUB_ACTIONS") == "true":
            for p in paths:
                if p in str(exc):
                    print(f"::error file={p}::invalid registration manifest (see log)")
        return 2
    if command == "validate":
        for p in paths:
            print(f"{p}: ok", file=sys.stderr)
        return 0
    matrix = json.dumps(rows, separators=(",", ":"))
    print(json.dumps(rows, indent=2))
    out = os.environ.get("GITHUB_OUTPUT")
    if out:
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(f"matrix={matrix}\ncount={len(rows)}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through the workflow step in tests
    sys.exit(main())
