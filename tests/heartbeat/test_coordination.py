"""Scheduled jobs across processes: one run at a time, one run per interval, nothing half done.

Every test runs on SQLite (file locks) and PostgreSQL (advisory locks). The cross-process
tests start real processes (:mod:`tests.heartbeat.job_competitor`) that compete for one
job through :func:`heartbeat.coordination.run_job`.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.coordination import (
    JobOutcome,
    ScheduledJob,
    job_lock,
    run_job,
)
from storage.engine import make_engine, make_sessions
from storage.locks import advisory_lock_key, default_lock_dir
from storage.records import JobRun
from tests.heartbeat.job_competitor import JOB_NAME, marker, marker_metadata
from tests.support.processes import ROOT
from tests.support.stack import wait_until
from venue.errors import VenueRateLimited
from venue.throttle import ThrottleClosed

T0 = dt.datetime(2026, 5, 27, 12, 0, tzinfo=dt.UTC)
INTERVAL = 60.0


@dataclass
class Report:
    """A job's report, as the real jobs return one."""

    done: int = 1

    def as_dict(self) -> dict[str, int]:
        return {"done": self.done}


@dataclass
class CountingJob:
    """A job that counts its calls and the times it was called with; may be told to fail."""

    calls: list[dt.datetime] = field(default_factory=list)
    error: Exception | None = None

    def __call__(self, now: dt.datetime) -> Report:
        self.calls.append(now)
        if self.error is not None:
            raise self.error
        return Report()


def job_run(sessions: sessionmaker[Session], name: str) -> JobRun | None:
    with sessions.begin() as session:
        return session.get(JobRun, name)


# --- the lock ------------------------------------------------------------------------------


def test_a_held_lock_is_refused_to_a_second_holder_until_released(
    migrated_engine: sa.Engine, tmp_path: Path
) -> None:
    """While one holder has a job's lock another gets False; once released, True."""
    other_engine = make_engine(migrated_engine.url.render_as_string(hide_password=False))
    try:
        with job_lock(migrated_engine, "feed", lock_dir=tmp_path) as first:
            assert first is True
            with job_lock(other_engine, "feed", lock_dir=tmp_path) as second:
                assert second is False
            with job_lock(other_engine, "watchdog", lock_dir=tmp_path) as unrelated:
                assert unrelated is True
        with job_lock(other_engine, "feed", lock_dir=tmp_path) as again:
            assert again is True
    finally:
        other_engine.dispose()


def test_the_lock_is_released_when_the_block_raises(
    migrated_engine: sa.Engine, tmp_path: Path
) -> None:
    """An exception inside the block does not leave the lock taken."""
    with pytest.raises(ZeroDivisionError), job_lock(migrated_engine, "feed", lock_dir=tmp_path):
        1 / 0  # noqa: B018

    with job_lock(migrated_engine, "feed", lock_dir=tmp_path) as held:
        assert held is True


def test_advisory_lock_keys_are_stable_signed_64_bit() -> None:
    """The key is the same for a name in every process and fits PostgreSQL's bigint."""
    assert advisory_lock_key("change_feed") == advisory_lock_key("change_feed")
    assert advisory_lock_key("change_feed") != advisory_lock_key("watchdog")
    assert -(2**63) <= advisory_lock_key("change_feed") < 2**63


def test_sqlite_locks_live_beside_the_database(tmp_path: Path) -> None:
    """A SQLite database's lock files go in a directory beside it, named after it."""
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'otacm.sqlite3'}")
    try:
        assert default_lock_dir(engine) == (tmp_path / "data" / "otacm.sqlite3.locks").resolve()
    finally:
        engine.dispose()


# --- run_job -------------------------------------------------------------------------------


def test_a_job_runs_and_its_run_is_recorded(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session]
) -> None:
    """A first run happens, is called with "now", and leaves a run record due an interval on."""
    job = CountingJob()

    outcome, report = run_job(
        migrated_engine, sessions, ScheduledJob("feed", INTERVAL, job), owner="a", now=T0
    )

    assert (outcome, report) == (JobOutcome.RAN, Report())
    assert job.calls == [T0]
    record = job_run(sessions, "feed")
    assert record is not None
    assert (record.owner, record.started_at, record.next_due_at) == (
        "a",
        T0,
        T0 + dt.timedelta(seconds=INTERVAL),
    )
    assert record.finished_at is not None and record.finished_at >= T0
    assert record.last_success_at == record.finished_at
    assert (record.runs, record.failures, record.last_error) == (1, 0, None)


def test_a_second_scheduler_finds_the_job_not_due(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session]
) -> None:
    """Two schedulers ticking in one interval run the job once between them, not twice."""
    job = CountingJob()
    scheduled = ScheduledJob("feed", INTERVAL, job)
    run_job(migrated_engine, sessions, scheduled, owner="a", now=T0)

    later = T0 + dt.timedelta(seconds=INTERVAL / 2)
    outcome, report = run_job(migrated_engine, sessions, scheduled, owner="b", now=later)

    assert (outcome, report) == (JobOutcome.NOT_DUE, None)
    assert job.calls == [T0]
    record = job_run(sessions, "feed")
    assert record is not None and (record.owner, record.runs) == ("a", 1)


def test_a_tick_just_before_due_time_runs_the_job(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session]
) -> None:
    """A scheduler whose tick comes slightly early (clock drift) still runs the job."""
    job = CountingJob()
    scheduled = ScheduledJob("feed", INTERVAL, job)
    run_job(migrated_engine, sessions, scheduled, owner="a", now=T0)

    early = T0 + dt.timedelta(seconds=INTERVAL * 0.95)
    outcome, _ = run_job(migrated_engine, sessions, scheduled, owner="b", now=early)

    assert outcome is JobOutcome.RAN
    assert job.calls == [T0, early]
    record = job_run(sessions, "feed")
    assert record is not None
    assert (record.owner, record.runs, record.next_due_at) == (
        "b",
        2,
        early + dt.timedelta(seconds=INTERVAL),
    )


def test_a_failing_job_is_recorded_and_runs_again_next_time(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session]
) -> None:
    """A job that raises is FAILED (not raised), counted, and runs at its next due time."""
    job = CountingJob(error=ConnectionError("venue unreachable"))
    scheduled = ScheduledJob("feed", INTERVAL, job)

    outcome, error = run_job(migrated_engine, sessions, scheduled, owner="a", now=T0)
    again, _ = run_job(migrated_engine, sessions, scheduled, owner="a", now=T0)

    assert outcome is JobOutcome.FAILED
    assert isinstance(error, ConnectionError)
    assert again is JobOutcome.NOT_DUE
    record = job_run(sessions, "feed")
    assert record is not None
    assert (record.failures, record.last_error) == (1, "ConnectionError: venue unreachable")
    assert record.finished_at is not None and record.last_success_at is None

    job.error = None
    next_time = T0 + dt.timedelta(seconds=INTERVAL)
    outcome, _ = run_job(migrated_engine, sessions, scheduled, owner="a", now=next_time)

    assert outcome is JobOutcome.RAN
    assert job.calls == [T0, next_time]
    record = job_run(sessions, "feed")
    assert record is not None and (record.runs, record.failures) == (2, 0)


def test_a_run_ended_by_the_stop_is_no_failure_and_is_due_again(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session]
) -> None:
    """A job whose venue call a stopping process cancelled (ThrottleClosed among its
    causes) is STOPPED: ended, the failure count and last error of the run before kept,
    and due again at once, for the next start."""
    scheduled = ScheduledJob("feed", INTERVAL, CountingJob(error=ConnectionError("down")))
    run_job(migrated_engine, sessions, scheduled, owner="a", now=T0)
    later = T0 + dt.timedelta(seconds=INTERVAL)
    try:
        try:
            raise ThrottleClosed(0.0)
        except ThrottleClosed as closed:
            raise VenueRateLimited("GET", "/orders", reason=str(closed)) from closed
    except VenueRateLimited as exc:
        cancelled = exc
    scheduled = ScheduledJob("feed", INTERVAL, CountingJob(error=cancelled))

    outcome, error = run_job(migrated_engine, sessions, scheduled, owner="a", now=later)

    assert (outcome, error) == (JobOutcome.STOPPED, cancelled)
    record = job_run(sessions, "feed")
    assert record is not None and record.finished_at is not None
    assert (record.runs, record.failures, record.last_error) == (2, 1, "ConnectionError: down")
    assert record.next_due_at == later
    again, _ = run_job(migrated_engine, sessions, scheduled, owner="b", now=later)
    assert again is JobOutcome.STOPPED  # due at once: run again, not skipped as not due


def test_a_busy_job_is_not_run(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """While another holder has the job's lock, run_job reports BUSY and runs nothing."""
    job = CountingJob()
    scheduled = ScheduledJob("feed", INTERVAL, job)

    with job_lock(migrated_engine, "feed", lock_dir=tmp_path):
        outcome, _ = run_job(
            migrated_engine, sessions, scheduled, owner="b", now=T0, lock_dir=tmp_path
        )

    assert outcome is JobOutcome.BUSY
    assert job.calls == []
    assert job_run(sessions, "feed") is None


def test_force_ignores_the_due_time_but_not_the_lock(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """``force`` runs a job that is not due, yet a job another holder runs stays BUSY."""
    job = CountingJob()
    scheduled = ScheduledJob("feed", INTERVAL, job)
    run_job(migrated_engine, sessions, scheduled, owner="a", now=T0, lock_dir=tmp_path)
    soon = T0 + dt.timedelta(seconds=1)

    forced, _ = run_job(
        migrated_engine, sessions, scheduled, owner="poll", now=soon, lock_dir=tmp_path, force=True
    )
    with job_lock(migrated_engine, "feed", lock_dir=tmp_path):
        busy, _ = run_job(
            migrated_engine,
            sessions,
            scheduled,
            owner="poll",
            now=soon,
            lock_dir=tmp_path,
            force=True,
        )

    assert (forced, busy) == (JobOutcome.RAN, JobOutcome.BUSY)
    assert job.calls == [T0, soon]


def test_a_database_without_the_schema_fails_the_job_without_raising(
    engine: sa.Engine,
) -> None:
    """When the run record cannot be written, run_job reports FAILED and the job is not run."""
    job = CountingJob()

    outcome, error = run_job(
        engine, make_sessions(engine), ScheduledJob("feed", INTERVAL, job), owner="a", now=T0
    )

    assert outcome is JobOutcome.FAILED
    assert isinstance(error, sa.exc.DBAPIError)
    assert job.calls == []


# --- real processes ------------------------------------------------------------------------


@dataclass
class Competitors:
    """Competitor processes on one database, and what they recorded."""

    url: str
    directory: Path
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, owner: str, mode: str) -> subprocess.Popen[bytes]:
        log = (self.directory / f"{owner}.log").open("wb")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.heartbeat.job_competitor",
                self.url,
                str(self.directory),
                owner,
                mode,
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.started[owner] = process
        return process

    def events(self, owner: str) -> list[dict[str, Any]]:
        path = self.directory / f"{owner}.jsonl"
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8").split("\n")
        # The last piece is empty, or a line still being written.
        return [json.loads(line) for line in lines[:-1]]

    def runs(self, owner: str) -> list[dict[str, Any]]:
        return [event for event in self.events(owner) if event["outcome"] == "ran"]

    def outcomes(self, owner: str) -> set[str]:
        return {event["outcome"] for event in self.events(owner)}

    def logs(self) -> str:
        return "\n".join(
            f"--- {owner} ---\n{(self.directory / f'{owner}.log').read_text(errors='replace')}"
            for owner in self.started
        )


@pytest.fixture
def competitors(migrated_engine: sa.Engine, tmp_path: Path) -> Iterator[Competitors]:
    """Start competitor processes on the migrated database; all killed after the test."""
    marker_metadata.create_all(migrated_engine)
    directory = tmp_path / "competition"
    directory.mkdir()
    group = Competitors(migrated_engine.url.render_as_string(hide_password=False), directory)
    yield group
    (directory / "stop").touch()
    for process in group.started.values():
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
    sys.stderr.write(group.logs())


@pytest.mark.process
def test_two_processes_share_a_job_and_never_run_it_at_the_same_time(
    competitors: Competitors,
) -> None:
    """Two schedulers competing for one job both run it, and no two runs ever overlap."""
    competitors.start("alpha", "share")
    competitors.start("beta", "share")

    wait_until(
        lambda: len(competitors.runs("alpha")) >= 5 and len(competitors.runs("beta")) >= 5,
        timeout=60,
        what="both processes to run the job five times",
    )
    (competitors.directory / "stop").touch()
    for owner, process in competitors.started.items():
        assert process.wait(timeout=30) == 0, f"{owner} failed:\n{competitors.logs()}"

    runs = sorted(
        competitors.runs("alpha") + competitors.runs("beta"), key=lambda run: run["start"]
    )
    overlaps = [
        (earlier, later) for earlier, later in pairwise(runs) if later["start"] < earlier["end"]
    ]
    assert overlaps == []
    # They did compete: each found the job busy while the other ran it.
    assert "busy" in competitors.outcomes("alpha") | competitors.outcomes("beta")


@pytest.mark.process
def test_a_killed_holder_frees_the_job_and_its_work_is_rolled_back(
    competitors: Competitors, migrated_engine: sa.Engine, sessions: sessionmaker[Session]
) -> None:
    """SIGKILL mid-job releases the lock; the other process runs the job next; the killed
    run's uncommitted write is gone."""
    holder = competitors.start("holder", "hold")
    wait_until(
        lambda: (competitors.directory / "holder.inside").exists() or holder.poll() is not None,
        timeout=30,
        what="the holder to be inside the job",
    )
    assert holder.poll() is None, competitors.logs()
    competitors.start("successor", "share")
    wait_until(
        lambda: "busy" in competitors.outcomes("successor"),
        timeout=30,
        what="the successor to find the job busy",
    )
    assert competitors.runs("successor") == []

    holder.kill()
    holder.wait(timeout=30)

    wait_until(
        lambda: competitors.runs("successor"),
        timeout=30,
        what="the successor to run the job after the holder died",
    )
    with sessions.begin() as session:
        assert session.scalars(sa.select(marker.c.owner)).all() == []
    record = job_run(sessions, JOB_NAME)
    assert record is not None
    assert record.owner == "successor"
    assert record.runs >= 2  # the holder's start counted; its run never finished
