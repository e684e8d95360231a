"""``serve`` (webhook receiver + worker + periodic reconcile), ``worker``, ``reconcile``,
``jobs list|retry`` and ``webhook ensure``: thin wrappers over jobs/worker/webhooks/reconcile."""

from __future__ import annotations

import logging
import signal
import threading

import click

from mlflow_safedelta.cli import (
    UsageError,
    cli,
    echo_table,
    emit_json,
    iso_time,
    json_option,
    translate_errors,
)
from mlflow_safedelta.extras import ENGINE, require
from mlflow_safedelta.vocab import ENV_JOB, ENV_QUEUE_URI, ENV_WEBHOOK_SECRET

_logger = logging.getLogger(__name__)

queue_option = click.option(
    "--queue-uri", envvar=ENV_QUEUE_URI, default=None,
    help="Job queue: a SQLAlchemy database URL or redis://host:port/db. [env SAFEDELTA_QUEUE_URI; default "
         "sqlite:///$SAFEDELTA_CACHE/jobs.sqlite]")
tracking_option = click.option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
    help="MLflow tracking server or database. [env MLFLOW_TRACKING_URI]")
registry_option = click.option(
    "--registry-uri", envvar="MLFLOW_REGISTRY_URI", default=None,
    help="MLflow registry, if not the tracking URI. [env MLFLOW_REGISTRY_URI]")
job_option = click.option(
    "--job", "job_spec", envvar=ENV_JOB, default=None,
    help="Gate job as module:function. [env SAFEDELTA_JOB; default "
         "mlflow_safedelta.gate_job:run_gate_job]")


def _queue(queue_uri):
    from mlflow_safedelta.jobqueue import JobQueue

    return JobQueue(queue_uri)


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum, _frame):
        _logger.info("signal %d: stopping after the current job", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def _load_job(job_spec):
    """The worker's job; the default gate job needs the engine extra, checked before any job
    runs (else every job would end in an error verdict for a missing torch)."""
    from mlflow_safedelta.worker import DEFAULT_JOB, load_job

    if (job_spec or DEFAULT_JOB) == DEFAULT_JOB:
        require(ENGINE)
    return load_job(job_spec)


def _threads(queue, stop, *, job, tracking_uri, registry_uri, reconcile_interval):
    """Start the worker (unless ``job`` is None) and the reconcile sweep (unless interval 0)."""
    from mlflow_safedelta.reconcile import reconcile_periodically
    from mlflow_safedelta.worker import Worker

    threads = []
    if job is not None:
        worker = Worker(queue, job, tracking_uri=tracking_uri,
                        registry_uri=registry_uri)
        threads.append(threading.Thread(target=worker.run, args=(stop,), name="worker",
                                        daemon=True))
    if reconcile_interval > 0:
        threads.append(threading.Thread(
            target=reconcile_periodically, args=(queue, stop, reconcile_interval), name="reconcile",
            kwargs={"tracking_uri": tracking_uri, "registry_uri": registry_uri}, daemon=True))
    for t in threads:
        t.start()
    return threads


@cli.command(name="serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8787, show_default=True, type=int, help="Port to bind.")
@click.option("--secret", envvar=ENV_WEBHOOK_SECRET, default=None,
              help="Webhook HMAC secret. [env SAFEDELTA_WEBHOOK_SECRET; required]")
@click.option("--path", "path_", default="/webhooks/mlflow", show_default=True,
              help="URL path of the receiver.")
@click.option("--ensure-webhook", "public_url", default=None, metavar="URL",
              help="Create or update the MLflow webhook subscription to URL at start-up.")
@click.option("--no-worker", is_flag=True, help="Only receive and enqueue; run no jobs here.")
@click.option("--reconcile-interval", default=300.0, show_default=True, type=float,
              help="Seconds between reconcile sweeps; 0 turns them off.")
@queue_option
@tracking_option
@registry_option
@job_option
@translate_errors
def serve(host, port, secret, path_, public_url, no_worker, reconcile_interval, queue_uri,
          tracking_uri, registry_uri, job_spec) -> None:
    """Receive MLflow webhooks and run gate jobs (receiver + worker + reconcile sweep).

    \b
    Example usage:
      export SAFEDELTA_WEBHOOK_SECRET=...  MLFLOW_TRACKING_URI=http://mlflow:5000
      mlflow safedelta serve --port 8787 --ensure-webhook http://gate-host:8787/webhooks/mlflow
    """
    import uvicorn

    from mlflow_safedelta.webhooks import create_app, ensure_webhook

    if not secret:
        raise UsageError("a webhook secret is required: --secret or SAFEDELTA_WEBHOOK_SECRET")
    job = None if no_worker else _load_job(job_spec)
    queue = _queue(queue_uri)
    if public_url:
        hook, action = ensure_webhook(public_url, secret, tracking_uri=tracking_uri,
                                      registry_uri=registry_uri)
        click.echo(f"webhook {hook.webhook_id} {action}: {public_url}", err=True)
    stop = threading.Event()
    threads = _threads(queue, stop, job=job, tracking_uri=tracking_uri,
                       registry_uri=registry_uri, reconcile_interval=reconcile_interval)
    from mlflow_safedelta.enforce import alias_guard

    app = create_app(queue, secret, path=path_,
                     on_alias=alias_guard(tracking_uri=tracking_uri, registry_uri=registry_uri))
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)


@cli.command(name="worker")
@click.option("--reconcile-interval", default=0.0, show_default=True, type=float,
              help="Seconds between reconcile sweeps; 0 turns them off.")
@click.option("--poll-interval", default=1.0, show_default=True, type=float,
              help="Seconds to wait when the queue is empty.")
@queue_option
@tracking_option
@registry_option
@job_option
@translate_errors
def worker_cmd(reconcile_interval, poll_interval, queue_uri, tracking_uri, registry_uri,
               job_spec) -> None:
    """Run gate jobs from the queue until interrupted (no HTTP receiver)."""
    from mlflow_safedelta.reconcile import reconcile_periodically
    from mlflow_safedelta.worker import Worker

    job = _load_job(job_spec)
    queue = _queue(queue_uri)
    stop = threading.Event()
    _stop_on_signals(stop)
    if reconcile_interval > 0:
        threading.Thread(target=reconcile_periodically, args=(queue, stop, reconcile_interval),
                         kwargs={"tracking_uri": tracking_uri, "registry_uri": registry_uri},
                         daemon=True).start()
    Worker(queue, job, tracking_uri=tracking_uri, registry_uri=registry_uri,
           poll_interval=poll_interval).run(stop)


@cli.command(name="reconcile")
@click.option("--model", "model_name", default=None, help="Only this registered model.")
@queue_option
@tracking_option
@registry_option
@json_option
@translate_errors
def reconcile_cmd(model_name, queue_uri, tracking_uri, registry_uri, json_) -> None:
    """Enqueue gate jobs for registered versions that no route noticed (one sweep)."""
    from mlflow_safedelta.reconcile import reconcile

    report = reconcile(_queue(queue_uri), tracking_uri=tracking_uri, registry_uri=registry_uri,
                       model_name=model_name)
    if json_:
        emit_json(report.to_dict())
    else:
        click.echo(f"scanned {report.scanned} versions, enqueued {len(report.enqueued)}")
        for m, v in report.enqueued:
            click.echo(f"  {m} v{v}")


@cli.group(name="jobs")
def jobs_group() -> None:
    """Inspect and retry gate jobs in the queue."""


@jobs_group.command(name="list")
@click.option("--state", type=click.Choice(["queued", "running", "done", "failed"]), default=None,
              help="Only jobs in this state.")
@click.option("--model", "model_name", default=None, help="Only this registered model.")
@click.option("--limit", default=100, show_default=True, type=int, help="At most this many.")
@queue_option
@json_option
@translate_errors
def jobs_list(state, model_name, limit, queue_uri, json_) -> None:
    """List gate jobs, newest first."""
    jobs = _queue(queue_uri).list(state=state, model_name=model_name, limit=limit)
    if json_:
        emit_json([{**j.to_dict(), **{k: iso_time(getattr(j, k)) for k in _JOB_TIMES}}
                   for j in jobs])
        return
    if not jobs:
        click.echo("no jobs")
        return
    rows = [("model", "version", "state", "attempts", "source", "updated", "detail")]
    rows += [(j.model_name, j.version, j.state, j.attempts, j.source, iso_time(j.updated_at),
              (j.last_error if j.state == "failed" else j.result) or "") for j in jobs]
    echo_table(rows)


#: the Job fields that hold times (epoch seconds in the queue, ISO 8601 in JSON)
_JOB_TIMES = ("enqueued_at", "next_run_at", "lease_until", "updated_at")


@jobs_group.command(name="retry")
@click.argument("model_name")
@click.argument("version")
@queue_option
@translate_errors
def jobs_retry(model_name, version, queue_uri) -> None:
    """Re-queue a failed job now, with fresh attempts."""
    if not _queue(queue_uri).retry(model_name, version):
        raise UsageError(f"no failed job for '{model_name}' version {version}")
    click.echo(f"re-queued {model_name} v{version}")


@cli.group(name="webhook")
def webhook_group() -> None:
    """Manage the MLflow webhook subscription of the receiver."""


@webhook_group.command(name="ensure")
@click.argument("url")
@click.option("--secret", envvar=ENV_WEBHOOK_SECRET, default=None,
              help="Webhook HMAC secret. [env SAFEDELTA_WEBHOOK_SECRET; required]")
@click.option("--name", default="safedelta-gate", show_default=True, help="Subscription name.")
@tracking_option
@registry_option
@json_option
@translate_errors
def webhook_ensure(url, secret, name, tracking_uri, registry_uri, json_) -> None:
    """Create or update the model_version.created subscription pointing at URL."""
    from mlflow_safedelta.webhooks import ensure_webhook

    if not secret:
        raise UsageError("a webhook secret is required: --secret or SAFEDELTA_WEBHOOK_SECRET")
    hook, action = ensure_webhook(url, secret, name=name, tracking_uri=tracking_uri,
                                  registry_uri=registry_uri)
    if json_:
        emit_json({"webhook_id": hook.webhook_id, "name": hook.name, "url": hook.url,
                   "action": action})
    else:
        click.echo(f"webhook {hook.webhook_id} {action}: {url}")
