"""``python -m benchmarks.run protect_lab``: :mod:`benchmarks.bench_protect`'s cold / warm / floor
variants on the lab's SmolLM2 pair (the demo's aligned parent and content-attack fine-tune)."""

from __future__ import annotations


def run() -> str:
    from benchmarks.bench_protect import run_lab_pair

    return run_lab_pair()
