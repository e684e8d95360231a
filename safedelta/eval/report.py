"""The evaluation report: metrics per model, validated tables, JSON, Markdown and plots.

Plots (matplotlib, Agg): ``asr.png`` (attack success / over-refusal per model with 95 %
intervals), ``utility.png`` (utility metrics per model), ``safety_utility.png`` (the
safety-utility plane with the aligned, fine-tuned and protected points) and, when the engine's
report is given, ``kept_fraction.png`` (kept share of delta entries per decoder layer).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROLE_ORDER = ("aligned", "finetuned", "protected")
UTILITY_KEYS = ("utility_retention", "gsm8k_accuracy", "rouge1", "rouge2", "rougeL",
                "exact_match", "task_loss")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@dataclass
class EvalReport:
    """What :func:`~safedelta.eval.evaluate_models` measured.

    Attributes:
        metrics: ``role -> metric -> value`` (``asr.<suite>`` with ``.ci_low``, ``.ci_high``,
            ``.n``; ``over_refusal.<suite>``; ``harmfulness.<suite>`` (LLM judge); task metrics;
            ``task_loss``; ``utility_retention``).
        tables: ``suite -> DataFrame`` (one row per prompt and model), validated.
        models: ``role -> model directory``.
        suites: each suite's description.
        judge: the judge's description (for the keyword judge: the exact list used).
        generation: the generation settings.
        warnings: things a reader must know (e.g. fine-tuning gained nothing).
    """

    metrics: dict[str, dict[str, float]]
    tables: dict[str, Any] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    suites: list[dict] = field(default_factory=list)
    judge: dict = field(default_factory=dict)
    generation: dict = field(default_factory=dict)
    engine_report: dict | None = None
    warnings: list[str] = field(default_factory=list)
    created_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        """JSON-ready dict (metrics, inputs, settings; tables are saved separately as CSV)."""
        return {
            "created_at": self.created_at,
            "models": {k: str(v) for k, v in self.models.items()},
            "suites": self.suites, "judge": self.judge, "generation": self.generation,
            "metrics": {r: {k: _clean(v) for k, v in m.items()} for r, m in self.metrics.items()},
            "warnings": self.warnings,
            "rows": {s: int(len(t)) for s, t in self.tables.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def load(cls, out_dir: str | Path) -> "EvalReport":
        """Read a report written by :meth:`save` (``report.json`` and ``tables/*.csv``)."""
        out = Path(out_dir)
        d = json.loads((out / "report.json").read_text(encoding="utf-8"))
        tables = {}
        if (out / "tables").is_dir():
            import pandas as pd

            tables = {p.stem: pd.read_csv(p) for p in sorted((out / "tables").glob("*.csv"))}
        nan = float("nan")
        return cls(metrics={r: {k: nan if v is None else v for k, v in m.items()}
                            for r, m in d["metrics"].items()},
                   tables=tables, models=d.get("models", {}), suites=d.get("suites", []),
                   judge=d.get("judge", {}), generation=d.get("generation", {}),
                   warnings=d.get("warnings", []), created_at=d.get("created_at", ""))

    def to_markdown(self) -> str:
        roles = _ordered_roles(self.metrics)
        lines = ["# Safety and utility evaluation", ""]
        lines.append("| model | " + " | ".join(roles) + " |")
        lines.append("|---|" + "---|" * len(roles))
        for key in _headline_keys(self.metrics):
            cells = [_fmt_metric(self.metrics[r], key) for r in roles]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines += ["", "Rates are means over prompts with seeded bootstrap 95 % intervals "
                  "and the number of prompts (n).", ""]
        lines.append("## Models")
        lines += [f"- **{r}**: `{p}`" for r, p in self.models.items()]
        lines += ["", "## Suites"]
        for s in self.suites:
            lines.append(f"- **{s['name']}** ({s['kind']}): {s.get('license') or 'user file'}"
                         + (f", `{s['file']}`" if s.get("file") else ""))
        j = self.judge
        lines += ["", "## Judge", f"- {j.get('judge')}"]
        if j.get("judge") == "keyword":
            lines.append(f"- list `{j.get('list')}` ({len(j.get('keywords', []))} strings, "
                         f"{j.get('rule')}): " + ", ".join(f"`{k}`" for k in j["keywords"]))
        lines += ["", "## Generation", "", "```json", json.dumps(self.generation, indent=2),
                  "```"]
        if self.warnings:
            lines += ["", "## Warnings"] + [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``report.json``, ``report.md``, ``tables/<suite>.csv`` and the plots."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files: dict[str, Path] = {}
        (out / "report.json").write_text(self.to_json(), encoding="utf-8")
        files["report.json"] = out / "report.json"
        (out / "report.md").write_text(self.to_markdown(), encoding="utf-8")
        files["report.md"] = out / "report.md"
        for s, t in self.tables.items():
            p = out / "tables" / f"{s}.csv"
            p.parent.mkdir(exist_ok=True)
            t.to_csv(p, index=False)
            files[f"tables/{s}.csv"] = p
        files.update(save_plots(self, out))
        return files


def _ordered_roles(metrics: dict) -> list[str]:
    return sorted(metrics, key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else 9, r))


def _headline_keys(metrics: dict) -> list[str]:
    keys: list[str] = []
    for m in metrics.values():
        for k in m:
            if not re.search(r"\.(ci_low|ci_high|n)$", k) and k not in keys:
                keys.append(k)
    # "<metric>.<suite>" is shown only when no plain "<metric>" alias exists
    return [k for k in keys if "." not in k or k.rsplit(".", 1)[0] not in keys]


def _fmt_metric(m: dict, key: str) -> str:
    v = m.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if f"{key}.ci_low" in m:
        return (f"{v:.3f} [{m[f'{key}.ci_low']:.3f}, {m[f'{key}.ci_high']:.3f}] "
                f"(n={int(m[f'{key}.n'])})")
    return f"{v:.4g}"


def kept_fraction_by_layer(engine_report: dict | None) -> dict[int, float]:
    """Kept share of delta entries per decoder layer from the engine's report dict.

    Tolerant of layout: any nested dict holding ``kept_fraction`` whose name mentions
    ``layers.<i>``; weighted by ``n_candidates`` when present, else a plain mean.
    """
    found: list[tuple[str, float, float]] = []  # (name, kept, weight)

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, dict):
            kf = obj.get("kept_fraction")
            if isinstance(kf, (int, float)):
                label = str(obj.get("name") or obj.get("module") or name)
                cand = obj.get("n_candidates")
                if isinstance(cand, (int, float)) and cand > 0:
                    found.append((label, float(kf) * cand, float(cand)))
                else:
                    found.append((label, float(kf), 1.0))
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")

    walk(engine_report or {}, "")
    per: dict[int, list[float]] = {}
    for label, kept, weight in found:
        m = re.search(r"(?:layers?|h|blocks?)\.(\d+)\.", label + ".")
        if m:
            acc = per.setdefault(int(m.group(1)), [0.0, 0.0])
            acc[0] += kept
            acc[1] += weight
    return {i: k / w for i, (k, w) in sorted(per.items()) if w > 0}


def kept_fraction_figure(per_layer: dict[int, float]):
    """A bar per decoder layer: the kept share of its delta entries, on an axis scaled to the
    data (real runs keep ~0.03 %: invisible on a 0..1 axis), each bar labelled in percent."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    values = list(per_layer.values())
    bars = ax.bar(list(per_layer), values)
    top = max(values) if values and max(values) > 0 else 1e-6
    ax.set_ylim(0, min(1.0, top * 1.25))
    decimals = max(0, min(6, 1 - math.floor(math.log10(top * 100)))) if top < 0.1 else 0
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=decimals))
    ax.bar_label(bars, labels=[f"{100 * v:.{decimals}f}%" for v in values], fontsize=7)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("kept share of the delta")
    ax.set_title("Safe Delta: share of the fine-tuning delta kept")
    return fig


def _utility_key(metrics: dict) -> str | None:
    for k in UTILITY_KEYS:
        if any(k in m and m[k] is not None and not math.isnan(m[k]) for m in metrics.values()):
            return k
    return None


def save_plots(report: EvalReport, out: Path) -> dict[str, Path]:
    """Write the report's plots into ``out``; returns ``{file name: path}``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    files: dict[str, Path] = {}
    roles = _ordered_roles(report.metrics)
    rate_keys = [k for k in _headline_keys(report.metrics)
                 if k.startswith(("asr.", "over_refusal."))]

    # 1. attack success / over-refusal per model
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rate_keys) * max(1, len(roles)) / 2), 3.8))
    width = 0.8 / max(1, len(roles))
    for j, r in enumerate(roles):
        m = report.metrics[r]
        xs = [i + j * width for i in range(len(rate_keys))]
        vals = [m.get(k, float("nan")) for k in rate_keys]
        err = [[max(0.0, v - m.get(f"{k}.ci_low", v)) for k, v in zip(rate_keys, vals)],
               [max(0.0, m.get(f"{k}.ci_high", v) - v) for k, v in zip(rate_keys, vals)]]
        ax.bar(xs, vals, width, yerr=err, capsize=3, label=r)
    ax.set_xticks([i + width * (len(roles) - 1) / 2 for i in range(len(rate_keys))])
    ax.set_xticklabels(rate_keys, rotation=15, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate (95 % bootstrap CI)")
    ax.set_title("Attack success and over-refusal per model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files["asr.png"] = out / "asr.png"
    fig.savefig(files["asr.png"], dpi=110)
    plt.close(fig)

    # 2. utility per model
    ukeys = [k for k in UTILITY_KEYS if any(k in report.metrics[r] for r in roles)]
    if ukeys:
        fig, axes = plt.subplots(1, len(ukeys), figsize=(3.2 * len(ukeys), 3.4), squeeze=False)
        for ax, k in zip(axes[0], ukeys):
            vals = [report.metrics[r].get(k, float("nan")) for r in roles]
            ax.bar(roles, vals, color=[f"C{i}" for i in range(len(roles))])
            ax.set_title(k, fontsize=9)
            ax.tick_params(axis="x", labelsize=8, rotation=15)
        fig.suptitle("Utility per model")
        fig.tight_layout()
        files["utility.png"] = out / "utility.png"
        fig.savefig(files["utility.png"], dpi=110)
        plt.close(fig)

    # 3. safety-utility plane
    asr_keys = [k for k in rate_keys if k.startswith("asr.")]
    ukey = _utility_key(report.metrics)
    if asr_keys and ukey:
        fig, ax = plt.subplots(figsize=(4.8, 4.0))
        for i, r in enumerate(roles):
            m = report.metrics[r]
            x, y = m.get(ukey), m.get(asr_keys[0])
            if x is None or y is None or math.isnan(x) or math.isnan(y):
                continue
            ax.scatter([x], [y], s=60, color=f"C{i}", label=r, zorder=3)
            ax.annotate(r, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xlabel(ukey + (" (lower is better)" if ukey == "task_loss" else ""))
        ax.set_ylabel(asr_keys[0] + " (lower is safer)")
        ax.set_title("Safety-utility plane")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        files["safety_utility.png"] = out / "safety_utility.png"
        fig.savefig(files["safety_utility.png"], dpi=110)
        plt.close(fig)

    # 4. per-layer kept fraction from the engine's report
    per_layer = kept_fraction_by_layer(report.engine_report)
    if per_layer:
        fig = kept_fraction_figure(per_layer)
        fig.tight_layout()
        files["kept_fraction.png"] = out / "kept_fraction.png"
        fig.savefig(files["kept_fraction.png"], dpi=110)
        plt.close(fig)
    return files
