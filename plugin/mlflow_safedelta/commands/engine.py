"""Engine commands: ``protect``, ``import-gguf``, ``generate-calibration``.

Each command parses its options, calls one ``safedelta`` function and renders the result (a
human summary, or JSON with ``--json``). Library errors become exit code 2 with the message.
"""

from __future__ import annotations

from pathlib import Path

import click

from mlflow_safedelta.cli import cli, emit_json, json_option, translate_errors, uri_options
from safedelta.budget import budget_names, default_s_help, rules_help
from safedelta.config import SafeDeltaConfig

_dir = click.Path(file_okay=False, path_type=Path)
_existing_dir = click.Path(exists=True, file_okay=False, path_type=Path)


class ModelDirOrUri(click.ParamType):
    """A model directory, or a registered model ``models:/name/version`` / ``models:/name@alias``
    (kept as a string; downloaded by :func:`mlflow_safedelta.registry.materialize`)."""

    name = "DIR|models:/URI"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.startswith("models:/"):
            from mlflow_safedelta.errors import RegistryError
            from mlflow_safedelta.registry import parse_models_uri

            try:
                parse_models_uri(value)
            except RegistryError as exc:
                self.fail(str(exc), param, ctx)
            return value
        return _existing_dir.convert(value, param, ctx)


@cli.command(name="protect")
@click.option("--aligned", required=True, type=ModelDirOrUri(),
              help="Aligned (parent) model directory: safetensors weights, config, tokenizer; "
                   "or a registered version, models:/NAME/VERSION or models:/NAME@ALIAS.")
@click.option("--finetuned", required=True, type=ModelDirOrUri(),
              help="Fine-tuned model directory of the same architecture, or a PEFT LoRA adapter "
                   "directory (adapter_config.json) trained on the aligned model; or a "
                   "registered version (models:/...), either flavor (safedelta, transformers).")
@click.option("--out", required=True, type=_dir,
              help="Output directory for the protected model (same sharding, config and "
                   "tokenizer as the aligned model) and safedelta_report.{json,md}.")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Safe calibration set: JSON Lines of {\"prompt\", \"response\"} or "
                   "{\"messages\": [...]}. Default: the shipped AdvBench refusals.")
@click.option("--s", "s", type=float, default=None,
              help=f"Safety budget, >= 0. {default_s_help()}")
@click.option("--budget", type=click.Choice(budget_names()), default=None,
              help=f"Budget rule: {rules_help()}.  "
                   f"[default: {SafeDeltaConfig.model_fields['budget'].default}]")
@click.option("--nonlinear", type=click.Choice(["aligned", "finetuned"]), default=None,
              help="Embeddings, norms and head: keep the aligned values (the paper) or the "
                   "fine-tuned ones. The discarded change is reported.  [default: aligned]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where the calibration pass and the solver run.  [default: cuda if available]")
@click.option("--cache-dir", type=_dir, default=None,
              help="Hessian and fingerprint cache.  [default: $SAFEDELTA_CACHE or "
                   "~/.cache/safedelta]")
@click.option("--overwrite", is_flag=True, help="Replace an output directory that holds a model.")
@click.option("--allow-pickle", is_flag=True,
              help="Accept pickle-based weights (*.bin); only for checkpoints you trust.")
@uri_options
@json_option
@translate_errors
def protect_cmd(aligned: str | Path, finetuned: str | Path, out: Path, calibration: Path | None,
                s: float | None, budget: str | None, nonlinear: str | None, device: str | None,
                cache_dir: Path | None, overwrite: bool, allow_pickle: bool,
                tracking_uri: str | None, registry_uri: str | None, json_: bool) -> None:
    """Repair a fine-tuned model against its aligned parent with Safe Delta.

    Checks both models (architecture, every tensor's shape, NaN/Inf), computes (or reuses from
    the cache) the aligned model's Hessians on the safe calibration set, then streams the
    checkpoints one tensor at a time: each decoder-block linear layer keeps the fine-tuned
    changes that fit the safety budget, with compensation. Nothing is written unless the whole
    run succeeds.

    \b
    Example usage:
      mlflow-safedelta protect --aligned models/chat --finetuned runs/ft --out models/ft-safe
      mlflow-safedelta protect --aligned models/chat --finetuned runs/lora --out out --s 1e-5 --json
      mlflow-safedelta protect --aligned models:/chat@production \\
          --finetuned models:/support-bot/3 --out models/ft-safe
    """
    import shutil
    import tempfile

    from mlflow_safedelta.registry import materialize
    from safedelta.pipeline import protect

    config = {k: v for k, v in (("s", s), ("budget", budget), ("nonlinear", nonlinear))
              if v is not None}
    uris = [str(x) for x in (aligned, finetuned) if str(x).startswith("models:/")]
    work = Path(tempfile.mkdtemp(prefix="safedelta-protect-")) if uris else None
    try:
        if work is not None:
            aligned = materialize(aligned, work / "aligned", tracking_uri=tracking_uri,
                                  registry_uri=registry_uri)
            finetuned = materialize(finetuned, work / "finetuned", tracking_uri=tracking_uri,
                                    registry_uri=registry_uri)
        report = protect(Path(aligned), Path(finetuned), out, calibration=calibration,
                         config=config, cache_dir=cache_dir, device=device, overwrite=overwrite,
                         allow_pickle=allow_pickle, progress=True)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    if json_:
        emit_json(report.to_dict())
    else:
        click.echo(report.summary())
        click.echo(f"\nProtected model: {out}  (report: {out / 'safedelta_report.md'})")


@cli.command(name="import-gguf")
@click.argument("file", metavar="FILE")
@click.argument("out", type=_dir)
@click.option("--overwrite", is_flag=True, help="Replace an output directory that holds files.")
@json_option
@translate_errors
def import_gguf_cmd(file: str, out: Path, overwrite: bool, json_: bool) -> None:
    """Convert a GGUF model into a safetensors checkpoint usable as an aligned model.

    FILE is a .gguf file, or the literal 'smollm2' for the bundled SmolLM2-135M-Instruct.
    OUT receives model.safetensors, config.json, generation_config.json and the tokenizer
    (with its chat template); the import is checked by comparing logits.

    \b
    Example usage:
      mlflow-safedelta import-gguf smollm2 models/smollm2
    """
    from safedelta.gguf import import_gguf

    path = import_gguf(file, out, overwrite=overwrite)
    if json_:
        emit_json({"source": file, "out": str(path)})
    else:
        click.echo(f"Imported {file} -> {path}")


@cli.command(name="generate-calibration")
@click.option("--aligned", required=True, type=_existing_dir,
              help="Aligned model directory (weights and tokenizer with a chat template).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSON Lines file to write ({\"prompt\", \"response\"} per line).")
@click.option("--n", "n", type=click.IntRange(min=1), default=128, show_default=True,
              help="Harmful prompts to answer (AdvBench calibration split).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Answer length limit.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the aligned model generates.")
@json_option
@translate_errors
def generate_calibration_cmd(aligned: Path, out: Path, n: int, max_new_tokens: int, device: str,
                             json_: bool) -> None:
    """Build a safe calibration set from the aligned model's own refusals.

    The aligned model answers harmful prompts; only the answers that refuse are kept, as the
    Safe Delta paper recommends. Use the file with 'protect --calibration'.

    \b
    Example usage:
      mlflow-safedelta generate-calibration --aligned models/chat --out calib.jsonl --n 64
    """
    from safedelta.calibration import generate_calibration

    result = generate_calibration(aligned, out, n=n, max_new_tokens=max_new_tokens,
                                  device=device, progress=True)
    if json_:
        emit_json(result)
    else:
        click.echo(f"Kept {result.get('kept')} of {result.get('prompts')} answers as refusals "
                   f"-> {out}")
