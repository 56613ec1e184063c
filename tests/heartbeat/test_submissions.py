"""Lost submissions: sales sent to the venue whose order the mirror never got are found by
reference, queued for the worker and mirrored; those the venue does not have are
reported and not asked about at every run.

Over real HTTP against the sandbox, on SQLite and on PostgreSQL (the ``stack`` fixture).
A lost answer is staged as it would be left behind: the order made at the venue, the
sale recorded with its create row ``sent`` (or ``dead`` after attempts that timed out),
and no mirrored order.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import pytest
import sqlalchemy as sa

from heartbeat.submissions import LOOKUP_REASON, MIN_RECHECK, LostReport, find_lost_submissions
from orders.outbox import record_submission
from orders.sender import send_outbox_row
from storage.models import Inbox, LedgerLine, Outbox, OutboxState
from tests.heartbeat.conftest import HeartbeatStack
from venue.client import open_client
from venue.retry import RetryPolicy

GRACE = dt.timedelta(minutes=2)
NO_RETRY = RetryPolicy(attempts=1, deadline=1.0, wait_initial=0.01, wait_max=0.01, wait_jitter=0)


@dataclass(frozen=True)
class Sale:
    """A staged submission: its ledger line, create row, and the order at the venue."""

    line_id: int
    outbox_id: int
    order_id: str | None


def stage(
    stack: HeartbeatStack,
    reference: str,
    *,
    at: dt.datetime,
    state: OutboxState,
    attempts: int = 1,
    at_venue: bool = True,
) -> Sale:
    """A sale recorded at ``at`` whose create row is in ``state``; no order is mirrored."""
    request = stack.order_request(reference)
    order_id = stack.venue.create_order(request).order_id if at_venue else None
    with stack.sessions.begin() as session:
        recorded = record_submission(session, stack.connection_id, request, now=at)
        recorded.line.created_at = at
        recorded.outbox.state = state
        recorded.outbox.attempts = attempts
        if state is OutboxState.SENT:
            recorded.outbox.order_id = order_id
            recorded.outbox.sent_at = at
        return Sale(recorded.line.id, recorded.outbox.id, order_id)


def lost(stack: HeartbeatStack, now: dt.datetime) -> LostReport:
    """One run of the job with otacm's venue client and the test's grace."""
    return find_lost_submissions(stack.sessions, stack.clients, now=now, grace=GRACE)


def outbox(stack: HeartbeatStack, outbox_id: int) -> Outbox:
    """The create row as it is now."""
    with stack.read_sessions.begin() as session:
        row = session.get(Outbox, outbox_id)
        assert row is not None
        session.expunge(row)
        return row


def test_lost_submissions_are_found_by_reference_and_mirrored(
    stack: HeartbeatStack, caplog: pytest.LogCaptureFixture
) -> None:
    """Past grace, sent and given-up sales the mirror lacks are looked up; found orders are
    mirrored by the worker, a missing one is logged and put off; the rest is left alone."""
    caplog.set_level(logging.INFO)
    start = stack.now()
    answer_lost = stage(stack, "LOST-A", at=start, state=OutboxState.SENT)
    given_up = stage(stack, "LOST-B", at=start, state=OutboxState.DEAD, attempts=8)
    gone = stage(stack, "GONE-C", at=start, state=OutboxState.SENT, at_venue=False)
    refused = stage(stack, "REFUSED-E", at=start, state=OutboxState.FAILED, at_venue=False)
    # Due for a retry: the outbox sender's, whose duplicate handling would find an order.
    stage(stack, "RETRY-H", at=start, state=OutboxState.PENDING, at_venue=False)
    # A sale sent the ordinary way: its order is mirrored with the send.
    with stack.sessions.begin() as session:
        fine = record_submission(
            session, stack.connection_id, stack.order_request("FINE-F"), now=start
        )
        fine.line.created_at = start
        fine_outbox = fine.outbox.id
    sent = send_outbox_row(stack.sessions, stack.client, fine_outbox, owner="test", now=start)
    assert sent.order_id is not None

    stack.advance(600, venue=False)
    now = stack.now()
    recent = stage(stack, "RECENT-D", at=now - GRACE / 2, state=OutboxState.SENT)
    stack.tick()  # the venue issues them, as it would have in ten minutes

    report = lost(stack, now)
    assert report.as_dict() == {"checked": 3, "found": 2, "missing": 1, "errors": 0}
    lookups = [row for row in stack.inbox() if row.payload.get("reason") == LOOKUP_REASON]
    assert sorted(row.order_id for row in lookups) == sorted(
        [answer_lost.order_id, given_up.order_id]
    )
    assert all(row.buy_from_order_reference for row in lookups)

    stack.drain()
    stack.assert_mirrored([answer_lost.order_id, given_up.order_id])  # type: ignore[list-item]
    dead_row = outbox(stack, given_up.outbox_id)
    assert (dead_row.state, dead_row.order_id) == (OutboxState.SENT, given_up.order_id), (
        "the call given up on did land, and the row now says so"
    )
    assert outbox(stack, refused.outbox_id).state is OutboxState.FAILED

    missing = [
        r for r in caplog.records if r.levelno == logging.WARNING and "GONE-C" in r.getMessage()
    ]
    assert len(missing) == 1, "the sale the venue does not have is reported"
    assert f"ledger line {gone.line_id}" in missing[0].getMessage()
    text = caplog.text
    assert "Jane Doe" not in text and "guest@example.com" not in text

    # The next run, half a minute on: the found ones are mirrored, the missing one is put
    # off, the recent one is still within its grace.
    stack.advance(30, venue=False)
    assert lost(stack, stack.now()).checked == 0

    # Once the missing sale's age has passed again, it is asked about again; by then the
    # recent sale is past its grace and is found.
    stack.advance(600, venue=False)
    stack.tick()
    assert lost(stack, stack.now()).as_dict() == {
        "checked": 2,
        "found": 1,
        "missing": 1,
        "errors": 0,
    }
    stack.drain()
    stack.assert_mirrored([recent.order_id])  # type: ignore[list-item]
    stack.advance(MIN_RECHECK.total_seconds(), venue=False)
    assert lost(stack, stack.now()).checked == 0


def test_venue_failures_are_counted_and_retried_next_run(stack: HeartbeatStack) -> None:
    """A venue that answers 503 costs one look-up per run (the connection waits), changes
    nothing, and the next run finds the orders; the limit takes the oldest first."""
    start = stack.now()
    older = stage(stack, "SLOW-1", at=start, state=OutboxState.SENT)
    newer = stage(stack, "SLOW-2", at=start + dt.timedelta(seconds=1), state=OutboxState.SENT)
    stack.advance(600, venue=False)
    now = stack.now()
    stack.tick()
    (connection,) = stack.settings.connections
    with open_client(connection, retry=NO_RETRY) as client:
        stack.faults(rate503=1.0)
        report = find_lost_submissions(
            stack.sessions, {stack.connection_id: client}, now=now, grace=GRACE
        )
        assert report.as_dict() == {"checked": 1, "found": 0, "missing": 0, "errors": 1}
        assert not stack.inbox()
        stack.faults(rate503=0.0)
        first = find_lost_submissions(
            stack.sessions, {stack.connection_id: client}, now=now, grace=GRACE, limit=1
        )
    assert first.as_dict() == {"checked": 1, "found": 1, "missing": 0, "errors": 0}
    assert [row.order_id for row in stack.inbox()] == [older.order_id]
    assert lost(stack, now).as_dict() == {"checked": 1, "found": 1, "missing": 0, "errors": 0}
    stack.drain()
    stack.assert_mirrored([older.order_id, newer.order_id])  # type: ignore[list-item]


def test_connections_without_a_client_and_inactive_lines_are_left_alone(
    stack: HeartbeatStack,
) -> None:
    """Only lines of connections with a client, and only active sales, are looked up."""
    start = stack.now()
    cancelled = stage(stack, "CANCELLED-1", at=start, state=OutboxState.SENT)
    with stack.sessions.begin() as session:
        session.execute(
            sa.update(LedgerLine)
            .where(LedgerLine.id == cancelled.line_id)
            .values(state="cancelled")
        )
    stage(stack, "OTHER-1", at=start, state=OutboxState.SENT)
    now = start + dt.timedelta(minutes=10)
    assert find_lost_submissions(stack.sessions, {}, now=now, grace=GRACE).checked == 0
    report = lost(stack, now)
    assert report.as_dict() == {"checked": 1, "found": 1, "missing": 0, "errors": 0}
    with stack.read_sessions.begin() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Inbox)) == 1


def test_sales_of_a_partner_no_longer_configured_are_not_looked_up(
    stack: HeartbeatStack,
) -> None:
    """A sale of a partner the connection no longer configures is left alone.

    listOrdersByPartner answers any partner of the company and getOrder has no partner
    check (ChannelMgrOrderAgent ``ListOrdersByPartner``, ``GetOrder``), so only the
    settings say whose orders otacm follows.
    """
    start = stack.now()
    ours = stage(stack, "OURS-1", at=start, state=OutboxState.SENT)
    theirs = stage(stack, "THEIRS-1", at=start, state=OutboxState.SENT)
    other = next(
        p.id for p in stack.sandbox.config.partners if p.active and p.id != stack.partner_id
    )
    with stack.sessions.begin() as session:
        session.execute(
            sa.update(LedgerLine).where(LedgerLine.id == theirs.line_id).values(partner_id=other)
        )

    report = lost(stack, start + dt.timedelta(minutes=10))

    assert report.as_dict() == {"checked": 1, "found": 1, "missing": 0, "errors": 0}
    with stack.read_sessions.begin() as session:
        assert list(session.scalars(sa.select(Inbox.order_id))) == [ours.order_id]
