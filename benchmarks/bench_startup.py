"""CLI start-up and evaluation overhead: what a command costs before any model work.

``python -m benchmarks.run startup`` regenerates the BENCHMARKS.md section. Each number is the
median of ``REPEATS`` fresh processes (wall time, ``time.perf_counter`` around ``subprocess.run``);
import costs come from ``python -X importtime`` (cumulative microseconds of the top module).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
CLI = str(Path(sys.executable).with_name("mlflow-safedelta"))

_VALIDATE = """
import time, pandas as pd
from safedelta.eval.tables import validate_table
rows = [{"model": m, "suite": "s", "kind": "harmful", "prompt_id": i, "prompt": f"p{i}",
         "generation": f"g{i}", "refused": bool(i % 2), "harmful": float(i % 2), "score": None,
         "judge": "keyword"} for m in ("aligned", "protected") for i in range(50)]
t0 = time.perf_counter()
validate_table(pd.DataFrame(rows), suite="s", kind="harmful", models=["aligned", "protected"],
               prompt_ids=list(range(50)), engine=ENGINE)
print(time.perf_counter() - t0)
"""


def _wall(cmd: list[str]) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _import_us(module: str) -> int:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stderr
    for line in reversed(out.splitlines()):
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1])
    return -1


def _validate_s(engine: str) -> float:
    vals = []
    for _ in range(REPEATS):
        out = subprocess.run([sys.executable, "-c", _VALIDATE.replace("ENGINE", repr(engine))],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout
        vals.append(float(out.strip().splitlines()[-1]))
    return statistics.median(vals)


def run() -> str:
    load0 = os.getloadavg()[0]
    rows = [
        ("`mlflow-safedelta --help` (wall)", f"{_wall([CLI, '--help']):.2f} s"),
        ("`mlflow-safedelta evaluate --help` (wall)", f"{_wall([CLI, 'evaluate', '--help']):.2f} s"),
        ("import `mlflow_safedelta.cli` (-X importtime)",
         f"{_import_us('mlflow_safedelta.cli') / 1e6:.2f} s"),
        ("import `safedelta.eval` (-X importtime; what `evaluate` loads before torch)",
         f"{_import_us('safedelta.eval') / 1e6:.2f} s"),
        ("import `great_expectations` (-X importtime; now only with `--validation "
         "great-expectations`)", f"{_import_us('great_expectations') / 1e6:.2f} s"),
        ("check one 100-row result table, pandas engine (default)",
         f"{_validate_s('pandas') * 1000:.0f} ms"),
        ("check one 100-row result table, great-expectations engine (its import included)",
         f"{_validate_s('great-expectations') * 1000:.0f} ms"),
    ]
    load1 = os.getloadavg()[0]
    return "\n".join([
        "## startup",
        "",
        f"Medians of {REPEATS} fresh processes; 1-minute load average {load0:.2f} -> "
        f"{load1:.2f} (a shared machine). Command: `python -m benchmarks.run startup` "
        "(`benchmarks/bench_startup.py`). Target: CLI start-up under 3 s.",
        "",
        "| what | time |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in rows],
    ])
