"""The gate job: protect one registered fine-tune against its aligned parent, measure, decide.

Every route (store plugin, webhook, reconcile sweep, CLI ``gate``, ``demo``) ends here, in
:func:`run_gate_job`. A version whose final ``safedelta.status`` was made under the same policy
content is answered from the record (:mod:`mlflow_safedelta.recorded`; a pass still moves the
promotion alias when asked) unless ``force``. Otherwise the job runs these steps, each a function
below with its inputs and outputs explicit (every boundary is a recovery point):

1. :func:`resolve_inputs` tag ``status=running``; find the parent (``safedelta.parent`` tag,
   the ``safedelta`` flavor, or the run's tag); download parent, fine-tune and task data;
2. :func:`prepare` the parent's Hessian cache (:mod:`mlflow_safedelta.hessian_cache`);
3. :func:`protect_step` Safe Delta with the policy's ``s`` or the ``s`` searched for its target;
4. :func:`evaluate` aligned, fine-tuned and protected models;
5. :func:`decide` the policy's verdict (pure: :mod:`mlflow_safedelta.verdict`);
6. record: :func:`record_run` (ONE run: params, metrics, reports, plots, rule results),
   :func:`register_protected` (a NEW version, ``safedelta.role=protected``), :func:`finish`
   (``safedelta/gate.json``, the version's tags);
7. :func:`promote_version` move the alias, last, and only for a pass.

Nothing registered is deleted or overwritten. Any exception: ``safedelta.status=error`` with a
reason, the run marked FAILED, no alias moved; the result has ``verdict="error"``.

Crash safety: every side effect carries the job key (``recovery.job_key``: the registered version
for good and the policy content), so a worker that takes over a dead one's job adopts the RUNNING
run and the protected version it made and closes what it cannot adopt (all in
:mod:`mlflow_safedelta.recovery`, with the step boundaries ``recovery.FAULT_POINTS`` and the
test-only fault injection, called between the steps below).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mlflow_safedelta import governance, guard
from mlflow_safedelta import registry as reg
from mlflow_safedelta.errors import GateJobError, error_reason
from mlflow_safedelta.hessian_cache import ensure_hessians
from mlflow_safedelta.policy import (
    Policy,
    policy_fingerprint,
)
from mlflow_safedelta.recorded import recorded_policy, reuse_recorded
from mlflow_safedelta.recovery import (
    adopt_protected,
    adopt_run,
    close_dead_runs,
    fault_point,
    job_key,
    settle_recorded,
    terminate_run,
)
from mlflow_safedelta.redact import redact_text, redact_uri
from mlflow_safedelta.verdict import (
    GateResult,
    GateVerdict,
    evaluate_policy,
    render_markdown,
    verdict_headline,
    with_verdict_block,
)
from mlflow_safedelta.vocab import (
    GATE_ARTIFACT,
    GATE_EXPERIMENT,
    GATE_PASSED_METRIC,
    ROLE_PROTECTED,
    RUN_KIND_GATE,
    RUN_TAG_KIND,
    RUN_TAG_MODEL,
    RUN_TAG_VERSION,
    STATUS_ERROR,
    TAG_JOB_KEY,
    TAG_POLICY,
    TAG_TASK_DATA,
    TAG_VERDICT,
)

_logger = logging.getLogger(__name__)

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


#: artifact URIs a registrant may name as task data: fetched only through MLflow's artifact
#: repositories, never a local file, a file:// URI or an arbitrary URL
_TASK_DATA_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def _resolve_task_data(cl: Any, policy: Policy, tags: dict[str, str], work: Path, *,
                       artifact_root: Path | None = None) -> str | None:
    """The task data file: the policy's (platform-chosen: a path or an artifact URI) or the
    version's ``safedelta.task_data`` tag (registrant-chosen: an MLflow artifact URI, or a path
    relative to the fine-tune's own downloaded artifact; anything else is an error naming the
    tag)."""
    from mlflow_safedelta.flavor.model_io import confine

    spec = policy.evaluation.task_data
    if spec and "://" not in spec and ":/" not in spec:
        return spec if Path(spec).is_file() else _download(cl, spec, work)
    if spec:
        return _download(cl, spec, work)
    spec = tags.get(TAG_TASK_DATA)
    if not spec:
        return None
    if spec.startswith(_TASK_DATA_SCHEMES):
        return _download(cl, spec, work)
    if ":" in spec.split("/", 1)[0]:
        raise GateJobError(f"{TAG_TASK_DATA}: only {', '.join(_TASK_DATA_SCHEMES)} URIs or a path "
                           "inside the fine-tune's own artifact are read")
    return str(confine(artifact_root or work, spec, TAG_TASK_DATA))


def _download(cl: Any, uri: str, work: Path) -> str:
    from mlflow.artifacts import download_artifacts

    return download_artifacts(artifact_uri=uri, dst_path=str(work / "task_data"),
                              tracking_uri=cl._tracking_client.tracking_uri)


@dataclass
class GateJob:
    """What every step of one gate reads: the version, the client, the policy and the options.
    Steps take it and return their own outputs explicitly; nothing else is shared."""

    cl: Any
    name: str
    version: str
    tags: dict[str, str]
    policy: Policy
    policy_sha: str
    work: Path
    evaluator: Evaluator
    job_key: str = ""
    policy_given: bool = False  # the caller chose the policy (not the version's tag)
    device: str | None = None
    cache_dir: str | Path | None = None
    promote: bool = True
    progress: bool = True
    #: governance: "enforced"/"unenforced", the bound policy's fingerprint, notes on the choice
    governance: str = "unenforced"
    bound_sha: str | None = None
    policy_notes: list[str] = field(default_factory=list)
    pg: "_Progress" = field(init=False)

    def __post_init__(self) -> None:
        self.pg = _Progress(f"{self.name} v{self.version}", self.progress)

    @property
    def tracking_uri(self) -> str:
        return self.cl._tracking_client.tracking_uri

    def engine_options(self) -> dict[str, Any]:
        return {"cache_dir": self.cache_dir, "device": self.device, "progress": self.progress}


@dataclass
class Inputs:
    """Step 1's output: the parent and both models on local disk, and the task data."""

    parent: reg.ParentInfo
    parent_dir: Path
    ft_dir: Path  # what Safe Delta reads (full weights or the adapter)
    ft_eval_dir: Path  # a full checkpoint for evaluation (an adapter merged onto the parent)
    ft_kind: str
    ft_flavor: str
    task_data: str | None


@dataclass
class Protection:
    """Step 3's output: the protected model, the Safe Delta report, the s used, the s search."""

    out: Path
    engine: Any
    s: float
    choice: Any = None


@dataclass
class Evaluation:
    """Step 4/5's output: the evaluation report, its finite metrics, and the policy verdict."""

    report: Any
    metrics: dict[str, dict[str, float]]
    verdict: GateVerdict


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
    fault_point("claimed")
    policy_given = policy is not None
    cl = reg.client(tracking_uri, registry_uri)
    mv = reg.resolve(cl, reg.ModelRef(model_name, version=version))
    gov = governance.current()
    tags = guard.readable_tags(gov, mv)  # state tags count only when the gate signed them
    governed = governance.resolve_policy(model_name, tags, requested=policy, gov=gov) \
        if gov is not None else None
    if governed is not None:
        policy = governed[0]
    if tags.get(reg.TAG_ROLE) == ROLE_PROTECTED:
        return GateResult(model=model_name, version=version, verdict=STATUS_ERROR,
                          reason=f"{model_name} version {version} is a protected output of the "
                                 "gate; gate the fine-tune it came from instead",
                          parent=tags.get(reg.TAG_PROTECTED_FROM))
    if tags.get(reg.TAG_STATUS) in reg.FINAL_STATUSES and not force:
        reused, loaded = reuse_recorded(cl, model_name, version, tags, policy, promote)
        if reused is not None:
            settle_recorded(cl, mv, tags)
            return reused
        policy = loaded or policy
    if policy is None and force:  # gate again under the content recorded, not a name or path
        policy = recorded_policy(cl, tags)

    result = GateResult(model=model_name, version=version, verdict=STATUS_ERROR, reason="")
    tmp_owner = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="safedelta-gate-")) if tmp_owner else Path(work_dir)
    job: GateJob | None = None
    run_id: str | None = None
    protected_version: str | None = None
    try:
        pol, bound, notes = governed or governance.resolve_policy(
            model_name, tags, requested=policy, gov=None)
        sha = policy_fingerprint(pol)
        job = GateJob(cl=cl, name=model_name, version=version, tags=tags, policy=pol,
                      policy_sha=sha, work=work, evaluator=evaluator or default_evaluator,
                      job_key=job_key(model_name, version, mv.creation_timestamp, sha),
                      device=device, cache_dir=cache_dir, promote=promote, progress=progress,
                      policy_given=policy_given, governance=governance.enforcement_label(gov),
                      bound_sha=policy_fingerprint(bound) if bound else None,
                      policy_notes=notes)
        result.policy = {"name": pol.name, "source": redact_uri(pol.source), "sha256": sha,
                         "promotion_alias": pol.promotion.target,
                         "governance": job.governance, "bound_sha256": job.bound_sha,
                         "notes": notes}
        inputs = resolve_inputs(job, mv)
        result.parent = inputs.parent.resolved_uri
        fault_point("tags")
        hessians = prepare(job, inputs)
        fault_point("hessians")
        protection = protect_step(job, inputs)
        fault_point("protect")
        evaluation = decide(job, evaluate(job, inputs, protection),
                            task_data_named=inputs.task_data is not None)
        run_id = record_run(job, inputs, hessians, protection, evaluation, result)
        fault_point("run")
        protected_version = register_protected(job, inputs, protection, evaluation, run_id)
        fault_point("registered")
        alias = pol.promotion.target if (promote and evaluation.verdict.passed) else None
        finish(job, evaluation, protection, result, run_id, protected_version, alias)
        fault_point("finish")
        if alias:  # last: only a fully recorded, passing version is promoted
            promote_version(job, alias, protected_version)
            fault_point("alias")
        elif gov is not None and not evaluation.verdict.passed:
            from mlflow_safedelta.enforce import demote_after_fail

            demote_after_fail(cl, gov, model_name)
        terminate_run(cl, run_id, "FINISHED")
        return result
    except Exception as exc:
        return record_error(cl, model_name, version, exc, result, run_id, protected_version,
                            job_key=job.job_key if job else None)
    finally:
        if tmp_owner:
            shutil.rmtree(work, ignore_errors=True)


# -- the steps, in order -----------------------------------------------------------------------

def resolve_inputs(job: GateJob, mv: Any) -> Inputs:
    """Step 1: mark the version running, find its parent, download both models and task data."""
    cl, name, version, work = job.cl, job.name, job.version, job.work
    reg.set_tags(cl, name, version, {reg.TAG_STATUS: reg.STATUS_RUNNING,
                                     reg.TAG_REASON: "gate job running",
                                     **_policy_tags(job), **_governance_tags(job)})
    parent = reg.find_parent(cl, mv)
    if not job.tags.get(reg.TAG_PARENT):  # record lineage found in the flavor; never overwrite
        reg.set_tags(cl, name, version, {reg.TAG_PARENT: parent.uri})
    work.mkdir(parents=True, exist_ok=True)
    with job.pg.step(f"downloading parent {parent.resolved_uri}"):
        ploc = reg.download_version(cl, parent.name, parent.version, work / "parent")
        if ploc.kind != "full":
            raise GateJobError(f"parent {parent.resolved_uri} is a LoRA adapter; the aligned "
                               "parent must hold full weights")
        parent_dir = reg.merge_tokenizer(ploc)
    with job.pg.step(f"downloading fine-tune models:/{name}/{version}"):
        floc = reg.download_version(cl, name, version, work / "finetuned")
        ft_dir = reg.merge_tokenizer(floc) if floc.kind == "full" else Path(floc.weights_dir)
        ft_eval_dir = _full_model_dir(floc, parent_dir, work / "finetuned_merged")
    return Inputs(parent=parent, parent_dir=parent_dir, ft_dir=ft_dir, ft_eval_dir=ft_eval_dir,
                  ft_kind=floc.kind, ft_flavor=floc.flavor,
                  task_data=_resolve_task_data(cl, job.policy, job.tags, work,
                                               artifact_root=work / "finetuned"))


def _policy_tags(job: GateJob) -> dict[str, str]:
    """The policy's content hash, and where it came from in a form that loads again: a shipped
    name or a file path as given (never a path rewritten to a name), else the policy's name. The
    version's own ``safedelta.policy`` tag is only replaced when the caller chose the policy."""
    from mlflow_safedelta.policy import SHIPPED_POLICIES

    out = {reg.TAG_POLICY_SHA256: job.policy_sha}
    src = job.policy.source
    label = src if src in SHIPPED_POLICIES or Path(src).is_file() else job.policy.name
    if job.policy_given or not job.tags.get(TAG_POLICY):
        out[reg.TAG_POLICY] = label
    return out


def prepare(job: GateJob, inputs: Inputs) -> Any:
    """Step 2: the parent's Hessian cache (downloaded from the registry, or built and attached)."""
    with job.pg.step("preparing the parent's Hessian cache"):
        return ensure_hessians(job.cl, inputs.parent, inputs.parent_dir, **job.engine_options())


def protect_step(job: GateJob, inputs: Inputs) -> Protection:
    """Step 3: Safe Delta with the policy's s (or the s searched for its ASR target)."""
    out = job.work / "protected"
    with job.pg.step("running Safe Delta"):
        engine, s, choice = _protect(inputs.parent_dir, inputs.ft_dir, out, job.policy,
                                     evaluator=job.evaluator, task_data=inputs.task_data,
                                     work=job.work, **job.engine_options())
    return Protection(out=out, engine=engine, s=s, choice=choice)


def evaluate(job: GateJob, inputs: Inputs, protection: Protection) -> Any:
    """Step 4: evaluate the aligned, fine-tuned and protected models on the policy's suites."""
    with job.pg.step("evaluating aligned, fine-tuned and protected models"):
        return job.evaluator({"aligned": inputs.parent_dir, "finetuned": inputs.ft_eval_dir,
                              "protected": protection.out}, job.policy,
                             task_data=inputs.task_data, **job.engine_options())


def decide(job: GateJob, report: Any, *, task_data_named: bool | None = None) -> Evaluation:
    """Step 5: the policy's verdict on the metrics (pure; see :mod:`mlflow_safedelta.verdict`);
    ``task_data_named``: whether the version or policy named task data (else the utility rule is
    not applicable, unless the policy requires task data)."""
    judge_used = (getattr(report, "judge", None) or {}).get("judge")
    judge_arg = judge_used if judge_used and \
        judge_used.split(":")[0] != job.policy.safety.judge_spec.split(":")[0] else None
    return Evaluation(report=report, metrics=_finite_metrics(report.metrics),
                      verdict=evaluate_policy(job.policy, report.metrics, judge=judge_arg,
                                              task_data_named=task_data_named))


def record_run(job: GateJob, inputs: Inputs, hessians: Any, protection: Protection,
               evaluation: Evaluation, result: GateResult) -> str:
    """Step 6a: ONE run with params, per-role metrics, the engine and evaluation reports, the s
    search and the rule results. Returns the run id (also set on ``result``)."""
    cl, pol = job.cl, job.policy
    with job.pg.step("logging the run"):
        exp_id = reg.experiment_id(cl, GATE_EXPERIMENT)
        run_id = adopt_run(cl, job.job_key, job.name, job.version)
        if run_id is None:
            run = cl.create_run(exp_id, run_name=f"gate-{job.name}-v{job.version}", tags={
                RUN_TAG_KIND: RUN_KIND_GATE, RUN_TAG_MODEL: job.name,
                RUN_TAG_VERSION: job.version, reg.TAG_PARENT: inputs.parent.resolved_uri,
                reg.TAG_POLICY: pol.name, TAG_JOB_KEY: job.job_key})
            run_id = run.info.run_id
        result.run_id = run_id
        result.run_url = reg.run_url(redact_uri(job.tracking_uri), exp_id, run_id)
        _log_params_and_metrics(job, run_id, _gate_params(job, inputs, hessians, protection),
                                evaluation.metrics)
        _log_reports(job, run_id, protection, evaluation, model_uris={
            "aligned": inputs.parent.resolved_uri,
            "finetuned": f"models:/{job.name}/{job.version}",
            "protected": f"Safe Delta output of models:/{job.name}/{job.version} (gate run "
                         f"{run_id}; registered as a new version of models:/{job.name})"})
    return run_id


def register_protected(job: GateJob, inputs: Inputs, protection: Protection,
                       evaluation: Evaluation, run_id: str) -> str:
    """Step 6b: the protected model as a NEW version of the same registered model (``safedelta``
    flavor, parent recorded, ``safedelta.role=protected`` so no route gates it)."""
    from mlflow_safedelta import flavor

    pol, parent, engine = job.policy, inputs.parent, protection.engine
    with job.pg.step("registering the protected model"):
        adopted = adopt_protected(job.cl, job.job_key, job.name, job.version, run_id)
        if adopted is not None:
            reg.set_tags(job.cl, job.name, adopted,
                         {reg.TAG_VERDICT: evaluation.verdict.verdict})
            return adopted
        model_dir = job.work / "protected_mlflow_model"
        flavor.save_model(str(protection.out), model_dir, parent=parent.resolved_uri,
                          parent_fingerprint=engine.inputs.get("aligned_fingerprint")
                          if isinstance(engine.inputs, dict) else None,
                          role=ROLE_PROTECTED,
                          safedelta_config=dict(engine.config) if engine.config else None)
        verdict = evaluation.verdict
        headline = verdict_headline({"verdict": verdict.verdict, "reason": verdict.reason,
                                     "policy": {"name": pol.name}})
        pv = reg.register_logged_model(
            job.cl, model_dir, job.name, run_id=run_id, model_name="protected_model",
            experiment_id=reg.experiment_id(job.cl, GATE_EXPERIMENT),
            metrics={**evaluation.metrics.get("protected", {}),
                     GATE_PASSED_METRIC: float(verdict.passed)},
            params={"s": f"{protection.s:g}", "policy": pol.name,
                    "parent": parent.resolved_uri, "protected_from": f"{job.name}/{job.version}"},
            description=f"{headline}\n\nSafe Delta protection of version {job.version} against "
                        f"{parent.resolved_uri} (s={protection.s:g}, policy {pol.name})",
            tags={reg.TAG_ROLE: ROLE_PROTECTED,
                  reg.TAG_STATUS: reg.STATUS_PROTECTED_OUTPUT,
                  reg.TAG_PROTECTED_FROM: f"{job.name}/{job.version}",
                  reg.TAG_PARENT: parent.resolved_uri, reg.TAG_S: f"{protection.s:g}",
                  reg.TAG_POLICY: pol.name, reg.TAG_POLICY_SHA256: job.policy_sha,
                  reg.TAG_RUN_ID: run_id, reg.TAG_VERDICT: verdict.verdict,
                  TAG_JOB_KEY: job.job_key, **_governance_tags(job)})
    return str(pv.version)


def _governance_tags(job: GateJob) -> dict[str, str | None]:
    """Whether the gate was enforced, the bound policy, and why the policy is the one used."""
    return {reg.TAG_GOVERNANCE: job.governance, reg.TAG_BOUND_POLICY_SHA256: job.bound_sha,
            reg.TAG_POLICY_NOTE: "; ".join(job.policy_notes) or None}


def finish(job: GateJob, evaluation: Evaluation, protection: Protection, result: GateResult,
           run_id: str, protected_version: str, alias: str | None) -> None:
    """Step 6c: the verdict in ``safedelta/gate.json`` / ``gate.md`` and in the version's tags."""
    verdict = evaluation.verdict
    result.verdict, result.reason = verdict.verdict, verdict.reason
    result.rules, result.metrics = verdict.rules, evaluation.metrics
    result.protected_version, result.promoted_alias = protected_version, alias
    gate = result.to_dict()
    job.cl.log_dict(run_id, gate, GATE_ARTIFACT)
    job.cl.log_text(run_id, render_markdown(gate), "safedelta/gate.md")
    job.cl.set_tag(run_id, TAG_VERDICT, verdict.verdict)
    job.cl.set_tag(run_id, reg.TAG_PROTECTED_VERSION, protected_version)
    show_verdict(job, gate)
    reg.set_tags(job.cl, job.name, job.version, {
        reg.TAG_STATUS: verdict.verdict, reg.TAG_REASON: verdict.reason, **_policy_tags(job),
        reg.TAG_RUN_ID: run_id, reg.TAG_PROTECTED_VERSION: protected_version,
        reg.TAG_S: f"{protection.s:g}",
        reg.TAG_GATE_ARTIFACT: f"runs:/{run_id}/{GATE_ARTIFACT}", **_governance_tags(job)})


def show_verdict(job: GateJob, gate: dict) -> None:
    """Where reviewers look in the MLflow UI: the run's name starts with the verdict (the runs
    table cuts long names at the end) and its metric
    ``gate.passed`` (1/0) is a sortable column; the fine-tune's description starts with the
    verdict line (the registrant's own text kept below it)."""
    cl, verdict = job.cl, gate["verdict"]
    cl.update_run(gate["run_id"], name=f"{verdict.upper()} · gate-{job.name}-v{job.version}")
    cl.log_metric(gate["run_id"], GATE_PASSED_METRIC, float(verdict == reg.STATUS_PASSED))
    mv = cl.get_model_version(job.name, job.version)
    cl.update_model_version(job.name, job.version, description=with_verdict_block(
        mv.description, verdict_headline(gate), gate.get("run_url")))


def promote_version(job: GateJob, alias: str, protected_version: str) -> None:
    """Step 7: move the promotion alias to the passing protected version."""
    job.cl.set_registered_model_alias(job.name, alias, protected_version)


def record_error(cl: Any, name: str, version: str, exc: Exception, result: GateResult,
                 run_id: str | None, protected_version: str | None,
                 job_key: str | None = None) -> GateResult:
    """Any exception: ``status=error`` (``pending`` when transient: the caller re-raises and the
    queue retries) with the reason, the run marked FAILED (and a dead attempt's run of the same
    job too), the protected version's verdict ``error``, no alias moved."""
    reason = redact_text(error_reason(exc))
    _logger.error("gate of %s v%s: error: %s", name, version, reason)
    transient = _is_transient(exc)
    try:
        if run_id:
            cl.update_run(run_id, name=f"{STATUS_ERROR.upper()} · gate-{name}-v{version}")
            cl.set_tag(run_id, TAG_VERDICT, STATUS_ERROR)
            terminate_run(cl, run_id, "FAILED", reason)
        if job_key and not transient:
            close_dead_runs(cl, job_key, status="FAILED",
                            reason=f"a dead attempt of this gate job; the job ended in error: "
                                   f"{reason}")
        if protected_version:
            reg.set_tags(cl, name, protected_version, {reg.TAG_VERDICT: STATUS_ERROR})
        reg.set_tags(cl, name, version, {
            reg.TAG_STATUS: reg.STATUS_PENDING if transient else reg.STATUS_ERROR,
            reg.TAG_REASON: ("transient, will retry: " if transient else "") + reason,
            reg.TAG_RUN_ID: run_id})
    except Exception as tag_exc:  # the registry itself is down: the caller retries
        _logger.error("could not record the error on %s v%s: %s", name, version, tag_exc)
    if transient:
        raise exc
    result.verdict, result.reason = STATUS_ERROR, reason
    result.protected_version, result.promoted_alias = protected_version, None
    return result


# -- what the run holds ------------------------------------------------------------------------

def _gate_params(job: GateJob, inputs: Inputs, hessians: Any, protection: Protection) -> dict:
    pol = job.policy
    return {"model": job.name, "version": job.version, "parent": inputs.parent.resolved_uri,
            "parent_source": inputs.parent.source, "policy": pol.name,
            "policy_source": redact_uri(pol.source), "s": protection.s,
            "s_mode": pol.select_s.mode, "budget": pol.select_s.budget,
            "judge": pol.safety.judge_spec,
            "suites": ",".join(pol.safety.suites), "limit": pol.evaluation.limit,
            "max_new_tokens": pol.evaluation.max_new_tokens,
            "finetuned_kind": inputs.ft_kind, "finetuned_flavor": inputs.ft_flavor,
            "hessian_key": hessians.fingerprint, "hessian_cache_hit": hessians.cache_hit,
            "task_data": inputs.task_data or "none"}


def _log_params_and_metrics(job: GateJob, run_id: str, params: dict,
                            metrics: dict[str, dict[str, float]]) -> None:
    from mlflow.entities import Metric, Param

    ts = int(time.time() * 1000)
    logged = job.cl.get_run(run_id).data  # an adopted run keeps what its dead attempt logged
    job.cl.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()
                                     if k not in logged.params],
                     metrics=[] if logged.metrics else
                     [Metric(f"{role}.{k}", v, ts, 0) for role, m in metrics.items()
                      for k, v in m.items() if v is not None])


def _log_reports(job: GateJob, run_id: str, protection: Protection,
                 evaluation: Evaluation, model_uris: dict[str, str] | None = None) -> None:
    """The engine and evaluation reports, the s search and the rule results. The evaluation
    report names the models by ``models:/`` URI, not by the worker's scratch directories."""
    cl, work = job.cl, job.work
    if model_uris and isinstance(getattr(evaluation.report, "models", None), dict):
        evaluation.report.models = {r: model_uris.get(r, p)
                                    for r, p in evaluation.report.models.items()}
    protection.engine.save(work / "engine")
    cl.log_artifacts(run_id, str(work / "engine"), "engine")
    if hasattr(evaluation.report, "save"):
        evaluation.report.save(work / "eval")
        cl.log_artifacts(run_id, str(work / "eval"), "eval")
    if protection.choice is not None:
        (work / "choose_s_out").mkdir(exist_ok=True)
        (work / "choose_s_out" / "choose_s.json").write_text(
            json.dumps(protection.choice.to_dict(), indent=2, default=str))
        protection.choice.plot(work / "choose_s_out" / "choose_s.png")
        cl.log_artifacts(run_id, str(work / "choose_s_out"), "choose_s")
    verdict = evaluation.verdict
    cl.log_dict(run_id, {"policy": job.policy.model_dump(mode="json"),
                         "rules": [r.to_dict() for r in verdict.rules],
                         "passed": verdict.passed}, "safedelta/validation.json")
