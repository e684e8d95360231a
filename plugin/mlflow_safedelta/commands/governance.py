"""Governance commands: ``keys generate``, ``override`` (break-glass) and ``governance check``.

Thin: each calls one function of ``mlflow_safedelta.signing`` / ``enforce`` / ``governance``.
"""

from __future__ import annotations

from pathlib import Path

import click

from mlflow_safedelta.cli import cli, emit_json, json_option, translate_errors
from mlflow_safedelta.cli import uri_options as _uris


@cli.group()
def keys():
    """Ed25519 keys: gate workers sign verdicts, admins sign overrides, the server verifies."""


@keys.command("generate")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Directory for NAME.key (private, mode 0600) and NAME.pub.")
@click.option("--name", default="gate", show_default=True,
              help="File stem, e.g. gate-2026a or admin.")
@json_option
@translate_errors
def keys_generate(out_dir, name, json_):
    """Make a key pair. The .key file goes to gate workers (SAFEDELTA_SIGNING_KEY) or admins
    (SAFEDELTA_ADMIN_KEY) only; the .pub file is listed in the governance file.

    \b
    Example:
      mlflow safedelta keys generate --out /etc/safedelta --name gate-2026a
    """
    from mlflow_safedelta.signing import generate_keypair

    priv, pub = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    kid = generate_keypair(priv, pub)
    if json_:
        emit_json({"key_id": kid, "private_key": str(priv), "public_key": str(pub)})
    else:
        click.echo(f"key {kid}: private {priv} (keep secret), public {pub}")


@cli.command()
@click.argument("model")
@click.argument("version")
@click.option("--alias", required=True, help="The guarded alias to move to VERSION.")
@click.option("--reason", required=True, help="Why (recorded in the run and on the version).")
@click.option("--who", default=None, help="Who decides  [default: the login name].")
@click.option("--admin-key", type=click.Path(exists=True, dir_okay=False), default=None,
              envvar="SAFEDELTA_ADMIN_KEY",
              help="Admin private key (PEM)  [env SAFEDELTA_ADMIN_KEY].")
@_uris
@json_option
@translate_errors
def override(model, version, alias, reason, who, admin_key, tracking_uri, registry_uri, json_):
    """Break glass: move a guarded alias to a version without a signed pass, audited.

    Signed with the platform admin's key (not the gate workers'); recorded in an MLflow run
    (experiment safedelta-overrides) and in the version's safedelta.override tag; shown by
    status.

    \b
    Example:
      mlflow safedelta override support-bot 7 --alias production --reason "INC-42 hotfix"
    """
    from mlflow_safedelta import registry as reg
    from mlflow_safedelta.enforce import override as do_override

    rec = do_override(reg.client(tracking_uri, registry_uri), model, version, alias, reason,
                      who=who, admin_key=admin_key)
    if json_:
        emit_json(rec)
    else:
        click.echo(f"alias {alias!r} of {model} -> version {version} by override of {rec['who']} "
                   f"(overrode verdict {rec['overrode']}); audit run {rec['run_id']}")


@cli.group("governance")
def governance_group():
    """The platform's governance file (SAFEDELTA_GOVERNANCE)."""


@governance_group.command("check")
@click.argument("file", type=click.Path(exists=True, dir_okay=False), required=False)
@json_option
@translate_errors
def governance_check(file, json_):
    """Validate a governance file (default: $SAFEDELTA_GOVERNANCE): schema, policies, keys."""
    import os

    from mlflow_safedelta.cli import UsageError
    from mlflow_safedelta.governance import parse_governance
    from mlflow_safedelta.policy import policy_fingerprint

    file = file or os.environ.get("SAFEDELTA_GOVERNANCE")
    if not file:
        raise UsageError("give FILE or set SAFEDELTA_GOVERNANCE")
    gov = parse_governance(file)
    out = {"valid": True, "file": str(gov.path), "gate_keys": sorted(gov.verify_keys),
           "admin_keys": sorted(gov.admin_keys),
           "bindings": [{"models": b.models, "policy": b.policy,
                         "policy_sha256": policy_fingerprint(gov.policies[b.policy]),
                         "guarded_aliases": b.guarded_aliases,
                         "allow_stricter_tag": b.allow_stricter_tag,
                         "demote_on_fail": b.demote_on_fail} for b in gov.spec.bindings]}
    if json_:
        emit_json(out)
    else:
        click.echo(f"{gov.path}: valid; gate keys {', '.join(out['gate_keys'])}; admin keys "
                   f"{', '.join(out['admin_keys']) or '-'}")
        for b in out["bindings"]:
            click.echo(f"  {','.join(b['models'])} -> {b['policy']} guarding "
                       f"{','.join(b['guarded_aliases']) or '-'}")
