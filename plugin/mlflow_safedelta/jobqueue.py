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
            return
        except (sa.exc.OperationalError, sa.exc.ProgrammingError, sa.exc.IntegrityError):
            if attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


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
        if cls is JobQueue and (uri or default_queue_uri()).startswith(REDIS_SCHEMES):
            return super().__new__(RedisJobQueue)
        return super().__new__(cls)

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

    def enqueue(self, model_name: str, version: str | int, *, source: str) -> tuple[Job, bool]:
        """Record a gate job for (model, version) unless one exists. Returns (job, created)."""
        with self.engine.begin() as conn:
            created = self._insert_job(conn, model_name, str(version), source)
        return self.get(model_name, version), created

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
                    self._insert_job(conn, job[0], str(job[1]), job[2])
        except sa.exc.IntegrityError:
            return False
        return True

    def _insert_job(self, conn, model_name: str, version: str, source: str) -> bool:
        import sqlalchemy as sa

        now = self.clock()
        row = dict(model_name=model_name, version=version, state=QUEUED, source=source,
                   attempts=0, enqueued_at=now, next_run_at=now, updated_at=now, force=False)
        dialect = conn.dialect.name
        if dialect in ("sqlite", "postgresql"):
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                from sqlalchemy.dialects.postgresql import insert
            stmt = insert(self.jobs).values(**row).on_conflict_do_nothing(
                index_elements=["model_name", "version"])
            return conn.execute(stmt).rowcount == 1
        exists = conn.execute(sa.select(self.jobs.c.state).where(
            self.jobs.c.model_name == model_name, self.jobs.c.version == version)).first()
        if exists:
            return False
        conn.execute(self.jobs.insert().values(**row))
        return True

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
        """Re-queue a *failed* job now with fresh attempts (operator action); the worker then runs
        the gate with ``force=True``, past the ``error`` status it recorded. False if the job is
        unknown or not failed."""
        j = self.jobs
        now = self.clock()
        with self.engine.begin() as conn:
            return conn.execute(j.update().where(
                j.c.model_name == model_name, j.c.version == str(version), j.c.state == FAILED
            ).values(state=QUEUED, attempts=0, next_run_at=now, token=None, lease_until=None,
                     force=True, updated_at=now)).rowcount == 1

    def known(self, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (model, version) keys already have a job."""
        import sqlalchemy as sa

        keys = [(m, str(v)) for m, v in keys]
        if not keys:
            return set()
        j = self.jobs
        names = sorted({m for m, _ in keys})
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(j.c.model_name, j.c.version)
                                .where(j.c.model_name.in_(names))).all()
        have = {(m, v) for m, v in rows}
        return {k for k in keys if k in have}


# -- Redis ------------------------------------------------------------------------------------

_R_ENQUEUE = """
-- KEYS: job, due, index, delivery ('' = none); ARGV: member, now, model, version, source,
-- with_job (1/0), delivery_ttl
if KEYS[4] ~= '' then
  if not redis.call('SET', KEYS[4], ARGV[2], 'NX', 'EX', ARGV[7]) then return -1 end
end
if ARGV[6] ~= '1' or redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'model_name', ARGV[3], 'version', ARGV[4], 'state', 'queued',
           'source', ARGV[5], 'attempts', 0, 'enqueued_at', ARGV[2], 'next_run_at', ARGV[2],
           'updated_at', ARGV[2], 'force', 0)
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
if redis.call('HGET', KEYS[1], 'state') ~= 'failed' then return 0 end
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

    def _add(self, model_name, version, source, delivery_id=None, with_job=True) -> int:
        member = self._member(model_name or "", version or "")
        delivery = f"{self.prefix}delivery:{delivery_id}" if delivery_id else ""
        return int(self._enqueue(
            keys=[self._job_key(member), self._due, self._index, delivery],
            args=[member, repr(self.clock()), model_name or "", str(version or ""), source or "",
                  "1" if with_job else "0", self.delivery_ttl]))

    def enqueue(self, model_name: str, version: str | int, *, source: str) -> tuple[Job, bool]:
        created = self._add(model_name, str(version), source) == 1
        return self.get(model_name, version), created

    def record_delivery(self, delivery_id: str, event: str | None,
                        job: tuple[str, str, str] | None = None) -> bool:
        if job is None:
            return self._add(None, None, None, delivery_id, with_job=False) != -1
        return self._add(job[0], str(job[1]), job[2], delivery_id) != -1

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
                   updated_at=float(h["updated_at"]), force=h.get("force") == "1")

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

    def known(self, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        keys = [(m, str(v)) for m, v in keys]
        pipe = self.redis.pipeline()
        for m, v in keys:
            pipe.exists(self._job_key(self._member(m, v)))
        return {k for k, there in zip(keys, pipe.execute()) if there}
