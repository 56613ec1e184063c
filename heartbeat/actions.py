"""Actions otacm takes on the partner's behalf, and the orders it leaves to a person.

:func:`confirm_paid_drafts` (the scheduler's ``confirm_drafts`` job, switched by the
setting ``auto_confirm_drafts``) finds, in one query, the mirrored Draft orders whose
sale the ledger holds as active with a payment reference, records a confirm for each in
the outbox (:func:`orders.outbox.record_action`) and sends them at once; the outbox
sender retries those the venue could not take. confirmOrder is idempotent at the venue,
so a retry after a lost answer is safe. A draft gets one confirm: while its row is
pending or leased, or once it was refused (``failed``) or given up (``dead``) — a person
looks at those — no other is recorded; a draft the venue made again later (a replace
that left it unpaid) gets a new one.

:func:`error_orders` lists the orders in Error with the venue's reason, for ``otacm
orders errors`` (and the finance pages): a person fixes and replaces them (``otacm orders
replace``) or cancels them (``otacm orders cancel``). The worker logs an order's
arrival in Error once, at WARNING, with the venue's reason. Logs name orders, references
and statuses, never customers.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from orders.attempt import SendOutcome
from orders.outbox import DEFAULT_LEASE_SECONDS
from orders.sender import send_outbox_row
from storage.models import (
    LedgerLine,
    LedgerState,
    Outbox,
    OutboxOperation,
    OutboxState,
    VenueConnection,
    VenueOrder,
)
from venue.client import VenueClient
from venue.models import OrderStatus

logger = logging.getLogger(__name__)

DEFAULT_CONFIRM_LIMIT = 200
"""The most confirms one run records: each is a venue call, and the quota is shared."""


@dataclass
class ActionReport:
    """What one :func:`confirm_paid_drafts` run did, counted in orders.

    Attributes:
        drafts: paid drafts found (those already confirmed or waiting included).
        queued: confirm outbox rows recorded by this run.
        confirmed: confirmed now: the venue's answer, Issued, is mirrored.
        failed: refused by the venue (or given up); left to a person.
        retried: the venue could not take them now; the outbox sender retries.
    """

    drafts: int = 0
    queued: int = 0
    confirmed: int = 0
    failed: int = 0
    retried: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts by name, for logs and ``--json``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _sale_of_order() -> sa.ColumnElement[bool]:
    return sa.and_(
        LedgerLine.connection_id == VenueOrder.connection_id,
        LedgerLine.partner_id == VenueOrder.partner_id,
        LedgerLine.reference_key == VenueOrder.reference_key,
    )


def _paid_drafts(connection_ids: Collection[int]) -> sa.ColumnElement[bool]:
    """Mirrored Draft orders whose sale is active in the ledger with a payment reference."""
    return sa.and_(
        VenueOrder.connection_id.in_(sorted(connection_ids)),
        VenueOrder.status == OrderStatus.DRAFT,
        VenueOrder.removed_at.is_(None),
        LedgerLine.state == LedgerState.ACTIVE,
        LedgerLine.payment_reference.is_not(None),
        sa.func.trim(LedgerLine.payment_reference) != "",
    )


def _confirm_recorded() -> sa.Exists:
    """A confirm row already answers for the order's current Draft.

    Pending or leased: it is on its way. Failed or dead: a person looks. Sent after the
    order last changed status: this Draft was confirmed (the mirror shows Draft again
    only if the venue made it a Draft again, e.g. after a replace).
    """
    return sa.exists().where(
        Outbox.connection_id == VenueOrder.connection_id,
        Outbox.order_id == VenueOrder.order_id,
        Outbox.operation == OutboxOperation.CONFIRM,
        sa.or_(
            Outbox.state.in_(
                [OutboxState.PENDING, OutboxState.LEASED, OutboxState.FAILED, OutboxState.DEAD]
            ),
            sa.and_(
                Outbox.state == OutboxState.SENT,
                Outbox.sent_at >= VenueOrder.status_changed_at,
            ),
        ),
    )


def confirm_paid_drafts(
    sessions: sessionmaker[Session],
    clients: Mapping[int, VenueClient],
    *,
    owner: str,
    now: dt.datetime,
    limit: int = DEFAULT_CONFIRM_LIMIT,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> ActionReport:
    """Confirm the Draft orders the shop has been paid for: record, then send each once.

    The drafts are found set-wise (a join of the mirror with the ledger); the confirms
    (``{"paymentReference": <the sale's>}``) are recorded in one transaction, then each is
    sent at once, with no transaction open, as :func:`orders.sender.send_outbox_row`
    does; its answer is mirrored with change source ``confirm``.

    Args:
        sessions: the session factory; recording and each send commit on their own.
        clients: the venue client of each connection id; only their drafts are confirmed.
            The caller creates and closes them.
        owner: the lease owner name (:func:`storage.lease.new_owner`).
        now: the current time (aware).
        limit: the most confirms to record in this run, oldest drafts first.
        lease_seconds: how long each confirm's row is held while it is sent
            (``OTACM_OUTBOX_LEASE_SECONDS``).

    Returns:
        What the run did.
    """
    report = ActionReport()
    if not clients:
        return report
    paid = _paid_drafts(clients.keys())
    with sessions.begin() as session:
        report.drafts = (
            session.scalar(
                sa.select(sa.func.count())
                .select_from(VenueOrder)
                .join(LedgerLine, _sale_of_order())
                .where(paid)
            )
            or 0
        )
        found = session.execute(
            sa.select(
                VenueOrder.connection_id,
                VenueOrder.order_id,
                LedgerLine.id.label("ledger_line_id"),
                LedgerLine.payment_reference,
            )
            .join(LedgerLine, _sale_of_order())
            .where(paid, ~_confirm_recorded())
            .order_by(VenueOrder.status_changed_at, VenueOrder.id)
            .limit(limit)
        ).all()
        rows = [
            Outbox(
                connection_id=draft.connection_id,
                ledger_line_id=draft.ledger_line_id,
                operation=OutboxOperation.CONFIRM,
                request={"paymentReference": draft.payment_reference.strip()},
                state=OutboxState.PENDING,
                attempts=0,
                next_attempt_at=now,
                order_id=draft.order_id,
            )
            for draft in found
        ]
        session.add_all(rows)
        session.flush()
        queued = [(row.id, row.connection_id, row.order_id) for row in rows]
    report.queued = len(queued)

    for outbox_id, connection_id, order_id in queued:
        result = send_outbox_row(
            sessions,
            clients[connection_id],
            outbox_id,
            owner=owner,
            now=now,
            lease_seconds=lease_seconds,
        )
        if result.outcome is SendOutcome.SENT:
            if result.order is not None and result.order.status is OrderStatus.ISSUED:
                report.confirmed += 1
            else:
                logger.warning(
                    "order %s: confirmed, but the venue answered %s",
                    order_id,
                    None if result.order is None else result.order.status,
                )
        elif result.outcome in (SendOutcome.FAILED, SendOutcome.DEAD):
            report.failed += 1
        elif result.outcome is SendOutcome.RETRYING:
            report.retried += 1
        # NOT_CLAIMED (behind an earlier action on the order), LEASE_LOST or ABANDONED:
        # the row is recorded, and the outbox sender finishes it.
    if report.drafts:
        logger.info("paid drafts: %s", report.as_dict())
    return report


# --- orders in Error -----------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorOrder:
    """An order the venue left in Error, for a person to fix and replace, or cancel.

    Attributes:
        connection: the venue connection's name.
        order_id: the venue's orderId.
        partner_id: the partner the order is for.
        reference: the shop's order number (``sellToOrderReference``).
        buy_from_order_reference: the venue's own document number, when known.
        status_message: the venue's reason (``statusMessage``).
        since: when the mirror saw the order go into Error (with this reason).
        received_at: when the venue received the order.
        in_ledger: whether the ledger has the sale (an active or closed line).
        ledger_state: the sale's state in the ledger, when it has it.
    """

    connection: str
    order_id: str
    partner_id: str
    reference: str
    buy_from_order_reference: str | None
    status_message: str | None
    since: dt.datetime
    received_at: dt.datetime | None
    in_ledger: bool
    ledger_state: LedgerState | None

    def to_json(self) -> dict[str, Any]:
        """The order as JSON (camelCase), as ``otacm orders errors --json`` prints it."""
        return {
            "connection": self.connection,
            "orderId": self.order_id,
            "partnerId": self.partner_id,
            "sellToOrderReference": self.reference,
            "buyFromOrderReference": self.buy_from_order_reference,
            "statusMessage": self.status_message,
            "since": self.since.isoformat(),
            "receivedAt": None if self.received_at is None else self.received_at.isoformat(),
            "inLedger": self.in_ledger,
            "ledgerState": None if self.ledger_state is None else str(self.ledger_state),
        }

    def describe(self) -> str:
        """One line for a terminal: reference, order, since when, and the venue's reason."""
        sale = f"sale {self.ledger_state}" if self.in_ledger else "no sale in the ledger"
        return "  ".join(
            [
                self.reference,
                f"order {self.order_id}",
                self.buy_from_order_reference or "-",
                f"since {self.since:%Y-%m-%d %H:%M:%S}Z",
                sale,
                self.status_message or "(no reason given)",
            ]
        )


def _error_query(
    connection_id: int | None,
) -> sa.Select[VenueOrder, str, LedgerState]:
    query = (
        sa.select(VenueOrder, VenueConnection.name, LedgerLine.state)
        .join(VenueConnection, VenueConnection.id == VenueOrder.connection_id)
        .outerjoin(LedgerLine, _sale_of_order())
        .where(VenueOrder.status == OrderStatus.ERROR, VenueOrder.removed_at.is_(None))
        .order_by(VenueOrder.status_changed_at, VenueOrder.id)
    )
    if connection_id is not None:
        query = query.where(VenueOrder.connection_id == connection_id)
    return query


def _error_order(
    order: VenueOrder, connection: str, ledger_state: LedgerState | None
) -> ErrorOrder:
    return ErrorOrder(
        connection=connection,
        order_id=order.order_id,
        partner_id=order.partner_id,
        reference=order.sell_to_order_reference,
        buy_from_order_reference=order.buy_from_order_reference,
        status_message=order.status_message,
        since=order.status_changed_at,
        received_at=order.received_at,
        in_ledger=ledger_state is not None,
        ledger_state=ledger_state,
    )


def error_orders(session: Session, connection_id: int | None = None) -> list[ErrorOrder]:
    """The mirrored orders in Error (not removed at the venue), oldest first.

    Args:
        session: the caller's session (read only).
        connection_id: only this venue connection's orders; ``None`` for all.

    Returns:
        Each order with the venue's reason, since when, and whether the ledger has it.
    """
    return [
        # The outer join gives no ledger state when the ledger lacks the sale.
        _error_order(order, name, state)
        for order, name, state in session.execute(_error_query(connection_id))
    ]
