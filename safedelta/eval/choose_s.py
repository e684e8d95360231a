"""Choosing Safe Delta's ``s`` from a safety target.

Attack success grows with ``s`` (a larger budget keeps more of the fine-tuning delta). Given a
maximum ASR, :func:`choose_s` bisects ``s`` on *measured* ASR for the largest value that meets the
target and records the curve. It is written against two callables, so it does not depend on the
pipeline: ``protect_fn(s) -> model dir`` and ``evaluate_fn(model dir) -> ASR`` (or a dict with
``"asr"`` and other metrics). :func:`choose_s_for_models` wires in :func:`safedelta.protect` and
:func:`~safedelta.eval.evaluate_models`; Hessians and generations are cached, so each step costs
one solve plus the evaluation of new generations only.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from safedelta.errors import InvalidConfig

logger = logging.getLogger(__name__)


@dataclass
class ChooseSResult:
    """Outcome of the search.

    Attributes:
        s: the largest tried ``s`` whose ASR met the target; ``None`` when even ``s_lo`` fails.
        asr: its measured ASR.
        path: its model directory.
        curve: every evaluation as ``(s, asr, path, extras)``, sorted by ``s``.
        max_asr: the target.
        message: one line for a human.
    """

    s: float | None
    asr: float | None
    path: Path | None
    curve: list[tuple[float, float, Path, dict]] = field(default_factory=list)
    max_asr: float = 0.0
    message: str = ""

    @property
    def met(self) -> bool:
        return self.s is not None

    def to_dict(self) -> dict:
        return {"s": self.s, "asr": self.asr, "path": str(self.path) if self.path else None,
                "max_asr": self.max_asr, "met": self.met, "message": self.message,
                "curve": [{"s": s, "asr": a, "path": str(p), **x} for s, a, p, x in self.curve]}

    def plot(self, path: str | Path) -> Path:
        """ASR against ``s`` with the target line and the chosen point (PNG)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([c[0] for c in self.curve], [c[1] for c in self.curve], "o-", label="measured ASR")
        ax.axhline(self.max_asr, color="C3", ls="--", label=f"max ASR {self.max_asr:g}")
        if self.s is not None:
            ax.scatter([self.s], [self.asr], s=90, facecolors="none", edgecolors="k", zorder=3,
                       label=f"chosen s = {self.s:.4g}")
        ax.set_xlabel("s")
        ax.set_ylabel("attack success rate")
        ax.set_title("Choosing s")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _split(value: float | Mapping[str, Any]) -> tuple[float, dict]:
    if isinstance(value, Mapping):
        if "asr" not in value:
            raise InvalidConfig("evaluate_fn returned a dict without an 'asr' entry")
        return float(value["asr"]), {k: v for k, v in value.items() if k != "asr"}
    return float(value), {}


def choose_s(protect_fn: Callable[[float], Path],
             evaluate_fn: Callable[[Path], float | Mapping[str, Any]] | None = None, *,
             max_asr: float, s_lo: float = 0.0, s_hi: float = 1.0, iters: int = 6,
             policy: Callable[[float, dict], bool] | None = None,
             geometric: bool | None = None) -> ChooseSResult:
    """Bisect ``s`` in ``[s_lo, s_hi]`` for the largest value whose measured ASR <= ``max_asr``.

    Args:
        protect_fn: ``s -> directory`` of the model protected with that ``s``.
        evaluate_fn: ``directory -> ASR`` (or ``{"asr": ..., ...}``); default: keyword ASR on
            the built-in AdvBench evaluation split with greedy generation.
        max_asr: the target (a rate in [0, 1]).
        s_lo, s_hi: the search interval (ASR is assumed to grow with ``s``).
        iters: bisection steps after the two ends (evaluations <= iters + 2).
        policy: optional extra acceptance rule ``(asr, extras) -> bool`` (e.g. a full gate
            policy); a point is accepted when ASR meets ``max_asr`` *and* the policy passes.
        geometric: bisect in log space (default: when ``s_lo > 0``; ``s`` spans magnitudes).

    Returns:
        :class:`ChooseSResult`; ``s`` is ``s_hi`` if it already meets the target, ``None`` when
        ``s_lo`` does not.
    """
    if not (0.0 <= max_asr <= 1.0):
        raise InvalidConfig(f"max_asr must be a rate in [0, 1], got {max_asr}")
    if not (0.0 <= s_lo < s_hi) or not math.isfinite(s_hi):
        raise InvalidConfig(f"need 0 <= s_lo < s_hi < inf, got s_lo={s_lo}, s_hi={s_hi}")
    if iters < 0:
        raise InvalidConfig(f"iters must be >= 0, got {iters}")
    if evaluate_fn is None:
        evaluate_fn = _default_evaluate
    geometric = (s_lo > 0) if geometric is None else geometric
    if geometric and s_lo <= 0:
        raise InvalidConfig("geometric bisection needs s_lo > 0")
    curve: dict[float, tuple[float, Path, dict]] = {}

    def probe(s: float) -> bool:
        path = Path(protect_fn(s))
        asr, extras = _split(evaluate_fn(path))
        curve[s] = (asr, path, extras)
        ok = asr <= max_asr and (policy is None or policy(asr, extras))
        logger.info("s=%.6g: ASR %.4f -> %s", s, asr, "meets" if ok else "fails")
        return ok

    def result(s: float | None, message: str) -> ChooseSResult:
        pts = [(k, v[0], v[1], v[2]) for k, v in sorted(curve.items())]
        asr, path = (curve[s][0], curve[s][1]) if s is not None else (None, None)
        return ChooseSResult(s=s, asr=asr, path=path, curve=pts, max_asr=max_asr,
                             message=message)

    if probe(s_hi):
        return result(s_hi, f"s_hi={s_hi:g} already meets max ASR {max_asr:g}; "
                            "raise s_hi to look for a larger s")
    if not probe(s_lo):
        return result(None, f"even s_lo={s_lo:g} gives ASR {curve[s_lo][0]:.4f} > "
                            f"{max_asr:g}: no s in range meets the target")
    lo, hi = s_lo, s_hi
    for _ in range(iters):
        mid = math.sqrt(lo * hi) if geometric else (lo + hi) / 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return result(lo, f"largest s meeting ASR <= {max_asr:g}: {lo:.6g} "
                      f"(next tried failing value {hi:.6g})")


def _default_evaluate(path: Path) -> dict:
    from safedelta.eval.runner import evaluate_models

    rep = evaluate_models({"protected": path}, ["advbench"], progress=False)
    m = rep.metrics["protected"]
    return {"asr": m["asr.advbench"], "n": m["asr.advbench.n"]}


def choose_s_for_models(aligned: str | Path, finetuned: str | Path, out_dir: str | Path, *,
                        max_asr: float, s_lo: float | None = None, s_hi: float | None = None,
                        iters: int = 5,
                        config: Any = None, suite: Any = "advbench", limit: int | None = None,
                        judge: Any = "keyword", generation: Any = None,
                        device: str | None = None, cache_dir: str | Path | None = None,
                        calibration: str | Path | None = None, progress: bool = True,
                        geometric: bool | None = None) -> ChooseSResult:
    """:func:`choose_s` with :func:`safedelta.protect` and keyword ASR on ``suite``.

    Each tried ``s`` is written to ``out_dir/s_<value>`` (replaced when it exists: the Hessian
    cache makes a re-solve cheap); ``out_dir/choose_s.png`` shows the curve. ``config`` is a
    :class:`~safedelta.SafeDeltaConfig` whose ``s`` is replaced (its budget rule decides the
    scale of ``s``). Left out, the range is the budget's default ``s`` divided by 100 to times
    10, searched geometrically.
    """
    from safedelta.config import SafeDeltaConfig
    from safedelta.eval.runner import evaluate_models

    try:
        from safedelta.pipeline import protect
    except ImportError as exc:
        raise InvalidConfig(f"the protect pipeline is not available: {exc}") from exc
    from safedelta.config import DEFAULT_S

    base = config or SafeDeltaConfig()
    default_s = DEFAULT_S[base.budget]
    s_lo = default_s / 100 if s_lo is None else s_lo
    s_hi = default_s * 10 if s_hi is None else s_hi
    out_dir = Path(out_dir)
    extra: dict[str, Any] = {}
    params = inspect.signature(protect).parameters
    for k, v in (("device", device), ("cache_dir", cache_dir), ("progress", progress),
                 ("calibration", calibration), ("overwrite", True)):
        if k in params and v is not None:
            extra[k] = v

    def protect_fn(s: float) -> Path:
        out = out_dir / f"s_{s:.6g}"
        protect(aligned, finetuned, out, config=base.model_copy(update={"s": s}), **extra)
        return out

    def evaluate_fn(path: Path) -> dict:
        rep = evaluate_models({"protected": path}, [suite], judge=judge, generation=generation,
                              limit=limit, device=device, cache_dir=cache_dir, progress=progress)
        name = rep.suites[0]["name"]
        m = rep.metrics["protected"]
        return {"asr": m[f"asr.{name}"], "ci_low": m[f"asr.{name}.ci_low"],
                "ci_high": m[f"asr.{name}.ci_high"], "n": m[f"asr.{name}.n"]}

    res = choose_s(protect_fn, evaluate_fn, max_asr=max_asr, s_lo=s_lo, s_hi=s_hi, iters=iters,
                   geometric=geometric)
    res.plot(out_dir / "choose_s.png")
    return res
