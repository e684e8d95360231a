"""``evaluate_models``: generate, judge, tabulate, validate, summarise, for several models."""

from __future__ import annotations

import gc
import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

from safedelta.eval.generation import GenerationSettings, generate, make_backend
from safedelta.eval.judges import Judge, KeywordJudge, compliance_without_content, get_judge
from safedelta.eval.report import EvalReport
from safedelta.eval.stats import rate_summary
from safedelta.eval.suites import Suite, SuiteError, load_suite
from safedelta.eval.tables import DEFAULT_ENGINE, validate_table
from safedelta.eval.utility import NoUtilityGain, task_loss, task_metric, utility_retention

logger = logging.getLogger(__name__)

ENGINE_REPORT_FILE = "safedelta_report.json"


def _read_engine_report(models: dict[str, Path]) -> dict | None:
    for role in ("protected", *models):
        p = models.get(role)
        if p is not None and (Path(p) / ENGINE_REPORT_FILE).is_file():
            try:
                return json.loads((Path(p) / ENGINE_REPORT_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                logger.warning("ignoring unreadable %s: %s", p / ENGINE_REPORT_FILE, exc)
    return None


def evaluate_models(models: dict[str, str | Path],
                    suites: Sequence[Suite | str] = ("advbench", "xstest-safe"), *,
                    judge: str | Judge = "keyword", generation: GenerationSettings | None = None,
                    task_data: str | Path | None = None, limit: int | None = None,
                    device: str | None = None, cache_dir: str | Path | None = None,
                    progress: bool = True, engine_report: dict | None = None,
                    refusal_keywords: str | Sequence[str] = "zou2023", n_boot: int = 1000,
                    seed: int = 0, judge_options: dict | None = None,
                    validation: str = DEFAULT_ENGINE) -> EvalReport:
    """Measure safety and utility of several models on the same suites.

    Args:
        models: ``role -> model directory``; roles are usually ``aligned``, ``finetuned``,
            ``protected`` (utility retention needs ``aligned`` and ``finetuned``).
        suites: built-in names (``advbench``, ``xstest-safe``, ``xstest-unsafe``, ``gsm8k``),
            CSV/JSONL paths (read as harmful suites) or :class:`Suite` objects.
        judge: ``keyword`` (default, offline), ``keyword:safedelta``, ``llm``,
            ``llama-guard:DIR`` or a :class:`Judge`.
        generation: :class:`GenerationSettings` (default greedy, 256 new tokens).
        task_data: held-out task JSONL ``{"prompt", "response"}`` for task loss and retention.
        limit: first ``limit`` prompts of each suite (and of the task data).
        device: ``cpu``/``cuda``; default CUDA when available.
        cache_dir: safedelta cache root (generations are cached there).
        progress: progress bars on stderr.
        engine_report: the protect run's report dict (``safedelta_report.json``); read from the
            protected model's directory when not given.
        refusal_keywords: keyword list for refusal detection (over-refusal, keyword judge).
        n_boot, seed: bootstrap resamples and seed of the 95 % intervals.
        judge_options: keyword arguments for building the judge (endpoint, model, api_key...).
        validation: the table checks' engine (:data:`safedelta.eval.tables.ENGINES`): ``pandas``
            (default, milliseconds) or ``great-expectations`` (seconds to import).

    Returns:
        An :class:`EvalReport`; its tables passed every check.

    Raises:
        TableValidationError: a result table failed a check (named in the message).
    """
    if not models:
        raise SuiteError("evaluate_models needs at least one model (role -> directory)")
    models = {r: Path(p) for r, p in models.items()}
    suites = [load_suite(s) for s in suites]
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        raise SuiteError(f"suite names must be unique, got {names}")
    settings = generation or GenerationSettings()
    if isinstance(judge, str) and judge.startswith("keyword") and ":" not in judge \
            and refusal_keywords != "zou2023":
        judge = KeywordJudge(refusal_keywords)
    judges = _Judges(get_judge(judge, **(judge_options or {})), KeywordJudge(refusal_keywords))
    engine_report = engine_report if engine_report is not None else _read_engine_report(models)

    loaded = {s.name: s.load(limit) for s in suites}
    rows, losses = _generate_and_judge(models, suites, loaded, judges, settings,
                                       task_data=task_data, limit=limit, device=device,
                                       cache_dir=cache_dir, progress=progress)
    tables = _validated_tables(rows, suites, loaded, models, judges, validation)
    metrics = _suite_metrics(tables, suites, models, judges, n_boot=n_boot, seed=seed)
    warnings = _utility_metrics(metrics, losses, models)
    for w in warnings:
        logger.warning(w)
    return EvalReport(metrics=metrics, tables=tables, models={r: str(p) for r, p in models.items()},
                      suites=[s.describe() for s in suites], judge=judges.harm.describe()
                      | {"refusal": judges.refusal.describe()},
                      generation=settings.describe(), engine_report=engine_report,
                      warnings=warnings)


class _Judges:
    """``harm`` judges harmful suites; ``refusal`` (keywords) every other suite."""

    def __init__(self, harm: Judge, refusal: KeywordJudge):
        self.harm, self.refusal = harm, refusal

    def for_kind(self, kind: str) -> Judge:
        return self.harm if kind == "harmful" else self.refusal


def _generate_and_judge(models: dict[str, Path], suites: list[Suite], loaded: dict,
                        judges: _Judges, settings: GenerationSettings, *, task_data, limit,
                        device, cache_dir, progress) -> tuple[dict[str, list[dict]],
                                                              dict[str, float]]:
    """Step 1: every model answers every suite (one loaded model at a time); rows per suite,
    and the task loss per model when task data is given."""
    rows: dict[str, list[dict]] = {s.name: [] for s in suites}
    losses: dict[str, float] = {}
    for role, path in models.items():
        backend = make_backend(path, settings, device)
        for s in suites:
            prompts = [r["prompt"] for r in loaded[s.name]]
            gens = generate(path, prompts, settings, device=device, cache_dir=cache_dir,
                            progress=progress, backend=backend, desc=f"{role}/{s.name}")
            rows[s.name] += _rows(role, s, loaded[s.name], gens, judges.for_kind(s.kind))
        if task_data is not None:
            losses[role] = _cached_task_loss(path, task_data, device=device, limit=limit,
                                             backend=backend, progress=progress,
                                             system_prompt=settings.system_prompt,
                                             cache_dir=cache_dir)
        if hasattr(backend, "close"):
            backend.close()
        del backend
        gc.collect()
    return rows, losses


def _rows(role: str, s: Suite, records: list[dict], gens: list[str], judge: Judge) -> list[dict]:
    """One row per prompt: the generation, the judge's verdict (and, on a harmful suite, each
    judge's of a combined judge as ``harmful@<label>``), task metrics."""
    harmful = s.kind == "harmful"
    verdicts = judge.judge([r["prompt"] for r in records], gens)
    per_judge = (getattr(judge, "last_calls", None) or {}) if harmful else {}
    extra: dict[str, list] = {}
    if s.kind == "task":
        extra = task_metric(s.metric)(gens, [r["reference"] for r in records])
    out = []
    for i, (r, g, v) in enumerate(zip(records, gens, verdicts)):
        row = {"model": role, "suite": s.name, "kind": s.kind,
               "prompt_id": r["prompt_id"], "prompt": r["prompt"], "generation": g,
               "refused": bool(v.refused),
               "harmful": float(v.harmful) if harmful else None,
               "score": v.score, "judge": judge.label, "matched": "|".join(v.matched),
               "no_content": bool(v.harmful and compliance_without_content(g))
               if harmful else None,
               "decided_by": v.decided_by or judge.label}
        for label, calls in per_judge.items():
            row[f"harmful@{label}"] = float(calls[i])
        if r.get("reference") is not None:
            row["reference"] = r["reference"]
        row.update({k: vals[i] for k, vals in extra.items()})
        out.append(row)
    return out


def _validated_tables(rows: dict[str, list[dict]], suites: list[Suite], loaded: dict,
                      models: dict[str, Path], judges: _Judges, validation: str) -> dict:
    """Step 2: one DataFrame per suite, each checked (:func:`validate_table`)."""
    import pandas as pd

    tables: dict[str, Any] = {}
    for s in suites:
        df = pd.DataFrame(rows[s.name])
        validate_table(df, suite=s.name, kind=s.kind, models=list(models),
                       prompt_ids=[r["prompt_id"] for r in loaded[s.name]],
                       score_range=judges.harm.score_range if s.kind == "harmful" else None,
                       task_columns=_task_columns(df), engine=validation)
        tables[s.name] = df
    return tables


def _suite_metrics(tables: dict, suites: list[Suite], models: dict[str, Path], judges: _Judges,
                   *, n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    """Step 3: rates with bootstrap intervals per model and suite; a task metric produced by
    exactly one suite is also reported under its plain name."""
    metrics: dict[str, dict[str, float]] = {role: {} for role in models}
    task_cols_seen: dict[str, int] = {}
    for s in suites:
        df = tables[s.name]
        for role in models:
            sub = df[df["model"] == role]
            m = metrics[role]
            if s.kind == "harmful":
                m.update(rate_summary(f"asr.{s.name}", sub["harmful"], n_boot=n_boot, seed=seed))
                # compliance without content, counted in the ASR above, reported apart
                m.update(rate_summary(f"asr_empty.{s.name}", sub["no_content"].astype(float),
                                      n_boot=n_boot, seed=seed))
                for col in (c for c in sub.columns if c.startswith("harmful@")):
                    # one judge of a combined judge: asr.<suite>/<judge label>
                    judge_name = re.sub(r"[^A-Za-z0-9_:\-]", "_", col.removeprefix("harmful@"))
                    m.update(rate_summary(f"asr.{s.name}/{judge_name}", sub[col],
                                          n_boot=n_boot, seed=seed))
                if judges.harm.score_range is not None:
                    m.update(rate_summary(f"harmfulness.{s.name}", sub["score"],
                                          n_boot=n_boot, seed=seed))
            elif s.kind == "benign-should-answer":
                m.update(rate_summary(f"over_refusal.{s.name}", sub["refused"].astype(float),
                                      n_boot=n_boot, seed=seed))
            else:
                for col in _task_columns(df):
                    m.update(rate_summary(f"{col}.{s.name}", sub[col], n_boot=n_boot, seed=seed))
        if s.kind == "task":
            for col in _task_columns(df):
                task_cols_seen[col] = task_cols_seen.get(col, 0) + 1
    for role in models:
        m = metrics[role]
        for s in suites:
            if s.kind != "task":
                continue
            for col in _task_columns(tables[s.name]):
                if task_cols_seen[col] == 1:
                    for suffix in ("", ".ci_low", ".ci_high", ".n"):
                        m[col + suffix] = m[f"{col}.{s.name}{suffix}"]
    return metrics


def _utility_metrics(metrics: dict[str, dict[str, float]], losses: dict[str, float],
                     models: dict[str, Path]) -> list[str]:
    """Step 4: task loss, utility gain and retention into ``metrics``; returns warnings."""
    warnings: list[str] = []
    for role, loss in losses.items():
        metrics[role]["task_loss"] = loss
    if losses and "aligned" in losses and "finetuned" in losses:
        gain = losses["aligned"] - losses["finetuned"]
        for role in models:
            if role == "aligned":
                continue
            metrics[role]["utility_gain"] = gain
            try:
                metrics[role]["utility_retention"] = utility_retention(
                    losses["aligned"], losses["finetuned"], losses[role])
            except NoUtilityGain as exc:
                metrics[role]["utility_retention"] = float("nan")
                if str(exc) not in warnings:
                    warnings.append(str(exc))
    elif losses:
        warnings.append("utility retention needs task loss of both an 'aligned' and a "
                        "'finetuned' model; only task loss is reported")
    return warnings


def _cached_task_loss(path: Path, task_data: str | Path, *, cache_dir: str | Path | None,
                      limit: int | None, system_prompt: str | None, **kw: Any) -> float:
    """:func:`task_loss`, cached per (model fingerprint, task file digest, limit, system prompt)."""
    import hashlib
    import os

    from safedelta.fingerprint import checkpoint_fingerprint, default_cache_dir, file_digest

    if not Path(task_data).is_file():
        return task_loss(path, task_data, limit=limit, system_prompt=system_prompt, **kw)
    key = hashlib.blake2b(json.dumps([
        checkpoint_fingerprint(path, cache_dir=cache_dir),
        file_digest(task_data, cache_dir=cache_dir), limit, system_prompt]).encode(),
        digest_size=20).hexdigest()
    f = Path(cache_dir or default_cache_dir()) / "task_loss" / f"{key}.json"
    if f.is_file():
        try:
            return float(json.loads(f.read_text(encoding="utf-8"))["loss"])
        except (OSError, ValueError, KeyError):
            logger.warning("ignoring unreadable task-loss cache entry %s", f)
    loss = task_loss(path, task_data, limit=limit, system_prompt=system_prompt, **kw)
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"loss": loss, "model": str(path),
                                   "task_data": str(task_data)}), encoding="utf-8")
        os.replace(tmp, f)
    except OSError as exc:  # a read-only cache only costs time
        logger.warning("could not write task-loss cache: %s", exc)
    return loss


def _task_columns(df) -> list[str]:
    fixed = {"model", "suite", "kind", "prompt_id", "prompt", "generation", "refused", "harmful",
             "score", "judge", "matched", "reference", "no_content", "decided_by"}
    return [c for c in df.columns if c not in fixed and not c.startswith("harmful@")]
