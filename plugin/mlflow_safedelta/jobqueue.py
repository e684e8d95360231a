"""The durable gate-job queue: one row per (model, version), leases, retries with backoff.

Why a small SQL table and not huey: huey deletes a task from its storage when a consumer dequeues
it, so a worker killed mid-job (SIGKILL, OOM) loses the job; it has no per-key uniqueness either.
The gate needs exactly the opposite: *at most one job per (model, version), run to completion*,
surviving restarts. So the queue is one table keyed by ``(model_name, version)``:

- ``enqueue`` inserts or does nothing (the unique key makes the three routes -- store plugin,
  webhook, reconcile -- converge on one job, whatever order they arrive in);
- ``claim`` takes a due row with a compare-and-set ``UPDATE ... WHERE state = ...`` (portable
  across SQLite and PostgreSQL, no table locks) and gives the worker a lease it renews with
  ``heartbeat``; a row whose lease expired (its worker died) is claimed again;
- ``retry_later`` puts a transiently failed job back with exponential backoff; ``fail`` and
  ``complete`` are final. Finishing calls check the claim token, so a worker that lost its lease
  cannot overwrite the state written by its successor.

Backends: any SQLAlchemy URL. SQLite is the default (``$SAFEDELTA_CACHE/jobs.sqlite``, WAL mode,
shared by the server's store plugin, the receiver and the worker on one host); a networked
PostgreSQL (``SAFEDELTA_QUEUE_URI=postgresql://...``, the ``postgres`` extra) or Redis
(``redis://host:6379/0``, the ``redis`` extra; :class:`RedisJobQueue`, the same semantics in Lua
scripts) lets workers run on other hosts. The queue also records webhook delivery ids, so dedupe
and enqueue happen in one transaction.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from mlflow_safedelta.vocab import (
    ENV_CACHE,
    ENV_JOB_BACKOFF,
    ENV_JOB_LEASE,
    ENV_JOB_MAX_ATTEMPTS,
    ENV_QUEUE_PREFIX,
    ENV_QUEUE_URI,
)

_logger = logging.getLogger(__name__)

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

#: queue backends by URI prefix (filled by :func:`register_queue_backend` below each class);
#: a URI no prefix claims is a SQLAlchemy URL and gets the SQL queue, :class:`JobQueue`
QUEUE_BACKENDS: dict[str, type] = {}


def register_queue_backend(prefixes: tuple[str, ...], cls: type) -> type:
    """Make ``JobQueue(uri)`` build ``cls`` for URIs starting with one of ``prefixes``."""
    for prefix in prefixes:
        if prefix in QUEUE_BACKENDS:
            raise ValueError(f"queue URI prefix {prefix!r} is already served by "
                             f"{QUEUE_BACKENDS[prefix].__name__}")
        QUEUE_BACKENDS[prefix] = cls
    return cls


def queue_backend(uri: str) -> type | None:
    """The registered backend class for ``uri`` (None: the SQL queue)."""
    return next((cls for prefix, cls in QUEUE_BACKENDS.items() if uri.startswith(prefix)), None)

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
STATES = (QUEUED, RUNNING, DONE, FAILED)


def default_queue_uri() -> str:
    """``$SAFEDELTA_QUEUE_URI``, else a SQLite file in the safedelta cache directory."""
    uri = os.environ.get(ENV_QUEUE_URI)
    if uri:
        return uri
    cache = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "safedelta")
    return f"sqlite:///{cache / 'jobs.sqlite'}"


@dataclass(frozen=True)
class Job:
    """One row of the queue. ``token`` identifies the current claim (None when not running)."""

    model_name: str
    version: str
    state: str
    source: str
    attempts: int
    enqueued_at: float
    next_run_at: float
    lease_until: float | None
    token: str | None
    last_error: str | None
    result: str | None
    updated_at: float
    force: bool = False
    #: the registered version's creation timestamp (ms): with name and number, its identity for
    #: good (MLflow never reuses it); None for rows enqueued before it was recorded
    version_created: str | None = None
    #: the policy content resolved at enqueue (``policy.policy_snapshot``); None = not yet
    policy: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.model_name, self.version)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def driver_url(uri: str) -> str:
    """Pick the installed PostgreSQL driver for a plain ``postgresql://`` URL.

    SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3; the ``postgres`` extra (and MLflow's docs)
    install psycopg2. Without psycopg 3, use ``postgresql+psycopg2://``. Other URLs pass through.
    """
    import importlib.util

    for prefix in ("postgresql://", "postgres://"):
        if uri.startswith(prefix):
            if (importlib.util.find_spec("psycopg") is None
                    and importlib.util.find_spec("psycopg2") is not None):
                return "postgresql+psycopg2://" + uri[len(prefix):]
            return "postgresql://" + uri[len(prefix):]
    return uri


_ENGINES: dict[str, Any] = {}
_ENGINES_LOCK = threading.Lock()


def _engine(uri: str):
    """One engine per URL per process, with the queue's tables created on first use."""
    import sqlalchemy as sa

    with _ENGINES_LOCK:
        eng = _ENGINES.get(uri)
        if eng is not None:
            return eng
        if uri.startswith("sqlite"):
            path = uri.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            eng = sa.create_engine(uri, connect_args={"timeout": 30, "check_same_thread": False})

            @sa.event.listens_for(eng, "connect")
            def _pragmas(dbapi_conn, _record):  # WAL: readers never block the one writer
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()
        else:
            eng = sa.create_engine(driver_url(uri), pool_pre_ping=True)
        _create_tables(eng)
        _ENGINES[uri] = eng
        return eng


def _create_tables(eng) -> None:
    import sqlalchemy as sa

    for attempt in range(3):  # several processes may race to create them
        try:
            _tables()[0].create_all(eng, checkfirst=True)
            _migrate(eng)
            return
        except (sa.exc.OperationalError, sa.exc.ProgrammingError, sa.exc.IntegrityError):
            if attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


#: columns added after the first release: (name, SQL type); existing rows get NULL, which the
#: queue reads as "not recorded yet" (identity inferred from times, policy resolved at claim)
_ADDED_COLUMNS = (("version_created", "VARCHAR(32)"), ("policy", "TEXT"))


def _migrate(eng) -> None:
    """Add the columns a queue database made by an older release lacks (idempotent)."""
    import sqlalchemy as sa

    have = {c["name"] for c in sa.inspect(eng).get_columns("safedelta_jobs")}
    for name, sql_type in _ADDED_COLUMNS:
        if name in have:
            continue
        try:
            with eng.begin() as conn:
                conn.execute(sa.text(f"ALTER TABLE safedelta_jobs ADD COLUMN {name} {sql_type}"))
            _logger.info("queue schema: added column safedelta_jobs.%s", name)
        except (sa.exc.OperationalError, sa.exc.ProgrammingError):  # added concurrently
            if name not in {c["name"] for c in sa.inspect(eng).get_columns("safedelta_jobs")}:
                raise


#: longest key parts the queue stores (MLflow's own limits on names; versions are numbers)
MAX_NAME, MAX_VERSION = 256, 64


class InvalidJob(ValueError):
    """A job key the queue cannot hold (bad input: callers answer 4xx / exit 2)."""


def check_key(model_name: Any, version: Any) -> tuple[str, str]:
    """``(name, version)`` as the queue stores them, or :class:`InvalidJob` saying why."""
    if not isinstance(model_name, str) or not model_name.strip():
        raise InvalidJob("model name must be a non-empty string")
    if len(model_name) > MAX_NAME:
        raise InvalidJob(f"model name longer than {MAX_NAME} characters")
    if isinstance(version, bool) or not isinstance(version, (str, int)):
        raise InvalidJob(f"version must be a number, got {type(version).__name__}")
    version = str(version).strip()
    if not version.isdigit() or len(version) > MAX_VERSION:
        raise InvalidJob(f"version must be a positive integer, got {version[:20]!r}")
    return model_name, version


def _is_stale(row: Any, created: str | None) -> bool:
    """Whether an existing row belongs to an EARLIER registered version of the same name and
    number (the model was deleted and created again): its recorded creation time differs, or,
    for a row from before it was recorded, it was enqueued before this version existed."""
    if not created:
        return False
    if row["version_created"]:
        return str(row["version_created"]) != str(created)
    return row["state"] in (DONE, FAILED) and float(row["enqueued_at"]) < int(created) / 1000.0


@functools.lru_cache(maxsize=1)
def _tables():
    """The queue's schema, built on first use (``import jobqueue`` stays free of SQLAlchemy)."""
    import sqlalchemy as sa

    md = sa.MetaData()
    jobs = sa.Table(
        "safedelta_jobs", md,
        sa.Column("model_name", sa.String(256), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, default=0),
        sa.Column("enqueued_at", sa.Float, nullable=False),
        sa.Column("next_run_at", sa.Float, nullable=False),
        sa.Column("lease_until", sa.Float, nullable=True),
        sa.Column("token", sa.String(64), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("result", sa.Text, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("force", sa.Boolean, nullable=False, default=False),
        sa.Column("version_created", sa.String(32), nullable=True),
        sa.Column("policy", sa.Text, nullable=True),
    )
    deliveries = sa.Table(
        "safedelta_deliveries", md,
        sa.Column("delivery_id", sa.String(128), primary_key=True),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("event", sa.String(64), nullable=True),
    )
    return md, jobs, deliveries



class JobQueue:
    """A durable queue of gate jobs, one per (model, version).

    Args:
        uri: SQLAlchemy URL (``sqlite:///...`` or ``postgresql://...``); default
            :func:`default_queue_uri`.
        max_attempts: claims per job before it fails for good (transient errors and dead
            workers both count).
        backoff_base: seconds before the first retry; doubled per attempt (plus up to 10% jitter).
        backoff_max: cap on the retry delay, in seconds.
        lease_seconds: how long a claim lasts without a heartbeat before another worker may
            take the job over.
        clock: time source (seconds); tests inject a fake one.
    """

    def __new__(cls, uri: str | None = None, **kwargs: Any):
        backend = queue_backend(uri or default_queue_uri()) if cls is JobQueue else None
        return super().__new__(backend or cls)

    def __init__(self, uri: str | None = None, *, max_attempts: int | None = None,
                 backoff_base: float | None = None, backoff_max: float = 600.0,
                 lease_seconds: float | None = None, clock: Callable[[], float] = time.time):
        self._configure(uri, max_attempts, backoff_base, backoff_max, lease_seconds, clock)
        self.engine = _engine(self.uri)  # cached per URL; creates the tables on first use
        _, self.jobs, self.deliveries = _tables()

    def _configure(self, uri, max_attempts, backoff_base, backoff_max, lease_seconds, clock):
        self.uri = uri or default_queue_uri()
        env = os.environ
        self.max_attempts = int(max_attempts or env.get(ENV_JOB_MAX_ATTEMPTS, 5))
        self.backoff_base = float(backoff_base if backoff_base is not None
                                  else env.get(ENV_JOB_BACKOFF, 10.0))
        self.backoff_max = backoff_max
        self.lease_seconds = float(lease_seconds or env.get(ENV_JOB_LEASE, 120.0))
        self.clock = clock

    # -- producers ----------------------------------------------------------------------------

    def enqueue(self, model_name: str, version: str | int, *, source: str,
                created: Any = None, policy: str | None = None,
                reopen: bool = False) -> tuple[Job, bool]:
        """Record a gate job for (model, version) unless one exists. Returns (job, created).

        Args:
            created: the version's creation timestamp (ms), when known: a row of an earlier
                version with the same name and number (a re-created model) is replaced by a
                fresh job for this one.
            policy: the policy content the job gates with (``policy.policy_snapshot``).
            reopen: re-queue a finished row (``done``/``failed``) for this version too (the
                reconcile sweep: the version is still without a verdict).

        Raises:
            InvalidJob: a name or version the queue cannot hold.
        """
        model_name, version = check_key(model_name, version)
        created = str(created) if created not in (None, "") else None
        with self.engine.begin() as conn:
            made = self._insert_job(conn, model_name, version, source, created, policy, reopen)
        return self.get(model_name, version), made

    def record_delivery(self, delivery_id: str, event: str | None,
                        job: tuple[str, str, str] | None = None) -> bool:
        """Remember a webhook delivery id and (optionally) enqueue its job in one transaction.

        ``job`` is ``(model_name, version, source)``. Returns False when the id was seen before
        (a retry or a replay): then nothing at all is written.
        """
        import sqlalchemy as sa

        try:
            with self.engine.begin() as conn:
                conn.execute(self.deliveries.insert().values(
                    delivery_id=delivery_id, received_at=self.clock(), event=event))
                if job is not None:
                    name, version = check_key(job[0], job[1])
                    self._insert_job(conn, name, version, job[2])
        except sa.exc.IntegrityError:
            return False
        return True

    def _insert_job(self, conn, model_name: str, version: str, source: str,
                    created: str | None = None, policy: str | None = None,
                    reopen: bool = False) -> bool:
        import sqlalchemy as sa

        now = self.clock()
        j = self.jobs
        row = dict(model_name=model_name, version=version, state=QUEUED, source=source,
                   attempts=0, enqueued_at=now, next_run_at=now, updated_at=now, force=False,
                   version_created=created, policy=policy)
        dialect = conn.dialect.name
        if dialect in ("sqlite", "postgresql"):
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                from sqlalchemy.dialects.postgresql import insert
            stmt = insert(j).values(**row).on_conflict_do_nothing(
                index_elements=["model_name", "version"])
            if conn.execute(stmt).rowcount == 1:
                return True
        key = (j.c.model_name == model_name, j.c.version == version)
        old = conn.execute(sa.select(j).where(*key)).mappings().first()
        if old is None:
            conn.execute(j.insert().values(**row))
            return True
        if _is_stale(old, created) or (reopen and old["state"] in (DONE, FAILED)):
            _logger.info("%s v%s: a new job replaces the %s one of %s", model_name, version,
                         old["state"], "an earlier version of that number"
                         if _is_stale(old, created) else "this version")
            conn.execute(j.update().where(*key).values(
                **row, token=None, lease_until=None, last_error=None, result=None))
            return True
        return False

    # -- consumers ----------------------------------------------------------------------------

    def claim(self, *, limit_scan: int = 20) -> Job | None:
        """Take one due job (queued and due, or running with an expired lease); None if idle."""
        import sqlalchemy as sa

        j = self.jobs
        now = self.clock()
        due = sa.or_(sa.and_(j.c.state == QUEUED, j.c.next_run_at <= now),
                     sa.and_(j.c.state == RUNNING, j.c.lease_until < now))
        with self.engine.connect() as conn:
            candidates = conn.execute(
                sa.select(j.c.model_name, j.c.version, j.c.state, j.c.token).where(due)
                .order_by(j.c.next_run_at).limit(limit_scan)).all()
        for name, version, state, old_token in candidates:
            token = uuid.uuid4().hex
            cond = [j.c.model_name == name, j.c.version == version, j.c.state == state]
            cond.append(j.c.token == old_token if old_token is not None else j.c.token.is_(None))
            with self.engine.begin() as conn:
                won = conn.execute(
                    j.update().where(*cond, due).values(
                        state=RUNNING, token=token, attempts=j.c.attempts + 1,
                        lease_until=now + self.lease_seconds, updated_at=now)).rowcount == 1
            if won:
                if state == RUNNING:
                    _logger.warning("Took over %s v%s: its previous worker's lease expired",
                                    name, version)
                return self.get(name, version)
        return None

    def pin(self, job: Job, *, created: Any = None, policy: str | None = None) -> bool:
        """Record what a claimed job did not know yet (its version's creation time, the policy
        content it gates with); values already recorded are kept. False if the claim was lost."""
        values = {}
        if created not in (None, "") and not job.version_created:
            values["version_created"] = str(created)
        if policy and not job.policy:
            values["policy"] = policy
        return self._update_claimed(job, **values) if values else True

    def heartbeat(self, job: Job) -> bool:
        """Extend the lease of a claimed job. False if the claim was lost."""
        now = self.clock()
        return self._update_claimed(job, lease_until=now + self.lease_seconds, updated_at=now)

    def complete(self, job: Job, result: str | None = None) -> bool:
        """Mark a claimed job done (final)."""
        return self._update_claimed(job, state=DONE, token=None, lease_until=None,
                                    result=result, updated_at=self.clock())

    def fail(self, job: Job, error: str) -> bool:
        """Mark a claimed job failed (final; ``jobs retry`` re-queues it)."""
        return self._update_claimed(job, state=FAILED, token=None, lease_until=None,
                                    last_error=error[:4000], updated_at=self.clock())

    def backoff(self, attempts: int) -> float:
        """Delay before the retry that follows the given number of attempts."""
        delay = min(self.backoff_max, self.backoff_base * 2 ** max(0, attempts - 1))
        return delay * (1.0 + 0.1 * random.random())

    def retry_later(self, job: Job, error: str) -> bool:
        """Put a claimed job back after a transient error. False when attempts are exhausted
        (the job is then failed)."""
        if job.attempts >= self.max_attempts:
            self.fail(job, f"gave up after {job.attempts} attempts: {error}")
            return False
        now = self.clock()
        self._update_claimed(job, state=QUEUED, token=None, lease_until=None,
                             next_run_at=now + self.backoff(job.attempts),
                             last_error=error[:4000], updated_at=now)
        return True

    def _update_claimed(self, job: Job, **values: Any) -> bool:
        j = self.jobs
        with self.engine.begin() as conn:
            return conn.execute(j.update().where(
                j.c.model_name == job.model_name, j.c.version == job.version,
                j.c.state == RUNNING, j.c.token == job.token).values(**values)).rowcount == 1

    # -- inspection and operator actions -------------------------------------------------------

    def get(self, model_name: str, version: str | int) -> Job | None:
        import sqlalchemy as sa

        j = self.jobs
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(j).where(
                j.c.model_name == model_name, j.c.version == str(version))).mappings().first()
        return Job(**row) if row else None

    def list(self, state: str | None = None, model_name: str | None = None,
             limit: int = 100) -> list[Job]:
        import sqlalchemy as sa

        j = self.jobs
        q = sa.select(j).order_by(j.c.enqueued_at.desc()).limit(limit)
        if state:
            q = q.where(j.c.state == state)
        if model_name:
            q = q.where(j.c.model_name == model_name)
        with self.engine.connect() as conn:
            return [Job(**r) for r in conn.execute(q).mappings().all()]

    def retry(self, model_name: str, version: str | int) -> bool:
        """Re-queue a *failed* (or skipped) job now with fresh attempts (operator action); the
        worker then runs the gate with ``force=True``, past the ``error`` status it recorded.
        False if the job is unknown, still live, or done with a verdict."""
        import sqlalchemy as sa

        j = self.jobs
        now = self.clock()
        with self.engine.begin() as conn:
            return conn.execute(j.update().where(
                j.c.model_name == model_name, j.c.version == str(version),
                sa.or_(j.c.state == FAILED, sa.and_(j.c.state == DONE,
                                                    j.c.result.like("skipped:%")))
            ).values(state=QUEUED, attempts=0, next_run_at=now, token=None, lease_until=None,
                     force=True, updated_at=now)).rowcount == 1

    def known(self, keys: Iterable[tuple], live_only: bool = False) -> set[tuple[str, str]]:
        """Which of these keys already have a job: ``(model, version)`` or ``(model, version,
        created)`` (then a row of an earlier version of that number does not count). With
        ``live_only``, a ``done``/``failed`` row does not count either."""
        import sqlalchemy as sa

        keys = [(k[0], str(k[1]), k[2] if len(k) > 2 else None) for k in keys]
        if not keys:
            return set()
        j = self.jobs
        names = sorted({m for m, _, _ in keys})
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(j).where(j.c.model_name.in_(names))).mappings().all()
        return _known(keys, {(r["model_name"], r["version"]): r for r in rows}, live_only)


def _known(keys, rows: dict, live_only: bool) -> set[tuple[str, str]]:
    out = set()
    for m, v, created in keys:
        row = rows.get((m, v))
        if row is None or _is_stale(row, str(created) if created else None):
            continue
        if live_only and row["state"] in (DONE, FAILED):
            continue
        out.add((m, v))
    return out


# -- Redis ------------------------------------------------------------------------------------

_R_ENQUEUE = """
-- KEYS: job, due, index, delivery ('' = none), leases; ARGV: member, now, model, version,
-- source, with_job (1/0), delivery_ttl, created ('' = unknown), policy, reopen (1/0)
if KEYS[4] ~= '' then
  if not redis.call('SET', KEYS[4], ARGV[2], 'NX', 'EX', ARGV[7]) then return -1 end
end
if ARGV[6] ~= '1' then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local old = redis.call('HGET', KEYS[1], 'version_created')
  local state = redis.call('HGET', KEYS[1], 'state')
  local stale = false
  if ARGV[8] ~= '' then
    if old and old ~= '' then stale = (old ~= ARGV[8])
    else stale = (state == 'done' or state == 'failed')
      and tonumber(redis.call('HGET', KEYS[1], 'enqueued_at')) < tonumber(ARGV[8]) / 1000 end
  end
  if not stale and not (ARGV[10] == '1' and (state == 'done' or state == 'failed')) then
    return 0
  end
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'model_name', ARGV[3], 'version', ARGV[4], 'state', 'queued',
           'source', ARGV[5], 'attempts', 0, 'enqueued_at', ARGV[2], 'next_run_at', ARGV[2],
           'updated_at', ARGV[2], 'force', 0, 'version_created', ARGV[8], 'policy', ARGV[9])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""

_R_CLAIM = """
-- KEYS: due, leases; ARGV: now, lease_until, token, job key prefix
local m = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)[1]
local from = KEYS[1]
if not m then
  m = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'LIMIT', 0, 1)[1]
  from = KEYS[2]
end
if not m then return false end
redis.call('ZREM', from, m)
local jk = ARGV[4] .. m
redis.call('HSET', jk, 'state', 'running', 'token', ARGV[3], 'lease_until', ARGV[2],
           'updated_at', ARGV[1])
redis.call('HINCRBY', jk, 'attempts', 1)
redis.call('ZADD', KEYS[2], ARGV[2], m)
return m
"""

_R_SETTLE = """
-- KEYS: job, due, leases; ARGV: token, member, action, now, a, b
if redis.call('HGET', KEYS[1], 'state') ~= 'running'
   or redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
local a = ARGV[3]
if a == 'heartbeat' then
  redis.call('HSET', KEYS[1], 'lease_until', ARGV[5], 'updated_at', ARGV[4])
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[2])
  return 1
end
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[1], 'token', 'lease_until')
if a == 'complete' then
  redis.call('HSET', KEYS[1], 'state', 'done', 'result', ARGV[5], 'updated_at', ARGV[4])
elseif a == 'fail' then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'last_error', ARGV[5], 'updated_at', ARGV[4])
else -- requeue
  redis.call('HSET', KEYS[1], 'state', 'queued', 'next_run_at', ARGV[5], 'last_error', ARGV[6],
             'updated_at', ARGV[4])
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[2])
end
return 1
"""

_R_RETRY = """
-- KEYS: job, due; ARGV: member, now
local st = redis.call('HGET', KEYS[1], 'state')
local res = redis.call('HGET', KEYS[1], 'result') or ''
if st ~= 'failed' and not (st == 'done' and string.sub(res, 1, 8) == 'skipped:') then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempts', 0, 'next_run_at', ARGV[2],
           'force', 1, 'updated_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'token', 'lease_until')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""


class RedisJobQueue(JobQueue):
    """:class:`JobQueue` on Redis (``redis://``; ``JobQueue("redis://...")`` returns one).

    One hash per job, a ``due`` sorted set (queued jobs by ``next_run_at``), a ``leases`` sorted
    set (running jobs by ``lease_until``) and an ``index`` (by ``enqueued_at``); every transition
    is one Lua script, so it is atomic like the SQL compare-and-set. Delivery ids are ``SET NX``
    keys that expire after ``delivery_ttl`` seconds (a week), far beyond MLflow's retries. Keys
    start with ``$SAFEDELTA_QUEUE_PREFIX`` (default ``safedelta:``). Use a Redis with persistence
    (AOF or RDB) for the queue to survive a Redis restart.
    """

    delivery_ttl = 7 * 24 * 3600

    def __init__(self, uri: str | None = None, *, max_attempts: int | None = None,
                 backoff_base: float | None = None, backoff_max: float = 600.0,
                 lease_seconds: float | None = None, clock: Callable[[], float] = time.time,
                 prefix: str | None = None):
        import redis

        self._configure(uri, max_attempts, backoff_base, backoff_max, lease_seconds, clock)
        self.redis = redis.Redis.from_url(self.uri, decode_responses=True)
        self.prefix = prefix or os.environ.get(ENV_QUEUE_PREFIX, "safedelta:")
        self._due, self._leases = self.prefix + "due", self.prefix + "leases"
        self._index = self.prefix + "index"
        self._enqueue = self.redis.register_script(_R_ENQUEUE)
        self._claim = self.redis.register_script(_R_CLAIM)
        self._settle = self.redis.register_script(_R_SETTLE)
        self._retry = self.redis.register_script(_R_RETRY)

    @staticmethod
    def _member(model_name: str, version: str | int) -> str:
        import json

        return json.dumps([model_name, str(version)])

    def _job_key(self, member: str) -> str:
        return f"{self.prefix}job:{member}"

    def _add(self, model_name, version, source, delivery_id=None, with_job=True,
             created=None, policy=None, reopen=False) -> int:
        member = self._member(model_name or "", version or "")
        delivery = f"{self.prefix}delivery:{delivery_id}" if delivery_id else ""
        return int(self._enqueue(
            keys=[self._job_key(member), self._due, self._index, delivery, self._leases],
            args=[member, repr(self.clock()), model_name or "", str(version or ""), source or "",
                  "1" if with_job else "0", self.delivery_ttl,
                  str(created) if created not in (None, "") else "", policy or "",
                  "1" if reopen else "0"]))

    def enqueue(self, model_name: str, version: str | int, *, source: str,
                created: Any = None, policy: str | None = None,
                reopen: bool = False) -> tuple[Job, bool]:
        model_name, version = check_key(model_name, version)
        made = self._add(model_name, version, source, created=created, policy=policy,
                         reopen=reopen) == 1
        return self.get(model_name, version), made

    def record_delivery(self, delivery_id: str, event: str | None,
                        job: tuple[str, str, str] | None = None) -> bool:
        if job is None:
            return self._add(None, None, None, delivery_id, with_job=False) != -1
        name, version = check_key(job[0], job[1])
        return self._add(name, version, job[2], delivery_id) != -1

    def pin(self, job: Job, *, created: Any = None, policy: str | None = None) -> bool:
        key = self._job_key(self._member(job.model_name, job.version))
        if self.redis.hget(key, "token") != job.token:
            return False
        values = {}
        if created not in (None, "") and not job.version_created:
            values["version_created"] = str(created)
        if policy and not job.policy:
            values["policy"] = policy
        if values:
            self.redis.hset(key, mapping=values)
        return True

    def claim(self, *, limit_scan: int = 20) -> Job | None:
        now = self.clock()
        import uuid as _uuid

        member = self._claim(keys=[self._due, self._leases],
                             args=[repr(now), repr(now + self.lease_seconds), _uuid.uuid4().hex,
                                   self.prefix + "job:"])
        if not member:
            return None
        import json

        name, version = json.loads(member)
        return self.get(name, version)

    def _update(self, job: Job, action: str, a: Any = "", b: Any = "") -> bool:
        member = self._member(job.model_name, job.version)
        return self._settle(keys=[self._job_key(member), self._due, self._leases],
                            args=[job.token or "", member, action, repr(self.clock()),
                                  a if isinstance(a, str) else repr(a), b]) == 1

    def heartbeat(self, job: Job) -> bool:
        return self._update(job, "heartbeat", self.clock() + self.lease_seconds)

    def complete(self, job: Job, result: str | None = None) -> bool:
        return self._update(job, "complete", result or "")

    def fail(self, job: Job, error: str) -> bool:
        return self._update(job, "fail", error[:4000])

    def retry_later(self, job: Job, error: str) -> bool:
        if job.attempts >= self.max_attempts:
            self.fail(job, f"gave up after {job.attempts} attempts: {error}")
            return False
        self._update(job, "requeue", self.clock() + self.backoff(job.attempts), error[:4000])
        return True

    def get(self, model_name: str, version: str | int) -> Job | None:
        h = self.redis.hgetall(self._job_key(self._member(model_name, version)))
        if not h:
            return None

        def num(k, cast=float):
            return cast(h[k]) if h.get(k) not in (None, "") else None

        return Job(model_name=h["model_name"], version=h["version"], state=h["state"],
                   source=h["source"], attempts=int(h.get("attempts", 0)),
                   enqueued_at=float(h["enqueued_at"]), next_run_at=float(h["next_run_at"]),
                   lease_until=num("lease_until"), token=h.get("token") or None,
                   last_error=h.get("last_error"), result=h.get("result"),
                   updated_at=float(h["updated_at"]), force=h.get("force") == "1",
                   version_created=h.get("version_created") or None,
                   policy=h.get("policy") or None)

    def list(self, state: str | None = None, model_name: str | None = None,
             limit: int = 100) -> list[Job]:
        import json

        out = []
        for member in self.redis.zrevrange(self._index, 0, -1):
            name, version = json.loads(member)
            if model_name and name != model_name:
                continue
            job = self.get(name, version)
            if job and (not state or job.state == state):
                out.append(job)
                if len(out) >= limit:
                    break
        return out

    def retry(self, model_name: str, version: str | int) -> bool:
        member = self._member(model_name, version)
        return self._retry(keys=[self._job_key(member), self._due],
                           args=[member, repr(self.clock())]) == 1

    def known(self, keys: Iterable[tuple], live_only: bool = False) -> set[tuple[str, str]]:
        keys = [(k[0], str(k[1]), k[2] if len(k) > 2 else None) for k in keys]
        fields = ("state", "version_created", "enqueued_at")
        pipe = self.redis.pipeline()
        for m, v, _ in keys:
            pipe.hmget(self._job_key(self._member(m, v)), fields)
        rows = {(m, v): dict(zip(fields, vals)) for (m, v, _), vals in zip(keys, pipe.execute())
                if vals[0] is not None}
        return _known(keys, rows, live_only)


register_queue_backend(REDIS_SCHEMES, RedisJobQueue)
