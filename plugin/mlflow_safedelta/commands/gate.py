"""Registry commands: ``gate``, ``prepare``, ``status``, ``report`` and the ``policy`` group.

Thin: each parses its options, calls one function of ``mlflow_safedelta.gate_job`` / ``registry`` /
``policy`` and renders the result. Exit codes of ``gate``: 0 passed, 1 failed, 2 error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mlflow_safedelta.cli import (
    UsageError,
    cli,
    echo_table,
    emit_json,
    json_option,
    needs_server,
    translate_errors,
)
from mlflow_safedelta.cli import uri_options as _uris
from mlflow_safedelta.extras import ENGINE, require


@cli.command()
@click.argument("model")
@click.argument("version", required=False)
@click.option("--alias", default=None, help="Gate the version this alias points at.")
@click.option("--policy", "policy_", default=None,
              help="Policy name (default, strict, permissive) or YAML file.  [default: the "
                   "version's safedelta.policy tag, else default]")
@click.option("--promote/--no-promote", default=True, show_default=True,
              help="Move the policy's alias to a passing protected version.")
@click.option("--force", is_flag=True, help="Re-run although the version already has a verdict.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where Safe Delta and evaluation run.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep downloads and the protected model here (default: a temporary dir).")
@click.option("--summary-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the verdict as Markdown (e.g. $GITHUB_STEP_SUMMARY).")
@_uris
@json_option
@translate_errors
@needs_server
def gate(model, version, alias, policy_, promote, force, device, work_dir, summary_file,
         tracking_uri, registry_uri, json_):
    """Protect, evaluate and gate one registered fine-tuned version.

    \b
    Examples:
      mlflow-safedelta gate support-bot 3 --policy strict
      mlflow-safedelta gate support-bot --alias candidate --json

    Exit codes: 0 passed, 1 failed, 2 error (reason in the output and in safedelta.reason).
    """
    from mlflow_safedelta import registry as reg
    from mlflow_safedelta.commands.demo import show_job_progress
    from mlflow_safedelta.gate_job import run_gate_job
    from mlflow_safedelta.verdict import render_markdown

    require(ENGINE)  # before the job: it would record an error verdict for a missing torch
    show_job_progress(not json_)
    if bool(version) == bool(alias):
        raise UsageError("give exactly one of VERSION or --alias")
    if alias:
        version = reg.resolve_alias(reg.client(tracking_uri, registry_uri), model, alias)
    result = run_gate_job(model, version, policy=policy_, tracking_uri=tracking_uri,
                          registry_uri=registry_uri, work_dir=work_dir, device=device,
                          promote=promote, force=force, progress=not json_)
    d = result.to_dict()
    if summary_file:
        summary_file.write_text(render_markdown(d))
    if json_:
        emit_json(d)
    else:
        click.echo(render_markdown(d))
    sys.exit(result.exit_code)


@cli.command()
@click.option("--parent", "parent_uri", required=True,
              help="The aligned parent: models:/NAME/VERSION or models:/NAME@ALIAS.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where the calibration pass runs.")
@_uris
@json_option
@translate_errors
@needs_server
def prepare(parent_uri, device, tracking_uri, registry_uri, json_):
    """Build a registered parent's Hessian cache and attach it to the parent version.

    Later gates of its fine-tunes, on any machine, download it instead of recomputing.
    """
    from mlflow_safedelta.commands.demo import show_job_progress
    from mlflow_safedelta.hessian_cache import prepare_parent

    require(ENGINE)
    show_job_progress(not json_)
    out = prepare_parent(parent_uri, tracking_uri=tracking_uri, registry_uri=registry_uri,
                         device=device, progress=not json_)
    if json_:
        emit_json(out)
    else:
        click.echo(f"{out['parent']}: Hessians {out['hessian_key']} "
                   f"({'reused' if out['cache_hit'] else 'built'}; {out['linears']} linears, "
                   f"{out['n_samples']} samples) attached as run {out['hessian_run']}")


@cli.command()
@click.argument("model", required=False)
@_uris
@json_option
@translate_errors
@needs_server
def status(model, tracking_uri, registry_uri, json_):
    """Gate state of registered versions (all models, or MODEL).

    The reason is printed in full (the last column)."""
    from mlflow_safedelta import registry as reg

    rows = reg.gate_states(reg.client(tracking_uri, registry_uri), model)
    if json_:
        emit_json(rows)
        return
    if not rows:
        click.echo("no registered versions" + (f" of {model}" if model else ""))
        return
    head = ("model", "version", "status", "role", "parent", "protected", "aliases", "reason")
    table = [head] + [(r["name"], r["version"], r["status"] or "-", r["role"] or "-",
                       r["parent"] or "-", r["protected_version"] or "-",
                       ",".join(r["aliases"]) or "-", r["reason"] or "") for r in rows]
    echo_table(table)
    click.echo("gate ENFORCED (governance file; only signed state shown)"
               if rows[0]["governance"] == "enforced" else
               "gate UNENFORCED: no governance file (SAFEDELTA_GOVERNANCE); verdicts are advisory")
    for r in rows:
        if r["override"]:
            o = r["override"]
            click.echo(f"OVERRIDE {r['name']} v{r['version']} alias {o['alias']!r} by {o['who']}: "
                       f"{o['reason']} (overrode {o['overrode']}; run {o['run_id']})")


@cli.command()
@click.argument("model")
@click.argument("version")
@click.option("--format", "fmt", type=click.Choice(["markdown", "json"]), default="markdown",
              show_default=True)
@_uris
@json_option
@translate_errors
@needs_server
def report(model, version, fmt, tracking_uri, registry_uri, json_):
    """Render the stored gate verdict of a version (from its run's safedelta/gate.json).

    --json is --format json."""
    from mlflow_safedelta.recorded import stored_gate
    from mlflow_safedelta.verdict import render_markdown

    d = stored_gate(model, version, tracking_uri=tracking_uri, registry_uri=registry_uri).to_dict()
    if fmt == "json" or json_:
        emit_json(d)
    else:
        click.echo(render_markdown(d))


@cli.group()
def policy():
    """Gate policies: validate a file, show a shipped one, print the schema."""


@policy.command("validate")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@json_option
@translate_errors
def policy_validate(file, json_):
    """Check a policy file; errors name the field and the reason (exit 2)."""
    from mlflow_safedelta.policy import load_policy

    p = load_policy(file)
    if json_:
        emit_json({"valid": True, "name": p.name, "source": p.source})
    else:
        click.echo(f"{file}: valid policy '{p.name}'")


@policy.command("show")
@click.argument("name", default="default")
@json_option
@translate_errors
def policy_show(name, json_):
    """Print a shipped policy (default, strict, permissive) or a file, as resolved."""
    from mlflow_safedelta.policy import load_policy, policy_to_yaml

    p = load_policy(name)
    if json_:
        emit_json(p.model_dump(mode="json"))
    else:
        click.echo(policy_to_yaml(p), nl=False)


@policy.command("schema")
def policy_schema_cmd():
    """Print the JSON schema of a policy file."""
    from mlflow_safedelta.policy import policy_schema

    click.echo(json.dumps(policy_schema(), indent=2))
