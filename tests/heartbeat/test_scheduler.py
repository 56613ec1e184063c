"""The scheduler's jobs through the surface users touch: ``otacm poll`` and ``otacm scheduler``.

Real processes against a migrated SQLite database and the sandbox over real HTTP: ``poll``
runs every job once and reports it; a job another process holds is reported busy; two
schedulers on one database run each job once per interval between them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.coordination import job_lock
from otacm.settings import Settings
from sandbox import Faults, SandboxConfig, SandboxServer
from storage.engine import make_engine, make_sessions
from storage.migrate import upgrade
from storage.models import Inbox, VenueOrder
from storage.records import JobRun
from tests.support.processes import ROOT, OtacmProcess, otacm_environment, run_otacm
from tests.support.stack import line, wait_until
from venue.client import open_client
from venue.models import OrderRequest

pytestmark = pytest.mark.process

POLL_INTERVAL_JOBS = ["change_feed", "watchdog", "confirm_drafts"]
ALL_JOBS = [
    "change_feed",
    "watchdog",
    "retry_outbox",
    "lost_submissions",
    "metric_figures",
    "confirm_drafts",
    "reconcile",
    "erase_personal_data",
    "prune",
]


@pytest.fixture
def venue_sandbox() -> Iterator[SandboxServer]:
    """The simulated venue on a free port, picking up orders only when told to."""
    with SandboxServer(SandboxConfig(pickup_interval=0, faults=Faults(seed=7))) as server:
        yield server


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """A SQLite database file, not migrated."""
    return f"sqlite:///{tmp_path / 'otacm.sqlite3'}"


@pytest.fixture
def settings(database_url: str, venue_sandbox: SandboxServer) -> Settings:
    """otacm configured for the sandbox (no webhook URL: no subscription job)."""
    config = venue_sandbox.config
    return Settings(
        database_url=database_url,
        api_base_url=venue_sandbox.url,
        tenant=config.tenant,
        environment=config.environment,
        company=config.company,
        api_key=config.api_key,
        partner_ids=[partner.id for partner in config.partners if partner.active],
        webhook_client_states=[SecretStr("scheduler-test-state-51c2")],
        api_tokens=[SecretStr("scheduler-test-token-9e0f")],
    )


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on the settings' database, migrated."""
    engine = make_engine(settings.database_url)
    upgrade(engine)
    try:
        yield make_sessions(engine)
    finally:
        engine.dispose()


def job_runs(sessions: sessionmaker[Session]) -> dict[str, JobRun]:
    with sessions.begin() as session:
        return {row.name: row for row in session.scalars(sa.select(JobRun))}


def poll(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``otacm poll ARGS`` to its end, whatever its exit status."""
    return subprocess.run(
        [sys.executable, "-m", "otacm", "poll", *args],
        cwd=ROOT,
        env=otacm_environment(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_poll_runs_every_job_once_and_follows_an_order_no_webhook_announced(
    settings: Settings, venue_sandbox: SandboxServer, sessions: sessionmaker[Session]
) -> None:
    """``otacm poll --json`` runs each enabled job and records it; its change feed mirrors an
    order created at the venue (there is no webhook subscription), and once the order
    settles a second poll queues its getOrder for the worker."""
    (connection,) = settings.connections
    environment = otacm_environment(settings)
    with open_client(connection) as client:
        order = client.create_order(
            OrderRequest.model_validate(
                {
                    "partnerId": connection.partner_ids[0],
                    "sellToOrderReference": "POLL-0001",
                    "paymentReference": "PAY-POLL-0001",
                    "items": [line()],
                }
            )
        )

    output = run_otacm("poll", "--json", environment=environment, timeout=120)

    results: list[dict[str, Any]] = json.loads(output)
    assert [(r["job"], r["outcome"]) for r in results] == [(job, "ran") for job in ALL_JOBS]
    assert all(isinstance(r["report"], dict) for r in results)
    # The change feed is a unit per partner, each with its own run record.
    partners = connection.partner_ids
    assert len(partners) > 1
    assert results[0]["report"]["units"] == results[0]["report"]["ran"] == len(partners)
    units = [f"change_feed:{connection.name}:{partner}" for partner in partners]
    feed = units[0]
    runs = job_runs(sessions)
    assert sorted(runs) == sorted([*units, *ALL_JOBS[1:]])
    assert all((run.runs, run.failures) == (1, 0) for run in runs.values())
    with sessions.begin() as session:
        mirrored = session.scalars(sa.select(VenueOrder.order_id)).all()
    assert mirrored == [order.order_id]

    venue_sandbox.tick()
    # A partner's unit by its own name, as the job-late alert names it.
    run_otacm("poll", "--job", feed, environment=environment, timeout=120)

    with sessions.begin() as session:
        queued = session.scalars(sa.select(Inbox.order_id)).all()
    assert queued == [order.order_id]
    assert job_runs(sessions)[feed].runs == 2


def test_poll_runs_only_the_named_job_and_prints_a_line(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    """``--job`` limits the run to that job; without ``--json`` it prints one line."""
    output = run_otacm(
        "poll", "--job", "retry_outbox", environment=otacm_environment(settings), timeout=120
    )

    lines = output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("retry_outbox: ran"), output
    assert sorted(job_runs(sessions)) == ["retry_outbox"]


def test_poll_reports_a_job_another_process_runs_as_busy(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    """A job whose lock another process holds (a running scheduler) is busy, not run twice."""
    engine = make_engine(settings.database_url)
    try:
        with job_lock(engine, "watchdog") as held:
            assert held
            done = poll(settings, "--job", "watchdog", "--json")
    finally:
        engine.dispose()

    assert done.returncode == 0, done.stderr
    assert [(r["job"], r["outcome"]) for r in json.loads(done.stdout)] == [("watchdog", "busy")]
    assert job_runs(sessions) == {}


def test_poll_names_an_unknown_job(settings: Settings, sessions: sessionmaker[Session]) -> None:
    """An unknown (or switched-off) job name is an error naming the jobs there are."""
    done = poll(settings, "--job", "check_subscriptions")

    assert done.returncode == 1
    assert "check_subscriptions" in done.stderr and "change_feed" in done.stderr
    assert job_runs(sessions) == {}


def test_poll_on_an_unmigrated_database_fails_clearly(settings: Settings) -> None:
    """Before ``otacm db upgrade``, poll exits 1 and says what to do."""
    done = poll(settings, "--json")

    assert done.returncode == 1
    assert "otacm db upgrade" in done.stderr
    assert done.stdout == ""


def test_two_schedulers_run_each_job_once_per_interval_between_them(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Two ``otacm scheduler`` processes on one database both tick every job, yet each
    job due once per interval runs once, not twice."""
    environment = otacm_environment(settings, OTACM_POLL_INTERVAL="3600", OTACM_LOG_LEVEL="DEBUG")
    schedulers = [
        OtacmProcess(["scheduler"], environment, tmp_path / f"scheduler-{n}.log") for n in (1, 2)
    ]
    try:

        def both_ticked() -> bool:
            return all(
                f"job {job}: " in scheduler.output()
                for scheduler in schedulers
                for job in POLL_INTERVAL_JOBS
            ) or not all(scheduler.alive() for scheduler in schedulers)

        wait_until(both_ticked, timeout=60, what="both schedulers to tick every job")
        assert all(scheduler.alive() for scheduler in schedulers)
        runs = job_runs(sessions)
    finally:
        codes = [scheduler.stop() for scheduler in schedulers]
        for scheduler in schedulers:
            sys.stderr.write(f"--- {scheduler.log.name} ---\n{scheduler.output()}\n")

    assert codes == [0, 0]
    # The change feed ticks as a whole and runs as a unit per partner.
    (connection,) = settings.connections
    records = [f"change_feed:{connection.name}:{p}" for p in connection.partner_ids]
    records += POLL_INTERVAL_JOBS[1:]
    assert {job: runs[job].runs for job in records} == dict.fromkeys(records, 1)
    assert all(runs[job].failures == 0 for job in records)


def test_a_scheduler_follows_the_partners_configured_now_and_forgets_the_others(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Partners change with the settings: a scheduler started with another partner list
    follows the new partner under its own unit and removes the removed partner's run record
    (and the feed's record from before it was a unit per partner), so that none alerts as
    a job that stopped succeeding."""
    (connection,) = settings.connections
    kept, removed = connection.partner_ids[:2]
    before = otacm_environment(settings, OTACM_PARTNER_IDS=removed)
    run_otacm("poll", "--job", "change_feed", environment=before, timeout=120)
    with sessions.begin() as session:
        old = job_runs(sessions)[f"change_feed:{connection.name}:{removed}"]
        session.add(
            JobRun(
                name="change_feed",
                owner="before-the-split",
                started_at=old.started_at,
                next_due_at=old.next_due_at,
                runs=1,
                failures=0,
            )
        )
    environment = otacm_environment(settings, OTACM_PARTNER_IDS=kept)
    scheduler = OtacmProcess(["scheduler"], environment, tmp_path / "scheduler.log")
    unit = f"change_feed:{connection.name}:{kept}"
    try:
        wait_until(
            lambda: unit in job_runs(sessions) or not scheduler.alive(),
            timeout=60,
            what="the new partner's unit to run",
        )
        assert scheduler.alive()
    finally:
        code = scheduler.stop()
        sys.stderr.write(f"--- {scheduler.log.name} ---\n{scheduler.output()}\n")

    assert code == 0
    feed_records = [name for name in job_runs(sessions) if name.startswith("change_feed")]
    assert feed_records == [unit]
