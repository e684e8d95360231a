"""Protect pipeline benchmark: cold, warm and the floor side by side, on a synthetic ~0.5 B Llama
(and, as its own section ``protect_lab``, on the lab's SmolLM2 pair: :mod:`benchmarks.bench_protect_lab`).

``python -m benchmarks.run protect`` regenerates the BENCHMARKS.md section;
``python -m benchmarks.bench_protect VARIANT OUT.json [PAIR]`` runs one variant (what ``run()``
does, each in its own subprocess; peak RSS is the variant's own, :func:`safedelta.memory.phase_peak`).
Every variant but ``straightforward`` runs ``BENCH_REPEATS`` times (default 3), interleaved
(cold, warm, floor, cold, ...), and the table quotes medians; the load average is recorded.

The model (built once, cached under ``.cache/bench/protect/``): Llama-shaped, hidden 1024,
intermediate 2816, 16 blocks, 16 heads / 4 KV heads, Llama-3's vocabulary of 128,256, untied
head: 0.44 B parameters (0.18 B in the decoder blocks, 0.26 B in embeddings and head, about the
split of Qwen2.5-0.5B / Llama-3.2-1B), random weights (std 0.02, norms 1), bf16 safetensors in 400 MB shards. The
fine-tuned model is the aligned one plus a random change (std 0.002) on every tensor.
Calibration: 16 random token sequences of 128 tokens (fixed seed). The real pair
(``.lab/models/aligned`` and ``.lab/models/ft-content``, the demo's pair, built from the shipped
adapters in seconds) uses the shipped calibration set (128 samples, its tokenizer).

Variants:

- ``protect_cold``: :func:`safedelta.protect` with an empty cache (fingerprints, calibration
  pass, Hessians written to the cache, protect, write);
- ``protect_warm``: the same with the Hessians (and fingerprints) cached, and with what the
  cold run cached beside them: each distinct Hessian's default-rule factorisation and each
  aligned weight's output energy ``E0`` (all depend on the aligned model and calibration set
  only), so this variant neither factors nor computes ``r c^2`` products;
- ``floor``: what any implementation must do, in plain transformers: load both models
  (``from_pretrained``, the aligned one in fp32 as the CPU calibration pass computes), tokenize
  the calibration set, and one batched forward (batch 16, right padding with an attention mask)
  with forward hooks adding ``X^T X`` of the real tokens into every decoder linear's Hessian
  (only the last position's logits are computed: the head is not part of the work);
- ``straightforward``: both models loaded whole with ``from_pretrained``, every decoder linear
  protected in memory with the same solver and the cached Hessians (factored once per distinct
  Hessian in this run, for the budget rule in use only: it does not build the official rule's
  factor the default rule never reads, and does not use the factorisation cache), the result
  saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".cache" / "bench" / "protect"
ALIGNED, FINETUNED = BENCH / "aligned", BENCH / "finetuned"

SPEC = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=128256, max_position_embeddings=2048,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
SHARD_BYTES = 400 << 20
N_SAMPLES, SEQ_LEN = 16, 128
DELTA_STD = 0.002
VARIANTS = ("protect_cold", "protect_warm", "floor", "straightforward")
REPEATED = ("protect_cold", "protect_warm", "floor")
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
FLOOR_BATCH = 16
#: the lab's real pair (SmolLM2-135M aligned + the demo's content-attack fine-tune)
LAB_MODELS = ROOT / ".lab" / "models"
REAL_ALIGNED, REAL_FINETUNED = LAB_MODELS / "aligned", LAB_MODELS / "ft-content"
REAL_SAMPLES = 128
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


# ------------------------------------------------------------------------------ the pairs


class Pair:
    """One aligned/fine-tuned pair and its calibration set, with its own cache and output."""

    def __init__(self, name: str, aligned: Path, finetuned: Path):
        self.name, self.aligned, self.finetuned = name, aligned, finetuned
        self.cache = BENCH / name / "cache"
        self.out = BENCH / name / "out"

    @property
    def synthetic(self) -> bool:
        return self.name == "synthetic"

    def calibration(self):
        """What ``protect`` is given: token ids (synthetic) or None (the shipped set)."""
        return _samples() if self.synthetic else None

    def protect_kwargs(self) -> dict:
        if self.synthetic:
            return {"max_samples": N_SAMPLES, "max_length": SEQ_LEN}
        return {"max_samples": REAL_SAMPLES}

    def tokenized(self):
        """The calibration samples as token ids (the floor's tokenize step)."""
        if self.synthetic:
            return _samples()
        from transformers import AutoTokenizer

        from safedelta.calibration import load_calibration

        tok = AutoTokenizer.from_pretrained(self.aligned)
        return load_calibration(None, tok, max_samples=REAL_SAMPLES)


def _pairs() -> dict[str, Pair]:
    out = {"synthetic": Pair("synthetic", ALIGNED, FINETUNED)}
    if (REAL_ALIGNED / "config.json").is_file() and (REAL_FINETUNED / "config.json").is_file():
        out["smollm2"] = Pair("smollm2", REAL_ALIGNED, REAL_FINETUNED)
    return out


# ------------------------------------------------------------------------------ the variants


def _protect(pair: Pair) -> dict:
    from safedelta.pipeline import protect

    report = protect(pair.aligned, pair.finetuned, pair.out, calibration=pair.calibration(),
                     cache_dir=pair.cache, device="cpu", overwrite=True, progress=True,
                     **pair.protect_kwargs())
    return {"timings": report.timings, "cache_hit": report.cache["hit"],
            "kept_fraction": report.totals["kept_fraction"],
            "factored": report.inputs.get("hessians_factored"),
            "factors_cached": report.inputs.get("factorisations_cached"),
            "phase_peaks": {k: v["peak_rss_mib"] for k, v in report.memory["phases"].items()}}


def _floor(pair: Pair) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from safedelta.hessian import micro_batches
    from safedelta.modelwalk import find_decoder_layers, find_linears

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(pair.aligned, dtype=torch.float32).eval()
    finetuned = AutoModelForCausalLM.from_pretrained(pair.finetuned, dtype="auto")
    t_load = time.perf_counter() - t0
    samples = pair.tokenized()
    t_tok = time.perf_counter() - t0 - t_load
    prefix, layers = find_decoder_layers(model)
    H: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor] = []
    hooks = []
    for i, block in enumerate(layers):
        for name, lin in find_linears(block).items():
            def hook(_m, inp, _out, _key=f"{prefix}.{i}.{name}", _c=lin.weight.shape[1]):
                X = inp[0].reshape(-1, _c)[mask[0].reshape(-1)].float()
                if _key not in H:
                    H[_key] = torch.zeros(_c, _c)
                H[_key].addmm_(X.T, X)
            hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for batch in micro_batches(samples, FLOOR_BATCH):
            mask[:] = [batch.mask]
            model(input_ids=batch.ids, attention_mask=batch.mask.long(), use_cache=False,
                  logits_to_keep=1)
    for h in hooks:
        h.remove()
    del finetuned
    return {"timings": {"load_both": round(t_load, 3), "tokenize": round(t_tok, 3),
                        "forward_xtx": round(time.perf_counter() - t0 - t_load - t_tok, 3)}}


def _straightforward(pair: Pair) -> dict:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from safedelta.config import SafeDeltaConfig
    from safedelta.hessian import prepare_hessians
    from safedelta.solver import prepare_hessian, protect_matrix

    cfg = SafeDeltaConfig()
    t0 = time.perf_counter()
    aligned = AutoModelForCausalLM.from_pretrained(pair.aligned, dtype=torch.bfloat16)
    finetuned = AutoModelForCausalLM.from_pretrained(pair.finetuned, dtype=torch.bfloat16)
    t_load = time.perf_counter() - t0
    hs = prepare_hessians(pair.aligned, pair.calibration(), cache_dir=pair.cache, device="cpu",
                          progress=False, **pair.protect_kwargs())
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
                prepared[key] = prepare_hessian(hs.get(name), damp=cfg.damp,
                                                budget=cfg.budget)
            W0, W1 = (p.T, f_params[name].T) if name in hs.conv1d else (p, f_params[name])
            w = protect_matrix(W0, W1, prepared[key], config=cfg).weight
            p.copy_(w.T if name in hs.conv1d else w)
    t_protect = time.perf_counter() - t0 - t_load
    out = BENCH / pair.name / "out_straightforward"
    shutil.rmtree(out, ignore_errors=True)
    aligned.save_pretrained(out, max_shard_size="400MB")
    return {"timings": {"load": round(t_load, 3), "protect": round(t_protect, 3),
                        "write": round(time.perf_counter() - t0 - t_load - t_protect, 3)}}


def _variant(name: str, pair: Pair) -> dict:
    import torch

    from safedelta.memory import phase_peak

    torch.set_num_threads(THREADS)
    t0, c0 = time.perf_counter(), time.process_time()
    with phase_peak() as mem:
        extra = {"protect_cold": _protect, "protect_warm": _protect, "floor": _floor,
                 "straightforward": _straightforward}[name](pair)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"variant": name, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "peak_rss_mib": mem.rss_mib, **extra}


def _run_variant(name: str, pair: Pair) -> dict:
    import shutil
    import tempfile

    if name == "protect_cold":
        shutil.rmtree(pair.cache, ignore_errors=True)
    _log(f"{pair.name}: running {name}")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        res_file = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
               "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run([sys.executable, "-m", "benchmarks.bench_protect", name, str(res_file),
                        pair.name], cwd=ROOT, env=env, check=True)
        res = json.loads(res_file.read_text())
    res["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    _log(f"{pair.name} {name}: {res['wall_s']} s wall, {res['cpu_s']} s CPU, peak RSS "
         f"{res['peak_rss_mib']} MiB, load {res['load_avg']}")
    if name.startswith("protect"):  # outside the measured time: the weights written
        res["out_digest"] = _weights_digest(pair.out)
    return res


def _weights_digest(d: Path) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs)


def _measure(pair: Pair) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(REPEATS):
        for name in REPEATED:
            runs[name].append(_run_variant(name, pair))
    runs["straightforward"].append(_run_variant("straightforward", pair))
    return runs


def _section(pair: Pair, runs: dict[str, list[dict]]) -> list[str]:
    wall = {n: _median([r["wall_s"] for r in rs]) for n, rs in runs.items()}
    cpu = {n: _median([r["cpu_s"] for r in rs]) for n, rs in runs.items()}
    rss = {n: _median([r["peak_rss_mib"] for r in rs]) for n, rs in runs.items()}
    sf_rss = rss["straightforward"]
    lines = [
        "| variant | runs | CPU time, median (s) | x floor (CPU) | wall, median (s) | "
        "x floor (wall) | all runs, wall (s) | peak RSS (MiB) | x straightforward RSS |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name in VARIANTS:
        rs = runs[name]
        each = ", ".join(f"{r['wall_s']:.0f}" for r in rs)
        lines.append(f"| {name} | {len(rs)} | {cpu[name]:.1f} | {cpu[name] / cpu['floor']:.2f} | "
                     f"{wall[name]:.1f} | {wall[name] / wall['floor']:.2f} | {each} | "
                     f"{rss[name]:.0f} | {rss[name] / sf_rss:.2f} |")
    cold, warm = runs["protect_cold"], runs["protect_warm"]
    loads = [x for rs in runs.values() for r in rs for x in r["load_avg"]]
    r_cold, r_warm = cpu["protect_cold"] / cpu["floor"], cpu["protect_warm"] / cpu["floor"]
    last = {n: rs[-1] for n, rs in runs.items()}
    lines += [
        "",
        "Phase timings of the last run (s, wall): "
        + "; ".join(f"{n}: " + ", ".join(f"{k} {v:.1f}" for k, v in last[n]["timings"].items())
                    for n in VARIANTS),
        "",
        "Per-phase peak RSS of protect (MiB, last run): "
        + "; ".join(f"{n}: " + ", ".join(f"{k} {v:.0f}" for k, v in last[n]["phase_peaks"].items())
                    for n in ("protect_cold", "protect_warm")),
        "",
        f"- Target cold <= 1.3x the floor: **{r_cold:.2f}x** CPU time "
        f"({'met' if r_cold <= 1.3 else 'not met'}; wall "
        f"{wall['protect_cold'] / wall['floor']:.2f}x). Target warm <= 0.6x: **{r_warm:.2f}x** "
        f"CPU time ({'met' if r_warm <= 0.6 else 'not met'}; wall "
        f"{wall['protect_warm'] / wall['floor']:.2f}x). Ratios are judged on CPU time (each "
        "variant is single-threaded): on this shared machine wall times moved by 2-4x between "
        "runs of the same variant.",
        f"- Peak RSS, larger of cold and warm, against the straightforward approach's: "
        f"{max(rss['protect_cold'], rss['protect_warm']) / sf_rss:.2f}x.",
        f"- Kept fraction (default budget): {100 * cold[-1]['kept_fraction']:.2f} %; every warm "
        "output's weight files are "
        f"{'bitwise identical to' if all(w['out_digest'] == cold[-1]['out_digest'] for w in warm) else 'NOT identical to'}"
        f" the cold one's. Hessians factored: cold {cold[-1].get('factored')}, warm "
        f"{warm[-1].get('factored')} (read back: {warm[-1].get('factors_cached')}).",
        f"- 1-minute load average during the runs: {min(loads):.2f} to {max(loads):.2f} on 2 "
        "cores (other jobs running).",
    ]
    return lines


def run() -> str:
    """Build the synthetic model if needed, run every variant on every available pair in
    subprocesses, return the Markdown."""
    build()
    pairs = _pairs()
    out = _header("protect") + [
        "### Synthetic 0.44 B Llama",
        "",
        "Hidden 1024, 16 blocks, vocabulary 128,256, untied head, bf16 safetensors in 400 MB "
        f"shards; fine-tuned = aligned + N(0, {DELTA_STD}) everywhere; calibration {N_SAMPLES} "
        f"samples x {SEQ_LEN} tokens.",
        "",
    ]
    out += _section(pairs["synthetic"], _measure(pairs["synthetic"]))
    out += ["", "### SmolLM2 lab pair", "",
            "In its own section: `python -m benchmarks.run protect_lab` (below)."]
    return "\n".join(out)


def _header(section: str) -> list[str]:
    return [
        "## protect",
        "",
        f"CPU, {THREADS} thread(s) per variant (`OMP_NUM_THREADS={THREADS}`), each variant in its "
        f"own subprocess, {REPEATS} interleaved runs of cold/warm/floor (medians quoted; CPU "
        "time = user + system seconds of the variant's process). "
        f"Command: `python -m benchmarks.run {section}` (`benchmarks/bench_protect.py`). The floor = "
        "load both models + tokenize + one batched forward (batch 16) with `X^T X` into every "
        "decoder linear's Hessian by plain transformers forward hooks.",
        "",
    ]


def run_lab_pair() -> str:
    """The same variants on the lab's SmolLM2 pair (built from the shipped adapters if missing)."""
    from safedelta.lab.models import build_demo_pair

    build_demo_pair(LAB_MODELS.parent, progress=False)
    pair = _pairs()["smollm2"]
    out = [h.replace("## protect", "## protect on the SmolLM2 lab pair")
           for h in _header("protect_lab")]
    out += [f"`{REAL_ALIGNED.relative_to(ROOT)}` and `{REAL_FINETUNED.relative_to(ROOT)}` (the "
            "demo's pair: SmolLM2-135M aligned parent and its content-attack LoRA fine-tune, "
            f"merged), the shipped calibration set ({REAL_SAMPLES} samples).", ""]
    out += _section(pair, _measure(pair))
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] in VARIANTS:
        pair = _pairs()[sys.argv[3] if len(sys.argv) == 4 else "synthetic"]
        result = _variant(sys.argv[1], pair)
        Path(sys.argv[2]).write_text(json.dumps(result))
    elif len(sys.argv) == 2 and sys.argv[1] == "build":
        build()
    else:
        print(f"usage: python -m benchmarks.bench_protect {{build|{'|'.join(VARIANTS)}}} "
              "[OUT.json] [synthetic|smollm2]", file=sys.stderr)
        raise SystemExit(2)
