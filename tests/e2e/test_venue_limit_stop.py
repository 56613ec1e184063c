"""A worker or scheduler stopped while it waits for a place of the venue's key exits at once.

The key's places in flight are shared by every process (:mod:`storage.venue_limits`); the
test holds the only one, so a real ``otacm worker`` given a webhook's order to fetch, or
a real ``otacm scheduler`` reading the change feed, waits for it. On SIGTERM the wait
ends at once: the process exits 0 long before the client would have given up, and
nothing is lost: the inbox row is pending again with the attempt not counted, the feed's
cursor stays, and once the place is free a restarted process does the work exactly once.
In one process, :func:`otacm.processes.open_runtime` cancels its limit on ``stop`` and
leaves no thread behind. On SQLite and PostgreSQL (``migrated_engine``).
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from heartbeat.feed import FEED_JOB
from otacm.processes import open_runtime
from otacm.settings import Settings
from receiver import metrics
from receiver.metrics import VenueCallMetrics
from storage.records import JobRun
from storage.venue_limits import close_shared_throttles, shared_throttle
from tests.e2e.conftest import E2E, OtacmProcess, otacm_environment, wait_until
from venue.errors import VenueRateLimited
from venue.retry import RetryPolicy
from venue.throttle import ThrottleClosed

pytestmark = pytest.mark.parametrize(
    "settings_changes", [{"venue_max_in_flight": 1}], ids=["one-place"]
)

STOPPED_WITHIN = 20.0
"""Seconds a stopped process may take to exit: a third of how long its call would have
waited for the place otherwise (the client gives up only at its deadline,
:attr:`RetryPolicy.deadline`, checked below)."""

POLL_INTERVAL = "10"
"""The shortest change-feed interval the settings accept: a restarted scheduler reads the
feed again within it."""


@pytest.fixture(autouse=True)
def _fresh_throttles() -> Iterator[None]:
    """The test's own holder of the place is made fresh and closed after the test."""
    close_shared_throttles()
    yield
    close_shared_throttles()


@contextmanager
def the_only_place(engine: sa.Engine, settings: Settings) -> Iterator[None]:
    """The key's only place in flight, taken through the shared limit as another process's
    call would, and held until the block ends."""
    (connection,) = settings.connections
    assert connection.venue_max_in_flight == 1
    with shared_throttle(engine, connection).slot():
        yield


def stopped_at_once(process: OtacmProcess) -> None:
    """SIGTERM ``process``; it exits 0 within :data:`STOPPED_WITHIN` seconds."""
    assert RetryPolicy().deadline >= 3 * STOPPED_WITHIN  # what the waiting call would take
    process.popen.terminate()
    stopping = time.monotonic()
    try:
        status = process.popen.wait(timeout=STOPPED_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still waiting for the place {STOPPED_WITHIN:.0f} s after SIGTERM")
    assert status == 0, process.output()
    assert time.monotonic() - stopping < STOPPED_WITHIN


def environment_of(settings: Settings) -> dict[str, str]:
    """The roles' environment: the settings, with one place in flight for the key."""
    (connection,) = settings.connections
    return otacm_environment(
        settings,
        OTACM_VENUE_MAX_IN_FLIGHT=str(connection.venue_max_in_flight),
        OTACM_POLL_INTERVAL=POLL_INTERVAL,
    )


@pytest.mark.process
def test_a_worker_stopped_while_waiting_for_a_venue_place_exits_at_once_and_loses_nothing(
    e2e: E2E,
    otacm: Callable[..., OtacmProcess],
    settings: Settings,
    migrated_engine: sa.Engine,
) -> None:
    """SIGTERM while the worker's getOrder waits for the key's one place, held elsewhere:
    it exits 0 without the call; the row is pending, its attempt uncounted; restarted
    once the place is free, a worker fetches the order once and mirrors it."""
    (order_id,) = e2e.create_many(1, "STOP")
    e2e.deliver()
    assert e2e.inbox_states() == {"pending": 1}
    environment = environment_of(settings)

    with the_only_place(migrated_engine, settings):
        worker = otacm("worker", environment=environment)

        def claimed() -> bool:
            assert worker.alive(), worker.output()
            return e2e.inbox_states() == {"leased": 1}

        wait_until(claimed, 30, what="the worker to claim the order's row")
        stopped_at_once(worker)
        assert "getOrder not sent, stopping" in worker.output()
        [row] = e2e.inbox()
        assert (str(row.state), row.attempts, row.lease_owner) == ("pending", 0, None)
        assert e2e.calls("getOrder") == 0

    restarted = otacm("worker", environment=environment)
    wait_until(lambda: e2e.inbox_states() == {"done": 1}, 30, what="the order fetched")
    assert restarted.stop() == 0, restarted.output()
    [row] = e2e.inbox()
    assert row.attempts == 1
    assert e2e.calls("getOrder") == 1
    e2e.assert_mirrored([order_id])


@pytest.mark.process
def test_a_scheduler_stopped_while_its_change_feed_waits_for_a_venue_place_exits_at_once(
    e2e: E2E,
    otacm: Callable[..., OtacmProcess],
    settings: Settings,
    migrated_engine: sa.Engine,
) -> None:
    """SIGTERM while the change feed's listing waits for the key's one place: the
    scheduler exits 0, the feed's run recorded as ended by the stop (not as a failure),
    nothing read; restarted once the place is free, the feed finds the order (whose
    webhook was lost) once."""
    e2e.faults(dropRate=1.0)
    (order_id,) = e2e.create_many(1, "FEED")
    e2e.deliver()
    assert e2e.inbox() == []
    environment = environment_of(settings)

    def feed_runs() -> list[JobRun]:
        with e2e.read_sessions.begin() as session:
            query = sa.select(JobRun).where(JobRun.name.startswith(FEED_JOB))
            return list(session.scalars(query))

    with the_only_place(migrated_engine, settings):
        scheduler = otacm("scheduler", environment=environment)

        def feed_waiting() -> bool:
            assert scheduler.alive(), scheduler.output()
            return any(run.finished_at is None for run in feed_runs())

        wait_until(feed_waiting, 30, what="the change feed's run to start")
        stopped_at_once(scheduler)
        assert "left to end with the process" not in scheduler.output()
        [run] = feed_runs()
        assert run.finished_at is not None
        # Ended by the stop, not failed: no failure counted, no error, due again at once.
        assert (run.runs, run.failures, run.last_error) == (1, 0, None)
        assert run.next_due_at <= run.finished_at
        assert e2e.calls("listOrdersByPartner") == 0
        assert e2e.inbox() == []

    restarted = otacm("scheduler", environment=environment)
    wait_until(lambda: bool(e2e.inbox()), 60, what="the change feed to find the order")
    assert restarted.stop() == 0, restarted.output()
    assert [(str(row.order_id), str(row.source)) for row in e2e.inbox()] == [(order_id, "poll")]
    [run] = feed_runs()
    assert (run.runs, run.failures) == (2, 0)


def test_a_runtime_cancels_its_venue_limit_on_stop_and_leaves_no_thread(
    e2e: E2E, settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """In one process: once ``stop`` is set, the runtime's calls end unsent at once and
    a new throttle replaces the cancelled one; its watcher ends with the runtime, stopped
    or not."""
    # A registry of the test's own: a worker process registers its metrics once, globally.
    monkeypatch.setattr(
        metrics, "VenueCallMetrics", lambda registry: VenueCallMetrics(CollectorRegistry())
    )
    (connection,) = settings.connections
    (order_id,) = e2e.create_many(1, "RUNTIME")
    calls = e2e.calls("getOrder")

    def watchers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "venue-limit-stop"]

    with open_runtime(settings, stop=threading.Event()) as runtime:
        assert len(watchers()) == 1
        [client] = runtime.clients.values()
        assert client.get_order(order_id).order_id == order_id
    assert watchers() == []  # exited without a stop: its watcher ended with it

    stop = threading.Event()
    with open_runtime(settings, stop=stop) as runtime:
        [client] = runtime.clients.values()
        cancelled = shared_throttle(runtime.engine, connection)  # the runtime's: one a process
        stop.set()

        def is_cancelled() -> bool:
            try:
                with cancelled.slot():  # a place of the key taken and let go: no call
                    return False
            except ThrottleClosed:
                return True

        wait_until(is_cancelled, 10, what="the runtime's venue limit cancelled")
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(VenueRateLimited) as held:
            client.get_order(order_id)
        assert isinstance(held.value.__cause__, ThrottleClosed)
        # Not tried again: a stopping process's closed limit stays closed.
        assert "gave up after 1 attempts" in caplog.text
        assert shared_throttle(runtime.engine, connection) is not cancelled
    assert watchers() == []
    assert e2e.calls("getOrder") == calls + 1  # the call before the stop alone
