"""The safety lab section of BENCHMARKS.md: ``python -m benchmarks.run lab`` (= ``make lab``).

Builds (or finds cached under ``$SAFEDELTA_LAB`` / ``./.lab``) SmolLM2-135M-Instruct, its aligned
parent and the fine-tunes, repairs every fine-tune with Safe Delta and the baselines, measures
them and writes the plots to ``benchmarks/lab/``. See ``safedelta/lab/run.py``.

Slow on a CPU (tens of minutes per scenario, training included), so ``make bench`` leaves it
out; ``make lab`` runs it. ``SAFEDELTA_LAB_SAVED=1`` re-renders the section from the last run's
``<lab>/results/lab_rows.json`` instead (an interrupted run is labelled partial there).
``benchmarks/lab/analysis.md`` (hand-written, dated) is appended to the section when present.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run() -> str:
    from safedelta.lab.run import load_saved, run_lab

    kw = {"plot_dir": ROOT / "benchmarks" / "lab", "link_root": ROOT}
    if os.environ.get("SAFEDELTA_LAB_SAVED"):
        md = load_saved(**kw).markdown
    else:
        md = run_lab(**kw).markdown
    # the hand-written reading of the recorded run (it names the run it was written for)
    analysis = ROOT / "benchmarks" / "lab" / "analysis.md"
    if analysis.is_file():
        md = md.rstrip() + "\n\n" + analysis.read_text().strip() + "\n"
    return md
