"""Lost submissions: sales otacm sent to the venue that the mirror still does not know.

A sale submitted through otacm is recorded first (a :class:`~storage.models.LedgerLine`
with source ``submit`` and a ``create`` :class:`~storage.models.Outbox` row), then sent
by :mod:`orders.outbox`, which mirrors the venue's answer in the same transaction as it
marks the row ``sent``. Unsent rows are that module's business (the scheduler's
``retry_outbox`` job). :func:`find_lost_submissions` looks for the rest: lines whose
create call was made, yet for which the mirror holds no live order under the line's
(partner, reference), and asks the venue by reference (listOrdersByPartner with
``sellToOrderReference``). An order found is queued for the worker
(:func:`orders.inbox.queue_lookups`, reason ``submission``), which fetches and mirrors
it; none found is logged, for a person and for reconciliation.

Which create rows count as "the call was made":

- ``sent``: the venue accepted the order. The mirror lacks it only if something removed
  it since (a Draft or Error order deleted at the venue, perhaps replaced by a new order
  under the same reference) or a write path skipped it; the look-up tells which.
- ``dead`` after at least one attempt: the sender gave up after transient failures, and
  a timeout, a 503 or a 504 does not say the order did not land (the venue's gateway
  times out requests it may still process). Nothing else will ever look again. When
  the order is found, the row is marked ``sent`` with the order's id: that is what
  happened.
- not ``failed``: the venue refused the order, and the sender already looked it up by
  reference when it did (a refusal is always checked against the venue's orders);
  looking again every few minutes would only repeat that answer. Nor ``pending`` or
  ``leased`` rows: the sender still owns them, and it looks a sale up the same way
  (:func:`orders.calls.latest_summary` names the order found) before it sends a
  create again.

A line the venue has no order for is not asked about again at every run. Without a new
column, the time of the next look-up is kept in the create row's ``next_attempt_at``,
which means "when this row is next worked on" and is unused once a row is sent or dead
(the sender claims only pending rows, and a re-submission that requeues a dead row sets
it afresh). Each look-up that finds nothing puts the next one off by the line's age,
between :data:`MIN_RECHECK` and :data:`MAX_RECHECK`: a sale is asked about at roughly
1, 2, 4, 8... times its grace, then daily. Venue failures change nothing, so the next
run tries again.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased, sessionmaker

from orders.calls import latest_summary
from orders.inbox import Lookup, queue_lookups
from storage.lease import NO_SYNC
from storage.models import (
    LedgerLine,
    LedgerSource,
    LedgerState,
    Outbox,
    OutboxOperation,
    OutboxState,
    VenueOrder,
)
from venue.client import VenueClient
from venue.errors import VenueError, VenueProtocolError, VenueRejected
from venue.models import OrderSummary

logger = logging.getLogger(__name__)

LOOKUP_REASON = "submission"
"""The reason on the inbox rows this job queues."""

MIN_RECHECK = dt.timedelta(minutes=5)
"""The shortest wait before a line found missing is looked up again."""

MAX_RECHECK = dt.timedelta(days=1)
"""The longest wait before a line found missing is looked up again."""


@dataclass
class LostReport:
    """What one :func:`find_lost_submissions` run did, counted in ledger lines.

    Attributes:
        checked: lines looked up at the venue by reference.
        found: of those, lines the venue has an order for; the orders are queued for the
            worker.
        missing: lines the venue has no order for (each logged as a warning).
        errors: look-ups that failed; tried again at the next run.
    """

    checked: int = 0
    found: int = 0
    missing: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts by name, for logs and ``--json``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class _Suspect:
    """A ledger line that looks lost, with its create row."""

    line_id: int
    connection_id: int
    partner_id: str
    reference: str
    created_at: dt.datetime
    outbox_id: int
    outbox_state: OutboxState


@dataclass
class _Findings:
    """What the look-ups found, to write in one transaction."""

    found: dict[int, list[tuple[_Suspect, list[OrderSummary]]]] = field(default_factory=dict)
    missing: list[_Suspect] = field(default_factory=list)


def find_lost_submissions(
    sessions: sessionmaker[Session],
    clients: Mapping[int, VenueClient],
    *,
    now: dt.datetime,
    grace: dt.timedelta,
    limit: int = 100,
) -> LostReport:
    """Look up, by reference, submitted sales the mirror still lacks (module docstring).

    One query finds the lines (oldest first, at most ``limit``, only of connections in
    ``clients``); the venue is then asked with no transaction open; what it answered is
    written in one transaction: lookups queued for the orders found, the next look-up
    of lines found missing put off. A connection whose venue is unreachable or refuses
    the key is left after its first failure, so one dead venue costs one call's
    retries, not one per line.

    Args:
        sessions: the session factory; the job commits its own transactions.
        clients: the venue client of each connection id; the caller creates and closes
            them.
        now: the current time (aware).
        grace: how long after its recording a sale may lack a mirrored order before it
            is looked up.
        limit: the most lines to look up in one run.

    Returns:
        What the run did.
    """
    report = LostReport()
    if not clients or limit < 1:
        return report
    with sessions.begin() as session:
        suspects = _suspects(
            session,
            {cid: client.partner_ids for cid, client in clients.items()},
            now=now,
            grace=grace,
            limit=limit,
        )
    if not suspects:
        return report

    findings = _Findings()
    given_up: set[int] = set()
    for suspect in suspects:
        if suspect.connection_id in given_up:
            continue
        report.checked += 1
        try:
            orders = clients[suspect.connection_id].find_by_reference(
                suspect.partner_id, suspect.reference
            )
        except (VenueRejected, VenueProtocolError) as exc:
            # About this line only (a partner the venue refuses, a bad answer): the next
            # line may fare better.
            report.errors += 1
            logger.warning(
                "lost submission check of %s (ledger line %d) failed: %s",
                suspect.reference,
                suspect.line_id,
                exc,
            )
            continue
        except VenueError as exc:
            report.errors += 1
            given_up.add(suspect.connection_id)
            logger.warning(
                "lost submission check of %s (ledger line %d) failed: %s; "
                "the other lines of connection %d wait for the next run",
                suspect.reference,
                suspect.line_id,
                exc,
                suspect.connection_id,
            )
            continue
        if orders:
            report.found += 1
            findings.found.setdefault(suspect.connection_id, []).append((suspect, orders))
        else:
            report.missing += 1
            findings.missing.append(suspect)

    if findings.found or findings.missing:
        with sessions.begin() as session:
            _record(session, findings, now=now, grace=grace)
    logger.info("lost submissions: %s", report.as_dict())
    return report


def _suspects(
    session: Session,
    partners: Mapping[int, Collection[str]],
    *,
    now: dt.datetime,
    grace: dt.timedelta,
    limit: int,
) -> list[_Suspect]:
    """The lines that look lost and are due for a look-up, oldest first.

    Only lines of the partners configured for each connection (``partners``): a partner
    since removed from the settings is not looked up, its orders no longer followed.
    """
    newer = aliased(Outbox)
    # The line's latest create row: a newer one (a re-submission) supersedes it.
    superseded = sa.exists().where(
        newer.ledger_line_id == Outbox.ledger_line_id,
        newer.operation == OutboxOperation.CREATE,
        newer.id > Outbox.id,
    )
    mirrored = sa.exists().where(
        VenueOrder.connection_id == LedgerLine.connection_id,
        VenueOrder.partner_id == LedgerLine.partner_id,
        VenueOrder.reference_key == LedgerLine.reference_key,
        VenueOrder.removed_at.is_(None),
    )
    call_made = sa.or_(
        Outbox.state == OutboxState.SENT,
        sa.and_(Outbox.state == OutboxState.DEAD, Outbox.attempts > 0),
    )
    query = (
        sa.select(
            LedgerLine.id,
            LedgerLine.connection_id,
            LedgerLine.partner_id,
            LedgerLine.shop_reference,
            LedgerLine.created_at,
            Outbox.id.label("outbox_id"),
            Outbox.state.label("outbox_state"),
        )
        .join(Outbox, Outbox.ledger_line_id == LedgerLine.id)
        .where(
            sa.or_(
                sa.false(),
                *(
                    sa.and_(
                        LedgerLine.connection_id == connection_id,
                        LedgerLine.partner_id.in_(sorted(partner_ids)),
                    )
                    for connection_id, partner_ids in partners.items()
                ),
            ),
            LedgerLine.source == LedgerSource.SUBMIT,
            LedgerLine.state == LedgerState.ACTIVE,
            LedgerLine.created_at <= now - grace,
            Outbox.operation == OutboxOperation.CREATE,
            call_made,
            Outbox.next_attempt_at <= now,
            ~superseded,
            ~mirrored,
        )
        .order_by(LedgerLine.created_at, LedgerLine.id)
        .limit(limit)
    )
    return [
        _Suspect(
            line_id=row.id,
            connection_id=row.connection_id,
            partner_id=row.partner_id,
            reference=row.shop_reference,
            created_at=row.created_at,
            outbox_id=row.outbox_id,
            outbox_state=row.outbox_state,
        )
        for row in session.execute(query)
    ]


def _record(
    session: Session, findings: _Findings, *, now: dt.datetime, grace: dt.timedelta
) -> None:
    """Queue the orders found, settle dead rows that landed, and put off the missing."""
    connection = session.connection()
    for connection_id, found in findings.found.items():
        lookups = [
            Lookup(
                summary.order_id,
                LOOKUP_REASON,
                status=str(summary.status),
                buy_from_order_reference=summary.buy_from_order_reference,
            )
            for _, orders in found
            for summary in orders
        ]
        queue_lookups(connection, connection_id, lookups, now=now)
        for suspect, orders in found:
            latest = latest_summary(orders)
            logger.info(
                "submission %s (ledger line %d, outbox %d) found at the venue: order %s is %s",
                suspect.reference,
                suspect.line_id,
                suspect.outbox_id,
                latest.order_id,
                latest.status,
            )
            if suspect.outbox_state is OutboxState.DEAD:
                # The call that was given up on did land: the row says so now.
                session.execute(
                    sa.update(Outbox)
                    .where(Outbox.id == suspect.outbox_id, Outbox.state == OutboxState.DEAD)
                    .values(
                        state=OutboxState.SENT,
                        order_id=latest.order_id,
                        sent_at=now,
                        last_error=None,
                    )
                    .execution_options(**NO_SYNC)
                )
            # Should the worker's fetch not make the mirror match after all, look again
            # after a grace period rather than at every run.
            _put_off(session, suspect, now + max(grace, MIN_RECHECK))
    for suspect in findings.missing:
        age = now - suspect.created_at
        next_look = now + min(max(age, grace, MIN_RECHECK), MAX_RECHECK)
        _put_off(session, suspect, next_look)
        logger.warning(
            "submission %s (ledger line %d, outbox %d, %s) not found at the venue by "
            "reference, %d s after it was recorded; next look at %s",
            suspect.reference,
            suspect.line_id,
            suspect.outbox_id,
            suspect.outbox_state,
            age.total_seconds(),
            next_look.isoformat(),
        )


def _put_off(session: Session, suspect: _Suspect, until: dt.datetime) -> None:
    # Only while the row is still sent or dead: a re-submission that requeued it in the
    # meantime made it pending and due now, and must stay so.
    session.execute(
        sa.update(Outbox)
        .where(
            Outbox.id == suspect.outbox_id,
            Outbox.state.in_([OutboxState.SENT, OutboxState.DEAD]),
        )
        .values(next_attempt_at=until)
        .execution_options(**NO_SYNC)
    )
