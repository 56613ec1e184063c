"""Cancelling a shared venue limit ends every wait of its calls at once, not only for a place.

A stopping role cancels its throttles (:func:`storage.venue_limits.cancel_shared_throttles`);
a call waiting out a ``Retry-After`` stored for the key ends with
:class:`~venue.throttle.ThrottleClosed`, unsent, as one waiting for a place does
(tests/e2e/test_venue_limit_stop.py). On SQLite and PostgreSQL (``migrated_engine``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from storage.venue_limits import cancel_shared_throttles, close_shared_throttles, shared_throttle
from venue.connection import VenueConnection
from venue.throttle import HeldOff, SharedThrottle, ThrottleClosed

HOLD = 600.0
"""The ``Retry-After`` the call waits out: far longer than the test waits for it to end."""


@pytest.fixture(autouse=True)
def _fresh_throttles() -> Iterator[None]:
    """Throttles are kept per process; each test starts and ends without any."""
    close_shared_throttles()
    yield
    close_shared_throttles()


def _connection() -> VenueConnection:
    # The slot is taken and waited for; no call is made, so the venue is never reached.
    return VenueConnection(
        api_base_url="http://venue.invalid",
        tenant="00000000-0000-0000-0000-000000000001",
        company="CRONUS International Ltd.",
        api_key=SecretStr("key-for-tests"),
        partner_ids=["21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e"],
        venue_max_in_flight=1,
    )


def test_a_wait_for_a_retry_after_ends_when_the_limit_is_cancelled(
    migrated_engine: sa.Engine,
) -> None:
    """A call that would wait out a stored Retry-After of ten minutes ends with
    ThrottleClosed once its throttle is cancelled, and a new throttle of the key still
    waits the hold out (the hold is the key's, not the cancelled throttle's)."""
    connection = _connection()
    throttle = shared_throttle(migrated_engine, connection)
    try:
        _cancel_while_waiting_out_a_hold(migrated_engine, connection, throttle)
    finally:
        # Cancelled, it is no longer the registry's: closed here, or its pool's
        # connections would be collected open, in whatever test runs then.
        close_shared_throttles([throttle])


def _cancel_while_waiting_out_a_hold(
    migrated_engine: sa.Engine, connection: VenueConnection, throttle: SharedThrottle
) -> None:
    throttle.hold_off(HOLD)
    outcome: list[BaseException] = []
    started = threading.Event()

    def call() -> None:
        started.set()
        try:
            with throttle.slot(max_hold=2 * HOLD):
                pass  # pragma: no cover - the hold lasts longer than the test
        except ThrottleClosed as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)  # a failed test leaves it asleep
    thread.start()
    assert started.wait(10)
    cancel_shared_throttles([throttle])
    thread.join(30)
    assert not thread.is_alive(), "still waiting out the Retry-After"
    assert len(outcome) == 1

    fresh = shared_throttle(migrated_engine, connection)
    assert fresh is not throttle
    with pytest.raises(ThrottleClosed), throttle.slot(max_hold=0):
        pass  # pragma: no cover - the cancelled throttle takes no call
    with pytest.raises(HeldOff, match="asked to wait") as held, fresh.slot(max_hold=1):
        pass  # pragma: no cover - the key is still held off
    assert not isinstance(held.value, ThrottleClosed)
