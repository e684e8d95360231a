"""The aligned parent's Hessian cache, attached to the parent version in the registry.

Built once per parent (calibration pass, factorisations) and logged as artifacts of a run in
the ``safedelta-hessians`` experiment; the parent version's ``safedelta.hessian_run`` /
``safedelta.hessian_key`` tags point at it so gates on other machines download it instead of
rebuilding.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlflow_safedelta import registry as reg
from mlflow_safedelta.errors import GateJobError
from mlflow_safedelta.vocab import (
    HESSIAN_EXPERIMENT,
    RUN_KIND_HESSIAN_CACHE,
    RUN_TAG_KIND,
)

_logger = logging.getLogger(__name__)


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
        exp = reg.experiment_id(cl, experiment)
        run = cl.create_run(exp, run_name=f"hessians-{parent.name}-v{parent.version}",
                            tags={RUN_TAG_KIND: RUN_KIND_HESSIAN_CACHE,
                                  reg.TAG_PARENT: parent.resolved_uri,
                                  reg.TAG_HESSIAN_KEY: hs.fingerprint})
        cl.log_artifacts(run.info.run_id, str(hs.cache_path), f"hessians/{hs.fingerprint}")
        cl.set_terminated(run.info.run_id, "FINISHED")
        reg.set_tags(cl, parent.name, parent.version,
                     {reg.TAG_HESSIAN_RUN: run.info.run_id, reg.TAG_HESSIAN_KEY: hs.fingerprint})
    return hs




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
        hs = ensure_hessians(cl, parent, reg.merge_tokenizer(loc), cache_dir=cache_dir,
                             device=device, progress=progress)
        tags = reg.version_tags(cl, parent.name, parent.version)
        return {"parent": parent.resolved_uri, "hessian_key": hs.fingerprint,
                "hessian_run": tags.get(reg.TAG_HESSIAN_RUN), "cache_hit": hs.cache_hit,
                "cache_path": str(hs.cache_path), "linears": len(hs.weight_names),
                "n_samples": hs.n_samples, "n_tokens": hs.n_tokens}
    finally:
        if tmp_owner:
            shutil.rmtree(work, ignore_errors=True)
