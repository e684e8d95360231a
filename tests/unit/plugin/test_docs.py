"""The docs cannot drift from the command line.

- ``docs/cli.md`` must be exactly what ``python docs/gen_cli.py`` writes from the live ``--help``
  texts (regenerate it after changing a command);
- every ``mlflow-safedelta <command>`` / ``mlflow safedelta <command>`` invocation in README.md
  must name a command that exists, and every ``--option`` it passes must be an option of that
  command;
- the same for ``python -m safedelta.lab <command>`` (the safety lab's own command line);
- every ``--option`` README.md mentions in inline code outside an invocation must be an option of
  some ``mlflow-safedelta`` command (or of the few other tools the README shows, listed below).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"

#: options of other tools that README shows on their own command lines or in prose
OTHER_TOOLS_OPTIONS = {
    "--backend-store-uri", "--registry-store-uri", "--artifacts-destination", "--host",
    "--port", "--workers", "--default-artifact-root",  # mlflow server / mlflow ui
    "--no-deps", "--index-url", "--extra-index-url",   # pip
    "--oneline",                                       # git log
}


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gen():
    return _gen_cli()


@pytest.fixture(scope="module")
def commands(gen) -> dict[str, click.Command]:
    return gen.command_paths()


def _paths(group: click.Command) -> dict[str, click.Command]:
    out = {}
    ctx = click.Context(group, info_name="x")
    for c, cmd in _gen_cli().walk(group, ctx):
        out[c.command_path.removeprefix("x").strip()] = cmd
    return out


@pytest.fixture(scope="module")
def lab_commands() -> dict[str, click.Command]:
    from safedelta.lab.__main__ import cli as lab_cli

    return _paths(lab_cli)


def _options(cmd: click.Command) -> set[str]:
    out = {"--help", "-h"}
    for p in cmd.params:
        if isinstance(p, click.Option):
            out.update(p.opts)
            out.update(p.secondary_opts)
    return out


def test_cli_md_is_current(gen):
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == gen.render(), "docs/cli.md is stale: run `python docs/gen_cli.py`"


def _code_texts(markdown: str) -> list[str]:
    """Fenced code blocks (continuation lines joined) and inline code spans."""
    texts = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.S | re.M):
        texts += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.S | re.M)
    texts += re.findall(r"`([^`\n]+)`", prose)
    return texts


_INVOCATION = re.compile(r"(?:^|[\s;&|(`$])(mlflow-safedelta|mlflow safedelta)(?=\s|$)(.*)")
_LAB_INVOCATION = re.compile(r"(?:^|\s)-m (safedelta\.lab)(?=\s|$)(.*)")


def _invocations(markdown: str, pattern: re.Pattern = _INVOCATION) -> list[tuple[str, list[str]]]:
    """``(text, words after the program name)`` for each invocation in code."""
    found = []
    for text in _code_texts(markdown):
        text = text.split(" #")[0]  # shell comments
        for m in pattern.finditer(text):
            rest = re.split(r"\s(?:[|;>]|&&|2>)", m.group(2))[0]
            try:
                words = shlex.split(rest, posix=True)
            except ValueError:
                words = rest.split()
            found.append((text.strip(), words))
    return found


def _resolve(commands: dict[str, click.Command], words: list[str]) -> tuple[str, list[str]]:
    """The longest command path that ``words`` starts with, and the words after it."""
    path: list[str] = []
    for w in words:
        if w.startswith("-"):
            break
        if " ".join([*path, w]) in commands and isinstance(commands[" ".join(path)], click.Group):
            path.append(w)
        else:
            break
    return " ".join(path), words[len(path):]


def _check_invocations(invocations, commands, prog) -> list[str]:
    problems = []
    for text, words in invocations:
        if words and re.fullmatch(r"<[^>]*>|\.\.\.|\[.*\]", words[0]):
            continue  # a placeholder: `mlflow-safedelta <command>`
        path, rest = _resolve(commands, words)
        cmd = commands[path]
        if isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
            problems.append(f"unknown command '{rest[0]}' in: {text}")
            continue
        known = _options(cmd) | (_options(commands[""]) if path else set())
        for w in rest:
            if w.startswith("--") or re.fullmatch(r"-[a-zA-Z]", w):
                opt = w.split("=", 1)[0]
                if opt not in known:
                    problems.append(f"'{opt}' is not an option of '{prog} {path}' in: {text}")
    return problems


def check_readme(markdown: str, commands: dict[str, click.Command],
                 lab_commands: dict[str, click.Command] | None = None) -> list[str]:
    """Problems with the README's command lines and options (empty when all is well)."""
    problems = _check_invocations(_invocations(markdown), commands, "mlflow-safedelta")
    if lab_commands is not None:
        problems += _check_invocations(_invocations(markdown, _LAB_INVOCATION), lab_commands,
                                       "python -m safedelta.lab")
    all_options = set().union(*(_options(c) for c in commands.values()))
    for text in _code_texts(markdown):
        if re.search(r"\bmlflow(?:-| )safedelta\b|-m safedelta\.lab\b", text):
            continue
        for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text):
            if opt not in all_options and opt not in OTHER_TOOLS_OPTIONS:
                problems.append(f"'{opt}' is not an option of any mlflow-safedelta command "
                                f"(in `{text}`)")
    return problems


def test_readme_commands_and_options_exist(commands, lab_commands):
    problems = check_readme(README.read_text(encoding="utf-8"), commands, lab_commands)
    assert not problems, "README.md mentions what the CLI does not have:\n" + "\n".join(problems)


@pytest.mark.parametrize("snippet, expected", [
    ("```bash\nmlflow-safedelta protect --aligned a --finetuned b --out c --s 1e-5\n```", None),
    ("```bash\nmlflow safedelta policy show strict\n```", None),
    ("```bash\nmlflow-safedelta protekt --aligned a\n```", "unknown command 'protekt'"),
    ("```bash\nmlflow-safedelta policy frobnicate\n```", "unknown command 'frobnicate'"),
    ("```bash\nmlflow-safedelta protect --aligned a \\\n    --no-such-flag\n```", "'--no-such-flag'"),
    ("Use `mlflow-safedelta evaluate --judge keyword`.", None),
    ("Use `mlflow-safedelta evaluate --judgement keyword`.", "'--judgement'"),
    ("Pass `--budget official` to protect.", None),
    ("Pass `--budjet official` to protect.", "'--budjet'"),
    ("Every command: `mlflow-safedelta <command>`.", None),
    ("```bash\npython -m safedelta.lab build --only aligned\n```", None),
    ("```bash\npython -m safedelta.lab build --onyl aligned\n```", "'--onyl'"),
    ("```bash\npython -m safedelta.lab bild\n```", "unknown command 'bild'"),
])
def test_checker_catches_what_it_should(commands, lab_commands, snippet, expected):
    problems = check_readme(snippet, commands, lab_commands)
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_readme_links_resolve():
    """Relative links point at files in the repository, and #anchors at README headings."""
    import os

    text = README.read_text(encoding="utf-8")
    missing = [link for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
               if not link.startswith(("http://", "https://"))
               and not os.path.exists(ROOT / link)]
    headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}
    bad = [a for a in re.findall(r"\]\(#([^)]+)\)", text) if a not in headings]
    assert not missing and not bad, f"missing files {missing}, unknown anchors {bad}"
