"""Regenerate BENCHMARKS.md: ``python -m benchmarks.run [kernel protect lab ...]``
(default: every section but ``lab``, which takes an hour on a CPU; name it to run it).

Each section lives between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` markers and is
replaced by the output of ``benchmarks.bench_NAME.run()``; other sections are left as they are.
"""

from __future__ import annotations

import importlib
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "BENCHMARKS.md"
#: sections left out unless named (``make lab``; ``scale`` and ``parent`` take minutes of CPU)
SLOW = ("lab", "scale", "parent")
HEADER = "# Benchmarks\n\nEvery number here is produced by `make bench` (`python -m benchmarks.run`).\n"


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py"))


def main(argv: list[str]) -> int:
    names = argv or [n for n in available() if n not in SLOW]
    for name in names:
        if name not in available():
            print(f"unknown benchmark {name!r}; known: {', '.join(available())}", file=sys.stderr)
            return 2
    for name in names:
        section = importlib.import_module(f"benchmarks.bench_{name}").run().strip()
        # read the file again only now: a section can take an hour, and another section may have
        # been rewritten meanwhile
        text = TARGET.read_text() if TARGET.is_file() else HEADER
        machine = f"_Machine: {platform.machine()}, {platform.processor() or platform.system()}._"
        block = f"<!-- bench:{name} -->\n{section}\n\n{machine}\n<!-- /bench:{name} -->"
        pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block + "\n"
        TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
