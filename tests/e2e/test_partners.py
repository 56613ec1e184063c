"""Other partners' orders: the venue notifies and answers them company-wide; otacm keeps none.

The venue raises ``ota_cm_order_processed`` for every order of the company, to every
subscription (CMJobQueueRunner ``ProcessOneOrder`` → CMOrderWebhooks
``SendOrderCompletionHook``, no partner filter), and getOrder has no partner check
(ChannelMgrOrderAgent ``GetOrder``). The stack configures only the sandbox's first active
partner; these tests place an order of the second one at the venue.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import sqlalchemy as sa

from reconciler.engine import reconcile
from storage.models import ForeignOrder, VenueOrder
from storage.records import ReconException, ReconTrigger
from tests.e2e.conftest import E2E
from tests.support.database import texts_in_database as stored_texts
from venue.models import OrderRequest

NAME = "Other Partner Guest"
EMAIL = "other.guest@example.com"


def other_partner(e2e: E2E) -> str:
    """An active partner of the sandbox that otacm is not configured for."""
    configured = set(e2e.settings.connections[0].partner_ids)
    return next(p.id for p in e2e.sandbox.config.partners if p.active and p.id not in configured)


def texts_in_database(e2e: E2E) -> str:
    """Every text and JSON value of otacm's database, joined: what a search would find."""
    return stored_texts(e2e.worker.sessions)


def test_another_partners_order_is_fetched_once_and_nothing_of_it_kept(e2e: E2E) -> None:
    """Notified of another partner's order: one getOrder, nothing mirrored, its id noted.

    CMOrderWebhooks ``SendOrderCompletionHook`` (every order of the company) and
    ChannelMgrOrderAgent ``GetOrder`` (no partner check): the order reaches otacm, which
    keeps neither it nor its customer's name and e-mail; a later notification of it costs
    no venue call, and reconciliation does not report it.
    """
    body = e2e.order_body("FOREIGN-1", paid=False)
    body.update(partnerId=other_partner(e2e), sellToName=NAME, sellToEmail=EMAIL)
    order = e2e.venue.create_order(OrderRequest.model_validate(body))
    calls_before = e2e.calls("getOrder")

    e2e.deliver()
    report = e2e.worker.drain()

    assert e2e.calls("getOrder") == calls_before + 1
    assert (report.foreign, report.fetched) == (1, 1)
    assert e2e.mirror(order.order_id) is None
    with e2e.read_sessions.begin() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(VenueOrder)) == 0
        noted = session.scalars(sa.select(ForeignOrder)).one()
    assert (noted.order_id, noted.partner_id) == (order.order_id, order.partner_id)
    stored = texts_in_database(e2e)
    assert NAME not in stored and EMAIL not in stored
    assert "FOREIGN-1" not in stored

    # The other channel fixes its Draft; the venue processes it again and notifies again.
    e2e.venue.replace_order(order.order_id, OrderRequest.model_validate(body))
    # A later notification: its timestamp differs, so it is no exact repeat of the first.
    assert e2e.admin.post("/clock", json={"advanceSeconds": 60}).status_code == 200
    e2e.deliver()
    again = e2e.worker.drain()

    assert (again.done, again.foreign, again.venue_calls) == (1, 1, 0)
    assert e2e.calls("getOrder") == calls_before + 1
    assert e2e.inbox_states() == {"done": 2}
    assert NAME not in texts_in_database(e2e)

    (connection_id,) = e2e.worker.clients
    now = dt.datetime.now(dt.UTC)
    reconcile(
        e2e.worker.sessions,
        connection_id=connection_id,
        period_from=now - dt.timedelta(days=1),
        period_to=now + dt.timedelta(days=1),
        now=now,
        trigger=ReconTrigger.MANUAL,
        actor="tester",
        grace=dt.timedelta(minutes=30),
        tolerance=Decimal("0.01"),
    )
    with e2e.read_sessions.begin() as session:
        subjects = list(session.scalars(sa.select(ReconException.subject_key)))
    assert not any(order.order_id in subject for subject in subjects)
