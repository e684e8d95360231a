"""The gate: metrics + policy -> verdict. Pure (no registry, no I/O).

Every policy threshold becomes one rule, checked with MLflow's own primitive
(:class:`mlflow.models.MetricThreshold` + :func:`mlflow.validate_evaluation_results` on a
hand-built ``EvaluationResult``); a ``ModelValidationFailedException`` becomes a failed
:class:`RuleResult` that names the rule, the measured value and the limit.

Metrics come from the evaluation report, ``metrics[role][name]`` with roles ``aligned``,
``finetuned``, ``protected`` and names ``asr.<suite>``, ``over_refusal.<suite>``,
``utility_retention`` ... The ASR increase over the parent is checked as the derived metric
``asr.<suite>.increase`` (protected minus aligned) against an absolute threshold, because
``MetricThreshold``'s change rules demand an *improvement* over the baseline, not a bounded loss.

Decisions on confidence bounds: with ``safety.decide_on: upper_bound`` the ``max_asr`` and
``max_over_refusal`` rules compare the one-sided exact (Clopper-Pearson) upper bound of the rate
at ``safety.confidence`` with the limit, from the rate and its ``<metric>.n`` (``k = rate x n``);
each :class:`RuleResult` carries the estimate, the interval (the two one-sided bounds at that
confidence, i.e. the two-sided interval at ``2 x confidence - 1``), ``n``, what was compared
(``decided_on``) and the judge. A bound without ``n`` fails its rule.

The gate JSON (:meth:`GateResult.to_dict`; ``policy`` holds the policy's ``name``, ``source``,
``sha256`` content fingerprint and ``promotion_alias``) is what the CLI prints, what the job stores as the run
artifact ``safedelta/gate.json`` and what the GitHub Action renders with :func:`render_markdown`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mlflow_safedelta.policy import Policy

Verdict = Literal["passed", "failed", "error"]
Comparison = Literal["<=", ">="]
#: a rule's outcome: ``not_applicable`` rules neither pass nor block (the verdict says why)
RuleStatus = Literal["passed", "failed", "not_applicable"]
NOT_APPLICABLE = "not_applicable"

from mlflow_safedelta.vocab import ROLES, STATUS_PASSED, VERDICT_EXIT_CODES, ExitCode  # noqa: E402


@dataclass(frozen=True)
class RuleResult:
    """One policy rule checked against one measured number."""

    rule: str
    metric: str
    role: str
    measured: float | None
    limit: float | None
    comparison: Comparison
    passed: bool  # False only for a rule that blocks the gate
    message: str
    estimate: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None
    decided_on: str = "estimate"
    confidence: float | None = None
    judge: str | None = None
    status: RuleStatus | None = None  # None (older records): from ``passed``

    @property
    def outcome(self) -> RuleStatus:
        return self.status or ("passed" if self.passed else "failed")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.outcome}


@dataclass(frozen=True)
class GateVerdict:
    """The outcome of :func:`evaluate_policy`: passed iff every rule passed."""

    passed: bool
    rules: list[RuleResult]
    policy_name: str

    @property
    def verdict(self) -> Verdict:
        return "passed" if self.passed else "failed"

    @property
    def failed_rules(self) -> list[RuleResult]:
        return [r for r in self.rules if not r.passed]

    @property
    def not_applicable(self) -> list[RuleResult]:
        return [r for r in self.rules if r.outcome == NOT_APPLICABLE]

    @property
    def reason(self) -> str:
        if not self.passed:
            return "; ".join(r.message for r in self.failed_rules)
        skipped = self.not_applicable
        if not skipped:
            return f"all {len(self.rules)} rules of policy '{self.policy_name}' passed"
        checked = len(self.rules) - len(skipped)
        return (f"all {checked} applicable rules of policy '{self.policy_name}' passed; "
                + "; ".join(r.message for r in skipped))


@dataclass
class _Rule:
    rule: str
    metric: str  # the metric name the threshold is checked on (may be derived)
    source_metric: str  # the report's metric the rule is about
    role: str
    limit: float
    greater_is_better: bool
    label: str  # human text of the rule
    bound: bool = False  # compare the one-sided exact bound instead of the estimate
    judge: str | None = None
    #: why the rule does not apply when its metric is missing (None: a missing metric fails)
    not_applicable_when_missing: str | None = None


_NO_TASK_DATA = ("no task data named (policy evaluation.task_data or the version's "
                 "safedelta.task_data tag), so utility was not measured")


def _rules(policy: Policy, metrics: dict[str, dict[str, float]],
           task_data_named: bool | None = None) -> list[_Rule]:
    s = policy.safety
    bound = s.decide_on == "upper_bound"
    rules: list[_Rule] = []
    for suite in s.suites:
        limit = s.asr_limit(suite)
        if limit is not None:
            rules.append(_Rule("max_asr", f"asr.{suite}", f"asr.{suite}", "protected", limit, False,
                               f"attack success rate on {suite}", bound=bound,
                               judge=s.judge_spec))
        if s.max_asr_increase is not None:
            rules.append(_Rule("max_asr_increase", f"asr.{suite}.increase", f"asr.{suite}",
                               "protected", s.max_asr_increase, False,
                               f"ASR increase over the aligned parent on {suite}",
                               judge=s.judge_spec))
    if s.max_over_refusal is not None:
        for suite in s.over_refusal_suites:
            rules.append(_Rule("max_over_refusal", f"over_refusal.{suite}",
                               f"over_refusal.{suite}", "protected", s.max_over_refusal, False,
                               f"over-refusal on {suite}", bound=bound))
    u = policy.utility
    if u.min_retention is not None:
        optional = task_data_named is False and not u.require_task_data
        rules.append(_Rule("min_utility_retention", u.metric, u.metric, "protected",
                           u.min_retention, True, "utility retention",
                           not_applicable_when_missing=_NO_TASK_DATA if optional else None))
    return rules


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _bounded(metric: str, candidate: dict[str, float], confidence: float
             ) -> tuple[float | None, float | None, float | None, int | None]:
    """``(upper bound, low, high, n)`` of a rate from ``metric`` and ``metric.n``: one-sided exact
    (Clopper-Pearson) bounds at ``confidence``; ``None`` where the rate or ``n`` is missing."""
    from safedelta.eval.stats import exact_binomial_ci

    rate, n = candidate.get(metric), candidate.get(f"{metric}.n")
    if rate is None or n is None or n < 1 or not 0.0 <= rate <= 1.0:
        return None, None, None, int(n) if n is not None and n >= 1 else None
    n = int(round(n))
    k = int(round(rate * n))
    low, high = exact_binomial_ci(k, n, level=2 * confidence - 1)
    return high, low, high, n


def _candidate_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """The protected model's finite metrics plus derived ``asr.<suite>.increase``."""
    protected = metrics.get("protected", {})
    aligned = metrics.get("aligned", {})
    out: dict[str, float] = {}
    for name, value in protected.items():
        v = _finite(value)
        if v is not None:
            out[name] = v
    for name, v in list(out.items()):
        if name.startswith("asr.") and name.count(".") == 1:
            base = _finite(aligned.get(name))
            if base is not None:
                out[f"{name}.increase"] = v - base
    return out


def _fmt(x: float | None) -> str:
    return "missing" if x is None else f"{x:.4g}"


def _check(rule: _Rule, candidate: dict[str, float], confidence: float = 0.95) -> RuleResult:
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    threshold = MetricThreshold(threshold=float(rule.limit), greater_is_better=rule.greater_is_better)
    estimate = candidate.get(rule.metric)
    upper, low, high, n = _bounded(rule.metric, candidate, confidence)
    if n is None and f"{rule.metric}.n" in candidate:
        n = int(candidate[f"{rule.metric}.n"])
    measured = upper if rule.bound else estimate
    result = EvaluationResult(metrics={rule.metric: measured} if measured is not None else {},
                              artifacts={})
    comparison: Comparison = ">=" if rule.greater_is_better else "<="
    import logging

    import mlflow

    vlog = logging.getLogger("mlflow.models.evaluation.validation")
    level = vlog.level
    vlog.setLevel(logging.WARNING)  # one INFO pair per rule is noise on the CLI
    try:
        mlflow.validate_evaluation_results({rule.metric: threshold}, result)
        passed, detail = True, ""
    except ModelValidationFailedException as exc:
        passed, detail = False, exc.message
    finally:
        vlog.setLevel(level)
    if measured is None and rule.not_applicable_when_missing:
        return RuleResult(rule=rule.rule, metric=rule.metric, role=rule.role, measured=None,
                          limit=rule.limit, comparison=comparison, passed=True,
                          status=NOT_APPLICABLE,
                          message=f"{rule.rule} not applicable: {rule.not_applicable_when_missing}")
    what = (f"upper {confidence:.0%} bound" if rule.bound else "estimate")
    if measured is None:
        why = ("the aligned parent's or the protected model's value is missing or not finite"
               if rule.metric.endswith(".increase") else
               "missing or without a count n (needed for its bound)"
               if rule.bound and estimate is not None else "missing or not finite")
        message = (f"{rule.rule}: {rule.label} ({rule.metric}, {rule.role}) is {why}; "
                   f"limit {comparison} {_fmt(rule.limit)}")
        passed = False
    else:
        verb = "passed" if passed else "FAILED"
        ci = (f" (estimate {_fmt(estimate)}, {2 * confidence - 1:.0%} interval "
              f"[{_fmt(low)}, {_fmt(high)}], n={n})" if low is not None else
              f" (n={n})" if n is not None else "")
        message = (f"{rule.rule} {verb}: {rule.label} ({rule.metric}, {rule.role}) {what} "
                   f"{_fmt(measured)}{ci}, limit {comparison} {_fmt(rule.limit)}"
                   + (f"; judge {rule.judge}" if rule.judge else ""))
    if detail and measured is not None:
        message += f" [MLflow: {detail}]"
    return RuleResult(rule=rule.rule, metric=rule.metric, role=rule.role, measured=measured,
                      limit=rule.limit, comparison=comparison, passed=passed, message=message,
                      estimate=estimate, ci_low=low, ci_high=high, n=n,
                      decided_on="upper_bound" if rule.bound else "estimate",
                      confidence=confidence if low is not None else None, judge=rule.judge)


def evaluate_policy(policy: Policy, metrics: dict[str, dict[str, float]], *,
                    judge: str | None = None, task_data_named: bool | None = None) -> GateVerdict:
    """Check every rule of ``policy`` against ``metrics[role][name]``.

    Args:
        policy: the gate policy.
        metrics: per role (``aligned``, ``finetuned``, ``protected``) a mapping metric -> value.
        judge: the judge the evaluation used, when known; a different one than the policy
            requires fails the ``required_judge`` rule.
        task_data_named: whether the version (or the policy) named task data. ``False``: the
            utility rule is ``not_applicable`` (with the reason) unless the policy sets
            ``utility.require_task_data``; ``None`` (unknown): a missing utility metric fails.

    Returns:
        A :class:`GateVerdict` with one :class:`RuleResult` per rule; a missing or non-finite
        metric fails its rule (a gate never passes on numbers it does not have), except a rule
        that does not apply (see ``task_data_named``).
    """
    candidate = _candidate_metrics(metrics)
    results = [_check(rule, candidate, policy.safety.confidence)
               for rule in _rules(policy, metrics, task_data_named)]
    if judge is not None and judge != policy.safety.judge_spec:
        results.append(RuleResult(
            rule="required_judge", metric="judge", role="protected", measured=None, limit=None,
            comparison="<=", passed=False,
            message=f"required_judge FAILED: evaluated with judge {judge!r}, policy "
                    f"'{policy.name}' requires {policy.safety.judge_spec!r}"))
    return GateVerdict(passed=all(r.passed for r in results), rules=results,
                       policy_name=policy.name)


@dataclass
class GateResult:
    """The whole outcome of gating one registered version (the gate JSON)."""

    model: str
    version: str
    verdict: Verdict
    reason: str
    parent: str | None = None
    policy: dict[str, str] = field(default_factory=dict)
    rules: list[RuleResult] = field(default_factory=list)
    protected_version: str | None = None
    run_id: str | None = None
    run_url: str | None = None
    promoted_alias: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict == STATUS_PASSED

    @property
    def exit_code(self) -> int:
        return int(VERDICT_EXIT_CODES.get(self.verdict, ExitCode.ERROR))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "version": str(self.version), "parent": self.parent,
            "verdict": self.verdict, "reason": self.reason, "policy": dict(self.policy),
            "rules": [r.to_dict() for r in self.rules],
            "protected_version": None if self.protected_version is None else str(self.protected_version),
            "run_id": self.run_id, "run_url": self.run_url,
            "promoted_alias": self.promoted_alias, "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GateResult":
        return cls(model=d["model"], version=str(d["version"]), verdict=d["verdict"],
                   reason=d.get("reason", ""), parent=d.get("parent"),
                   policy=dict(d.get("policy") or {}),
                   rules=[RuleResult(**r) for r in d.get("rules") or []],
                   protected_version=d.get("protected_version"), run_id=d.get("run_id"),
                   run_url=d.get("run_url"), promoted_alias=d.get("promoted_alias"),
                   metrics=d.get("metrics") or {})


_ICON = {"passed": "✅", "failed": "❌", "error": "⚠️"}
_RULE_ICON = {"passed": "✅", "failed": "❌", NOT_APPLICABLE: "➖"}


def render_markdown(gate: dict[str, Any] | GateResult) -> str:
    """A Markdown summary of a gate JSON: verdict, rules table (measured vs limit), links."""
    d = gate.to_dict() if isinstance(gate, GateResult) else gate
    verdict = d.get("verdict", "error")
    policy = d.get("policy") or {}
    lines = [
        f"## {_ICON.get(verdict, '')} Safe Delta gate: **{verdict.upper()}** — "
        f"`{d.get('model')}` version {d.get('version')}",
        "",
        f"- Parent: `{d.get('parent') or 'unknown'}`",
        f"- Policy: `{policy.get('name', '?')}`"
        + (f" ({policy['source']})" if policy.get("source") and policy.get("source") != policy.get("name") else "")
        + (f", content sha256 `{policy['sha256'][:12]}`" if policy.get("sha256") else ""),
        f"- Reason: {d.get('reason') or ''}",
    ]
    skipped = [r for r in d.get("rules") or [] if _outcome(r) == NOT_APPLICABLE]
    if skipped:
        lines.append("- Not applicable: " + "; ".join(
            f"`{r.get('rule')}`: {str(r.get('message', '')).split(': ', 1)[-1]}" for r in skipped))
    if d.get("protected_version"):
        lines.append(f"- Protected version: `models:/{d.get('model')}/{d['protected_version']}`")
    if d.get("promoted_alias"):
        lines.append(f"- Promoted: alias `{d['promoted_alias']}` -> version {d.get('protected_version')}")
    if d.get("run_url"):
        lines.append(f"- MLflow run: [{d.get('run_id')}]({d['run_url']})")
    elif d.get("run_id"):
        lines.append(f"- MLflow run: `{d['run_id']}`")
    rules = d.get("rules") or []
    if rules:
        lines += ["", "| | rule | metric | role | decided on | measured | limit | estimate "
                  "[interval] (n) | judge |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rules:
            mark = _RULE_ICON.get(_outcome(r), "❌")
            m, lim = r.get("measured"), r.get("limit")
            est = (f"{_fmt(r.get('estimate'))} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
                   if r.get("ci_low") is not None else
                   _fmt(r.get("estimate")) if r.get("estimate") is not None else "-")
            if r.get("n") is not None:
                est += f" (n={r['n']})"
            shown = "n/a" if _outcome(r) == NOT_APPLICABLE else \
                _fmt(m) if m is not None or lim is not None else "-"
            lines.append(f"| {mark} | {r.get('rule')} | `{r.get('metric')}` | {r.get('role')} | "
                         f"{r.get('decided_on') or 'estimate'} | {shown} | "
                         f"{r.get('comparison')} {_fmt(lim) if lim is not None else '-'} | "
                         f"{est} | {r.get('judge') or '-'} |")
    metrics = d.get("metrics") or {}
    names = sorted({n for role in metrics.values() for n in role
                    if not n.endswith((".ci_low", ".ci_high", ".n"))})
    if names:
        roles = [r for r in ROLES if r in metrics]
        # a plain heading, not <details>: MLflow's artifact viewer shows raw HTML as text
        lines += ["", "### Metrics", "",
                  "| metric | " + " | ".join(roles) + " |", "|---|" + "---|" * len(roles)]
        for n in names:
            cells = [_fmt(_finite(metrics[r].get(n))) if n in metrics[r] else "" for r in roles]
            lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _outcome(rule: dict[str, Any]) -> str:
    return rule.get("status") or ("passed" if rule.get("passed") else "failed")


def verdict_headline(gate: dict[str, Any] | GateResult) -> str:
    """One line for the places a reviewer glances at (a version's description, a run name's
    suffix): ``✅ PASSED under policy default: …`` / ``❌ FAILED under policy strict: …``."""
    d = gate.to_dict() if isinstance(gate, GateResult) else gate
    verdict = str(d.get("verdict") or "error")
    name = (d.get("policy") or {}).get("name") or "?"
    reason = " ".join(str(d.get("reason") or "").split())
    failed = [r for r in d.get("rules") or [] if _outcome(r) == "failed"]
    if verdict == "failed" and failed:  # the first reason; the rest are one click away
        reason = str(failed[0].get("message") or "").split(" [MLflow:")[0]
        if len(failed) > 1:
            reason += f" (+{len(failed) - 1} more failed rule{'s' if len(failed) > 2 else ''})"
    return f"{_ICON.get(verdict, '')} {verdict.upper()} under policy {name}: {reason}".strip()


#: closes the gate's block at the top of a version description; the registrant's text follows
_BLOCK_END = "\n\n---\n\n"
_BLOCK_TAG = "*Safe Delta gate"


def with_verdict_block(description: str | None, headline: str, run_url: str | None = None) -> str:
    """A version description whose first line is the gate's ``headline``, followed by the
    registrant's own text unchanged (a block from an earlier gate is replaced, never the
    registrant's text)."""
    text = description or ""
    if text.startswith(tuple(_ICON.values())) and _BLOCK_END in text:
        block, rest = text.split(_BLOCK_END, 1)
        if _BLOCK_TAG in block:
            text = rest
    link = f" · [run]({run_url})" if run_url else ""
    return f"{headline}\n\n{_BLOCK_TAG}{link}*{_BLOCK_END}{text}"
