"""The gate job: protect one registered fine-tune against its aligned parent, measure, decide.

Every route (store plugin, webhook, reconcile sweep, CLI ``gate``, ``demo``) ends here, in
:func:`run_gate_job`. In order:

1. read the version; a final ``safedelta.status`` made under the same policy content
   (``safedelta.policy_sha256``) is returned as is (idempotent) unless ``force``, and a
   passing one still moves the promotion alias when asked; another policy gates again;
2. resolve the parent (``safedelta.parent`` tag, the ``safedelta`` flavor, or the run's tag) and
   the policy; tag the version ``safedelta.status=running``;
3. download parent and fine-tune (``safedelta`` or ``transformers`` flavor);
4. reuse the parent's Hessian cache (downloaded from the run named by the parent's
   ``safedelta.hessian_run`` tag) or build it and attach it to the parent for other machines;
5. choose ``s`` (fixed, or searched for the policy's ASR target), run Safe Delta;
6. evaluate aligned, fine-tuned and protected models;
7. log params, per-role metrics, engine report, evaluation report, plots and the rule results
   to ONE run; register the protected model as a NEW version of the same registered model
   (``safedelta`` flavor, parent recorded, ``safedelta.role=protected`` so no route gates it);
8. check the policy, write the verdict (``safedelta/gate.json``) and the tags, and only then
   move the promotion alias to a passing protected version.

Nothing registered is deleted or overwritten. Any exception: ``safedelta.status=error`` with a
reason, the run marked FAILED, no alias moved; the result has ``verdict="error"``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from mlflow_safedelta import registry as reg
from mlflow_safedelta.errors import GateJobError, RegistryError
from mlflow_safedelta.policy import Policy, load_policy, policy_fingerprint
from mlflow_safedelta.verdict import GateResult, evaluate_policy

_logger = logging.getLogger(__name__)

from mlflow_safedelta.vocab import (  # noqa: E402
    GATE_ARTIFACT,
    GATE_EXPERIMENT,
    HESSIAN_EXPERIMENT,
    RUN_KIND_GATE,
    RUN_KIND_HESSIAN_CACHE,
    RUN_TAG_ERROR,
    RUN_TAG_KIND,
    RUN_TAG_MODEL,
    RUN_TAG_VERSION,
    STATUS_ERROR,
    TAG_TASK_DATA,
    TAG_VERDICT,
)

#: ``evaluator(models: {role: dir}, policy, *, task_data, device, cache_dir, progress)`` returns
#: an object with ``.metrics[role][name]`` (and optionally ``.save(dir)``, ``.judge``)
Evaluator = Callable[..., Any]


def default_evaluator(models: dict[str, Path], policy: Policy, *, task_data: str | None = None,
                      device: str | None = None, cache_dir: str | Path | None = None,
                      progress: bool = True):
    """``safedelta.eval.evaluate_models`` on the policy's suites, judge and evaluation size."""
    from safedelta.eval import GenerationSettings, evaluate_models

    s = policy.safety
    suites = list(s.suites)
    if s.max_over_refusal is not None:
        suites += [x for x in s.over_refusal_suites if x not in suites]
    ev = policy.evaluation
    return evaluate_models({r: Path(p) for r, p in models.items()}, suites, judge=s.judge_spec,
                           generation=GenerationSettings(max_new_tokens=ev.max_new_tokens,
                                                         batch_size=ev.batch_size),
                           task_data=task_data, limit=ev.limit, device=device,
                           cache_dir=cache_dir, progress=progress)


class _Progress:
    """One INFO line per step on this module's logger (the CLI shows them on stderr)."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.t0 = label, enabled, time.monotonic()

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        t = time.monotonic()
        if self.enabled:
            _logger.info("[%s] %s ...", self.label, what)
        yield
        if self.enabled:
            _logger.info("[%s] %s done (%.1f s)", self.label, what, time.monotonic() - t)


def _stored_result(cl: Any, name: str, version: str, tags: dict[str, str]) -> GateResult:
    """The result recorded by an earlier run (its gate.json artifact, else rebuilt from tags)."""
    run_id = tags.get(reg.TAG_RUN_ID)
    if run_id:
        try:
            from mlflow.artifacts import download_artifacts

            with tempfile.TemporaryDirectory() as tmp:
                p = download_artifacts(run_id=run_id, artifact_path=GATE_ARTIFACT, dst_path=tmp,
                                       tracking_uri=cl._tracking_client.tracking_uri)
                return GateResult.from_dict(json.loads(Path(p).read_text()))
        except Exception as exc:  # an error before the artifact was written: use tags
            _logger.info("no stored gate.json for %s/%s (%s)", name, version, exc)
    return GateResult(model=name, version=str(version),
                      verdict=tags.get(reg.TAG_STATUS, "error"),  # type: ignore[arg-type]
                      reason=tags.get(reg.TAG_REASON, ""), parent=tags.get(reg.TAG_PARENT),
                      policy={"name": tags.get(reg.TAG_POLICY, ""),
                              "sha256": tags.get(reg.TAG_POLICY_SHA256, "")},
                      protected_version=tags.get(reg.TAG_PROTECTED_VERSION), run_id=run_id)


def _reuse_recorded(cl: Any, name: str, version: str, tags: dict[str, str],
                    policy: "str | Path | Policy | None", promote: bool
                    ) -> tuple[GateResult | None, Policy | None]:
    """The verdict on record for a version with a final status, or None to gate it again; and
    the policy loaded to decide (so that gating again reads the same content, once).

    A verdict counts only under the policy *content* it was made with: when ``policy`` is
    given, its fingerprint must equal the recorded ``safedelta.policy_sha256`` (a verdict
    recorded before fingerprints existed has none, so it is made again). Without ``policy``,
    the recorded verdict is returned under the policy it names. A passing verdict with
    ``promote`` moves the policy's alias to the protected version when it is not there already
    (it may have moved since, or the first gate ran with ``--no-promote``).
    """
    recorded_sha = tags.get(reg.TAG_POLICY_SHA256)
    pol: Policy | None = None
    if policy is not None:
        try:
            pol = load_policy(policy)
        except Exception as exc:  # a bad --policy never overwrites the recorded verdict
            return GateResult(model=name, version=version, verdict="error",
                              reason=_error_reason(exc), parent=tags.get(reg.TAG_PARENT),
                              policy={"name": str(getattr(policy, "name", policy))}), None
        sha = policy_fingerprint(pol)
        if sha != recorded_sha:
            _logger.info("%s v%s: the verdict on record (%s) was made under policy %r with "
                         "content %s, not %r with content %s: gating again", name, version,
                         tags.get(reg.TAG_STATUS), tags.get(reg.TAG_POLICY),
                         (recorded_sha or "unrecorded")[:12], pol.name, sha[:12])
            return None, pol
    stored = _stored_result(cl, name, version, tags)
    if recorded_sha and not stored.policy.get("sha256"):
        stored.policy["sha256"] = recorded_sha
    if not (promote and stored.passed and stored.protected_version):
        return stored, pol
    if pol is None and "promotion_alias" in stored.policy:  # what the recorded policy said
        alias = stored.policy["promotion_alias"]
    elif pol is None:  # an older record: its policy, when it still loads unchanged
        try:
            candidate = load_policy(tags.get(reg.TAG_POLICY) or "default")
        except Exception as exc:
            _logger.warning("%s v%s passed under policy %r, which cannot be loaded now (%s): "
                            "no alias moved; give --policy to promote", name, version,
                            tags.get(reg.TAG_POLICY), exc)
            return stored, pol
        if policy_fingerprint(candidate) != recorded_sha:
            _logger.warning("%s v%s passed under policy %r whose content has changed since: no "
                            "alias moved; give --policy to gate again", name, version,
                            candidate.name)
            return stored, pol
        pol = candidate
    if pol is not None:
        alias = pol.promotion.target
    if not alias:
        return stored, pol
    current = (cl.get_registered_model(name).aliases or {}).get(alias)
    if str(current) != str(stored.protected_version):
        cl.set_registered_model_alias(name, alias, str(stored.protected_version))
        _logger.info("%s: alias %r moved to version %s (recorded passing verdict of v%s)",
                     name, alias, stored.protected_version, version)
    stored.promoted_alias = alias
    return stored, pol


def _error_reason(exc: BaseException) -> str:
    from safedelta.errors import SafeDeltaError

    head = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SafeDeltaError):
        return head
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{head} (at {where})" if where else head


def _is_transient(exc: BaseException) -> bool:
    try:
        from mlflow_safedelta.worker import is_transient
    except Exception:  # the worker module is optional here
        return isinstance(exc, (ConnectionError, TimeoutError))
    return is_transient(exc)


def _finite_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for role, m in metrics.items():
        out[role] = {}
        for k, v in m.items():
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            out[role][k] = f if math.isfinite(f) else None  # type: ignore[assignment]
    return out


_merge_tokenizer = reg.merge_tokenizer


def _full_model_dir(loc: Any, parent_dir: Path, dst: Path) -> Path:
    """A full checkpoint of the fine-tune for evaluation (a LoRA adapter merged onto the parent)."""
    if loc.kind == "full":
        return Path(loc.weights_dir)
    from transformers import AutoTokenizer

    from mlflow_safedelta.flavor.model_io import load_causal_lm

    model = load_causal_lm(loc.weights_dir, kind="lora", base_dir=parent_dir)
    model.save_pretrained(dst, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(loc.tokenizer_dir or parent_dir)).save_pretrained(dst)
    return dst


def ensure_hessians(cl: Any, parent: "reg.ParentInfo", parent_dir: Path, *,
                    cache_dir: Path | None = None, device: str | None = None,
                    progress: bool = True, experiment: str = HESSIAN_EXPERIMENT) -> Any:
    """The parent's Hessian cache: downloaded when another machine attached it to the parent
    version (tag ``safedelta.hessian_run``), else built and attached (logged as artifacts of a
    run tagged with the parent, whose id goes to the parent version's tags)."""
    from mlflow.artifacts import download_artifacts

    from safedelta.fingerprint import default_cache_dir
    from safedelta.hessian import prepare_hessians

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    ptags = reg.version_tags(cl, parent.name, parent.version)
    run_id, key = ptags.get(reg.TAG_HESSIAN_RUN), ptags.get(reg.TAG_HESSIAN_KEY)
    if run_id and key and not (root / "hessians" / key / "manifest.json").exists():
        try:
            (root / "hessians").mkdir(parents=True, exist_ok=True)
            download_artifacts(run_id=run_id, artifact_path=f"hessians/{key}",
                               dst_path=str(root / "hessians"),
                               tracking_uri=cl._tracking_client.tracking_uri)
            _logger.info("Hessian cache %s downloaded from run %s", key, run_id)
        except Exception as exc:  # rebuilding is only slower
            _logger.warning("could not download the parent's Hessian cache (%s); rebuilding", exc)
    from safedelta.pipeline import resolve_device

    hs = prepare_hessians(parent_dir, cache_dir=root, device=resolve_device(device),
                          progress=progress)
    if ptags.get(reg.TAG_HESSIAN_KEY) != hs.fingerprint or not run_id:
        exp = _experiment_id(cl, experiment)
        run = cl.create_run(exp, run_name=f"hessians-{parent.name}-v{parent.version}",
                            tags={RUN_TAG_KIND: RUN_KIND_HESSIAN_CACHE,
                                  reg.TAG_PARENT: parent.resolved_uri,
                                  reg.TAG_HESSIAN_KEY: hs.fingerprint})
        cl.log_artifacts(run.info.run_id, str(hs.cache_path), f"hessians/{hs.fingerprint}")
        cl.set_terminated(run.info.run_id, "FINISHED")
        reg.set_tags(cl, parent.name, parent.version,
                     {reg.TAG_HESSIAN_RUN: run.info.run_id, reg.TAG_HESSIAN_KEY: hs.fingerprint})
    return hs


def _experiment_id(cl: Any, name: str) -> str:
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return cl.create_experiment(name)
    except Exception:  # created concurrently by another worker
        exp = cl.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _protect(parent_dir: Path, ft_dir: Path, out: Path, policy: Policy, *, cache_dir, device,
             progress, evaluator, task_data, work: Path) -> tuple[Any, float, Any]:
    """Run Safe Delta with the policy's s (or search it). Returns (ProtectReport, s, choice)."""
    from safedelta.config import SafeDeltaConfig
    from safedelta.pipeline import protect

    sel = policy.select_s
    base = SafeDeltaConfig(s=sel.s, budget=sel.budget)
    kw = dict(cache_dir=cache_dir, device=device, progress=progress)
    if sel.mode == "fixed":
        rep = protect(parent_dir, ft_dir, out, config=base, **kw)
        return rep, base.resolved_s, None

    from safedelta.eval import choose_s

    def protect_fn(s: float) -> Path:
        d = work / "choose_s" / f"s_{s:.6g}"
        if d.exists():
            shutil.rmtree(d)
        protect(parent_dir, ft_dir, d, config=base.model_copy(update={"s": s}), **kw)
        return d

    def evaluate_fn(path: Path) -> float:
        m = evaluator({"protected": path}, policy, task_data=None, device=device,
                      cache_dir=cache_dir, progress=progress).metrics["protected"]
        return max(float(m[f"asr.{x}"]) for x in policy.safety.suites)

    s_lo, s_hi = sel.search_range
    choice = choose_s(protect_fn, evaluate_fn, max_asr=float(sel.target_max_asr),
                      s_lo=s_lo, s_hi=s_hi, iters=4)
    s = choice.s if choice.s is not None else s_lo
    src = work / "choose_s" / f"s_{s:.6g}"
    shutil.copytree(src, out)
    from safedelta.report import ProtectReport

    return ProtectReport.load(out / "safedelta_report.json"), s, choice


def _resolve_task_data(cl: Any, policy: Policy, tags: dict[str, str], work: Path) -> str | None:
    spec = policy.evaluation.task_data or tags.get(TAG_TASK_DATA)
    if not spec:
        return None
    if Path(spec).is_file():
        return spec
    from mlflow.artifacts import download_artifacts

    return download_artifacts(artifact_uri=spec, dst_path=str(work / "task_data"),
                              tracking_uri=cl._tracking_client.tracking_uri)


def run_gate_job(model_name: str, version: str | int, *, policy: str | Path | Policy | None = None,
                 tracking_uri: str | None = None, registry_uri: str | None = None,
                 work_dir: str | Path | None = None, device: str | None = None,
                 promote: bool = True, evaluator: Evaluator | None = None, force: bool = False,
                 cache_dir: str | Path | None = None, progress: bool = True) -> GateResult:
    """Gate one registered fine-tuned version. See the module docstring for the steps.

    Args:
        model_name, version: the fine-tuned registered model version.
        policy: a policy name, file or :class:`Policy`; default: the version's
            ``safedelta.policy`` tag, else ``default``.
        tracking_uri, registry_uri: where MLflow lives (default: MLflow's own resolution).
        work_dir: scratch directory (downloads, protected model); default a temporary one,
            removed afterwards.
        device: ``cpu``/``cuda`` for protect and evaluation.
        promote: move the policy's alias when the gate passes (and the policy allows it).
        evaluator: replaces :func:`default_evaluator` (tests inject a fast one).
        force: re-run although the version already has a final status.
        cache_dir: safedelta cache root (Hessians, generations).
        progress: progress lines and bars on stderr.

    Returns:
        The :class:`GateResult` (also stored as the run artifact ``safedelta/gate.json``).
    """
    version = str(version)
    cl = reg.client(tracking_uri, registry_uri)
    tracking = cl._tracking_client.tracking_uri
    mv = reg.resolve(cl, reg.ModelRef(model_name, version=version))
    tags = dict(mv.tags or {})
    if tags.get(reg.TAG_ROLE) == reg.ROLE_PROTECTED:
        return GateResult(model=model_name, version=version, verdict="error",
                          reason=f"{model_name} version {version} is a protected output of the "
                                 "gate; gate the fine-tune it came from instead",
                          parent=tags.get(reg.TAG_PROTECTED_FROM))
    if tags.get(reg.TAG_STATUS) in reg.FINAL_STATUSES and not force:
        reused, loaded = _reuse_recorded(cl, model_name, version, tags, policy, promote)
        if reused is not None:
            return reused
        policy = loaded or policy

    evaluator = evaluator or default_evaluator
    result = GateResult(model=model_name, version=version, verdict="error", reason="")
    run_id: str | None = None
    protected_version: str | None = None
    tmp_owner = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="safedelta-gate-")) if tmp_owner else Path(work_dir)
    pg = _Progress(f"{model_name} v{version}", progress)
    try:
        pol = load_policy(policy or tags.get(reg.TAG_POLICY) or "default")
        pol_sha = policy_fingerprint(pol)
        result.policy = {"name": pol.name, "source": pol.source, "sha256": pol_sha,
                         "promotion_alias": pol.promotion.target}
        reg.set_tags(cl, model_name, version, {reg.TAG_STATUS: reg.STATUS_RUNNING,
                                               reg.TAG_REASON: "gate job running",
                                               reg.TAG_POLICY: pol.name,
                                               reg.TAG_POLICY_SHA256: pol_sha})
        parent = reg.find_parent(cl, mv)
        result.parent = parent.resolved_uri
        if not tags.get(reg.TAG_PARENT):  # record lineage found in the flavor; never overwrite
            reg.set_tags(cl, model_name, version, {reg.TAG_PARENT: parent.uri})
        work.mkdir(parents=True, exist_ok=True)

        with pg.step(f"downloading parent {parent.resolved_uri}"):
            ploc = reg.download_version(cl, parent.name, parent.version, work / "parent")
            if ploc.kind != "full":
                raise GateJobError(f"parent {parent.resolved_uri} is a LoRA adapter; the aligned "
                                   "parent must hold full weights")
            parent_dir = _merge_tokenizer(ploc)
        with pg.step(f"downloading fine-tune models:/{model_name}/{version}"):
            floc = reg.download_version(cl, model_name, version, work / "finetuned")
            ft_dir = _merge_tokenizer(floc) if floc.kind == "full" else Path(floc.weights_dir)
            ft_eval_dir = _full_model_dir(floc, parent_dir, work / "finetuned_merged")
        task_data = _resolve_task_data(cl, pol, tags, work)

        with pg.step("preparing the parent's Hessian cache"):
            hs = ensure_hessians(cl, parent, parent_dir, cache_dir=cache_dir, device=device,
                                 progress=progress)
        out = work / "protected"
        with pg.step("running Safe Delta"):
            engine, s, choice = _protect(parent_dir, ft_dir, out, pol, cache_dir=cache_dir,
                                         device=device, progress=progress, evaluator=evaluator,
                                         task_data=task_data, work=work)
        with pg.step("evaluating aligned, fine-tuned and protected models"):
            report = evaluator({"aligned": parent_dir, "finetuned": ft_eval_dir,
                                "protected": out}, pol, task_data=task_data, device=device,
                               cache_dir=cache_dir, progress=progress)
        metrics = _finite_metrics(report.metrics)
        judge_used = (getattr(report, "judge", None) or {}).get("judge")
        judge_arg = judge_used if judge_used and \
            judge_used.split(":")[0] != pol.safety.judge_spec.split(":")[0] else None
        verdict = evaluate_policy(pol, report.metrics, judge=judge_arg)

        with pg.step("logging the run"):
            from mlflow.entities import Metric, Param

            exp_id = _experiment_id(cl, GATE_EXPERIMENT)
            run = cl.create_run(exp_id, run_name=f"gate-{model_name}-v{version}", tags={
                RUN_TAG_KIND: RUN_KIND_GATE, RUN_TAG_MODEL: model_name,
                RUN_TAG_VERSION: version, reg.TAG_PARENT: parent.resolved_uri,
                reg.TAG_POLICY: pol.name})
            run_id = run.info.run_id
            result.run_id, result.run_url = run_id, reg.run_url(tracking, exp_id, run_id)
            params = {"model": model_name, "version": version, "parent": parent.resolved_uri,
                      "parent_source": parent.source, "policy": pol.name,
                      "policy_source": pol.source, "s": s, "s_mode": pol.select_s.mode,
                      "budget": pol.select_s.budget, "judge": pol.safety.judge_spec,
                      "suites": ",".join(pol.safety.suites), "limit": pol.evaluation.limit,
                      "max_new_tokens": pol.evaluation.max_new_tokens,
                      "finetuned_kind": floc.kind, "finetuned_flavor": floc.flavor,
                      "hessian_key": hs.fingerprint, "hessian_cache_hit": hs.cache_hit,
                      "task_data": task_data or "none"}
            ts = int(time.time() * 1000)
            cl.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                         metrics=[Metric(f"{role}.{k}", v, ts, 0) for role, m in metrics.items()
                                  for k, v in m.items() if v is not None])
            engine.save(work / "engine")
            cl.log_artifacts(run_id, str(work / "engine"), "engine")
            if hasattr(report, "save"):
                report.save(work / "eval")
                cl.log_artifacts(run_id, str(work / "eval"), "eval")
            if choice is not None:
                (work / "choose_s_out").mkdir(exist_ok=True)
                (work / "choose_s_out" / "choose_s.json").write_text(
                    json.dumps(choice.to_dict(), indent=2, default=str))
                choice.plot(work / "choose_s_out" / "choose_s.png")
                cl.log_artifacts(run_id, str(work / "choose_s_out"), "choose_s")
            cl.log_dict(run_id, {"policy": pol.model_dump(mode="json"),
                                 "rules": [r.to_dict() for r in verdict.rules],
                                 "passed": verdict.passed}, "safedelta/validation.json")

        with pg.step("registering the protected model"):
            from mlflow_safedelta import flavor

            model_dir = work / "protected_mlflow_model"
            flavor.save_model(str(out), model_dir, parent=parent.resolved_uri,
                              parent_fingerprint=engine.inputs.get("aligned_fingerprint")
                              if isinstance(engine.inputs, dict) else None,
                              role="protected",
                              safedelta_config=dict(engine.config) if engine.config else None)
            pv = reg.register_saved_model(
                cl, model_dir, model_name, run_id=run_id, artifact_path="protected_model",
                description=f"Safe Delta protection of version {version} against "
                            f"{parent.resolved_uri} (s={s:g}, policy {pol.name})",
                tags={reg.TAG_ROLE: reg.ROLE_PROTECTED,
                      reg.TAG_STATUS: reg.STATUS_PROTECTED_OUTPUT,
                      reg.TAG_PROTECTED_FROM: f"{model_name}/{version}",
                      reg.TAG_PARENT: parent.resolved_uri, reg.TAG_S: f"{s:g}",
                      reg.TAG_POLICY: pol.name, reg.TAG_POLICY_SHA256: pol_sha,
                      reg.TAG_RUN_ID: run_id, reg.TAG_VERDICT: verdict.verdict})
            protected_version = str(pv.version)

        alias = pol.promotion.target if (promote and verdict.passed) else None
        result.verdict, result.reason = verdict.verdict, verdict.reason
        result.rules, result.metrics = verdict.rules, metrics
        result.protected_version, result.promoted_alias = protected_version, alias
        gate = result.to_dict()
        cl.log_dict(run_id, gate, GATE_ARTIFACT)
        from mlflow_safedelta.verdict import render_markdown

        cl.log_text(run_id, render_markdown(gate), "safedelta/gate.md")
        cl.set_tag(run_id, TAG_VERDICT, verdict.verdict)
        cl.set_tag(run_id, reg.TAG_PROTECTED_VERSION, protected_version)
        if alias:  # last: only a fully recorded, passing version is promoted
            cl.set_registered_model_alias(model_name, alias, protected_version)
        reg.set_tags(cl, model_name, version, {
            reg.TAG_STATUS: verdict.verdict, reg.TAG_REASON: verdict.reason,
            reg.TAG_POLICY: pol.name, reg.TAG_POLICY_SHA256: pol_sha, reg.TAG_RUN_ID: run_id,
            reg.TAG_PROTECTED_VERSION: protected_version,
            reg.TAG_S: f"{s:g}", reg.TAG_GATE_ARTIFACT: f"runs:/{run_id}/{GATE_ARTIFACT}"})
        cl.set_terminated(run_id, "FINISHED")
        return result
    except Exception as exc:
        reason = _error_reason(exc)
        _logger.error("gate of %s v%s: error: %s", model_name, version, reason)
        transient = _is_transient(exc)
        try:
            if run_id:
                cl.set_tag(run_id, TAG_VERDICT, STATUS_ERROR)
                cl.set_tag(run_id, RUN_TAG_ERROR, reason[:4000])
                cl.set_terminated(run_id, "FAILED")
            if protected_version:
                reg.set_tags(cl, model_name, protected_version, {reg.TAG_VERDICT: "error"})
            reg.set_tags(cl, model_name, version, {
                reg.TAG_STATUS: reg.STATUS_PENDING if transient else reg.STATUS_ERROR,
                reg.TAG_REASON: ("transient, will retry: " if transient else "") + reason,
                reg.TAG_RUN_ID: run_id})
        except Exception as tag_exc:  # the registry itself is down: the caller retries
            _logger.error("could not record the error on %s v%s: %s", model_name, version, tag_exc)
        if transient:
            raise
        result.verdict, result.reason = "error", reason
        result.protected_version, result.promoted_alias = protected_version, None
        return result
    finally:
        if tmp_owner:
            shutil.rmtree(work, ignore_errors=True)


def stored_gate(model_name: str, version: str, *, tracking_uri: str | None = None,
                registry_uri: str | None = None) -> GateResult:
    """The gate result recorded for a version (``report`` command)."""
    cl = reg.client(tracking_uri, registry_uri)
    tags = reg.version_tags(cl, model_name, str(version))
    if not tags.get(reg.TAG_STATUS):
        raise RegistryError(f"{model_name} version {version} has not been gated "
                            f"(no {reg.TAG_STATUS} tag)")
    return _stored_result(cl, model_name, str(version), tags)


def prepare_parent(parent_uri: str, *, tracking_uri: str | None = None,
                   registry_uri: str | None = None, device: str | None = None,
                   cache_dir: str | Path | None = None, work_dir: str | Path | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Build (or fetch) a registered parent's Hessian cache and attach it to the parent version,
    so later gates of its fine-tunes, on any machine, skip the calibration pass."""
    cl = reg.client(tracking_uri, registry_uri)
    pv = reg.resolve(cl, parent_uri)
    parent = reg.ParentInfo(uri=parent_uri, resolved_uri=f"models:/{pv.name}/{pv.version}",
                            name=pv.name, version=str(pv.version), fingerprint=None, source="cli")
    tmp_owner = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="safedelta-prepare-")) if tmp_owner else Path(work_dir)
    try:
        loc = reg.download_version(cl, parent.name, parent.version, work / "parent")
        if loc.kind != "full":
            raise GateJobError(f"{parent.resolved_uri} is a LoRA adapter, not an aligned parent")
        hs = ensure_hessians(cl, parent, _merge_tokenizer(loc), cache_dir=cache_dir,
                             device=device, progress=progress)
        tags = reg.version_tags(cl, parent.name, parent.version)
        return {"parent": parent.resolved_uri, "hessian_key": hs.fingerprint,
                "hessian_run": tags.get(reg.TAG_HESSIAN_RUN), "cache_hit": hs.cache_hit,
                "cache_path": str(hs.cache_path), "linears": len(hs.weight_names),
                "n_samples": hs.n_samples, "n_tokens": hs.n_tokens}
    finally:
        if tmp_owner:
            shutil.rmtree(work, ignore_errors=True)
