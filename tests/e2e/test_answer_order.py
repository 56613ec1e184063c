"""End to end over real HTTP: answers that reach otacm's database in another order than
the venue gave them.

A createOrder's answer (``Submitted``) can be applied after the order has settled and a
webhook's getOrder has mirrored it (``Issued``): the sender waited for SQLite's write
lock, or was merely slower than the worker. The later-applied, older answer must not
send the order back in flight — the shop would be told it settled twice, and the change
feed would fetch it again. Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

import sqlalchemy as sa

from heartbeat.feed import follow_feed
from orders.submit import submit_now
from storage.models import StatusChange, VenueOrder, ensure_connection
from storage.records import ShopEvent
from storage.types import utcnow
from tests.e2e.conftest import E2E
from venue.client import VenueClient
from venue.models import Order, OrderRequest, OrderStatus


class AnswerAfterTheWebhook:
    """A venue client whose createOrder answer comes back only once the order has
    settled at the venue and the worker has mirrored it for its webhook."""

    def __init__(self, client: VenueClient, e2e: E2E) -> None:
        self._client = client
        self._e2e = e2e

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def create_order(self, request: OrderRequest) -> Order:
        answer = self._client.create_order(request)
        assert answer.status is OrderStatus.SUBMITTED
        self._e2e.deliver()
        self._e2e.worker.drain()
        return answer


def test_a_create_answer_applied_after_the_webhooks_fetch_keeps_the_settled_order(
    e2e: E2E,
) -> None:
    """The order stays Issued with one status change and one ``order.issued`` event, and
    the change feed's next pass adopts it without a second getOrder."""
    (connection,) = e2e.settings.connections
    sessions = e2e.worker.sessions
    with sessions.begin() as session:
        connection_id = ensure_connection(session, connection.name)
    client = cast(VenueClient, AnswerAfterTheWebhook(e2e.venue, e2e))

    outcome = submit_now(
        sessions, client, connection_id, e2e.order_request("LATE-ANSWER-1"), now=utcnow()
    )

    assert outcome.order_id is not None
    with e2e.sessions.begin() as session:
        order = session.scalars(sa.select(VenueOrder)).one()
        assert (order.order_id, order.status) == (outcome.order_id, OrderStatus.ISSUED)
        assert len(order.items) == 1
        assert all(item.wallets for item in order.items)
        changes = session.scalars(sa.select(StatusChange.status).order_by(StatusChange.id)).all()
        assert changes == [OrderStatus.ISSUED]
        events = session.scalars(sa.select(ShopEvent.type).order_by(ShopEvent.id)).all()
        assert [str(event) for event in events] == ["order.issued"]
    assert e2e.calls("getOrder") == 1

    report = follow_feed(
        sessions,
        e2e.venue,
        connection_id=connection_id,
        partner_id=e2e.partner_id,
        now=utcnow(),
        overlap=dt.timedelta(minutes=10),
    )

    assert (report.queued, report.adopted) == (0, 1)
    assert e2e.worker.drain().venue_calls == 0
    assert e2e.calls("getOrder") == 1
