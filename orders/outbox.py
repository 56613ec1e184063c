"""The outbox: every call that changes an order at the venue, recorded first, then claimed.

Four operations (:class:`~storage.models.OutboxOperation`):

- ``create``: a sale the shop submits (:mod:`orders.submission` reads it);
  :func:`record_submission` writes, in the caller's transaction, the
  :class:`~storage.models.LedgerLine` (source ``submit``) and a pending
  :class:`~storage.models.Outbox` row — so nothing is lost if the call then fails; the
  ledger's unique (partner, reference) makes a repeat a no-op.
- ``confirm``, ``replace``, ``delete``: an action on an order the venue already has
  (confirmOrder, replaceOrder, deleteOrder), recorded by :func:`record_action` with the
  order's id and, when the ledger has its sale, the sale's line.

:func:`claim_outbox` leases due rows with the inbox's lease mechanism
(:class:`storage.lease.LeasedQueue`: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN
IMMEDIATE`` serializing claimers on SQLite); a row waits while an earlier row for the
same order is unfinished, so one order's calls reach the venue in the order they were
decided. The lease (``OTACM_OUTBOX_LEASE_SECONDS``, :data:`DEFAULT_LEASE_SECONDS`) is
kept fresh by its live sender (:mod:`orders.attempt`), so it can be short: a sender's
death, not a slow call, is what lets another sender take the row. Sending is
:mod:`orders.sender`'s. Logs name outbox ids, order ids, references and statuses —
never customer names, e-mails or keys.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from orders.submission import NO_CURRENCY, Submission
from storage.lease import LeasedQueue
from storage.models import (
    LedgerLine,
    LedgerSource,
    LedgerState,
    Outbox,
    OutboxOperation,
    OutboxState,
    VenueOrder,
)
from venue.models import OrderRequest
from venue.values import canonical_guid, normalize_reference

logger = logging.getLogger(__name__)


DEFAULT_LEASE_SECONDS = 15.0
"""How long a claimed outbox row stays one sender's (``OTACM_OUTBOX_LEASE_SECONDS``).

A live sender renews the lease every third of it while it works on the row
(:func:`orders.attempt.kept_leased`), however long a venue call takes with the client's own
retries, so the lease only says how soon a dead sender's row comes back: at most this long
after its death, then at the next outbox pass (every 10 s), about one poll interval. The
claim then looks the sale up before it sends a create again."""


DEFAULT_MAX_ATTEMPTS = 8
"""Claims of an outbox row before it is given up (``dead``)."""


OUTBOX_QUEUE = LeasedQueue(
    Outbox,
    pending=OutboxState.PENDING,
    leased=OutboxState.LEASED,
    dead=OutboxState.DEAD,
    holder="sender",
    gave_up="given up",
    logger=logger,
)


@dataclass(frozen=True)
class Recorded:
    """What :func:`record_submission` stored or found.

    Attributes:
        line: the sale's ledger line.
        outbox: its createOrder outbox row.
        already_recorded: the (partner, reference) was submitted before; nothing doubled.
        requeued: the earlier submission had failed or been given up, and this one put
            it back in the queue with the new request.
    """

    line: LedgerLine
    outbox: Outbox
    already_recorded: bool
    requeued: bool = False


def record_submission(
    session: Session,
    connection_id: int,
    request: OrderRequest,
    *,
    now: dt.datetime,
    amount: Decimal | None = None,
    currency: str | None = None,
    amount_includes_vat: bool = True,
) -> Recorded:
    """Record a sale and its pending createOrder, before any call to the venue.

    The ledger line: source ``submit``, state ``active``, ``shop_reference`` the
    request's ``sellToOrderReference``, ``quantity`` the sum of its items' quantities,
    ``amount`` and ``currency`` as given (0 in :data:`NO_CURRENCY` when the shop gave
    none), the request's wire JSON. The outbox row: ``create``, pending, due at ``now``,
    the same JSON.

    Submitting a (partner, reference) again doubles nothing: the ledger's unique
    constraint (``IntegrityError`` under a savepoint) means "already had it", and the
    existing line and row come back with ``already_recorded``. Two exceptions, both
    about the outbox row, never a second line: a line imported from the shop's export
    without a row gets its first one; a row that ``failed`` (refused by the venue) or
    went ``dead`` is put back in the queue with this request, because its sale was never
    issued and the shop is trying again.

    Args:
        session: the caller's session; flushed, not committed.
        connection_id: the venue connection the sale belongs to.
        request: the createOrder body.
        now: when the sale is recorded (aware).
        amount: what the shop charged; with ``currency``.
        currency: ISO 4217 code of ``amount``.
        amount_includes_vat: whether ``amount`` includes VAT.

    Returns:
        The line and row, and whether they were already there.
    """
    if (amount is None) != (currency is None):
        raise ValueError("amount and currency go together")
    wire = request.to_wire()
    partner_id = canonical_guid(request.partner_id)
    reference_key = normalize_reference(request.sell_to_order_reference)

    line = _locked_line(session, connection_id, partner_id, reference_key)
    if line is None:
        line = LedgerLine(
            connection_id=connection_id,
            partner_id=partner_id,
            shop_reference=request.sell_to_order_reference.strip(),
            sold_at=now,
            quantity=sum(item.quantity for item in request.items),
            amount=amount if amount is not None else Decimal(0),
            currency=currency.upper() if currency is not None else NO_CURRENCY,
            amount_includes_vat=amount_includes_vat,
            payment_reference=_blank_to_none(request.payment_reference),
            external_reference_numbers=_external_references(request),
            state=LedgerState.ACTIVE,
            source=LedgerSource.SUBMIT,
            request=wire,
        )
        try:
            with session.begin_nested():
                session.add(line)
                session.flush()
                outbox = _new_outbox(connection_id, line.id, wire, now)
                session.add(outbox)
        except IntegrityError:
            # Another submission of the same sale committed first: that one is the sale.
            line = _locked_line(session, connection_id, partner_id, reference_key)
            if line is None:
                raise
        else:
            session.flush()
            logger.info(
                "sale %s recorded: ledger line %d, outbox %d", reference_key, line.id, outbox.id
            )
            return Recorded(line, outbox, already_recorded=False)

    existing = session.scalars(
        sa.select(Outbox)
        .where(Outbox.ledger_line_id == line.id, Outbox.operation == OutboxOperation.CREATE)
        .order_by(Outbox.id.desc())
        .limit(1)
        .with_for_update()
    ).one_or_none()
    if existing is None:
        # A sale imported from the shop's export, now submitted through otacm.
        if line.request is None:
            line.request = wire
        outbox = _new_outbox(connection_id, line.id, wire, now)
        session.add(outbox)
        session.flush()
        logger.info(
            "sale %s: ledger line %d now queued as outbox %d", reference_key, line.id, outbox.id
        )
        return Recorded(line, outbox, already_recorded=True)
    if existing.state in (OutboxState.FAILED, OutboxState.DEAD):
        previous = existing.state
        existing.request = wire
        existing.state = OutboxState.PENDING
        existing.attempts = 0
        existing.next_attempt_at = now
        existing.lease_owner = None
        existing.lease_expires_at = None
        line.request = wire
        line.quantity = sum(item.quantity for item in request.items)
        line.payment_reference = _blank_to_none(request.payment_reference)
        line.external_reference_numbers = _external_references(request)
        if amount is not None and currency is not None:
            line.amount, line.currency = amount, currency.upper()
            line.amount_includes_vat = amount_includes_vat
        session.flush()
        logger.info(
            "sale %s submitted again: outbox %d was %s, queued again",
            reference_key,
            existing.id,
            previous,
        )
        return Recorded(line, existing, already_recorded=True, requeued=True)
    logger.info(
        "sale %s already recorded: ledger line %d, outbox %d is %s",
        reference_key,
        line.id,
        existing.id,
        existing.state,
    )
    return Recorded(line, existing, already_recorded=True)


def _new_outbox(
    connection_id: int, ledger_line_id: int, wire: dict[str, Any], now: dt.datetime
) -> Outbox:
    return Outbox(
        connection_id=connection_id,
        ledger_line_id=ledger_line_id,
        operation=OutboxOperation.CREATE,
        request=wire,
        state=OutboxState.PENDING,
        attempts=0,
        next_attempt_at=now,
    )


def _locked_line(
    session: Session, connection_id: int, partner_id: str, reference_key: str
) -> LedgerLine | None:
    # Locked so that two re-submissions of one sale cannot both add or requeue its row.
    return session.scalars(
        sa.select(LedgerLine)
        .where(
            LedgerLine.connection_id == connection_id,
            LedgerLine.partner_id == partner_id,
            LedgerLine.reference_key == reference_key,
        )
        .with_for_update()
    ).one_or_none()


def _external_references(request: OrderRequest) -> list[str] | None:
    found = [
        number
        for item in request.items
        if item.wallet is not None and item.wallet.external_reference_numbers
        for number in item.wallet.external_reference_numbers
    ]
    return found or None


def sale_of(session: Session, connection_id: int, order_id: str) -> LedgerLine | None:
    """The ledger line of a mirrored order's sale: same connection, partner and reference.

    ``None`` when the order is not mirrored or the ledger has no such sale (an order made
    through another channel).
    """
    return session.scalars(
        sa.select(LedgerLine)
        .join(
            VenueOrder,
            sa.and_(
                VenueOrder.connection_id == LedgerLine.connection_id,
                VenueOrder.partner_id == LedgerLine.partner_id,
                VenueOrder.reference_key == LedgerLine.reference_key,
            ),
        )
        .where(
            VenueOrder.connection_id == connection_id,
            VenueOrder.order_id == canonical_guid(order_id),
        )
    ).one_or_none()


def record_action(
    session: Session,
    connection_id: int,
    operation: OutboxOperation,
    order_id: str,
    *,
    now: dt.datetime,
    request: dict[str, Any] | None = None,
) -> Outbox:
    """Record a pending confirm, replace or delete of an order, before any call to the venue.

    The row names the order and, when the ledger has the order's sale
    (:func:`sale_of`), the sale's line; it is due at ``now``. Every call records a new
    row: two actions decided one after the other are two calls, sent in that order.

    Args:
        session: the caller's session; flushed, not committed.
        connection_id: the venue connection the order belongs to.
        operation: ``confirm``, ``replace`` or ``delete``.
        order_id: the venue's orderId.
        now: when the action was decided (aware).
        request: the call's body as wire JSON: ``{"paymentReference": ...}`` to confirm;
            for replace the order request, optionally with the sale's ``amount``,
            ``currency`` and ``amountIncludesVat`` (applied to the ledger line once the
            replacement lands); ``None`` to delete.

    Returns:
        The pending row.

    Raises:
        ValueError: ``operation`` is ``create`` (use :func:`record_submission`), or the
            request does not fit the operation.
    """
    if operation is OutboxOperation.CREATE:
        raise ValueError("a create is recorded with its sale: record_submission")
    takes_request = operation is not OutboxOperation.DELETE
    if (request is not None) != takes_request:
        raise ValueError(f"{operation} takes {'a' if takes_request else 'no'} request")
    order_id = canonical_guid(order_id)
    line = sale_of(session, connection_id, order_id)
    row = Outbox(
        connection_id=connection_id,
        ledger_line_id=None if line is None else line.id,
        operation=operation,
        request=request,
        state=OutboxState.PENDING,
        attempts=0,
        next_attempt_at=now,
        order_id=order_id,
    )
    session.add(row)
    session.flush()
    logger.info("order %s: %s recorded as outbox %d", order_id, operation, row.id)
    return row


@dataclass(frozen=True)
class OutboxClaim:
    """An outbox row leased to one sender: what sending it needs, not the ORM object.

    Attributes:
        id: the outbox row.
        connection_id: the venue connection the row belongs to.
        operation: the call to make.
        ledger_line_id: the sale it serves, if the ledger has it.
        order_id: the order a confirm, replace or delete targets (``None`` for a create).
        request: the stored body (wire JSON); ``None`` for a delete.
        attempts: how many times the row has been claimed, this claim included.
        lease_expires_at: until when the row is this sender's.
    """

    id: int
    connection_id: int
    operation: OutboxOperation
    ledger_line_id: int | None
    order_id: str | None
    request: dict[str, Any] | None
    attempts: int
    lease_expires_at: dt.datetime


def claim_outbox(
    sessions: sessionmaker[Session],
    *,
    owner: str,
    now: dt.datetime,
    limit: int,
    lease_seconds: float,
    connection_ids: Collection[int] | None = None,
    ids: Collection[int] | None = None,
    max_attempts: int | None = None,
) -> list[OutboxClaim]:
    """Lease up to ``limit`` due outbox rows to ``owner``, in one short transaction.

    Due: pending with ``next_attempt_at`` come, or leased with the lease expired (its
    sender died or stalled), oldest id first — except a row for an order that has an
    earlier row still pending or leased: it waits its turn, so a cancel decided after a
    replace never overtakes it. PostgreSQL selects them ``FOR UPDATE SKIP LOCKED``, so
    concurrent claimers take disjoint rows; SQLite's ``BEGIN IMMEDIATE`` makes claimers
    take the write lock one after the other, each seeing what the previous leased.

    Args:
        sessions: the session factory; the claim commits its own transaction.
        owner: the sender's name (:func:`~storage.lease.new_owner`).
        now: the current time (aware).
        limit: the most rows to claim.
        lease_seconds: how long the rows stay ``owner``'s.
        connection_ids: only rows of these connections; ``None`` for all.
        ids: only these rows; ``None`` for all.
        max_attempts: an expired lease on a row already claimed this many times makes
            the row ``dead`` instead of claiming it again.

    Returns:
        The claimed rows, by id.
    """
    if ids is not None and not ids:
        return []
    earlier = aliased(Outbox)
    waits_its_turn = (
        sa.exists()
        .where(
            earlier.connection_id == Outbox.connection_id,
            earlier.order_id == Outbox.order_id,
            earlier.id < Outbox.id,
            earlier.state.in_([OutboxState.PENDING, OutboxState.LEASED]),
        )
        .correlate(Outbox)
    )
    where = [sa.or_(Outbox.order_id.is_(None), ~waits_its_turn)]
    if ids is not None:
        where.append(Outbox.id.in_(sorted(ids)))
    return OUTBOX_QUEUE.claim(
        sessions,
        _claim,
        columns=(
            Outbox.id,
            Outbox.connection_id,
            Outbox.operation,
            Outbox.ledger_line_id,
            Outbox.order_id,
            Outbox.request,
        ),
        owner=owner,
        now=now,
        limit=limit,
        lease_seconds=lease_seconds,
        connection_ids=connection_ids,
        where=where,
        max_attempts=max_attempts,
    )


def _claim(
    row: sa.Row[*tuple[Any, ...]], attempts: int, lease_expires_at: dt.datetime
) -> OutboxClaim:
    return OutboxClaim(
        id=row.id,
        connection_id=row.connection_id,
        operation=row.operation,
        ledger_line_id=row.ledger_line_id,
        order_id=row.order_id,
        request=row.request,
        attempts=attempts,
        lease_expires_at=lease_expires_at,
    )


def apply_replacement(session: Session, ledger_line_id: int, replacement: Submission) -> None:
    """The sale's ledger line after its order was replaced: the new request and its terms."""
    line = session.get(LedgerLine, ledger_line_id, with_for_update=True)
    if line is None:  # pragma: no cover - ledger lines are never deleted
        return
    request = replacement.request
    line.request = request.to_wire()
    line.quantity = sum(item.quantity for item in request.items)
    line.external_reference_numbers = _external_references(request)
    # A replacement without a payment reference leaves the order a Draft to confirm; the
    # sale's own payment reference stays the shop's record of it.
    payment = _blank_to_none(request.payment_reference)
    if payment is not None:
        line.payment_reference = payment
    if replacement.amount is not None and replacement.currency is not None:
        line.amount, line.currency = replacement.amount, replacement.currency
        line.amount_includes_vat = replacement.amount_includes_vat
    session.flush()


def _blank_to_none(value: str | None) -> str | None:
    # The shop's paymentReference, recorded (not sent) trimmed; blank is none.
    if value is None or not value.strip():
        return None
    return value.strip()
