"""Wait for the server's verdict: find a registered fine-tune's gate and read it when it ends.

The gate runs where the models are (the tracking server's worker); a CI check only *reads* it.
:func:`find_version` names the version from what a pull request knows: the version, an alias,
the run that logged it, or the git commit of that run (MLflow's ``mlflow.source.git.commit``
run tag). :func:`wait_for_verdict` polls the version's ``safedelta.status`` until it is final
(``passed`` | ``failed`` | ``error``) and returns the stored gate result; ``pending``, ``running``
or no status yet keep it waiting, up to a timeout, after which the result is an ``error`` that
says what the version was still doing. Nothing is downloaded but the small ``gate.json``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from mlflow_safedelta import registry as reg
from mlflow_safedelta.errors import RegistryError
from mlflow_safedelta.recorded import stored_gate
from mlflow_safedelta.verdict import GateResult
from mlflow_safedelta.vocab import FINAL_STATUSES, ROLE_PROTECTED, STATUS_ERROR

_logger = logging.getLogger(__name__)

#: the run tag MLflow sets to the git commit a run was logged from
GIT_COMMIT_TAG = "mlflow.source.git.commit"


def find_version(cl: Any, model: str, *, version: str = "", alias: str = "", run_id: str = "",
                 commit: str = "") -> str:
    """The version number of ``model`` named by exactly one of ``version``, ``alias``,
    ``run_id`` (the run that logged it) or ``commit`` (its run's git commit). For a run or a
    commit with several fine-tuned versions, the newest; the gate's own protected outputs never
    count. Raises :class:`RegistryError` naming what was looked for."""
    named = {"version": version, "alias": alias, "run_id": run_id, "commit": commit}
    given = {k: v for k, v in named.items() if v}
    if len(given) != 1:
        raise RegistryError("name the version by exactly one of version, alias, run-id and "
                            f"commit (got {', '.join(given) or 'none'})")
    if version or alias:
        ref = reg.ModelRef(model, version=version or None, alias=alias or None)
        return str(reg.resolve(cl, ref).version)
    run_ids = {run_id} if run_id else _runs_of_commit(cl, commit)
    versions = [mv for rid in sorted(run_ids)
                for mv in cl.search_model_versions(f"name='{model}' and run_id='{rid}'")
                if (mv.tags or {}).get(reg.TAG_ROLE) != ROLE_PROTECTED]
    if not versions:
        what = f"run {run_id}" if run_id else f"commit {commit} ({len(run_ids)} runs)"
        raise RegistryError(f"no version of {model} was registered from {what}")
    return str(max(int(mv.version) for mv in versions))


def _runs_of_commit(cl: Any, commit: str) -> set[str]:
    """Ids of the runs (any experiment) tagged with this git commit (a full SHA, or a prefix of
    at least 7 characters)."""
    if len(commit) < 7 or not all(c in "0123456789abcdefABCDEF" for c in commit):
        raise RegistryError(f"commit must be a git SHA (7 to 40 hex digits), got {commit!r}")
    exp_ids = [e.experiment_id for e in cl.search_experiments()]
    flt = (f"tags.`{GIT_COMMIT_TAG}` = '{commit}'" if len(commit) == 40
           else f"tags.`{GIT_COMMIT_TAG}` LIKE '{commit.lower()}%'")
    out: set[str] = set()
    for i in range(0, len(exp_ids), 100):  # the search API takes at most 100 experiments
        out |= {r.info.run_id for r in cl.search_runs(exp_ids[i:i + 100], flt, max_results=1000)}
    return out


def wait_for_verdict(model: str, version: str, *, tracking_uri: str | None = None,
                     registry_uri: str | None = None, timeout: float = 3600.0,
                     interval: float = 15.0, on_wait: Callable[[str, str], None] | None = None,
                     sleep: Callable[[float], None] = time.sleep,
                     clock: Callable[[], float] = time.monotonic) -> GateResult:
    """Poll ``model`` ``version`` until its gate ends; return the stored result.

    Args:
        model, version: the fine-tuned version.
        tracking_uri, registry_uri: the server.
        timeout: seconds to wait for a final status; then the result is ``error`` (the version
            keeps its state: the server may still finish).
        interval: seconds between polls.
        on_wait: called with (status, reason) each time the version is not final yet.

    Returns:
        The :class:`GateResult` recorded by the server's gate (``verdict`` passed, failed or
        error), or an ``error`` result on timeout.
    """
    cl = reg.client(tracking_uri, registry_uri)
    deadline = clock() + timeout
    while True:
        tags = reg.version_tags(cl, model, str(version))
        status = tags.get(reg.TAG_STATUS) or ""
        if tags.get(reg.TAG_ROLE) == ROLE_PROTECTED:
            return GateResult(model=model, version=str(version), verdict=STATUS_ERROR,
                              reason=f"{model} version {version} is a protected output of the "
                                     "gate; check the fine-tune it came from")
        # a pass or fail is complete once its run is named too (the tags are written one by one)
        if status in FINAL_STATUSES and (status == STATUS_ERROR or tags.get(reg.TAG_RUN_ID)):
            return stored_gate(model, str(version), tracking_uri=tracking_uri,
                               registry_uri=registry_uri)
        if clock() >= deadline:
            doing = f"is still {status}" if status else f"has no {reg.TAG_STATUS} tag yet"
            why = tags.get(reg.TAG_REASON)
            return GateResult(
                model=model, version=str(version), verdict=STATUS_ERROR,
                parent=tags.get(reg.TAG_PARENT),
                reason=f"no verdict after {timeout:g} s: {model} version {version} {doing}"
                       + (f" ({why})" if why else "")
                       + ("" if status else "; is the server's gate worker running?"))
        if on_wait:
            on_wait(status or "unseen", tags.get(reg.TAG_REASON) or "")
        sleep(max(0.0, min(interval, deadline - clock())))
