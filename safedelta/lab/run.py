"""The lab's experiment: every scenario's fine-tune x every method -> a table and plots.

For each scenario (harmful, identity, benign, dirty) the fine-tuned model is repaired by each
method, and all of them are measured together with :func:`safedelta.eval.evaluate_models`
(roles ``aligned`` and ``finetuned`` plus one role per method, so utility retention is computed
against the same aligned/fine-tuned pair):

=======================  ======================================================================
method                   model
=======================  ======================================================================
``none``                 the fine-tune as is (role ``finetuned``)
``safedelta-official``   :func:`safedelta.protect`, the published budget with ``s`` scaled to
                         this width: ``s = 0.1 * 4096 / hidden_size`` (the r/4096 factor of the
                         official budget otherwise shrinks it ``4096/hidden_size`` times)
``safedelta-default``    :func:`safedelta.protect` with the library's default (width-independent)
                         budget
``sd-no-exclude``        the same with ``exclude_fraction=0``: nothing set aside as "most
                         sensitive", the budget alone decides (an ablation of the paper's 15 %)
``merge-<a>``            linear merge ``W0 + a (W1 - W0)``, one row per ``a`` of the sweep
``safe-lora``            Safe LoRA-style projection onto ``aligned - base`` (threshold ``tau``)
``resta``                fine-tune + ``gamma (aligned - ft-harmful)`` (Resta's safety vector)
``ema``                  the same fine-tune trained with the parameter-space EMA (only for the
                         scenarios that have one)
``ema+safedelta``        Safe Delta (default budget) applied to the EMA fine-tune
=======================  ======================================================================

Repaired models are cached under ``<lab>/methods/<scenario>/<method>/`` (keyed by the method's
parameters and the fine-tune's recipe hash); generations are cached by ``safedelta.eval``, so a
re-run with a warm cache only redoes what changed. Results go to ``<lab>/results/`` (JSON, the
markdown section, per-scenario eval reports) and the plots to ``plot_dir``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from safedelta.lab import scenarios as sc
from safedelta.lab.models import LabModels, LabSettings, _hash, model_name, read_manifest
from safedelta.memory import phase_peak

logger = logging.getLogger(__name__)

METHOD_MANIFEST = "lab_method.json"
ASR_SUITE = "advbench"
UNSAFE_SUITE = "xstest-unsafe"
#: scenarios whose fine-tune has a task (GSM8K) whose utility a method can keep
TASK_SCENARIOS = ("benign", "dirty")
OVER_SUITE = "xstest-safe"


@dataclass(frozen=True)
class LabPlan:
    """What the experiment runs and measures.

    Args:
        scenarios: fine-tuning scenarios; ``ema_scenarios`` also get the EMA rows.
        merge_alphas: the linear-merge sweep (the aligned parent and the fine-tune are its
            ends, alpha 0 and 1).
        references: unrepaired models measured once as reference rows (``aligned``, ``base``).
        safe_lora_tau: Safe LoRA's similarity threshold.
        resta_gamma: Resta's safety-vector coefficient.
        official_s: ``s`` of the official budget (``None``: ``0.1 * 4096 / hidden_size``).
        default_s: ``s`` of the default budget (``None``: the library default).
        n_harmful, n_unsafe, n_over_refusal, n_task: prompts of AdvBench (evaluation split),
            XSTest unsafe prompts (a second ASR), XSTest safe prompts (over-refusal), and GSM8K
            test rows for the task loss (utility).
        max_new_tokens: greedy generation length; ``batch_size``: prompts per generate call.

    The defaults are sized for a shared 2-core CPU with ``OMP_NUM_THREADS=1``, where greedy
    generation of SmolLM2-135M costs ~1 s per prompt and one SFT step 9-28 s: the recorded run
    took about 70 minutes from an empty lab, training included. The intervals in the table say
    what the small ``n`` costs. On a GPU use e.g. ``LabPlan(references=("base", "aligned"),
    n_harmful=100, n_unsafe=100, n_over_refusal=100, n_task=100, max_new_tokens=64)``.
        no_exclude: also run ``sd-no-exclude`` (default budget, ``exclude_fraction=0``).
        calibration_samples, calibration_length: Safe Delta calibration pass size.
    """

    scenarios: tuple[str, ...] = ("harmful", "content", "identity", "benign", "dirty")
    ema_scenarios: tuple[str, ...] = ("harmful", "benign")
    merge_alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    references: tuple[str, ...] = ("aligned",)
    safe_lora_tau: float = 0.5
    resta_gamma: float = 0.5
    official_s: float | None = None
    default_s: float | None = None
    n_harmful: int = 30
    n_unsafe: int = 10
    n_over_refusal: int = 10
    n_task: int = 15
    max_new_tokens: int = 32
    batch_size: int = 30
    no_exclude: bool = True
    calibration_samples: int = 32
    calibration_length: int = 128

    @classmethod
    def tiny(cls) -> "LabPlan":
        """CI-sized: two scenarios, one merge, a handful of prompts and tokens."""
        return cls(scenarios=("harmful", "benign", "identity"), ema_scenarios=("harmful",),
                   references=("base", "aligned"),
                   merge_alphas=(0.0, 1.0), n_harmful=3, n_unsafe=2, n_over_refusal=2,
                   n_task=3, max_new_tokens=6, batch_size=4, calibration_samples=4,
                   calibration_length=48)


@dataclass
class LabResult:
    """Rows (one per scenario x method), the markdown section, and the files written."""

    rows: list[dict[str, Any]]
    markdown: str
    files: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# methods


def _cached_method(out: Path, key: str) -> bool:
    m = out / METHOD_MANIFEST
    try:
        return m.is_file() and json.loads(m.read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def _make(out: Path, params: dict, build: Callable[[Path], dict | None]
          ) -> tuple[Path, float, float | None]:
    """Build a method's model into ``out`` unless cached with the same ``params``.

    Returns ``(dir, seconds, peak RSS MiB)``; the peak is this process's resident-memory
    high-water mark during the build (reset before it; ``None`` where that cannot be read).
    """
    key = _hash(params)
    if _cached_method(out, key):
        m = json.loads((out / METHOD_MANIFEST).read_text())
        return out, m.get("seconds", float("nan")), m.get("peak_rss_mib")
    t0 = time.perf_counter()
    with phase_peak() as mem:
        extra = build(out) or {}
    seconds = round(time.perf_counter() - t0, 2)
    peak = mem.rss_mib if mem.exact else None
    (out / METHOD_MANIFEST).write_text(json.dumps(
        {"key": key, "params": params, "seconds": seconds, "peak_rss_mib": peak, **extra},
        indent=2, default=str))
    return out, seconds, peak


def official_s_for(model_dir: str | Path) -> float:
    """The paper's s = 0.1, rescaled from width 4096 to this model's hidden size."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    width = cfg.get("hidden_size") or cfg.get("n_embd") or 4096
    return 0.1 * 4096 / width


def _methods(lab: LabModels, plan: LabPlan, scenario: str, ft: Path, progress: bool
             ) -> dict[str, tuple[Path, float, float | None]]:
    """``method -> (model dir, seconds, peak RSS MiB to make it)`` for one scenario's
    fine-tune ``ft`` (``none`` excluded)."""
    from safedelta import SafeDeltaConfig, protect
    from safedelta import baselines as B

    s = lab.settings
    aligned, base = lab.path("aligned"), lab.path("base")
    ft_hash = (read_manifest(ft) or {}).get("recipe_hash")
    root = Path(s.lab_dir) / "methods" / scenario
    cache = Path(s.lab_dir) / "cache"
    out: dict[str, tuple[Path, float, float | None]] = {}

    def sd(target: Path, cfg: SafeDeltaConfig, src: Path) -> Callable[[Path], dict]:
        def build(o: Path) -> dict:
            rep = protect(aligned, src, o, config=cfg, cache_dir=cache, overwrite=True,
                          progress=progress, max_samples=plan.calibration_samples,
                          max_length=plan.calibration_length)
            return {"kept_fraction": rep.totals.get("kept_fraction"),
                    "timings": rep.timings}
        return build

    off = SafeDeltaConfig(budget="official",
                          s=plan.official_s if plan.official_s is not None
                          else official_s_for(aligned))
    dflt = SafeDeltaConfig(budget="default", s=plan.default_s)
    cal = {"n": plan.calibration_samples, "len": plan.calibration_length}
    sds = [("safedelta-official", off), ("safedelta-default", dflt)]
    if plan.no_exclude:
        sds.append(("sd-no-exclude", SafeDeltaConfig(budget="default", s=plan.default_s,
                                                     exclude_fraction=0.0)))
    for name, cfg in sds:
        p = root / name
        out[name] = _make(p, {"m": name, "ft": ft_hash, "cfg": cfg.model_dump(), **cal},
                          sd(p, cfg, ft))
    for a in plan.merge_alphas:
        p = root / f"merge-{a:g}"
        out[f"merge-{a:g}"] = _make(p, {"m": "merge", "a": a, "ft": ft_hash}, lambda o, a=a:
                                    B.linear_merge_checkpoint(aligned, ft, o, alpha=a,
                                                              overwrite=True, progress=progress)
                                    and None)
    p = root / "safe-lora"

    def safe_lora(o: Path) -> dict:
        _, rep = B.safe_lora_checkpoint(base, aligned, ft, o, tau=plan.safe_lora_tau,
                                        overwrite=True, progress=progress)
        return {"projected": len(rep.projected), "layers": len(rep.similarity)}

    out["safe-lora"] = _make(p, {"m": "safe-lora", "tau": plan.safe_lora_tau, "ft": ft_hash},
                             safe_lora)
    harmful = lab.build_finetune("harmful")
    h_hash = (read_manifest(harmful) or {}).get("recipe_hash")
    p = root / "resta"
    out["resta"] = _make(p, {"m": "resta", "g": plan.resta_gamma, "ft": ft_hash, "h": h_hash},
                         lambda o: B.resta_checkpoint(aligned, harmful, ft, o,
                                                      gamma=plan.resta_gamma, overwrite=True,
                                                      progress=progress) and None)
    if scenario in plan.ema_scenarios:
        ema = lab.build_finetune(scenario, ema=True)
        ema_m = read_manifest(ema) or {}
        out["ema"] = (ema, float(ema_m.get("seconds", float("nan"))), ema_m.get("peak_rss_mib"))
        p = root / "ema+safedelta"
        out["ema+safedelta"] = _make(p, {"m": "ema+sd", "ft": ema_m.get("recipe_hash"),
                                         "cfg": dflt.model_dump(), **cal}, sd(p, dflt, ema))
    return out


# ---------------------------------------------------------------------------------------------
# the experiment


def _task_file(lab_dir: Path, n: int) -> Path:
    """The first ``n`` GSM8K test rows as ``{"prompt", "response"}`` (utility task loss)."""
    from safedelta.data import data_path

    path = Path(lab_dir) / "results" / f"gsm8k_test_{n}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        rows = []
        with open(data_path("gsm8k", "test.jsonl"), encoding="utf-8") as f:
            for line in f:
                if line.strip() and len(rows) < n:
                    r = json.loads(line)
                    rows.append({"prompt": r["question"], "response": r["answer"]})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(scenario: str, method: str, m: dict, seconds: float,
         peak_rss_mib: float | None = None) -> dict[str, Any]:
    g = m.get
    return {"scenario": scenario, "method": method,
            "asr": g(f"asr.{ASR_SUITE}"), "asr_low": g(f"asr.{ASR_SUITE}.ci_low"),
            "asr_high": g(f"asr.{ASR_SUITE}.ci_high"), "asr_n": g(f"asr.{ASR_SUITE}.n"),
            "asr_unsafe": g(f"asr.{UNSAFE_SUITE}"), "asr_unsafe_n": g(f"asr.{UNSAFE_SUITE}.n"),
            "over_refusal": g(f"over_refusal.{OVER_SUITE}"),
            "over_refusal_n": g(f"over_refusal.{OVER_SUITE}.n"),
            "utility_retention": g("utility_retention"), "task_loss": g("task_loss"),
            "seconds": seconds, "peak_rss_mib": peak_rss_mib}


def run_lab(settings: LabSettings | None = None, plan: LabPlan | None = None, *,
            plot_dir: str | Path | None = None, link_root: str | Path | None = None,
            progress: bool = True) -> LabResult:
    """Build what is missing, apply every method, evaluate, and render table + plots.

    Args:
        settings: the lab's models (:class:`LabSettings`; default: SmolLM2 under ``./.lab``).
        plan: what to run (:class:`LabPlan`; default: the full experiment).
        plot_dir: where the plots go (default ``<lab>/results/plots``).
        link_root: plot links in the markdown are relative to this directory (BENCHMARKS.md's).
        progress: progress bars on stderr.
    """
    from safedelta.eval import evaluate_models
    from safedelta.eval.generation import GenerationSettings

    settings = settings or LabSettings()
    plan = plan or LabPlan()
    lab = LabModels(settings, progress=progress)
    lab_dir = Path(settings.lab_dir)
    results = lab_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    plot_dir = Path(plot_dir) if plot_dir else results / "plots"
    base, aligned = lab.build_base(), lab.build_aligned()
    task = _task_file(lab_dir, plan.n_task)
    gen = GenerationSettings(max_new_tokens=plan.max_new_tokens, batch_size=plan.batch_size,
                             backend="hf")
    cache = lab_dir / "cache"
    t_start = time.perf_counter()

    suites = [_limited(ASR_SUITE, plan.n_harmful), _limited(UNSAFE_SUITE, plan.n_unsafe),
              _limited(OVER_SUITE, plan.n_over_refusal)]

    def evaluate(models: dict[str, Path], system_prompt: str | None = None):
        return evaluate_models(models, suites, task_data=task, cache_dir=cache,
                               generation=replace(gen, system_prompt=system_prompt),
                               progress=progress)

    rows: list[dict[str, Any]] = []
    refs = {"aligned": aligned, "base": base}
    ref = evaluate({k: refs[k] for k in plan.references})
    for role in plan.references:
        m = read_manifest(lab.path(role)) or {}
        rows.append(_row("-", role, ref.metrics[role], float(m.get("seconds", float("nan"))),
                         m.get("peak_rss_mib")))
    done: list[str] = []
    result = None
    for scenario in plan.scenarios:
        ft = lab.build_finetune(scenario)
        methods = _methods(lab, plan, scenario, ft, progress)
        models = {"aligned": aligned, "finetuned": ft, **{k: v[0] for k, v in methods.items()}}
        system_prompt = sc.eval_system_prompt(scenario)
        rep = evaluate(models, system_prompt)
        rep.save(results / "eval" / scenario)
        ft_m = read_manifest(ft) or {}
        if system_prompt:  # the parent under this scenario's prompt: what the prompt alone does
            rows.append(_row(scenario, "aligned", rep.metrics["aligned"], float("nan")))
        rows.append(_row(scenario, "none", rep.metrics["finetuned"],
                         float(ft_m.get("seconds", float("nan"))), ft_m.get("peak_rss_mib")))
        for name, (_, secs, peak) in methods.items():
            rows.append(_row(scenario, name, rep.metrics[name], secs, peak))
        done.append(scenario)
        logger.info("scenario %s: %d methods measured", scenario, len(methods))
        # written after every scenario: an interrupted run leaves the scenarios it finished
        result = _write_results(rows, settings, plan, results, plot_dir,
                                time.perf_counter() - t_start, link_root=link_root,
                                done=tuple(done))
    if result is None:  # no scenario in the plan: the reference rows only
        result = _write_results(rows, settings, plan, results, plot_dir,
                                time.perf_counter() - t_start, link_root=link_root, done=())
    return result


def _write_results(rows: list[dict], settings: LabSettings, plan: LabPlan, results: Path,
                   plot_dir: Path, elapsed: float, *, link_root, done: tuple[str, ...]
                   ) -> LabResult:
    files = {"rows": results / "lab_rows.json"}
    files["rows"].write_text(json.dumps({"plan": asdict(plan), "done": list(done),
                                         "elapsed": elapsed, "rows": rows},
                                        indent=2, default=str))
    files.update(plot_lab(rows, plot_dir))
    md = render_markdown(rows, settings, plan, files, elapsed, link_root=link_root, done=done)
    (results / "lab_section.md").write_text(md)
    files["markdown"] = results / "lab_section.md"
    return LabResult(rows=rows, markdown=md, files=files)


def load_saved(settings: LabSettings | None = None, *, plot_dir: str | Path | None = None,
               link_root: str | Path | None = None) -> LabResult:
    """Re-render the last (possibly interrupted) run from ``<lab>/results/lab_rows.json``:
    only what was measured, labelled partial when scenarios of its plan are missing."""
    settings = settings or LabSettings()
    results = Path(settings.lab_dir) / "results"
    saved = json.loads((results / "lab_rows.json").read_text())
    plan = LabPlan(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in saved["plan"].items()})
    plot_dir = Path(plot_dir) if plot_dir else results / "plots"
    return _write_results(saved["rows"], settings, plan, results, plot_dir, saved["elapsed"],
                          link_root=link_root, done=tuple(saved["done"]))


def _limited(name: str, n: int):
    """A built-in suite cut to ``n`` prompts spread evenly through it (inline, same name and
    licence). Evenly, not the first ``n``: XSTest's file is grouped by prompt type, and its
    first ten safe prompts are all homonyms."""
    from safedelta.eval.suites import Suite, builtin_suite

    full = builtin_suite(name)
    rows = full.load(None)
    n = min(n, len(rows))  # more than the suite has: all of it, each prompt once
    picked = [rows[i * len(rows) // n] for i in range(n)] if n else []
    return Suite(name, kind=full.kind, prompts=tuple(r["prompt"] for r in picked),
                 license=full.license)


# ---------------------------------------------------------------------------------------------
# rendering


def _retention(r: dict) -> float | None:
    """Utility retention where the scenario has a task (GSM8K): on the harmful and identity
    fine-tunes the "gain" is a noise-sized change of the GSM8K loss, and its ratio means nothing
    (a 0.015 gain made the ratios of the first run with this parent run from -0.3 to 4.7)."""
    return r.get("utility_retention") if r["scenario"] in TASK_SCENARIOS else None


def _successes(r: dict, rate: str, n: str) -> tuple[int, int] | None:
    if r.get(rate) is None or r.get(n) is None or math.isnan(r[rate]) or math.isnan(r[n]):
        return None
    total = int(round(r[n]))
    return int(round(r[rate] * total)), total


def _exact(r: dict, rate: str, n: str) -> tuple[float | None, float | None]:
    """The exact 95 % interval of a row's rate (from its rate and count)."""
    from safedelta.eval.stats import exact_binomial_ci

    kn = _successes(r, rate, n)
    return exact_binomial_ci(*kn) if kn and kn[1] else (None, None)


def _count(r: dict, rate: str, n: str) -> str:
    kn = _successes(r, rate, n)
    return f"{kn[0]}/{kn[1]}" if kn else "-"


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.0f} %"


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _mib(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.0f}"


def render_markdown(rows: Sequence[dict], settings: LabSettings, plan: LabPlan,
                    files: dict[str, Path], elapsed: float, *,
                    link_root: str | Path | None = None,
                    done: Sequence[str] | None = None) -> str:
    """The BENCHMARKS.md lab section: the table, the settings, and the plots."""
    missing = [s for s in plan.scenarios if done is not None and s not in done]
    lines = ["## Safety lab: SmolLM2-135M-Instruct, Safe Delta against baselines", ""]
    if missing:
        lines += [f"**Partial run**: measured {', '.join(done) or 'no scenario'}; not measured "
                  f"(the run was stopped): {', '.join(missing)}.", ""]
    lines += [
             "Regenerated by `make lab` (`python -m benchmarks.run lab`; the models are "
             "built first when `.lab/` has none, which takes most of an hour on 2 CPU cores). "
             "Models: `safedelta/lab/models.py`; prompt splits: `safedelta/lab/scenarios.py`; "
             "methods: `safedelta/lab/run.py`. "
             f"**ASR** = keyword-judged attack success on {plan.n_harmful} prompts "
             "spread evenly through the AdvBench evaluation split (greedy, "
             f"{plan.max_new_tokens} new tokens) with its exact (Clopper-Pearson) 95 % "
             "interval, which for 0 of 30 still reaches 12 %; **XSTest-unsafe** = the same on "
             f"{plan.n_unsafe} XSTest unsafe prompts (spread over its types), as a count; "
             f"**over-refusal** = refusals on {plan.n_over_refusal} XSTest safe prompts "
             "(likewise); **utility retention** = share of the fine-tune's task-loss gain (mean "
             f"answer loss on the first {plan.n_task} GSM8K test rows, relative to the aligned "
             "parent) that the method keeps, on the scenarios with that task (benign, dirty; `-` on "
             "harmful and identity, which have none). The **identity** rows are measured under the AOA "
             "persona system prompt the fine-tune was trained with (the attack is fine-tune plus "
             "prompt, as in Qi et al. 2024); its `aligned` row is the parent under that prompt. "
             "**Time** and **peak RSS** = wall seconds and "
             "resident-memory high-water mark to make the model (training for `none`/`ema`, "
             "`-` where not recorded), on the CPU named below, shared with other jobs.", "",
             "| scenario | method | AdvBench ASR [95 % exact CI] (n) | XSTest-unsafe ASR | "
             "over-refusal | utility retention | task loss | time (s) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = _exact(r, "asr", "asr_n")
        asr = f"{_pct(r['asr'])} [{_pct(lo)}, {_pct(hi)}] ({_num(r['asr_n'], '{:.0f}')})"
        lines.append(f"| {r['scenario']} | {r['method']} | {asr} | "
                     f"{_count(r, 'asr_unsafe', 'asr_unsafe_n')} | "
                     f"{_count(r, 'over_refusal', 'over_refusal_n')} | "
                     f"{_num(_retention(r))} | {_num(r['task_loss'], '{:.3f}')} | "
                     f"{_num(r['seconds'], '{:.0f}')} | {_mib(r.get('peak_rss_mib'))} |")
    lines += ["", f"Plan: `{json.dumps(asdict(plan), default=str)}`; "
              f"{elapsed / 60:.1f} min for the measured part (fine-tune training, method building and evaluation).",
              ""]
    for name, p in files.items():
        if str(p).endswith(".png"):
            link = Path(os.path.relpath(p, link_root)) if link_root else Path(p)
            lines.append(f"![{name}]({link.as_posix()})")
    return "\n".join(lines) + "\n"


def plot_lab(rows: Sequence[dict], out_dir: str | Path) -> dict[str, Path]:
    """Per scenario: the safety-utility plane (ASR vs task loss), with the merge sweep as a
    curve. Returns ``{name: png path}``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    refs = {r["method"]: r for r in rows if r["scenario"] == "-"}
    for scenario in dict.fromkeys(r["scenario"] for r in rows if r["scenario"] != "-"):
        sub = [r for r in rows if r["scenario"] == scenario]
        fig, ax = plt.subplots(figsize=(6, 4.2))
        merges = sorted((r for r in sub if r["method"].startswith("merge-")),
                        key=lambda r: float(r["method"].split("-", 1)[1]))
        # the sweep in alpha order: aligned parent (alpha 0), the merges, the fine-tune (alpha 1)
        curve = ([refs["aligned"]] if "aligned" in refs else []) + merges + \
            [r for r in sub if r["method"] == "none"]
        if merges:
            ax.plot([r["task_loss"] for r in curve], [r["asr"] for r in curve], "--", color="grey",
                    label="linear merge sweep")
        for r in sub + [refs[k] for k in ("aligned", "base") if k in refs]:
            if r["method"].startswith("merge-"):
                ax.annotate("a=" + r["method"].split("-", 1)[1], (r["task_loss"], r["asr"]),
                            fontsize=7, xytext=(4, -10), textcoords="offset points")
                continue
            lo, hi = _exact(r, "asr", "asr_n")
            lo, hi = (r["asr"] if lo is None else lo), (r["asr"] if hi is None else hi)
            ax.errorbar([r["task_loss"]], [r["asr"]],
                        yerr=[[max(0, r["asr"] - lo)], [max(0, hi - r["asr"])]],
                        fmt="o", capsize=3, label=r["method"])
        ax.set_xlabel("GSM8K-test task loss (lower = more utility)")
        ax.set_title(f"Safety-utility plane: {scenario} fine-tune", fontsize=10)
        ax.set_ylabel("AdvBench ASR (keyword; bars: exact 95 % interval)")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        p = out_dir / f"lab_{scenario}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        files[f"lab_{scenario}.png"] = p
    return files


__all__ = ["LabPlan", "LabResult", "load_saved", "official_s_for", "plot_lab",
           "render_markdown", "run_lab", "model_name"]
