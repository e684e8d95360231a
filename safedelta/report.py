"""The report of one protect run: what was kept, what was discarded, what it cost.

:class:`ProtectReport` is filled by :func:`safedelta.protect` and saved beside the protected model
as ``safedelta_report.json`` (machine) and ``safedelta_report.md`` (human). It records, per linear
layer of the decoder blocks, the solver's statistics (candidates, kept entries, budget and cost
used, delta norms, safety loss); per non-linear tensor (embeddings, norms, head, biases) the norm
of the fine-tuned change and whether it was discarded; phase timings, peak memory (the run's
own, per phase), the Hessian cache outcome, the inputs (paths, content fingerprints, full
checkpoint or LoRA) and the config.

Example::

    report = protect("aligned", "finetuned", "out")
    print(report.summary())
    report.totals["kept_fraction"]
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPORT_JSON = "safedelta_report.json"
REPORT_MD = "safedelta_report.md"
REPORT_VERSION = 1


@dataclass
class ProtectReport:
    """Everything a protect run decided and measured.

    Attributes:
        inputs: ``aligned``, ``finetuned``, ``out``, ``calibration`` (paths), fingerprints,
            ``finetuned_kind`` (``"full"`` or ``"lora"``), ``n_samples``/``n_tokens`` of the
            calibration pass.
        config: the :class:`~safedelta.config.SafeDeltaConfig` as a dict (plus ``resolved_s``).
        matrices: weight name -> solver stats (``MatrixStats.as_dict()`` plus ``block``).
        nonlinear: tensor name -> ``{"delta_norm", "kept", "policy"}``; ``kept`` false means the
            fine-tuned change (of that norm) was discarded.
        timings: seconds per phase (``fingerprint``, ``hessians``, ``protect``, ``write``,
            ``total``).
        memory: this run's own peaks (:func:`safedelta.memory.memory_summary`):
            ``peak_rss_mib``, ``cuda_max_allocated_mib`` and per phase (``validate``,
            ``hessians``, ``stream``) under ``phases``; not the process's lifetime peak.
        cache: ``hit`` (bool) and ``path`` of the Hessian cache entry.
        device: where the solver ran.
    """

    inputs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    matrices: dict[str, dict[str, Any]] = field(default_factory=dict)
    nonlinear: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    versions: dict[str, str] = field(default_factory=dict)
    report_version: int = REPORT_VERSION

    # -- derived ------------------------------------------------------------------------------

    @property
    def totals(self) -> dict[str, Any]:
        """Sums over all matrices and non-linear tensors.

        ``kept_fraction`` = kept entries / candidate entries over all matrices;
        ``budget_used`` = summed cost / summed budget; norms are Frobenius norms over everything.
        """
        m = list(self.matrices.values())
        cand = sum(int(s.get("n_candidates", 0)) for s in m)
        kept = sum(int(s.get("n_kept", 0)) for s in m)
        budget = sum(float(s.get("budget", 0.0)) for s in m)
        cost = sum(float(s.get("cost_used", 0.0)) for s in m)
        dn = math.sqrt(sum(float(s.get("delta_norm", 0.0)) ** 2 for s in m))
        dk = math.sqrt(sum(float(s.get("delta_norm_kept", 0.0)) ** 2 for s in m))
        disc = [v for v in self.nonlinear.values() if not v.get("kept")]
        return {
            "n_matrices": len(m),
            "n_candidates": cand,
            "n_kept": kept,
            "kept_fraction": kept / cand if cand else 0.0,
            "budget": budget,
            "cost_used": cost,
            "budget_used": cost / budget if budget > 0 else 0.0,
            "safety_loss": sum(float(s.get("safety_loss", 0.0)) for s in m),
            "delta_norm": dn,
            "delta_norm_kept": dk,
            "n_nonlinear": len(self.nonlinear),
            "n_nonlinear_changed": sum(1 for v in self.nonlinear.values() if v["delta_norm"] > 0),
            "nonlinear_discarded_norm": math.sqrt(sum(v["delta_norm"] ** 2 for v in disc)),
            "nonlinear_kept_norm": math.sqrt(sum(v["delta_norm"] ** 2 for v in
                                                 self.nonlinear.values() if v.get("kept"))),
        }

    # -- output -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["totals"] = self.totals
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProtectReport":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "ProtectReport":
        """Read a saved report (a directory holding ``safedelta_report.json`` or the file)."""
        p = Path(path)
        p = p / REPORT_JSON if p.is_dir() else p
        return cls.from_dict(json.loads(p.read_text()))

    def _by_kind(self) -> list[tuple[str, int, int, int, float, float]]:
        """Per module kind (``self_attn.q_proj`` ...): matrices, candidates, kept, budget used."""
        kinds: dict[str, list[dict]] = {}
        for name, s in self.matrices.items():
            kind = re.sub(r"^.*?\.\d+\.", "", name).removesuffix(".weight")
            kinds.setdefault(kind, []).append(s)
        rows = []
        for kind, ss in sorted(kinds.items()):
            cand = sum(int(s.get("n_candidates", 0)) for s in ss)
            kept = sum(int(s.get("n_kept", 0)) for s in ss)
            budget = sum(float(s.get("budget", 0.0)) for s in ss)
            cost = sum(float(s.get("cost_used", 0.0)) for s in ss)
            rows.append((kind, len(ss), cand, kept, kept / cand if cand else 0.0,
                         cost / budget if budget > 0 else 0.0))
        return rows

    def _phase_peaks(self) -> str:
        phases = {k: v.get("peak_rss_mib") for k, v in (self.memory.get("phases") or {}).items()
                  if v.get("peak_rss_mib") is not None}
        return (" (" + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()) + ")"
                if phases else "")

    def summary(self) -> str:
        """A short human-readable table (what ``mlflow-safedelta protect`` prints)."""
        t = self.totals
        i = self.inputs
        lines = [
            f"Safe Delta: {i.get('finetuned')} ({i.get('finetuned_kind', 'full')}) against "
            f"{i.get('aligned')} -> {i.get('out')}",
            f"budget {self.config.get('budget')}, s={self.config.get('resolved_s')}, non-linear "
            f"parameters: {self.config.get('nonlinear')}; device {self.device}; Hessian cache "
            f"{'hit' if self.cache.get('hit') else 'miss'}",
            "",
            f"{'module':<24} {'matrices':>8} {'candidates':>12} {'kept':>12} {'kept %':>7} "
            f"{'budget used':>11}",
        ]
        for kind, n, cand, kept, frac, used in self._by_kind():
            lines.append(f"{kind:<24} {n:>8} {cand:>12} {kept:>12} {100 * frac:>6.2f}% "
                         f"{100 * used:>10.1f}%")
        lines.append(f"{'total':<24} {t['n_matrices']:>8} {t['n_candidates']:>12} "
                     f"{t['n_kept']:>12} {100 * t['kept_fraction']:>6.2f}% "
                     f"{100 * t['budget_used']:>10.1f}%")
        lines += [
            "",
            f"delta norm kept {t['delta_norm_kept']:.4g} of {t['delta_norm']:.4g}; non-linear "
            f"change {'discarded' if self.config.get('nonlinear') == 'aligned' else 'kept'}: "
            f"{t['n_nonlinear_changed']} of {t['n_nonlinear']} tensors changed, norm "
            f"{t['nonlinear_discarded_norm']:.4g} discarded",
            "time " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
            + f"; peak RSS {self.memory.get('peak_rss_mib')} MiB" + self._phase_peaks()
            + (f", GPU {self.memory['cuda_max_allocated_mib']} MiB"
               if self.memory.get("cuda_max_allocated_mib") is not None else ""),
        ]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The full report: summary, every matrix, every non-linear tensor."""
        out = ["# Safe Delta report", "", "```", self.summary(), "```", "",
               "## Inputs", ""]
        out += [f"- {k}: `{v}`" for k, v in self.inputs.items()]
        out += ["", "## Config", ""] + [f"- {k}: `{v}`" for k, v in self.config.items()]
        out += ["", "## Linear layers", "",
                "| weight | shape | candidates | kept | kept % | budget | cost used | "
                "delta norm | kept norm | safety loss |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, s in self.matrices.items():
            out.append(
                f"| {name} | {s.get('rows')}x{s.get('cols')} | {s.get('n_candidates')} | "
                f"{s.get('n_kept')} | {100 * float(s.get('kept_fraction', 0)):.2f} | "
                f"{float(s.get('budget', 0)):.4g} | {float(s.get('cost_used', 0)):.4g} | "
                f"{float(s.get('delta_norm', 0)):.4g} | {float(s.get('delta_norm_kept', 0)):.4g} | "
                f"{float(s.get('safety_loss', 0)):.4g} |")
        out += ["", "## Non-linear tensors", "", "| tensor | delta norm | kept |", "|---|---:|---|"]
        for name, v in self.nonlinear.items():
            out.append(f"| {name} | {v['delta_norm']:.4g} | {'yes' if v['kept'] else 'no'} |")
        return "\n".join(out) + "\n"

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``safedelta_report.json`` and ``safedelta_report.md`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / REPORT_JSON).write_text(self.to_json() + "\n")
        (d / REPORT_MD).write_text(self.to_markdown())
        return d / REPORT_JSON, d / REPORT_MD
