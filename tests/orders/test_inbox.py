"""The inbox's one write: a batch stored in one statement, exact repeats skipped."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from orders.inbox import POLL_EVENT, Lookup, NewInboxRow, queue_lookups, store_notifications
from storage.models import Inbox, InboxSource, ensure_connection

NOW = dt.datetime(2024, 1, 15, 10, 31, tzinfo=dt.UTC)


def row(connection_id: int, payload: dict[str, Any]) -> NewInboxRow:
    """A webhook row with ``payload``."""
    return {
        "connection_id": connection_id,
        "source": InboxSource.WEBHOOK,
        "event_name": "ota_cm_order_processed",
        "order_id": None,
        "buy_from_order_reference": None,
        "notified_status": None,
        "notified_at": None,
        "received_at": NOW,
        "payload": payload,
    }


def test_a_batch_is_stored_and_repeats_are_counted(sessions: sessionmaker[Session]) -> None:
    """New rows are stored with their ids; repeats, in the batch or stored, are counted."""
    with sessions.begin() as session:
        first_id = ensure_connection(session, "first")
        other_id = ensure_connection(session, "other")
        first = store_notifications(
            session.connection(), [row(first_id, {"n": 1}), row(first_id, {"n": 2})]
        )
    with sessions.begin() as session:
        second = store_notifications(
            session.connection(),
            [
                row(first_id, {"n": 2}),  # stored before
                row(first_id, {"n": 3}),
                row(first_id, {"n": 3}),  # earlier in this batch
                row(other_id, {"n": 1}),  # same payload, another connection
            ],
        )
        stored = session.execute(sa.select(Inbox.id, Inbox.connection_id, Inbox.payload)).all()

    assert (first.stored, first.duplicates, len(first.ids)) == (2, 0, 2)
    assert (second.stored, second.duplicates, len(second.ids)) == (2, 2, 2)
    assert sorted(id_ for id_, _, _ in stored) == sorted(first.ids + second.ids)
    assert len({(c, str(p)) for _, c, p in stored}) == 4


def test_an_empty_batch_stores_nothing(sessions: sessionmaker[Session]) -> None:
    """No rows: no statement, nothing stored."""
    with sessions.begin() as session:
        result = store_notifications(session.connection(), [])

    assert (result.stored, result.duplicates, result.ids) == (0, 0, ())


def test_lookups_are_queued_once_per_order_and_row_version(
    sessions: sessionmaker[Session],
) -> None:
    """A lookup is skipped while its order waits in the inbox, or at a row version stored."""
    order_a, order_b = "0" * 31 + "a", "0" * 31 + "b"
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "c")
        first = queue_lookups(
            session.connection(),
            connection_id,
            [Lookup(order_a, "feed", "Issued", row_version=7), Lookup(order_b, "in_flight")],
            now=NOW,
        )
        # Both still pending: asking again stores nothing.
        again = queue_lookups(
            session.connection(),
            connection_id,
            [Lookup(order_a, "feed", "Issued", row_version=7), Lookup(order_b, "in_flight")],
            now=NOW + dt.timedelta(seconds=15),
        )
        session.execute(sa.update(Inbox).values(state="done"))
        # Done now: the same row version is still the same lookup; a new ask is new.
        later = queue_lookups(
            session.connection(),
            connection_id,
            [Lookup(order_a, "feed", "Issued", row_version=7), Lookup(order_b, "in_flight")],
            now=NOW + dt.timedelta(seconds=30),
        )
        stored = session.execute(
            sa.select(
                Inbox.order_id, Inbox.source, Inbox.event_name, Inbox.notified_status
            ).order_by(Inbox.id)
        ).all()

    assert (first.stored, again.stored, again.duplicates) == (2, 0, 2)
    assert (later.stored, later.duplicates) == (1, 1)
    assert stored == [
        (order_a, InboxSource.POLL, POLL_EVENT, "Issued"),
        (order_b, InboxSource.POLL, POLL_EVENT, None),
        (order_b, InboxSource.POLL, POLL_EVENT, None),
    ]
