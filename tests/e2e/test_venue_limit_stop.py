"""A worker stopped while it waits for a place of the venue's key exits at once.

The key's places in flight are shared by every process (:mod:`storage.venue_limits`); the
test holds the only one, so a real ``otacm worker`` given a webhook's order to fetch
waits for it. On SIGTERM the wait ends at once: the worker exits 0 long before the
client would have given up, the inbox row is pending again with the attempt not counted,
and, once the place is free, a restarted worker fetches the order exactly once. On
SQLite and PostgreSQL (``migrated_engine``).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest
import sqlalchemy as sa

from otacm.settings import Settings
from storage.venue_limits import close_shared_throttles, shared_throttle
from tests.e2e.conftest import E2E, OtacmProcess, otacm_environment, wait_until
from venue.retry import RetryPolicy

pytestmark = pytest.mark.process

STOPPED_WITHIN = 20.0
"""Seconds a stopped worker may take to exit: a third of how long its getOrder would have
waited for the place otherwise (the client gives up only at its deadline,
:attr:`RetryPolicy.deadline`, checked below)."""


@pytest.fixture(autouse=True)
def _fresh_throttles() -> Iterator[None]:
    """The test's own holder of the place is made fresh and closed after the test."""
    close_shared_throttles()
    yield
    close_shared_throttles()


@pytest.mark.parametrize("settings_changes", [{"venue_max_in_flight": 1}], ids=["one-place"])
def test_a_worker_stopped_while_waiting_for_a_venue_place_exits_at_once_and_loses_nothing(
    e2e: E2E,
    otacm: Callable[..., OtacmProcess],
    settings: Settings,
    migrated_engine: sa.Engine,
) -> None:
    """SIGTERM while the worker's getOrder waits for the key's one place, held elsewhere:
    it exits 0 without the call; the row is pending, its attempt uncounted; restarted
    once the place is free, a worker fetches the order once and mirrors it."""
    assert RetryPolicy().deadline >= 3 * STOPPED_WITHIN  # what the worker would wait
    (connection,) = settings.connections
    (order_id,) = e2e.create_many(1, "STOP")
    e2e.deliver()
    assert e2e.inbox_states() == {"pending": 1}
    environment = otacm_environment(
        settings, OTACM_VENUE_MAX_IN_FLIGHT=str(connection.venue_max_in_flight)
    )

    with ExitStack() as place:
        # The key's only place, taken through the shared limit as another process would.
        place.enter_context(shared_throttle(migrated_engine, connection).slot())
        worker = otacm("worker", environment=environment)

        def waiting() -> bool:
            assert worker.alive(), worker.output()
            return e2e.inbox_states() == {"leased": 1}

        wait_until(waiting, 30, what="the worker to claim the order's row")
        worker.popen.terminate()
        stopping = time.monotonic()
        try:
            status = worker.popen.wait(timeout=STOPPED_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still waiting for the place {STOPPED_WITHIN:.0f} s after SIGTERM")
        assert status == 0, worker.output()
        assert time.monotonic() - stopping < STOPPED_WITHIN
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
