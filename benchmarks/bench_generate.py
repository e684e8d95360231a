"""Evaluation generation against plain ``generate``: ``python -m benchmarks.run generate``.

On the lab's aligned SmolLM2-135M parent (built from the shipped adapter if missing), 50 AdvBench
evaluation prompts, greedy, 64 new tokens, float32 on CPU, three variants side by side, each in
its own fresh process, interleaved ``REPEATS`` times (medians quoted):

- ``plain``: what anyone would write: ``from_pretrained``, chat template, left padding, batches
  of 16 in file order, ``model.generate``;
- ``library``: :func:`safedelta.eval.generation.generate` at its defaults (batch size chosen
  from the model and free memory, longest prompts first), cache off;
- ``cli``: ``mlflow-safedelta evaluate --model m=DIR --suite advbench --limit 50
  --max-new-tokens 64`` (imports, judge, table validation, report and plots included), cache
  off (a fresh ``SAFEDELTA_CACHE``).

Target (issue "speed"): the library within 1.1x plain at equal settings.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
N, TOKENS, PLAIN_BATCH = 50, 64, 16

_PLAIN = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from safedelta.eval.suites import builtin_suite
d = sys.argv[1]
prompts = [r["prompt"] for r in builtin_suite("advbench").load({n})]
tok = AutoTokenizer.from_pretrained(d); tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
texts = [tok.apply_chat_template([{{"role": "user", "content": p}}], tokenize=False,
                                 add_generation_prompt=True) for p in prompts]
with torch.inference_mode():
    for i in range(0, len(texts), {b}):
        enc = tok(texts[i:i + {b}], return_tensors="pt", padding=True, add_special_tokens=False)
        model.generate(**enc, max_new_tokens={t}, do_sample=False, pad_token_id=tok.pad_token_id)
""".format(n=N, b=PLAIN_BATCH, t=TOKENS)

_LIBRARY = """
import sys
from safedelta.eval.generation import GenerationSettings, generate
from safedelta.eval.suites import builtin_suite
prompts = [r["prompt"] for r in builtin_suite("advbench").load({n})]
generate(sys.argv[1], prompts, GenerationSettings(max_new_tokens={t}), device="cpu",
         use_cache=False, progress=False)
""".format(n=N, t=TOKENS)


def _timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(model_dir: Path) -> dict[str, list[float]]:
    py = sys.executable
    cli = str(Path(py).with_name("mlflow-safedelta"))
    runs: dict[str, list[float]] = {"plain": [], "library": [], "cli": []}
    for _ in range(REPEATS):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "SAFEDELTA_CACHE": cache}
            runs["plain"].append(_timed([py, "-c", _PLAIN, str(model_dir)], env))
            runs["library"].append(_timed([py, "-c", _LIBRARY, str(model_dir)], env))
            runs["cli"].append(_timed([cli, "evaluate", "--model", f"m={model_dir}", "--suite",
                                       "advbench", "--limit", str(N), "--max-new-tokens",
                                       str(TOKENS), "--out", str(Path(cache) / "report")], env))
    return runs


def run() -> str:
    from safedelta.eval.batching import choose_batch_size
    from safedelta.lab.models import LabModels, LabSettings

    model = LabModels(LabSettings(lab_dir=ROOT / ".lab"), progress=False).build_aligned()
    runs = measure(model)
    med = {k: statistics.median(v) for k, v in runs.items()}
    batch = choose_batch_size(model, device="cpu", max_new_tokens=TOKENS, n_prompts=N)
    lines = [
        "## Evaluation generation against plain `generate`",
        "",
        f"`python -m benchmarks.run generate` (`benchmarks/bench_generate.py`): the lab's aligned "
        f"SmolLM2-135M, {N} AdvBench evaluation prompts, greedy, {TOKENS} new tokens, float32 "
        f"CPU, {os.environ.get('OMP_NUM_THREADS', 'all')} thread(s); each variant a fresh process "
        f"(load included), {REPEATS} interleaved runs, medians. `plain` = batches of "
        f"{PLAIN_BATCH} in file order with `model.generate`; `library` = "
        f"`safedelta.eval.generation.generate` at its defaults (batch {batch} chosen here, "
        "longest first, cache off); `cli` = `mlflow-safedelta evaluate` on one suite "
        "(imports, judge, validation, report and plots), cache off.",
        "",
        "| variant | wall, median (s) | x plain | all runs (s) |",
        "|---|---:|---:|---|",
    ]
    for k in ("plain", "library", "cli"):
        lines.append(f"| {k} | {med[k]:.1f} | {med[k] / med['plain']:.2f} | "
                     + ", ".join(f"{v:.1f}" for v in runs[k]) + " |")
    ratio = med["library"] / med["plain"]
    lines += ["", f"- Target: library within 1.1x plain: **{ratio:.2f}x** "
              f"({'met' if ratio <= 1.1 else 'not met'}). The CLI's extra over the library: "
              f"{med['cli'] - med['library']:.1f} s."]
    Path(ROOT / ".lab" / "generate_bench.json").write_text(json.dumps(runs))
    return "\n".join(lines)
