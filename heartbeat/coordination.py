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

**A job of many units** (:class:`SplitJob`, the change feed: one unit per partner) is
not one job under one lock: each unit is a :class:`ScheduledJob` of its own, named
``<job>:<key>``, with its own lock and run record, run through :func:`run_job` like any
job. So schedulers on any number of nodes share the units between them (one runs a
unit, the others find it busy or not due), and each scheduler runs several units at
once in a small pool of threads, so a slow unit (a partner whose venue calls are retried
for a minute) delays only itself. The scheduler ticks such a job often
(:data:`UNIT_TICK_SECONDS`): each tick reads the units' run records in one query and
hands the due ones not already queued here to the pool, without waiting for them.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from filelock import FileLock, Timeout
from sqlalchemy.orm import Session, sessionmaker

from storage.engine import database_error_reason, make_sessions, waiting_helps
from storage.locks import advisory_lock_key, default_lock_dir
from storage.records import JobRun
from storage.types import utcnow

logger = logging.getLogger(__name__)

DUE_TOLERANCE = 0.1
"""The share of a job's interval by which a scheduler may tick early and still run it:
two schedulers' clocks drift, and a tick a moment before ``next_due_at`` must not skip a
whole interval."""

MAX_ERROR_LENGTH = 500
"""How much of a failure's message the run record keeps."""

UNIT_TICK_SECONDS = 1.0
"""How often a scheduler looks for due units of a :class:`SplitJob` (one query): a unit
is started within about this long of being due, whoever ran it last."""

UNIT_STOP_GRACE = 10.0
"""Seconds a stopping scheduler waits for the units it is running. A unit still running
then (its venue call being retried) is left to end with the process: its transaction
rolls back and its run record shows a run that never finished, which the next run redoes,
as for any job whose process died."""

UNIT_SEPARATOR = ":"
"""Between a split job's name and a unit's key in the unit's name."""


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
        """Nothing to release (a :class:`SplitJob` stops its pool)."""


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

    A :class:`SplitJob` has no lock or run record of its own: its units have. Without
    ``force`` (the scheduler's tick), its due units are handed to its pool and the call
    returns at once, ``RAN`` with no report; with ``force`` (``otacm poll``) every unit
    is run now, several at once, and the call returns when all are done, with a
    :class:`SplitReport` (``FAILED`` with a :class:`JobFailed` carrying it when a unit
    failed, ``BUSY`` when every unit was busy).

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
    if isinstance(job, SplitJob):
        return _run_split(
            engine, sessions, job, owner=owner, now=now, lock_dir=lock_dir, force=force
        )
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
                if not isinstance(exc, JobFailed):
                    _log_failure(exc, job.name, "failed")
                _finish(sessions, job, now=now, elapsed=time.monotonic() - began, error=exc)
                return JobOutcome.FAILED, exc
            _finish(sessions, job, now=now, elapsed=time.monotonic() - began, error=None)
            return JobOutcome.RAN, report
    except Exception as exc:
        # The database itself failed (the lock, the run record): nothing to record it in.
        _log_failure(exc, job.name, "could not be run")
        return JobOutcome.FAILED, exc


def _log_failure(error: Exception, name: str, what: str) -> None:
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
) -> None:
    """Record the end of a run, successful when ``error`` is ``None``."""
    with sessions.begin() as session:
        record = session.get(JobRun, job.name)
        if record is None:  # removed under us (an operator's reset): nothing to record
            return
        # Measured on the monotonic clock from the tick's "now", so that a run's end is
        # never before its start, whatever clock the caller's "now" comes from.
        record.finished_at = now + dt.timedelta(seconds=elapsed)
        if error is None:
            record.failures = 0
            record.last_success_at = record.finished_at
            return
        record.failures += 1
        record.last_error = describe_error(error)


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


@dataclass
class SplitReport:
    """What one run of a split job's units did.

    Attributes:
        units: units tried.
        outcomes: how many ended in each outcome.
        totals: the units' reports (``as_dict()``) added up, number by number.
        failures: the name and error of each unit that failed.
    """

    units: int = 0
    outcomes: Counter[JobOutcome] = field(default_factory=Counter)
    totals: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[str, BaseException]] = field(default_factory=list)

    def add(self, name: str, outcome: JobOutcome, result: object | None) -> None:
        """Count one unit's outcome and add its report (a failure's, when it left one)."""
        self.units += 1
        self.outcomes[outcome] += 1
        if outcome is JobOutcome.FAILED and isinstance(result, BaseException):
            self.failures.append((name, result))
            result = result.report if isinstance(result, JobFailed) else None
        for key, value in report_dict(result).items():
            if isinstance(value, int):
                self.totals[key] += value

    def changed(self) -> bool:
        """Whether a unit did something worth a log line."""
        return self.outcomes[JobOutcome.FAILED] > 0 or self.totals.total() > 0

    def as_dict(self) -> dict[str, int]:
        """The units and their outcomes, then the units' counts added up."""
        outcomes = {str(outcome): self.outcomes[outcome] for outcome in JobOutcome}
        return {"units": self.units, **outcomes, **self.totals}


class SplitJob:
    """A scheduled job done as separate units of work; see the module docstring.

    Each unit is a :class:`ScheduledJob` named ``<name>:<key>`` (:func:`unit_name`) with
    this job's interval. The pool of threads is made on the first tick and stopped by
    :meth:`close`; a unit is never queued twice in one process.

    Attributes:
        name: the job's name, the prefix of its units' names.
        interval: seconds between runs of each unit, across every scheduler.
        units: the units.
        workers: how many units one process runs at once.
        tick: how often a scheduler looks for due units.
    """

    def __init__(
        self,
        name: str,
        interval: float,
        units: Sequence[ScheduledJob],
        *,
        workers: int,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        """Args: as the attributes; ``clock`` says "now" when a queued unit starts."""
        if workers < 1:
            raise ValueError("a split job needs at least one worker")
        self.name = name
        self.interval = interval
        self.units = tuple(units)
        self.workers = workers
        self.tick = min(UNIT_TICK_SECONDS, interval)
        self._clock = clock
        self._lock = threading.Lock()
        self._queued: set[str] = set()
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._tidied = False
        self._readers: sessionmaker[Session] | None = None
        self._quiet_until = 0.0

    def names(self) -> tuple[str, ...]:
        """The job's name and its units' (``otacm poll --job`` takes any of them)."""
        return (self.name, *(unit.name for unit in self.units))

    def only(self, names: Sequence[str]) -> SplitJob | None:
        """This job if ``names`` names it; else a job of the units it names, or ``None``."""
        if self.name in names:
            return self
        units = [unit for unit in self.units if unit.name in names]
        if not units:
            return None
        return SplitJob(self.name, self.interval, units, workers=self.workers, clock=self._clock)

    def dispatch(
        self,
        engine: sa.Engine,
        sessions: sessionmaker[Session],
        *,
        owner: str,
        now: dt.datetime,
        lock_dir: Path | None = None,
    ) -> int:
        """Hand every due unit not already queued here to the pool; returns at once.

        The first tick of a process also removes the run records of units this job no
        longer has (:meth:`forget_others`).

        Returns:
            How many units were handed to the pool.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the run records could not be read.
        """
        if not self._tidied:
            self.forget_others(sessions)
            self._tidied = True
        handed = 0
        if self._readers is None:
            # Each tick's look at the run records only reads: on SQLite it must not take
            # the write lock every second in every scheduler.
            self._readers = make_sessions(engine, read_only=True)
        for unit in self.due(self._readers, now):
            with self._lock:
                if self._closed or unit.name in self._queued:
                    continue
                self._queued.add(unit.name)
                if len(self._threads) < self.workers:
                    self._start_thread()
            self._work.put(partial(self._run_queued, engine, sessions, unit, owner, lock_dir))
            handed += 1
        return handed

    def _start_thread(self) -> None:
        # Daemon threads, not a ThreadPoolExecutor's: a process stopping must not wait
        # for a unit whose venue call is being retried for a minute (UNIT_STOP_GRACE).
        thread = threading.Thread(
            target=self._serve, name=f"{self.name}-{len(self._threads) + 1}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            work()

    def _run_queued(
        self,
        engine: sa.Engine,
        sessions: sessionmaker[Session],
        unit: ScheduledJob,
        owner: str,
        lock_dir: Path | None,
    ) -> None:
        if self._closed:  # queued before the stop: not started
            return
        try:
            # "Now" is when the unit starts, not the tick that queued it: its run record
            # counts its interval from then.
            outcome, report = run_job(
                engine, sessions, unit, owner=owner, now=self._clock(), lock_dir=lock_dir
            )
            log_outcome(unit.name, outcome, report)
        finally:
            with self._lock:
                self._queued.discard(unit.name)

    def due(self, sessions: sessionmaker[Session], now: dt.datetime) -> list[ScheduledJob]:
        """The units due at ``now`` (or never run), longest due first, in one query.

        Ties are shuffled, so that schedulers on several nodes start at different units.
        :func:`run_job` checks again under each unit's lock.
        """
        with sessions.begin() as session:
            query = sa.select(JobRun.name, JobRun.next_due_at).where(self._my_units())
            records = {name: due for name, due in session.execute(query)}
        early = dt.timedelta(seconds=self.interval * DUE_TOLERANCE)
        due = [
            unit
            for unit in self.units
            if unit.name not in records or now >= records[unit.name] - early
        ]
        random.shuffle(due)
        due.sort(key=lambda unit: (unit.name in records, records.get(unit.name, now)))
        return due

    def forget_others(self, sessions: sessionmaker[Session]) -> int:
        """Remove the run records of units this job does not have (a partner no longer
        configured) and the job's own record from before it was split, so that none
        shows on ``/metrics`` as a job that stopped succeeding.

        Returns:
            How many records were removed.
        """
        stale = (JobRun.name == self.name) | (
            self._my_units() & JobRun.name.not_in([unit.name for unit in self.units])
        )
        with sessions.begin() as session:
            removed = session.execute(
                sa.delete(JobRun).where(stale).execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
        if removed:
            logger.info(
                "job %s: %d run records of units no longer configured removed", self.name, removed
            )
        return int(removed)

    def tick_failure_worth_logging(self) -> bool:
        """Whether a failed tick (the database away) is logged: once an interval, not at
        every tick of every second."""
        now = time.monotonic()
        if now < self._quiet_until:
            return False
        self._quiet_until = now + self.interval
        return True

    def _my_units(self) -> sa.ColumnElement[bool]:
        return JobRun.name.startswith(self.name + UNIT_SEPARATOR, autoescape=True)

    def run_all(
        self,
        engine: sa.Engine,
        sessions: sessionmaker[Session],
        *,
        owner: str,
        force: bool,
        lock_dir: Path | None = None,
    ) -> SplitReport:
        """Run every unit through :func:`run_job` now, ``workers`` at once; wait for all.

        Args:
            engine: the shared database.
            sessions: sessions on ``engine``.
            owner: who runs them.
            force: run units that are not due too (``otacm poll``).
            lock_dir: SQLite only: where the lock files are.

        Returns:
            What the units did.
        """

        def one(unit: ScheduledJob) -> tuple[JobOutcome, object | None]:
            outcome, report = run_job(
                engine,
                sessions,
                unit,
                owner=owner,
                now=self._clock(),
                lock_dir=lock_dir,
                force=force,
            )
            log_outcome(unit.name, outcome, report)
            return outcome, report

        report = SplitReport()
        with ThreadPoolExecutor(self.workers, thread_name_prefix=self.name) as pool:
            for unit, (outcome, result) in zip(self.units, pool.map(one, self.units), strict=True):
                report.add(unit.name, outcome, result)
        return report

    def close(self, grace: float = UNIT_STOP_GRACE) -> None:
        """Stop the pool: no queued unit starts any more; waits up to ``grace`` seconds
        for the units running (see :data:`UNIT_STOP_GRACE`)."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._work.put(None)
        deadline = time.monotonic() + grace
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        running = [thread.name for thread in threads if thread.is_alive()]
        if running:
            logger.warning(
                "job %s: %d units still running at the stop are left to end with the process",
                self.name,
                len(running),
            )


def unit_name(job: str, key: str) -> str:
    """The name of the unit ``key`` of the split job ``job``: its lock and run record."""
    return f"{job}{UNIT_SEPARATOR}{key}"


def _run_split(
    engine: sa.Engine,
    sessions: sessionmaker[Session],
    job: SplitJob,
    *,
    owner: str,
    now: dt.datetime,
    lock_dir: Path | None,
    force: bool,
) -> tuple[JobOutcome, object | None]:
    """:func:`run_job` of a :class:`SplitJob`."""
    try:
        if not force:
            job.dispatch(engine, sessions, owner=owner, now=now, lock_dir=lock_dir)
            return JobOutcome.RAN, None
        report = job.run_all(engine, sessions, owner=owner, force=True, lock_dir=lock_dir)
    except Exception as exc:
        if force or job.tick_failure_worth_logging():
            _log_failure(exc, job.name, "could not be run")
        return JobOutcome.FAILED, exc
    if report.failures:
        name, error = report.failures[0]
        message = (
            f"{len(report.failures)} of {report.units} units failed, the first: "
            f"{name}: {describe_error(error)}"
        )
        return JobOutcome.FAILED, JobFailed(message, report=report)
    if report.units and report.outcomes[JobOutcome.BUSY] == report.units:
        return JobOutcome.BUSY, report
    return JobOutcome.RAN, report
