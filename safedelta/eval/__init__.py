"""Measuring safety and utility: suites, generation, judges, utility, validated tables,
reports, and choosing ``s`` from a safety target.

Example::

    from safedelta.eval import evaluate_models, GenerationSettings
    rep = evaluate_models({"aligned": "models/aligned", "finetuned": "models/ft",
                           "protected": "out/protected"},
                          ["advbench", "xstest-safe"],
                          generation=GenerationSettings(max_new_tokens=128),
                          task_data="data/heldout.jsonl", limit=50)
    rep.metrics["protected"]["asr.advbench"], rep.save("eval-report")

Nothing here imports torch, transformers, great-expectations or matplotlib at import time.
"""

from __future__ import annotations

from safedelta.eval.choose_s import ChooseSResult, choose_s, choose_s_for_models
from safedelta.eval.generation import (PAPER_SYSTEM_PROMPT, GenerationCache, GenerationError,
                                       GenerationSettings, generate)
from safedelta.eval.judges import (CombinedJudge, Judge, JudgeError, KeywordJudge,
                                   LlamaGuardJudge, LLMJudge, MiniLMJudge, Verdict,
                                   compliance_without_content, get_judge, register_judge)
from safedelta.eval.report import EvalReport
from safedelta.eval.runner import evaluate_models
from safedelta.eval.stats import bootstrap_ci, rate_summary
from safedelta.eval.suites import BUILTIN_SUITES, Suite, SuiteError, builtin_suite, load_suite
from safedelta.eval.tables import TableValidationError, validate_table
from safedelta.eval.utility import (NoUtilityGain, UtilityError, register_task_metric,
                                    task_loss, utility_retention)

__all__ = [
    "BUILTIN_SUITES", "ChooseSResult", "CombinedJudge", "MiniLMJudge",
    "compliance_without_content", "register_judge", "EvalReport", "GenerationCache", "GenerationError",
    "GenerationSettings", "Judge", "JudgeError", "KeywordJudge", "LLMJudge", "LlamaGuardJudge",
    "NoUtilityGain", "PAPER_SYSTEM_PROMPT", "Suite", "SuiteError", "TableValidationError",
    "UtilityError", "Verdict", "bootstrap_ci", "builtin_suite", "choose_s",
    "choose_s_for_models", "evaluate_models", "generate", "get_judge", "load_suite",
    "rate_summary", "register_task_metric", "task_loss", "utility_retention", "validate_table",
]
