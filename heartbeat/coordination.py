"""Coordination of scheduled jobs across processes and nodes: each runs at most once at a time.

APScheduler (3.x) ticks inside its own process only and keeps no shared job store, so
every scheduler process sharing the database ticks every job on its own clock. Two
mechanisms the database already has make that safe:

- **Who runs a job now: a lock that dies with its holder.** On PostgreSQL,
  :func:`job_lock` takes a session-level advisory lock (``pg_try_advisory_lock``) on a
  connection it holds for the run; the server releases it when that session ends, so a
  process killed mid-job (or a node that vanished, once its TCP connection is declared
  dead) holds nothing. On SQLite (one box) it takes an ``flock`` on a file beside the
  database (:func:`default_lock_dir`), which the kernel releases when the process dies.
  The lock is only ever *tried*: a scheduler that finds a job busy skips that tick.
  Session-level advisory locks need a real server session: behind PgBouncer, use
  session pooling for otacm's schedulers (transaction pooling would lose the lock).
- **When a job is next due: its run record** (:class:`storage.records.JobRun`, a row per
  job). With N schedulers, the first to tick after ``next_due_at`` runs the job and moves
  ``next_due_at`` one interval on; the others find it not due. So a job runs once per
  interval between all of them, not N times (the venue's API quota counts every call).

A job's own writes are its own transactions: a process killed mid-job leaves its open
transaction to the database, which rolls it back, and a job must be written so that a
run cut short is simply redone by the next one (the heartbeat's jobs are: they ask the
worker to fetch, through the inbox, or claim rows with leases). The run record of a run
that never finished keeps ``finished_at`` empty, and the next run logs it.

:func:`run_job` is the one way to run a job, for the scheduler and ``otacm poll`` alike.
It never raises: a failing job is recorded and logged, and the scheduler keeps going.

**A job of many units** (:class:`heartbeat.split_jobs.SplitJob`, the change feed: one
unit per partner) has no lock or run record of its own: each unit is a
:class:`ScheduledJob` with its own, run through :func:`run_job` like any job.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from filelock import FileLock, Timeout
from sqlalchemy.orm import Session, sessionmaker

from storage.engine import database_error_reason, waiting_helps
from storage.locks import advisory_lock_key, default_lock_dir
from storage.records import JobRun

if TYPE_CHECKING:
    from heartbeat.split_jobs import SplitJob

logger = logging.getLogger(__name__)

DUE_TOLERANCE = 0.1
"""The share of a job's interval by which a scheduler may tick early and still run it:
two schedulers' clocks drift, and a tick a moment before ``next_due_at`` must not skip a
whole interval."""

MAX_ERROR_LENGTH = 500
"""How much of a failure's message the run record keeps."""


class JobOutcome(StrEnum):
    """What became of one attempt to run a job."""

    RAN = "ran"
    """The job ran to its end."""
    NOT_DUE = "not_due"
    """The run record says the job is not due yet (another scheduler ran it)."""
    BUSY = "busy"
    """Another process holds the job's lock: it is running right now."""
    FAILED = "failed"
    """The job (or its bookkeeping) raised; recorded and logged."""
    STOPPED = "stopped"
    """The process's stop ended the run (its venue calls were cancelled): recorded as
    ended, neither a failure nor a success, and due again at once."""


@dataclass(frozen=True)
class ScheduledJob:
    """A job the scheduler runs every ``interval`` seconds.

    Attributes:
        name: unique among jobs; names the lock and the run record.
        interval: seconds between runs, across every scheduler sharing the database.
        run: the job, called with "now"; returns a report with ``as_dict()``.
    """

    name: str
    interval: float
    run: Callable[[dt.datetime], object]

    @property
    def tick(self) -> float:
        """How often a scheduler tries the job: every interval."""
        return self.interval

    def names(self) -> tuple[str, ...]:
        """The names ``otacm poll --job`` takes for this job: its own."""
        return (self.name,)

    def only(self, names: Sequence[str]) -> ScheduledJob | None:
        """This job if ``names`` names it, else ``None``."""
        return self if self.name in names else None

    def close(self) -> None:
        """Nothing to release (a split job stops its pool)."""


class JobFailed(Exception):
    """Raised by a job that failed in a way it has already logged, with what it did.

    :func:`run_job` records it like any failure but logs no traceback (the job's own
    line said why), and describes it by its message alone.

    Attributes:
        report: what the job did before it failed (its counts), or ``None``.
    """

    def __init__(self, message: str, *, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


@contextmanager
def job_lock(engine: sa.Engine, name: str, *, lock_dir: Path | None = None) -> Iterator[bool]:
    """Try to take the lock of job ``name`` for the duration of the block; never waits.

    PostgreSQL: a session-level advisory lock (:func:`advisory_lock_key`) on a connection
    of ``engine`` held, in autocommit (no transaction stays open), until the block ends;
    then unlocked and the connection returned to the pool. SQLite: an exclusive
    ``flock`` on ``lock_dir / "<name>.lock"``. Either is released by the database server
    or the kernel when the holding process dies.

    Args:
        engine: the database the schedulers share; stays the caller's.
        name: the job's name.
        lock_dir: SQLite only: where the lock files are (default:
            :func:`default_lock_dir`); created if missing.

    Yields:
        ``True`` when this process holds the lock, ``False`` when another one does.
    """
    if engine.dialect.name == "postgresql":
        with _advisory_lock(engine, name) as held:
            yield held
        return
    directory = lock_dir if lock_dir is not None else default_lock_dir(engine)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / f"{name}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


@contextmanager
def _advisory_lock(engine: sa.Engine, name: str) -> Iterator[bool]:
    key = advisory_lock_key(name)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        held = bool(connection.scalar(sa.select(sa.func.pg_try_advisory_lock(key))))
        if not held:
            yield False
            return
        try:
            yield True
        finally:
            try:
                released = connection.scalar(sa.select(sa.func.pg_advisory_unlock(key)))
            except sa.exc.DBAPIError:
                released = False
            if not released:
                # The session is in an unknown state: close it rather than pool it, which
                # ends any lock it might still hold.
                connection.invalidate()


def run_job(
    engine: sa.Engine,
    sessions: sessionmaker[Session],
    job: ScheduledJob | SplitJob,
    *,
    owner: str,
    now: dt.datetime,
    lock_dir: Path | None = None,
    force: bool = False,
) -> tuple[JobOutcome, object | None]:
    """Run ``job`` if no other process runs it now and it is due; record the run.

    Under :func:`job_lock`: reads the job's run record; unless ``force``, a job whose
    ``next_due_at`` is more than :data:`DUE_TOLERANCE` of its interval away is not run.
    Otherwise the start is committed (owner, ``started_at``, ``next_due_at`` one interval
    on, ``runs`` + 1) before the job runs, so a run that dies half-way still counts
    against the interval; then the end: ``finished_at`` and, on success, ``failures``
    back to 0, or on failure ``failures`` + 1 and ``last_error``.

    A :class:`~heartbeat.split_jobs.SplitJob` has no lock or run record of its own: its
    units have. It runs as its :meth:`~heartbeat.split_jobs.SplitJob.run_now` says: the
    scheduler's tick hands its due units to its pool and returns at once; ``force``
    (``otacm poll``) runs every unit and returns when all are done.

    Args:
        engine: the shared database; stays the caller's.
        sessions: sessions on ``engine``, for the run record.
        job: what to run.
        owner: who runs it (host, process id...), recorded on the run record.
        now: the time of this tick (aware); the job is called with it.
        lock_dir: SQLite only: where the lock files are (default: beside the database).
        force: run even if not due (``otacm poll``); the lock still applies.

    Returns:
        The outcome, and with it: the job's report when it ``RAN``, the exception when
        it ``FAILED``, ``None`` otherwise. Never raises (but ``KeyboardInterrupt`` and
        other ``BaseException`` pass through).
    """
    if not isinstance(job, ScheduledJob):
        return job.run_now(engine, sessions, owner=owner, now=now, lock_dir=lock_dir, force=force)
    try:
        with job_lock(engine, job.name, lock_dir=lock_dir) as held:
            if not held:
                return JobOutcome.BUSY, None
            if not _start(sessions, job, owner=owner, now=now, force=force):
                return JobOutcome.NOT_DUE, None
            began = time.monotonic()
            try:
                report = job.run(now)
            except Exception as exc:
                elapsed = time.monotonic() - began
                if ended_by_stop(exc):
                    logger.info("job %s: ended by the process's stop; due again", job.name)
                    _finish(sessions, job, now=now, elapsed=elapsed, error=exc, stopped=True)
                    return JobOutcome.STOPPED, exc
                if not isinstance(exc, JobFailed):
                    log_failure(exc, job.name, "failed")
                _finish(sessions, job, now=now, elapsed=elapsed, error=exc)
                return JobOutcome.FAILED, exc
            _finish(sessions, job, now=now, elapsed=time.monotonic() - began, error=None)
            return JobOutcome.RAN, report
    except Exception as exc:
        # The database itself failed (the lock, the run record): nothing to record it in.
        log_failure(exc, job.name, "could not be run")
        return JobOutcome.FAILED, exc


def log_failure(error: Exception, name: str, what: str) -> None:
    """Log a failed run: one line when the database is away (the next tick tries again,
    and a traceback per tick and job would bury the logs), the traceback otherwise."""
    if waiting_helps(error):
        reason = database_error_reason(error)
        logger.warning("job %s %s: database not reachable (%s)", name, what, reason)
    else:
        logger.exception("job %s %s", name, what)


def _start(
    sessions: sessionmaker[Session],
    job: ScheduledJob,
    *,
    owner: str,
    now: dt.datetime,
    force: bool,
) -> bool:
    """Record the start of a run, unless the job is not due; whether it may run."""
    interval = dt.timedelta(seconds=job.interval)
    with sessions.begin() as session:
        record = session.get(JobRun, job.name)
        if record is None:
            record = JobRun(name=job.name, runs=0, failures=0)
            session.add(record)
        else:
            if not force and now < record.next_due_at - interval * DUE_TOLERANCE:
                return False
            if record.finished_at is None:
                logger.warning(
                    "job %s: the run %s started at %s never finished (its process died?)",
                    job.name,
                    record.owner,
                    record.started_at.isoformat(),
                )
        record.owner = owner
        record.started_at = now
        record.finished_at = None
        record.next_due_at = now + interval
        record.runs += 1
    return True


def _finish(
    sessions: sessionmaker[Session],
    job: ScheduledJob,
    *,
    now: dt.datetime,
    elapsed: float,
    error: Exception | None,
    stopped: bool = False,
) -> None:
    """Record the end of a run, successful when ``error`` is ``None``; ``stopped``: ended
    by the process's stop, which is no failure of the job (its last error stays), and
    due again at once."""
    with sessions.begin() as session:
        record = session.get(JobRun, job.name)
        if record is None:  # removed under us (an operator's reset): nothing to record
            return
        # Measured on the monotonic clock from the tick's "now", so that a run's end is
        # never before its start, whatever clock the caller's "now" comes from.
        record.finished_at = now + dt.timedelta(seconds=elapsed)
        if stopped:
            record.next_due_at = now
            return
        if error is None:
            record.failures = 0
            record.last_success_at = record.finished_at
            return
        record.failures += 1
        record.last_error = describe_error(error)


def ended_by_stop(error: BaseException) -> bool:
    """Whether ``error`` came of the process's stop: somewhere in its causes, a venue
    limit closed because the role is stopping (:class:`venue.throttle.ThrottleClosed`)."""
    from venue.throttle import ThrottleClosed

    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ThrottleClosed):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def describe_error(error: BaseException) -> str:
    """A failure as the run record keeps it: the exception's type and message, truncated.

    Messages are built from identifiers by otacm's and the venue client's errors; they
    carry no keys or client states. A :class:`JobFailed` is its message: it names the
    failure it stands for.
    """
    if isinstance(error, JobFailed):
        text = str(error).strip()
    else:
        text = f"{type(error).__name__}: {error}".strip()
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 1] + "…"
    return text


def report_dict(report: object) -> dict[str, Any]:
    """A job's report as a dict: its ``as_dict()``, or ``{}`` when it has none."""
    as_dict = getattr(report, "as_dict", None)
    if callable(as_dict):
        return dict(as_dict())
    return {}


def did_something(report: object) -> bool:
    """Whether a job's report is worth a log line: its ``changed()`` when it has one (a
    report that always counts something, such as the rows a feed re-read), else whether
    it counts anything (a non-zero number or a non-empty value)."""
    changed = getattr(report, "changed", None)
    if callable(changed):
        return bool(changed())
    return any(report_dict(report).values())


def log_outcome(name: str, outcome: JobOutcome, report: object | None) -> None:
    """Log a run's outcome: INFO when it did something, DEBUG when it found nothing to
    do or was busy or not due; a failure has been logged by :func:`run_job`."""
    if outcome is JobOutcome.RAN and did_something(report):
        logger.info("job %s: %s", name, report_dict(report))
    elif outcome is not JobOutcome.FAILED:
        logger.debug("job %s: %s", name, outcome)
