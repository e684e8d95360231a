"""Protect pipeline benchmark: wall time and peak memory on a synthetic ~0.5 B Llama.

``python -m benchmarks.run protect`` regenerates the BENCHMARKS.md section;
``python -m benchmarks.bench_protect VARIANT OUT.json`` runs one variant (what ``run()`` does, each
in its own subprocess so that peak RSS, ``ru_maxrss``, belongs to that variant alone).

The model (built once, cached under ``.cache/bench/protect/``): Llama-shaped, hidden 1024,
intermediate 2816, 16 blocks, 16 heads / 4 KV heads, Llama-3's vocabulary of 128,256, untied
head: 0.44 B parameters (0.18 B in the decoder blocks, 0.26 B in embeddings and head, about the
split of Qwen2.5-0.5B / Llama-3.2-1B), random weights (std 0.02, norms 1), bf16 safetensors in 400 MB shards. The
fine-tuned model is the aligned one plus a random change (std 0.002) on every tensor.
Calibration: 16 random token sequences of 128 tokens (fixed seed), batch size 1.

Variants:

- ``protect_cold``: :func:`safedelta.protect` with an empty cache (fingerprints, calibration
  pass, Hessians written to the cache, protect, write);
- ``protect_warm``: the same with the Hessians (and fingerprints) cached, and with what the
  cold run cached beside them: each distinct Hessian's default-rule factorisation and each
  aligned weight's output energy ``E0`` (all depend on the aligned model and calibration set
  only), so this variant neither factors nor computes ``r c^2`` products;
- ``floor``: what any implementation must do: read both checkpoints and run the calibration
  samples once through the aligned model (fp32, as the CPU calibration pass does);
- ``straightforward``: both models loaded whole with ``from_pretrained``, every decoder linear
  protected in memory with the same solver and the cached Hessians (factored once per distinct
  Hessian in this run: it does not use the factorisation cache), the result saved with
  ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".cache" / "bench" / "protect"
ALIGNED, FINETUNED = BENCH / "aligned", BENCH / "finetuned"
CACHE, OUT = BENCH / "cache", BENCH / "out"

SPEC = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=128256, max_position_embeddings=2048,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
SHARD_BYTES = 400 << 20
N_SAMPLES, SEQ_LEN = 16, 128
DELTA_STD = 0.002
VARIANTS = ("protect_cold", "protect_warm", "floor", "straightforward")
#: threads per variant; the same for all, so that ratios compare like with like
THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def _log(msg: str) -> None:
    print(f"[bench protect {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _samples():
    import torch

    g = torch.Generator().manual_seed(42)
    return [torch.randint(3, SPEC["vocab_size"], (SEQ_LEN,), generator=g)
            for _ in range(N_SAMPLES)]


def _spec_tag() -> str:
    return json.dumps({**SPEC, "shard": SHARD_BYTES, "delta": DELTA_STD, "v": 1}, sort_keys=True)


def build() -> None:
    """Write the aligned and fine-tuned checkpoints (skipped when the cached ones match SPEC)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    marker = BENCH / "built.json"
    if marker.is_file() and marker.read_text() == _spec_tag():
        return
    _log("building the synthetic ~0.5 B checkpoints (once)")
    cfg = LlamaConfig(**SPEC)
    cfg.dtype = torch.bfloat16
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    shapes = {n: tuple(p.shape) for n, p in skeleton.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for d in (ALIGNED, FINETUNED):
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.safetensors"):
            old.unlink()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = 2
        for s in shape:
            n *= s
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        a_part, f_part = {}, {}
        for name in names:
            shape = shapes[name]
            a = (torch.ones(shape) if "norm" in name
                 else 0.02 * torch.randn(shape, generator=g))
            f = a + DELTA_STD * torch.randn(shape, generator=g)
            a_part[name], f_part[name] = a.to(torch.bfloat16), f.to(torch.bfloat16)
            weight_map[name] = fname
        save_file(a_part, str(ALIGNED / fname), metadata={"format": "pt"})
        save_file(f_part, str(FINETUNED / fname), metadata={"format": "pt"})
        _log(f"  shard {i + 1}/{len(shards)} written")
        del a_part, f_part
    total = sum(2 * int(torch.tensor(s).prod()) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for d in (ALIGNED, FINETUNED):
        cfg.save_pretrained(d)
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    marker.write_text(_spec_tag())


# ------------------------------------------------------------------------------ the variants


def _protect() -> dict:
    from safedelta.pipeline import protect

    report = protect(ALIGNED, FINETUNED, OUT, calibration=_samples(), cache_dir=CACHE,
                     device="cpu", overwrite=True, progress=True, max_samples=N_SAMPLES,
                     max_length=SEQ_LEN)
    return {"timings": report.timings, "cache_hit": report.cache["hit"],
            "kept_fraction": report.totals["kept_fraction"],
            "factored": report.inputs.get("hessians_factored"),
            "factors_cached": report.inputs.get("factorisations_cached")}


def _floor() -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from safedelta.checkpoint import CheckpointReader

    t0 = time.perf_counter()
    ft = CheckpointReader(FINETUNED)
    for name in ft.names():
        t = ft.get(name)
        del t
    t_read = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(ALIGNED, dtype=torch.float32)
    t_load = time.perf_counter() - t0 - t_read
    with torch.no_grad():
        for s in _samples():
            model(input_ids=s.reshape(1, -1), use_cache=False)
    return {"timings": {"read_finetuned": round(t_read, 3), "load_aligned": round(t_load, 3),
                        "forward": round(time.perf_counter() - t0 - t_read - t_load, 3)}}


def _straightforward() -> dict:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from safedelta.hessian import prepare_hessians
    from safedelta.solver import prepare_hessian, protect_matrix

    t0 = time.perf_counter()
    aligned = AutoModelForCausalLM.from_pretrained(ALIGNED, dtype=torch.bfloat16)
    finetuned = AutoModelForCausalLM.from_pretrained(FINETUNED, dtype=torch.bfloat16)
    t_load = time.perf_counter() - t0
    hs = prepare_hessians(ALIGNED, _samples(), cache_dir=CACHE, device="cpu", progress=False,
                          max_samples=N_SAMPLES, max_length=SEQ_LEN)
    if not hs.cache_hit:
        raise RuntimeError("straightforward variant expects the Hessians cached by protect_cold")
    f_params = dict(finetuned.named_parameters())
    prepared: dict[str, object] = {}
    with torch.no_grad():
        for name, p in aligned.named_parameters():
            if name not in hs.weight_names:
                continue
            key = hs.shared.get(name, name)
            if key not in prepared:
                prepared.clear()
                prepared[key] = prepare_hessian(hs.get(name))
            p.copy_(protect_matrix(p, f_params[name], prepared[key]).weight)
    t_protect = time.perf_counter() - t0 - t_load
    out = BENCH / "out_straightforward"
    shutil.rmtree(out, ignore_errors=True)
    aligned.save_pretrained(out, max_shard_size="400MB")
    return {"timings": {"load": round(t_load, 3), "protect": round(t_protect, 3),
                        "write": round(time.perf_counter() - t0 - t_load - t_protect, 3)}}


def _variant(name: str) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    extra = {"protect_cold": _protect, "protect_warm": _protect, "floor": _floor,
             "straightforward": _straightforward}[name]()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": name, "wall_s": round(wall, 2), "peak_rss_mib": round(peak, 1), **extra}


def _run_variant(name: str) -> dict:
    import shutil
    import tempfile

    if name == "protect_cold":
        shutil.rmtree(CACHE, ignore_errors=True)
    _log(f"running {name}")
    with tempfile.TemporaryDirectory() as tmp:
        res_file = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
               "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run([sys.executable, "-m", "benchmarks.bench_protect", name, str(res_file)],
                       cwd=ROOT, env=env, check=True)
        res = json.loads(res_file.read_text())
    _log(f"{name}: {res['wall_s']} s, peak RSS {res['peak_rss_mib']} MiB")
    if name.startswith("protect"):  # outside the measured time: the weights written
        res["out_digest"] = _weights_digest(OUT)
    return res


def _weights_digest(d: Path) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def run() -> str:
    """Build the model if needed, run every variant in a subprocess, return the Markdown."""
    build()
    r = {name: _run_variant(name) for name in VARIANTS}
    floor, sf = r["floor"]["wall_s"], r["straightforward"]
    lines = [
        "## protect",
        "",
        "Synthetic Llama-shaped model, 0.44 B parameters (hidden 1024, 16 blocks, vocabulary "
        "128,256, untied head), bf16 safetensors in 400 MB shards; fine-tuned = aligned + N(0, 0.002) "
        f"everywhere; calibration {N_SAMPLES} samples x {SEQ_LEN} tokens; CPU, "
        f"{THREADS} thread(s). Command: `python -m benchmarks.run protect` "
        "(`benchmarks/bench_protect.py`).",
        "",
        "| variant | wall time (s) | x floor | peak RSS (MiB) | x straightforward RSS |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        v = r[name]
        lines.append(f"| {name} | {v['wall_s']:.1f} | {v['wall_s'] / floor:.2f} | "
                     f"{v['peak_rss_mib']:.0f} | {v['peak_rss_mib'] / sf['peak_rss_mib']:.2f} |")
    cold, warm = r["protect_cold"], r["protect_warm"]
    ok_time = warm["wall_s"] <= 1.5 * floor
    ok_mem = max(cold["peak_rss_mib"], warm["peak_rss_mib"]) < 0.5 * sf["peak_rss_mib"]
    lines += [
        "",
        "Phase timings (s): "
        + "; ".join(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in r[name]["timings"].items())
                    for name in VARIANTS),
        "",
        f"- Target: time within 1.5x the floor. Warm cache (the normal case: every request "
        f"after the first against one aligned model): {warm['wall_s'] / floor:.2f}x "
        f"({'met' if ok_time else 'not met'}). Cold cache: {cold['wall_s'] / floor:.2f}x "
        f"({'within' if cold['wall_s'] <= 1.5 * floor else 'not within'} 1.5x): the first "
        "request against an aligned model also fingerprints both checkpoints, accumulates every "
        "Hessian (a `c x c` product per linear and sample), factors each distinct one "
        "(Cholesky, inverse, Cholesky of the permuted inverse) and computes each weight's "
        "output energy `E0 = 1/2 tr(W0 H W0^T)` (`r c^2`): work the floor does not do, cached "
        "for later requests.",
        f"- Target: peak RSS below half of the straightforward approach's: "
        f"{max(cold['peak_rss_mib'], warm['peak_rss_mib']) / sf['peak_rss_mib']:.2f}x, the "
        f"larger of cold and warm ({'met' if ok_mem else 'not met'}).",
        f"- Kept fraction of candidate delta entries (default budget): "
        f"{100 * cold['kept_fraction']:.2f} % (warm: {100 * warm['kept_fraction']:.2f} %; the "
        "warm output's weight files are "
        f"{'bitwise identical to' if cold['out_digest'] == warm['out_digest'] else 'NOT identical to'}"
        " the cold one's). Hessians factored: cold "
        f"{cold.get('factored')}, warm {warm.get('factored')} (read back: "
        f"{warm.get('factors_cached')}).",
        "- Wall times come from a shared machine (other jobs running) and vary between runs; "
        "peak RSS includes the Python/torch baseline of each subprocess.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in VARIANTS:
        result = _variant(sys.argv[1])
        Path(sys.argv[2]).write_text(json.dumps(result))
    elif len(sys.argv) == 2 and sys.argv[1] == "build":
        build()
    else:
        print(f"usage: python -m benchmarks.bench_protect {{build|{'|'.join(VARIANTS)}}} "
              "[OUT.json]", file=sys.stderr)
        raise SystemExit(2)
