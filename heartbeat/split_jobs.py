"""Scheduled jobs done as separate units of work, one :class:`SplitJob` each.

A job of many units (the change feed: one unit per partner) is not one job under one
lock: each unit is a :class:`~heartbeat.coordination.ScheduledJob` of its own, named
``<job>:<key>`` (:func:`unit_name`), with its own lock and run record, run through
:func:`~heartbeat.coordination.run_job` like any job. So schedulers on any number of
nodes share the units between them (one runs a unit, the others find it busy or not
due), and each scheduler runs several units at once in a small pool of threads, so a slow
unit (a partner whose venue calls are retried for a minute) delays only itself.

The scheduler ticks such a job often (:data:`UNIT_TICK_SECONDS`): each tick reads the
units' run records in one query and hands the due ones not already queued here to the
pool, without waiting for them (:meth:`SplitJob.dispatch`). ``otacm poll`` runs every
unit and waits (:meth:`SplitJob.run_all`).
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.coordination import (
    DUE_TOLERANCE,
    JobFailed,
    JobOutcome,
    ScheduledJob,
    describe_error,
    log_failure,
    log_outcome,
    report_dict,
    run_job,
)
from storage.engine import make_sessions
from storage.records import JobRun
from storage.types import utcnow

logger = logging.getLogger(__name__)

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

    def run_now(
        self,
        engine: sa.Engine,
        sessions: sessionmaker[Session],
        *,
        owner: str,
        now: dt.datetime,
        lock_dir: Path | None,
        force: bool,
    ) -> tuple[JobOutcome, object | None]:
        """:func:`~heartbeat.coordination.run_job` of this job; never raises.

        Without ``force`` (the scheduler's tick): :meth:`dispatch`, ``RAN`` with no
        report. With ``force`` (``otacm poll``): :meth:`run_all`, then ``RAN`` with its
        :class:`SplitReport`, ``FAILED`` with a :class:`JobFailed` carrying it when a unit
        failed, ``BUSY`` when every unit was busy.
        """
        try:
            if not force:
                self.dispatch(engine, sessions, owner=owner, now=now, lock_dir=lock_dir)
                return JobOutcome.RAN, None
            report = self.run_all(engine, sessions, owner=owner, force=True, lock_dir=lock_dir)
        except Exception as exc:
            if force or self.tick_failure_worth_logging():
                log_failure(exc, self.name, "could not be run")
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
