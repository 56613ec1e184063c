"""``otacm worker`` stopped while a shop endpoint is slow to answer an event.

A real worker process, configured for one shop endpoint through ``OTACM_SHOP_ENDPOINT_*``
as an operator would, sends to a receiving shop over real HTTP (every signature verified
with the ``standardwebhooks`` library, :mod:`tests.orders.test_shop_events`). On SIGTERM
mid-POST it waits for the answer, records the delivery and exits; restarted, it does not
send that event again. On SQLite and PostgreSQL (``migrated_engine``).
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable

import pytest
from sqlalchemy.orm import Session, sessionmaker

from orders.mirror import upsert_order
from orders.shop_events import deliver_to
from otacm.settings import Settings
from storage.models import ChangeSource, ensure_connection
from storage.records import DeliveryState
from storage.types import utcnow
from tests.e2e.conftest import OtacmProcess, otacm_environment, wait_until
from tests.orders.test_shop_events import Shop, deliveries, events, new_secret, order, serve

__all__ = ["serve"]  # a fixture, used by name

pytestmark = pytest.mark.process


def test_a_worker_stopped_mid_post_records_the_answer_and_never_sends_it_again(
    settings: Settings,
    sessions: sessionmaker[Session],
    otacm: Callable[..., OtacmProcess],
    serve: Callable[[Shop], Shop],
) -> None:
    """SIGTERM while the shop holds the POST: the worker lives on until the shop answers,
    then exits 0 with the delivery delivered; a new worker sends only the next event."""
    (connection,) = settings.connections
    secret = new_secret()
    release = threading.Event()
    shop = serve(Shop([secret], hold=release))
    deliver_to(sessions, {connection.name: ["shop"]})
    with sessions.begin() as session:
        connection_id = ensure_connection(session, connection.name)

    def mirror(n: int) -> None:
        # Of the connection's partner, so that the worker's start does not erase it.
        issued = order(n, "Issued").model_copy(update={"partner_id": connection.partner_ids[0]})
        with sessions.begin() as session:
            upsert_order(
                session, connection_id, issued, source=ChangeSource.WEBHOOK, observed_at=utcnow()
            )

    environment = otacm_environment(
        settings,
        OTACM_SHOP_ENDPOINT_URL=shop.url,
        OTACM_SHOP_ENDPOINT_SECRETS=secret,
        OTACM_SHOP_REQUEST_TIMEOUT="30",
    )
    mirror(1)
    worker = otacm("worker", environment=environment)
    try:
        assert shop.arrived.wait(60), worker.output()
        [sending] = deliveries(sessions)
        # SQLite's sole sender claims by reading (its lease is its file lock).
        sqlite = settings.database_url.startswith("sqlite")
        assert sending.state is (DeliveryState.PENDING if sqlite else DeliveryState.LEASED)
        worker.popen.terminate()
        # It cannot end before the shop answers: the answer is what it waits for.
        with pytest.raises(subprocess.TimeoutExpired):
            worker.popen.wait(timeout=1)
    finally:
        release.set()
    assert worker.popen.wait(timeout=30) == 0, worker.output()

    [delivered] = deliveries(sessions)
    assert (delivered.state, delivered.attempts) == (DeliveryState.DELIVERED, 1)
    assert delivered.lease_owner is None

    restarted = otacm("worker", environment=environment)
    mirror(2)
    wait_until(lambda: len(shop.accepted()) == 2, 60, what="the second event")
    assert restarted.stop() == 0, restarted.output()

    first, second = shop.accepted()
    assert [first.event_id, second.event_id] == [e.event_id for e in events(sessions)]
    assert [r.body["data"]["sellToOrderReference"] for r in shop.requests] == ["SHOP-1", "SHOP-2"]
    assert shop.unverified == 0
