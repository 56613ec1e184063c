"""A job of many units (:class:`heartbeat.split_jobs.SplitJob`): each unit its own lock
and run record, several at once, a slow or failing unit delaying only itself.

Every test runs on SQLite (file locks) and PostgreSQL (advisory locks). The lock held
"by another process" is held by a real one.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.coordination import JobFailed, JobOutcome, ScheduledJob, run_job
from heartbeat.split_jobs import SplitJob, SplitReport, unit_name
from storage.engine import make_sessions
from storage.records import JobRun
from tests.support.processes import ROOT
from tests.support.stack import wait_until

T0 = dt.datetime(2026, 5, 27, 12, 0, tzinfo=dt.UTC)
INTERVAL = 60.0
KEYS = ("a", "b", "c", "d")


@dataclass
class Units:
    """Units that record their calls; one may be told to block until released, one to fail."""

    calls: list[str] = field(default_factory=list)
    slow: str | None = None
    failing: str | None = None
    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def job(self, keys: tuple[str, ...] = KEYS, *, workers: int = 2) -> SplitJob:
        units = [ScheduledJob(unit_name("split", key), INTERVAL, self.unit(key)) for key in keys]
        return SplitJob("split", INTERVAL, units, workers=workers, clock=lambda: T0)

    def unit(self, key: str) -> Callable[[dt.datetime], Counts]:
        def run(now: dt.datetime) -> dict[str, int]:
            with self.lock:
                self.calls.append(key)
            if key == self.slow:
                self.entered.set()
                self.release.wait(timeout=120)
            if key == self.failing:
                raise JobFailed(f"unit {key} failed", report=Counts(done=0, failed=1))
            return Counts()

        return run


@dataclass
class Counts:
    """A unit's report, as the real units return one."""

    done: int = 1
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"done": self.done, "failed": self.failed}


def records(sessions: sessionmaker[Session]) -> dict[str, JobRun]:
    with sessions.begin() as session:
        return {row.name: row for row in session.scalars(sa.select(JobRun))}


@pytest.fixture
def held_by_another_process(migrated_engine: sa.Engine, tmp_path: Path) -> Iterator[None]:
    """Unit ``split:b``'s lock held by a separate process until the test ends."""
    url = migrated_engine.url.render_as_string(hide_password=False)
    ready = tmp_path / "held"
    code = (
        "import sys, time, pathlib\n"
        "from heartbeat.coordination import job_lock\n"
        "from storage.engine import make_engine\n"
        "with job_lock(make_engine(sys.argv[1]), 'split:b', lock_dir=pathlib.Path(sys.argv[2])) "
        "as held:\n"
        "    assert held\n"
        "    pathlib.Path(sys.argv[3]).touch()\n"
        "    sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, url, str(tmp_path), str(ready)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
    )
    try:
        wait_until(lambda: ready.exists() or holder.poll() is not None, timeout=60, what="lock")
        assert holder.poll() is None, "the lock holder died"
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.mark.process
@pytest.mark.usefixtures("held_by_another_process")
def test_a_unit_another_process_holds_is_skipped_and_the_others_run(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Each unit has its own lock: the one held elsewhere is busy, the others run."""
    units = Units()
    report = units.job().run_all(
        migrated_engine, sessions, owner="me", force=False, lock_dir=tmp_path
    )

    assert sorted(units.calls) == ["a", "c", "d"]
    assert report.outcomes == {JobOutcome.RAN: 3, JobOutcome.BUSY: 1}
    assert sorted(records(sessions)) == ["split:a", "split:c", "split:d"]


def test_each_unit_has_its_own_run_record_and_runs_once_per_interval(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A first run runs every unit and records each; a second in the same interval, by
    another owner, finds none due; ``force`` runs them all again."""
    units = Units()
    job = units.job()

    first = job.run_all(migrated_engine, sessions, owner="one", force=False, lock_dir=tmp_path)
    second = job.run_all(migrated_engine, sessions, owner="two", force=False, lock_dir=tmp_path)
    forced = job.run_all(migrated_engine, sessions, owner="two", force=True, lock_dir=tmp_path)

    assert first.outcomes == {JobOutcome.RAN: 4}
    assert first.as_dict()["done"] == 4
    assert second.outcomes == {JobOutcome.NOT_DUE: 4}
    assert forced.outcomes == {JobOutcome.RAN: 4}
    assert sorted(units.calls) == sorted(KEYS * 2)
    runs = records(sessions)
    assert sorted(runs) == [f"split:{key}" for key in KEYS]
    assert all((run.runs, run.owner) == (2, "two") for run in runs.values())
    assert all(run.next_due_at == T0 + dt.timedelta(seconds=INTERVAL) for run in runs.values())


def test_a_failing_unit_fails_only_its_own_record(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A unit that fails is recorded on its own run record with its message; the others
    succeed; run_job of the whole job reports the failure with every unit's counts."""
    units = Units(failing="c")

    outcome, error = run_job(
        migrated_engine, sessions, units.job(), owner="poll", now=T0, lock_dir=tmp_path, force=True
    )

    assert outcome is JobOutcome.FAILED
    assert isinstance(error, JobFailed)
    assert str(error) == "1 of 4 units failed, the first: split:c: unit c failed"
    assert isinstance(error.report, SplitReport)
    assert error.report.as_dict() == {
        "units": 4,
        "ran": 3,
        "not_due": 0,
        "busy": 0,
        "failed": 1,
        "stopped": 0,
        "done": 3,
    }
    runs = records(sessions)
    assert (runs["split:c"].failures, runs["split:c"].last_error) == (1, "unit c failed")
    assert runs["split:c"].last_success_at is None
    assert all(runs[f"split:{key}"].failures == 0 for key in "abd")


def test_a_tick_hands_due_units_to_the_pool_and_a_slow_one_delays_only_itself(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The scheduler's tick returns at once; while one unit hangs, the others (more than
    the pool's workers) all finish; a unit still queued or running is not queued again."""
    units = Units(slow="a")
    job = units.job(("a", "b", "c", "d", "e", "f"), workers=2)
    try:
        outcome, _ = run_job(migrated_engine, sessions, job, owner="s", now=T0, lock_dir=tmp_path)
        assert outcome is JobOutcome.RAN
        assert units.entered.wait(timeout=60)

        def others_done() -> bool:
            runs = records(sessions)
            return all(
                f"split:{key}" in runs and runs[f"split:{key}"].finished_at is not None
                for key in "bcdef"
            )

        wait_until(others_done, timeout=60, what="the other units to finish")
        handed = job.dispatch(migrated_engine, sessions, owner="s", now=T0, lock_dir=tmp_path)
        assert not units.release.is_set()
        assert records(sessions)["split:a"].finished_at is None
    finally:
        units.release.set()
        job.close()

    assert handed == 0  # the slow unit is still queued here; the others are not due
    assert sorted(units.calls) == ["a", "b", "c", "d", "e", "f"]
    assert records(sessions)["split:a"].finished_at is not None


def test_a_unit_due_again_is_handed_again_and_a_closed_job_hands_nothing(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A tick an interval later runs each unit again; after close, ticks start nothing."""
    units = Units()
    job = units.job(("a", "b"))
    later = T0 + dt.timedelta(seconds=INTERVAL)
    try:
        assert job.dispatch(migrated_engine, sessions, owner="s", now=T0, lock_dir=tmp_path) == 2
        wait_until(lambda: len(units.calls) == 2, timeout=60, what="the first runs")
        wait_until(
            lambda: all(r.finished_at for r in records(sessions).values()),
            timeout=60,
            what="the first runs' records",
        )
        job._clock = lambda: later  # the units start at the later time
        assert job.dispatch(migrated_engine, sessions, owner="s", now=later, lock_dir=tmp_path) == 2
        wait_until(lambda: len(units.calls) == 4, timeout=60, what="the second runs")
    finally:
        job.close()

    much_later = later + dt.timedelta(hours=1)
    assert (
        job.dispatch(migrated_engine, sessions, owner="s", now=much_later, lock_dir=tmp_path) == 0
    )
    assert sorted(units.calls) == ["a", "a", "b", "b"]


def test_the_first_tick_removes_records_of_units_no_longer_configured(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A removed unit's record (a partner no longer configured) and the job's record from
    before it was split go; other jobs' records stay, even one whose name matches the
    prefix but for ``_`` (not a LIKE wildcard here)."""
    names = ["split", "split:a", "split:gone", "split_1", "split_1:gone", "splitX1:z", "watchdog"]
    with sessions.begin() as session:
        for name in names:
            session.add(
                JobRun(name=name, owner="old", started_at=T0, next_due_at=T0, runs=1, failures=0)
            )
    other = SplitJob("split_1", INTERVAL, [], workers=1)
    units = Units().job(("a",))
    try:
        assert units.forget_others(sessions) == 2
        assert other.forget_others(sessions) == 2
        assert sorted(records(sessions)) == ["split:a", "splitX1:z", "watchdog"]
        # A scheduler's first tick does it too (here: nothing left to remove), once.
        units.dispatch(migrated_engine, sessions, owner="s", now=T0, lock_dir=tmp_path)
    finally:
        units.close()


def test_only_selects_the_job_or_some_of_its_units() -> None:
    """``otacm poll --job`` takes the job's name or a unit's."""
    job = Units().job()

    assert job.only(["split"]) is job
    selected = job.only(["split:b", "watchdog"])
    assert selected is not None and [u.name for u in selected.units] == ["split:b"]
    assert job.only(["watchdog"]) is None
    assert job.names()[:2] == ("split", "split:a")


def test_a_tick_without_its_database_fails_and_says_so_once_an_interval(
    engine: sa.Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ticks come every second: one that cannot read the run records (no schema here)
    fails without raising, and only the first of an interval's failed ticks is logged."""
    job = Units().job()
    sessions = make_sessions(engine)

    outcomes = [
        run_job(engine, sessions, job, owner="s", now=T0, lock_dir=tmp_path)[0] for _ in range(3)
    ]

    assert outcomes == [JobOutcome.FAILED] * 3
    logged = [r for r in caplog.records if "could not be run" in r.getMessage()]
    assert len(logged) == 1 and logged[0].getMessage().startswith("job split ")
