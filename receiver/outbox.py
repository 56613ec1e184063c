"""The outbox: every call that changes an order at the venue, recorded first, then sent.

This module owns the life of a change otacm asks the venue for, from the moment it is
decided to the venue's answer. Four operations (:class:`~storage.models.OutboxOperation`):

- ``create``: a sale the shop submits. :func:`parse_submission` turns the JSON the shop
  sends (the venue's order request plus the sale's ``amount``, ``currency``,
  ``amountIncludesVat`` and ``connection``) into a :class:`Submission`;
  :func:`record_submission` writes, in the caller's transaction, the
  :class:`~storage.models.LedgerLine` (source ``submit``) and a pending
  :class:`~storage.models.Outbox` row — so nothing is lost if the call then fails; the
  ledger's unique (partner, reference) makes a repeat a no-op.
- ``confirm``, ``replace``, ``delete``: an action on an order the venue already has
  (confirmOrder, replaceOrder, deleteOrder), recorded by :func:`record_action` with the
  order's id and, when the ledger has its sale, the sale's line.

:func:`send_outbox_row` and :func:`run_outbox_once` lease pending rows (with the inbox
worker's lease mechanism, :class:`storage.lease.LeasedQueue`: ``FOR UPDATE SKIP LOCKED``
on PostgreSQL, ``BEGIN IMMEDIATE`` serializing claimers on SQLite; a row waits while an
earlier row for the same order is unfinished, so one order's calls reach the venue in the
order they were decided), make the call with no transaction open, and apply the answer
in a transaction of its own, only while the row is still leased by its sender:

- an order → the row is ``sent`` and the order mirrored (:func:`~storage.models.upsert_order`
  with the operation's :class:`~storage.models.ChangeSource`: no webhook fires for confirm
  or delete, so the answer is the only news of them); a replaceOrder that lands also
  updates the sale's ledger line (its request, quantity, references, and the amount when
  the replacement carries one);
- deleteOrder answers "Cancelled" whether the venue kept the order (Issued, Cancelled)
  or then removed it (Draft, Error), so its answer's status is never read: a getOrder
  after it decides — 404 → the row is ``sent`` and the order marked removed
  (:func:`~storage.models.mark_removed`), an order → mirrored as it is (Cancelled); when
  that getOrder fails, the mirror's status before the call says what to expect and the
  worker's getOrder settles the mirror;
- createOrder's duplicate-reference 400 (an earlier attempt landed but its answer was
  lost) → the order is found by reference, fetched, mirrored, and the row is ``sent``;
  a replaceOrder refused on a retry is checked the same way (the order now holds the
  replacement: an earlier attempt landed); confirmOrder is idempotent at the venue
  (confirming an Issued order returns it unchanged), and deleting a Cancelled one too;
- 429, 503, 504, transport errors, a 400 that :attr:`~venue.errors.VenueRejected.may_be_transient`
  and anything that is not the order's fault (401, 403, 5xx) → back to ``pending`` with
  :func:`~receiver.worker.backoff`, ``dead`` after ``max_attempts``. One exception:
  deleteOrder of an order in flight (:attr:`~venue.errors.VenueRejected.order_in_flight`) is
  ``failed`` — a cancel is a person's decision, and carrying it out minutes later, after
  the order was issued, is not what they were told; they run it again once it settled;
- a 404 naming the order (:func:`~venue.errors.order_gone`) → ``failed`` ("the venue no
  longer knows the order") and the order marked removed; for deleteOrder it is the goal
  reached: ``sent``, the order marked removed. Any other 404 (an unmatched route, the
  gateway's) is retried like a 5xx;
- any other rejection → ``failed`` with the venue's message (createOrder: unless a
  look-up by reference finds the venue kept an order after all, as the older API does
  with a failed issuance in Error). After a refused action the order is queued for a
  fresh getOrder (:func:`~receiver.inbox.queue_lookups`): the refusal says the mirror
  was stale. A sale's ledger line stays: finance must see the sale that was never issued.

A create claimed again (its earlier attempt failed, or its sender died or lost our
database with the lease held) is looked up before it is sent again, since the earlier
call may have reached the venue: the mirror first, then listOrdersByPartner by
``sellToOrderReference``. An order found settles the row ``sent`` with it — one in Error
too, marked so and never sent again, because the venue would delete it and issue the
new one with no person deciding (``otacm orders replace`` is that person's way); only a
look-up the venue answered with nothing lets the create go. Whenever a create or replace
answer names the sale's order, its other live orders are retired: one in Error is
marked removed (the venue deletes it when it accepts a new order for the reference),
any other is queued for a getOrder. The lease (``OTACM_OUTBOX_LEASE_SECONDS``,
:data:`DEFAULT_LEASE_SECONDS`) is kept fresh by its live sender while it works on the
row (a renewal every third of it, and before each further venue call), so it can be
short: a sender's death, not a slow call, is what lets another sender take the row.
:func:`submit_now` is what ``otacm submit`` (:func:`submit_file`) and ``POST /api/orders``
(:mod:`receiver.api`) do: record, then try once at once; :func:`act_now` the same for an
action (``otacm orders replace`` / ``cancel``, the heartbeat's confirmations). Logs name
outbox ids, order ids, references and statuses — never customer names, e-mails or keys.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, aliased, sessionmaker

from otacm.settings import Settings
from receiver.body import JsonRefused, decode_json
from receiver.inbox import Lookup, queue_lookups
from receiver.worker import LAST_ERROR_MAX_CHARS, backoff, describe_venue_error, new_owner
from storage.lease import NO_SYNC, LeasedQueue
from storage.models import (
    INTEGER_MAX,
    ChangeSource,
    ColumnOverflow,
    LedgerLine,
    LedgerSource,
    LedgerState,
    Outbox,
    OutboxOperation,
    OutboxState,
    VenueOrder,
    ensure_connection,
    mark_removed,
    note_foreign_order,
    upsert_order,
)
from storage.types import MONEY_MAX
from venue.client import RetryPolicy, VenueClient
from venue.connection import VenueConnection
from venue.errors import VenueError, VenueRejected, order_gone
from venue.models import (
    ConfirmRequest,
    Order,
    OrderRequest,
    OrderStatus,
    OrderSummary,
    canonical_guid,
    normalize_reference,
)
from venue.text import UNSTORABLE_TEXT, unstorable_text_path

logger = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 15.0
"""How long a claimed outbox row stays one sender's (``OTACM_OUTBOX_LEASE_SECONDS``).

A live sender renews the lease every third of it while it works on the row
(:func:`_kept_leased`), however long a venue call takes with the client's own retries,
so the lease only says how soon a dead sender's row comes back: at most this long after
its death, then at the next outbox pass (every 10 s), about one poll interval. The claim
then looks the sale up before it sends a create again."""

RENEWALS_PER_LEASE = 3
"""A live sender renews its row's lease this many times per lease: two renewals can
fail (a database hiccup, a loaded machine) before the lease runs out."""

Clock = Callable[[], dt.datetime]
"""The current time (aware), read by a sender each time it claims or renews a lease."""

T = TypeVar("T")

DEFAULT_MAX_ATTEMPTS = 8
"""Claims of an outbox row before it is given up (``dead``)."""

SUBMIT_NOW_RETRY = RetryPolicy(attempts=2, deadline=10.0, wait_initial=0.5, wait_max=2.0)
"""The client retry policy for sending while someone waits (``POST /api/orders``): the
outbox retries later anyway, so the caller gets "recorded, will retry" within seconds."""

NO_CURRENCY = "XXX"
"""The ledger currency of a sale submitted without an amount: ISO 4217's "no currency"
(the amount is then 0), so finance sees that the shop did not say what it charged."""

# The top-level fields of a submission that are the sale's, not the venue's request.
_TERMS_KEYS = frozenset({"amount", "currency", "amountIncludesVat", "connection"})

_QUEUE = LeasedQueue(
    Outbox,
    pending=OutboxState.PENDING,
    leased=OutboxState.LEASED,
    dead=OutboxState.DEAD,
    holder="sender",
    gave_up="given up",
    logger=logger,
)


# --- what the shop sends -----------------------------------------------------------------


class SubmissionError(ValueError):
    """A submission the shop sent cannot be accepted; nothing was recorded.

    Attributes:
        field: the path of the problem (``items[0].quantity``), ``""`` for the body.
        problem: what is wrong with it.
        code: a stable snake_case code: ``invalid_order`` or ``unknown_connection``.
    """

    def __init__(self, field: str, problem: str, *, code: str = "invalid_order") -> None:
        self.field = field
        self.problem = problem
        self.code = code
        super().__init__(f"{field or 'body'}: {problem}")


class SubmissionsRefused(SubmissionError):
    """Several entries of one file cannot be accepted; nothing was recorded.

    Attributes:
        refusals: one error per refused entry, in the file's order.
    """

    def __init__(self, refusals: list[SubmissionError]) -> None:
        first = refusals[0]
        super().__init__(first.field, first.problem, code=first.code)
        self.refusals = refusals


class _SaleTerms(BaseModel):
    """The shop's own fields of a submission, beside the venue's order request."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    amount: Decimal | None = Field(default=None, ge=0, le=MONEY_MAX, allow_inf_nan=False)
    currency: str | None = Field(default=None, pattern=r"^[A-Za-z]{3}$")
    amount_includes_vat: bool = True
    connection: str | None = Field(default=None, min_length=1)

    @field_validator("currency")
    @classmethod
    def _upper(cls, value: str | None) -> str | None:
        return None if value is None else value.upper()


@dataclass(frozen=True)
class Submission:
    """One order the shop submits: the venue's request and what the shop charged.

    Attributes:
        request: the createOrder body, exactly as it will be sent.
        amount: what the shop charged for the sale, if it said.
        currency: the currency of ``amount`` (ISO 4217, upper case).
        amount_includes_vat: whether ``amount`` includes VAT.
        connection: the venue connection's name, if the shop named one.
    """

    request: OrderRequest
    amount: Decimal | None = None
    currency: str | None = None
    amount_includes_vat: bool = True
    connection: str | None = None

    @property
    def reference(self) -> str:
        """The shop's order number (``sellToOrderReference``)."""
        return self.request.sell_to_order_reference


def parse_submission(raw: Any) -> Submission:
    """A submission from decoded JSON: an OrderRequest plus the sale's own fields.

    The venue's request is validated as :class:`~venue.models.OrderRequest`; beside it the
    object may carry ``amount`` (a number or a numeric string; decode JSON with
    ``parse_float=Decimal`` to keep it exact), ``currency`` (required with ``amount``),
    ``amountIncludesVat`` (default true) and ``connection`` (a connection name).

    Args:
        raw: the decoded JSON object.

    Returns:
        The submission.

    Raises:
        SubmissionError: naming the first invalid field.
    """
    if not isinstance(raw, dict):
        raise SubmissionError("", "an order must be a JSON object")
    unstorable = unstorable_text_path(raw)
    if unstorable is not None:
        raise SubmissionError(_dotted(tuple(_path_parts(unstorable))), UNSTORABLE_TEXT)
    terms_raw = {key: value for key, value in raw.items() if key in _TERMS_KEYS}
    request_raw = {key: value for key, value in raw.items() if key not in _TERMS_KEYS}
    try:
        terms = _SaleTerms.model_validate(terms_raw)
        request = OrderRequest.model_validate(request_raw)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        raise SubmissionError(_dotted(error["loc"]), error["msg"]) from None
    if (terms.amount is None) != (terms.currency is None):
        missing = "currency" if terms.currency is None else "amount"
        other = "amount" if missing == "currency" else "currency"
        raise SubmissionError(missing, f"required when {other} is given")
    if not request.sell_to_order_reference.strip():
        raise SubmissionError("sellToOrderReference", "must not be blank")
    if sum(item.quantity for item in request.items) > INTEGER_MAX:
        raise SubmissionError("items", f"the quantities add up to more than {INTEGER_MAX}")
    return Submission(
        request=request,
        amount=terms.amount,
        currency=terms.currency,
        amount_includes_vat=terms.amount_includes_vat,
        connection=terms.connection,
    )


def choose_connection(settings: Settings, name: str | None) -> VenueConnection:
    """The venue connection a submission names, or the only one when it names none.

    Raises:
        SubmissionError: code ``unknown_connection``: no such connection, none
            configured, or several and the submission named none.
    """
    names = [venue.name for venue in settings.connections]
    if name is None:
        if len(names) == 1:
            return settings.connections[0]
        problem = (
            "no venue connection is configured"
            if not names
            else f"required when several venue connections are configured ({', '.join(names)})"
        )
        raise SubmissionError("connection", problem, code="unknown_connection")
    for venue in settings.connections:
        if venue.name == name:
            return venue
    known = ", ".join(names) or "none configured"
    raise SubmissionError(
        "connection",
        f"no venue connection named {name!r} (known: {known})",
        code="unknown_connection",
    )


def check_connection(venue: VenueConnection, request: OrderRequest) -> None:
    """Refuse a sale ``venue`` would take but otacm cannot follow, or would cut.

    The venue takes any partner of the company (ChannelMgrOrderAgent ``CreateOrder``
    checks only that the partner is set up), but otacm mirrors and reconciles only the
    configured partners' orders: a sale of another would be sent and then never followed.
    A ``paymentReference`` longer than the venue's field (the connection's
    ``payment_reference_max_chars``: 20 on the older synchronous version) would be cut.

    Raises:
        SubmissionError: naming ``partnerId`` or ``paymentReference``.
    """
    if canonical_guid(request.partner_id) not in venue.partner_ids:
        raise SubmissionError(
            "partnerId",
            f"partner {request.partner_id!r} is not configured for venue connection {venue.name!r}",
        )
    problem = payment_reference_problem(request.payment_reference, venue)
    if problem is not None:
        raise SubmissionError("paymentReference", problem)


def payment_reference_problem(reference: str | None, venue: VenueConnection) -> str | None:
    """Why ``venue`` would cut ``reference`` (its Code field trims trailing blanks), or None."""
    limit = venue.payment_reference_max_chars
    if reference is None or len(reference.rstrip()) <= limit:
        return None
    return (
        f"at most {limit} characters at venue connection {venue.name!r}: "
        "the venue would cut the rest"
    )


# --- recording ---------------------------------------------------------------------------


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


# --- claiming ----------------------------------------------------------------------------


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
        owner: the sender's name (:func:`~receiver.worker.new_owner`).
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
    return _QUEUE.claim(
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


# --- sending -----------------------------------------------------------------------------


class SendOutcome(StrEnum):
    """What one send of an outbox row came to."""

    SENT = "sent"
    """The venue did it; the row is ``sent`` and the order mirrored (or marked removed)."""
    RETRYING = "retrying"
    """A failure that may pass; the row is pending again, after its backoff."""
    FAILED = "failed"
    """The venue refused the call; the row is ``failed`` with its message."""
    DEAD = "dead"
    """Attempts are spent; the row is ``dead`` for a person to look at."""
    NOT_CLAIMED = "not_claimed"
    """The row was not due (sent, failed, in backoff, waiting behind an earlier row for
    its order, or leased by another sender)."""
    LEASE_LOST = "lease_lost"
    """Another sender re-claimed the row while this one called; that one applies."""
    ABANDONED = "abandoned"
    """Our database failed; the row stays leased until its lease expires."""


@dataclass(frozen=True)
class SendResult:
    """The result of sending one outbox row.

    Attributes:
        outbox_id: the row.
        outcome: what came of it.
        state: the row's state afterwards, as far as this sender knows.
        order: the venue's order, when it answered with one (for a delete that removed
            the order: the order as it was).
        order_id: the venue's orderId, when known.
        message: the venue's message on a refusal, or the failure on a retry.
        code: the venue's error code on a refusal.
        removed: the order is gone at the venue (deleted while Draft or Error, or a 404).
        resolved: the answer to an earlier attempt was lost and the order was found
            holding its result afterwards.
        resolved_by_reference: of ``resolved``, a createOrder whose order was found by
            its reference after the venue said it already had one.
        found_in_error: of ``resolved``, a createOrder claimed again whose order was found
            in Error: settled with that order and not sent again (a person replaces it).
        next_attempt_at: when a retried row is due again.
    """

    outbox_id: int
    outcome: SendOutcome
    state: OutboxState | None = None
    order: Order | None = None
    order_id: str | None = None
    message: str | None = None
    code: str | None = None
    removed: bool = False
    resolved: bool = False
    resolved_by_reference: bool = False
    found_in_error: bool = False
    next_attempt_at: dt.datetime | None = None


@dataclass
class OutboxReport:
    """What one :func:`run_outbox_once` pass did, counted in rows.

    Attributes:
        claimed: rows leased by the pass.
        sent: rows the venue carried out (including those resolved after a lost answer).
        resolved: of ``sent``, rows whose earlier answer was lost, found afterwards.
        in_error: of ``resolved``, creates whose order was found in Error (not sent again).
        removed: of ``sent``, orders now gone at the venue (deleted while Draft or Error).
        retried: rows sent back to pending after a failure that may pass.
        failed: rows the venue refused.
        dead: rows given up after ``max_attempts``.
        lease_lost: rows another sender had re-claimed by the time this one applied.
        abandoned: rows left leased after our own database failed.
        venue_calls: rows sent to the venue (look-ups and the client's retries not counted).
    """

    claimed: int = 0
    sent: int = 0
    resolved: int = 0
    in_error: int = 0
    removed: int = 0
    retried: int = 0
    failed: int = 0
    dead: int = 0
    lease_lost: int = 0
    abandoned: int = 0
    venue_calls: int = 0

    def add(self, result: SendResult) -> None:
        """Count one row's result."""
        self.venue_calls += 1
        counter = {
            SendOutcome.SENT: "sent",
            SendOutcome.RETRYING: "retried",
            SendOutcome.FAILED: "failed",
            SendOutcome.DEAD: "dead",
            SendOutcome.LEASE_LOST: "lease_lost",
            SendOutcome.ABANDONED: "abandoned",
        }.get(result.outcome)
        if counter is not None:
            setattr(self, counter, getattr(self, counter) + 1)
        if result.outcome is SendOutcome.SENT:
            self.resolved += result.resolved
            self.in_error += result.found_in_error
            self.removed += result.removed

    def as_dict(self) -> dict[str, int]:
        """The counts by name, for logs and ``--json``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def send_outbox_row(
    sessions: sessionmaker[Session],
    client: VenueClient,
    outbox_id: int,
    *,
    owner: str,
    now: dt.datetime,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    clock: Clock | None = None,
) -> SendResult:
    """Claim one outbox row if it is due, send it, and apply the venue's answer.

    Args:
        sessions: the session factory; claim and apply commit on their own.
        client: the venue client of the row's connection.
        outbox_id: the row.
        owner: the lease owner name (:func:`~receiver.worker.new_owner`).
        now: the current time (aware).
        lease_seconds: how long the row is held from its claim, and from each renewal
            before a further venue call (``OTACM_OUTBOX_LEASE_SECONDS``).
        max_attempts: attempts after which a failing row is ``dead``.
        clock: the time renewals are counted from; by default ``now`` moving on with
            the monotonic clock.

    Returns:
        What came of it; ``NOT_CLAIMED`` with the row's current state when it was not due.
    """
    clock = clock or _moving_from(now)
    claims = claim_outbox(
        sessions,
        owner=owner,
        now=now,
        limit=1,
        lease_seconds=lease_seconds,
        ids=[outbox_id],
        max_attempts=max_attempts,
    )
    if not claims:
        with sessions.begin() as session:
            row = session.get(Outbox, outbox_id)
            state = None if row is None else row.state
            order_id = None if row is None else row.order_id
            message = None if row is None else row.last_error
        return SendResult(
            outbox_id, SendOutcome.NOT_CLAIMED, state=state, order_id=order_id, message=message
        )
    return _send_claim(
        sessions,
        client,
        claims[0],
        owner=owner,
        now=now,
        max_attempts=max_attempts,
        lease_seconds=lease_seconds,
        clock=clock,
    )


def run_outbox_once(
    sessions: sessionmaker[Session],
    clients: Mapping[int, VenueClient],
    *,
    owner: str,
    now: dt.datetime,
    batch_size: int = 50,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    clock: Clock | None = None,
) -> OutboxReport:
    """One pass of the outbox sender: claim due rows one at a time and send each.

    Only rows of connections in ``clients`` are claimed, whatever their operation. Each
    row is claimed just before it is sent, so its lease counts from then, not from the
    start of the pass; each call is made with no transaction open.

    Args:
        sessions: the session factory.
        clients: the venue client of each connection id; the caller creates and closes
            them (:func:`venue.client.open_client`).
        owner: this sender's lease owner name (:func:`~receiver.worker.new_owner`).
        now: the current time (aware).
        batch_size: the most rows to claim.
        lease_seconds: how long a claimed row stays this sender's, from its claim and
            from each renewal before a further venue call (``OTACM_OUTBOX_LEASE_SECONDS``;
            see :data:`DEFAULT_LEASE_SECONDS`).
        max_attempts: attempts after which a row is ``dead``.
        clock: the current time at each claim; by default ``now`` moving on with the
            monotonic clock.

    Returns:
        What the pass did.
    """
    clock = clock or _moving_from(now)
    report = OutboxReport()
    while report.claimed < batch_size:
        # Each lease counts from its own claim; what the pass records is stamped ``now``.
        claims = claim_outbox(
            sessions,
            owner=owner,
            now=clock(),
            limit=1,
            lease_seconds=lease_seconds,
            connection_ids=clients.keys(),
            max_attempts=max_attempts,
        )
        if not claims:
            break
        [claim] = claims
        report.claimed += 1
        report.add(
            _send_claim(
                sessions,
                clients[claim.connection_id],
                claim,
                owner=owner,
                now=now,
                max_attempts=max_attempts,
                lease_seconds=lease_seconds,
                clock=clock,
            )
        )
    if report.claimed:
        logger.info("outbox pass: %s", report.as_dict())
    return report


def _moving_from(now: dt.datetime) -> Clock:
    """A clock that reads ``now`` at first and then moves on with the monotonic clock."""
    started = time.monotonic()
    return lambda: now + dt.timedelta(seconds=time.monotonic() - started)


def _send_claim(
    sessions: sessionmaker[Session],
    client: VenueClient,
    claim: OutboxClaim,
    *,
    owner: str,
    now: dt.datetime,
    max_attempts: int,
    lease_seconds: float,
    clock: Clock,
) -> SendResult:
    """Send one claimed row and apply the answer; a database failure leaves it leased."""
    send = _Send(
        sessions,
        client,
        claim,
        owner=owner,
        now=now,
        max_attempts=max_attempts,
        lease_seconds=lease_seconds,
        clock=clock,
    )
    try:
        with _kept_leased(send):
            return _SENDERS[claim.operation](send)
    except _LeaseLost:
        logger.warning(
            "outbox %d: lease lost before a further venue call; left to its new sender", claim.id
        )
        return SendResult(claim.id, SendOutcome.LEASE_LOST)
    except SQLAlchemyError as exc:
        # Nothing of the failed transaction was written; the row stays leased, and the
        # first claim after the lease expires sends it again.
        logger.warning(
            "outbox %d: database error %s; left to its lease", claim.id, type(exc).__name__
        )
        return SendResult(claim.id, SendOutcome.ABANDONED, state=OutboxState.LEASED)


NO_LONGER_KNOWN = "the venue no longer knows the order"
"""The row's ``last_error`` when the venue answers an action on an order with 404."""

_CHANGE_SOURCES = {
    OutboxOperation.CREATE: ChangeSource.SUBMIT,
    OutboxOperation.CONFIRM: ChangeSource.CONFIRM,
    OutboxOperation.REPLACE: ChangeSource.REPLACE,
    OutboxOperation.DELETE: ChangeSource.DELETE,
}


class _LeaseLost(Exception):
    """The row's lease could not be renewed before a venue call: another sender has it."""


@dataclass
class _Send:
    """One claimed row being sent: its venue calls, and the three ways its attempt ends.

    Every venue call goes through :meth:`venue`, which renews the lease before each call
    after the first (and finds out there when another sender has the row); meanwhile
    :func:`_kept_leased` renews it on a timer, so the row stays this sender's however
    long each call takes. :meth:`sent`, :meth:`refuse` and :meth:`retry`
    each write in a transaction of their own, and only while the row is still leased by
    ``owner`` (:meth:`~storage.lease.LeasedQueue.settle`); when another sender has
    re-claimed it, they write nothing and answer ``LEASE_LOST``.
    """

    sessions: sessionmaker[Session]
    client: VenueClient
    claim: OutboxClaim
    owner: str
    now: dt.datetime
    max_attempts: int
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    clock: Clock | None = None
    calls: int = field(default=0, init=False)

    def venue(self, call: Callable[..., T], *args: Any) -> T:
        """Make one venue call for the row; before any but the first, renew the lease.

        Raises:
            _LeaseLost: the lease had expired and another sender claimed the row.
        """
        if self.calls:
            self._renew()
        self.calls += 1
        return call(*args)

    def _renew(self) -> None:
        if not self.extend_lease():
            raise _LeaseLost

    def extend_lease(self) -> bool:
        """Hold the row for another ``lease_seconds`` from now, if it is still ours.

        Returns:
            False when the row is no longer leased by ``owner`` (settled, or claimed
            again by another sender after the lease expired).
        """
        now = self.clock() if self.clock is not None else self.now
        expires = now + dt.timedelta(seconds=self.lease_seconds)
        with self.sessions.begin() as session:
            renewed = session.scalar(
                sa.update(Outbox)
                .where(
                    Outbox.id == self.claim.id,
                    Outbox.state == OutboxState.LEASED,
                    Outbox.lease_owner == self.owner,
                )
                .values(lease_expires_at=expires)
                .returning(Outbox.id)
                .execution_options(**NO_SYNC)
            )
        return renewed is not None

    def sent(
        self,
        order: Order | None,
        *,
        order_id: str | None = None,
        removed: bool = False,
        resolved: bool = False,
        found_in_error: bool = False,
        replacement: Submission | None = None,
        message: str | None = None,
        mirror: bool = True,
    ) -> SendResult:
        """In one transaction: the row ``sent`` and the venue's answer mirrored.

        ``order`` is upserted with the operation's change source, or, when ``removed``,
        the order is marked removed; ``order_id`` without an ``order`` settles the row
        with an order the mirror already holds. A ``replacement`` that landed is copied
        to the sale's ledger line. With ``mirror`` false nothing of the order is written;
        a getOrder is queued for the worker instead (the answer could not be confirmed).
        A create or replace that names an order also retires the sale's other orders
        (:func:`_retire_other_orders`). ``found_in_error`` keeps ``message`` on the row.
        """
        claim, now = self.claim, self.now
        if order is not None:
            order_id = order.order_id
        order_id = order_id or claim.order_id
        assert order_id is not None, "an answer without an order is a delete's, which names one"
        source = _CHANGE_SOURCES[claim.operation]
        note = message[:LAST_ERROR_MAX_CHARS] if found_in_error and message else None

        def record(mirror: bool) -> list[int]:
            with self.sessions.begin() as session:
                updated = _QUEUE.settle(
                    session,
                    [claim.id],
                    owner=self.owner,
                    state=OutboxState.SENT,
                    order_id=order_id,
                    sent_at=now,
                    last_error=note,
                )
                if updated:
                    if not mirror:
                        lookup = Lookup(
                            order_id,
                            f"{claim.operation}_answer",
                            None if order is None else order.status,
                        )
                        queue_lookups(session.connection(), claim.connection_id, [lookup], now=now)
                    elif removed:
                        mark_removed(session, claim.connection_id, order_id, now, source)
                    elif order is not None and not self.client.serves(order.partner_id):
                        # Another partner's order (an action on an order the mirror
                        # never held): its id is noted, nothing else of it kept.
                        note_foreign_order(
                            session, claim.connection_id, order_id, order.partner_id, now
                        )
                    elif order is not None:
                        upsert_order(
                            session, claim.connection_id, order, source=source, observed_at=now
                        )
                    if replacement is not None and claim.ledger_line_id is not None:
                        _apply_replacement(session, claim.ledger_line_id, replacement)
                    if mirror and not removed and claim.operation in _NAMES_THE_SALES_ORDER:
                        _retire_other_orders(session, claim.connection_id, order_id, now, source)
                return updated

        try:
            updated = record(mirror=mirror)
        except ColumnOverflow as exc:
            # The call landed, but the mirror cannot hold the answer. The row is sent all
            # the same (sending it again would not change the answer), and the order is
            # left to the worker, whose getOrder dead-letters it naming the column.
            logger.warning(
                "outbox %d: sent, but the mirror cannot hold order %s: %s", claim.id, order_id, exc
            )
            updated = record(mirror=False)
        if not updated:
            logger.warning(
                "outbox %d: lease lost; order %s left to its new sender", claim.id, order_id
            )
            return SendResult(claim.id, SendOutcome.LEASE_LOST, order=order, order_id=order_id)
        if found_in_error:
            logger.warning(
                "outbox %d: order %s of this sale found in Error at the venue; not sent"
                " again (a person replaces it: otacm orders replace)",
                claim.id,
                order_id,
            )
        elif claim.operation is OutboxOperation.CREATE and order is not None:
            logger.info(
                "outbox %d sent: order %s (%s) is %s%s",
                claim.id,
                order_id,
                normalize_reference(order.sell_to_order_reference),
                order.status,
                ", found by reference" if resolved else "",
            )
        else:
            logger.info(
                "outbox %d sent: %s of order %s: %s",
                claim.id,
                claim.operation,
                order_id,
                "removed" if removed else (order.status if order is not None else "-"),
            )
        return SendResult(
            claim.id,
            SendOutcome.SENT,
            state=OutboxState.SENT,
            order=order,
            order_id=order_id,
            message=message,
            removed=removed,
            resolved=resolved,
            resolved_by_reference=resolved and claim.operation is OutboxOperation.CREATE,
            found_in_error=found_in_error,
        )

    def refuse(
        self,
        message: str,
        code: str | None = None,
        *,
        removed: bool = False,
        recheck: bool = False,
        observed: Order | None = None,
    ) -> SendResult:
        """The row ``failed`` with the venue's message; a sale's ledger line stays as it is.

        For an action on an order, what the refusal says about the order is recorded with
        it: ``removed`` marks it removed (a 404), ``observed`` mirrors the order as just
        fetched, and ``recheck`` queues a getOrder for the worker (the mirror was stale).
        """
        claim, now = self.claim, self.now
        source = _CHANGE_SOURCES[claim.operation]
        with self.sessions.begin() as session:
            updated = _QUEUE.settle(
                session,
                [claim.id],
                owner=self.owner,
                state=OutboxState.FAILED,
                last_error=message[:LAST_ERROR_MAX_CHARS],
            )
            if updated and claim.order_id is not None:
                if removed:
                    mark_removed(session, claim.connection_id, claim.order_id, now, source)
                elif observed is not None:
                    upsert_order(
                        session,
                        claim.connection_id,
                        observed,
                        source=ChangeSource.FETCH,
                        observed_at=now,
                    )
                elif recheck:
                    queue_lookups(
                        session.connection(),
                        claim.connection_id,
                        [Lookup(claim.order_id, f"{claim.operation}_refused")],
                        now=now,
                    )
        if not updated:
            return SendResult(claim.id, SendOutcome.LEASE_LOST)
        if claim.order_id is None:
            logger.warning("outbox %d refused by the venue: %s", claim.id, message)
        else:
            logger.warning(
                "outbox %d: %s of order %s refused by the venue: %s",
                claim.id,
                claim.operation,
                claim.order_id,
                message,
            )
        return SendResult(
            claim.id,
            SendOutcome.FAILED,
            state=OutboxState.FAILED,
            order=observed,
            order_id=claim.order_id,
            message=message,
            code=code,
            removed=removed,
        )

    def retry(self, exc: VenueError) -> SendResult:
        """The row back to pending after its backoff, or ``dead`` once attempts are spent."""
        claim = self.claim
        reason = describe_venue_error(exc)[:LAST_ERROR_MAX_CHARS]
        retry_at = self.now + backoff(claim.attempts)
        with self.sessions.begin() as session:
            state = _QUEUE.retry(
                session,
                claim.id,
                owner=self.owner,
                attempts=claim.attempts,
                max_attempts=self.max_attempts,
                retry_at=retry_at,
                reason=reason,
            )
        if state is None:
            return SendResult(claim.id, SendOutcome.LEASE_LOST)
        if state is OutboxState.DEAD:
            logger.error(
                "outbox %d given up after %d attempts: %s", claim.id, claim.attempts, reason
            )
            return SendResult(
                claim.id,
                SendOutcome.DEAD,
                state=state,
                order_id=claim.order_id,
                message=reason,
                code=exc.code,
            )
        logger.warning(
            "outbox %d: attempt %d failed (%s); next at %s",
            claim.id,
            claim.attempts,
            reason,
            retry_at.isoformat(),
        )
        return SendResult(
            claim.id,
            SendOutcome.RETRYING,
            state=state,
            order_id=claim.order_id,
            message=reason,
            code=exc.code,
            next_attempt_at=retry_at,
        )


FOUND_IN_ERROR = (
    "found at the venue in Error after an earlier attempt; not sent again, since the venue"
    " would delete that order and issue the new one: fix it with otacm orders replace"
)
"""The row's ``last_error`` (kept on a ``sent`` row) when a create claimed again finds the
sale's order in Error."""


@contextmanager
def _kept_leased(send: _Send) -> Iterator[None]:
    """Keep ``send``'s row leased for the ``with`` block: a thread renews the lease every
    third of it, so a call that takes longer than the lease (a slow venue, the client's
    own retries) is never overtaken by another sender, while a sender that dies stops
    renewing and its row comes back one lease after its last renewal.

    The thread stops when the block ends or the row is no longer ours. A renewal that
    fails on our database is logged and tried again at the next tick: meanwhile the
    lease runs on, as it would for a dead sender.
    """
    stop = threading.Event()
    every = send.lease_seconds / RENEWALS_PER_LEASE

    def renew() -> None:
        while not stop.wait(every):
            try:
                if not send.extend_lease():
                    return
            except SQLAlchemyError as exc:
                logger.warning(
                    "outbox %d: lease renewal failed on the database (%s); retrying",
                    send.claim.id,
                    type(exc).__name__,
                )

    renewer = threading.Thread(target=renew, name=f"outbox-lease-{send.claim.id}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()


def _send_create(send: _Send) -> SendResult:
    try:
        request = OrderRequest.model_validate(send.claim.request or {})
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        return send.refuse(
            f"the stored request is invalid: {_dotted(error['loc'])}: {error['msg']}"
        )
    if send.claim.attempts > 1:
        # Claimed before: that attempt may have reached the venue with its answer lost
        # (a timeout, a killed sender, our database failing). Sending again is safe only
        # if the venue has no order for the sale: a second createOrder would be refused
        # as a duplicate at best, and at worst, the order being in Error by now, make the
        # venue delete it and issue the new one with no person deciding.
        found = _look_up_sale(send, request)
        if found is not None:
            return found

    # The call happens with no transaction open: a slow venue must not hold a database
    # lock (on SQLite, the only write lock).
    try:
        order = send.venue(send.client.create_order, request)
    except VenueRejected as exc:
        if exc.is_duplicate_reference:
            logger.info(
                "outbox %d: %s is already at the venue; finding it",
                send.claim.id,
                normalize_reference(request.sell_to_order_reference),
            )
            return _resolve(send, request, exc)
        if exc.may_be_transient:
            return send.retry(exc)
        # A refusal, but "a 400 is not proof": the older synchronous API answers a failed
        # issuance with one and keeps the order in Error, and a retry after an earlier
        # attempt landed may be refused for another reason (a visit date now past).
        return _resolve(send, request, exc)
    except VenueError as exc:
        # Unavailable, rate limited, 5xx, a bad body, or the key or address is wrong: none
        # is a verdict on the order, so it waits and tries again.
        return send.retry(exc)
    return send.sent(order)


def _look_up_sale(send: _Send, request: OrderRequest) -> SendResult | None:
    """Settle a create claimed again with the sale's order, if there is one; else None.

    The mirror first: a live order of the sale in any status but Error (a webhook or
    the feed brought it) is the sale's order, and the venue is not asked. Otherwise the
    venue (listOrdersByPartner by ``sellToOrderReference``, the order found read with
    getOrder): an order in Error in the mirror may be an earlier submission's that this
    row's lost create made the venue replace, and one the mirror lacks may have landed.
    An order found settles the row ``sent`` with it, mirrored; one in Error is settled
    all the same, never sent again (:data:`FOUND_IN_ERROR`). Only a look-up the venue
    answered with nothing lets the create be sent (``None``); one it did not answer is
    retried, as the create would be.
    """
    claim = send.claim
    with send.sessions.begin() as session:
        known = sale_orders(
            session,
            claim.connection_id,
            canonical_guid(request.partner_id),
            normalize_reference(request.sell_to_order_reference),
        )
    live = [order for order in known if order.removed_at is None]
    if live and live[0].status is not OrderStatus.ERROR:
        logger.info(
            "outbox %d: the mirror has order %s (%s) of this sale; not sent again",
            claim.id,
            live[0].order_id,
            live[0].status,
        )
        return send.sent(None, order_id=live[0].order_id, resolved=True)
    try:
        found = send.venue(
            send.client.find_by_reference, request.partner_id, request.sell_to_order_reference
        )
        if not found:
            return None
        order = send.venue(send.client.get_order, latest_summary(found).order_id)
    except VenueError as exc:
        # Not knowing whether the venue has the order, sending it again could double it.
        return send.retry(exc)
    in_error = order.status is OrderStatus.ERROR
    return send.sent(
        order,
        resolved=True,
        found_in_error=in_error,
        message=FOUND_IN_ERROR if in_error else None,
    )


def sale_orders(
    session: Session, connection_id: int, partner_id: str, reference_key: str
) -> list[VenueOrder]:
    """The mirrored orders of one sale (connection, partner, reference): live ones first,
    each group most recently seen first; removed ones included."""
    return list(
        session.scalars(
            sa.select(VenueOrder)
            .where(
                VenueOrder.connection_id == connection_id,
                VenueOrder.partner_id == partner_id,
                VenueOrder.reference_key == reference_key,
            )
            .order_by(
                VenueOrder.removed_at.is_not(None),
                VenueOrder.first_seen_at.desc(),
                VenueOrder.id.desc(),
            )
        )
    )


_NAMES_THE_SALES_ORDER = frozenset({OutboxOperation.CREATE, OutboxOperation.REPLACE})
"""Operations whose answer names the order a sale has now at the venue."""


def _retire_other_orders(
    session: Session,
    connection_id: int,
    order_id: str,
    now: dt.datetime,
    source: ChangeSource,
) -> None:
    """The sale's other live orders, once an answer named ``order_id`` as its order.

    The venue holds one order per (partner, sellToOrderReference) and accepts a second
    createOrder only after deleting an earlier one in Error (ChannelMgrOrderAgent
    ``CreateOrder``): such an order in the mirror is marked removed, as the venue
    deleted it, so reconciliation does not see two orders for one sale. Any other live
    order of the sale (the mirror's status may be stale) is queued for a getOrder.
    """
    current = session.scalars(
        sa.select(VenueOrder).where(
            VenueOrder.connection_id == connection_id, VenueOrder.order_id == order_id
        )
    ).one_or_none()
    if current is None:
        return
    others = [
        other
        for other in sale_orders(session, connection_id, current.partner_id, current.reference_key)
        if other.order_id != order_id and other.removed_at is None
    ]
    stale = []
    for other in others:
        if other.status is OrderStatus.ERROR:
            mark_removed(session, connection_id, other.order_id, now, source)
            logger.info(
                "order %s in Error marked removed: the venue deleted it for order %s",
                other.order_id,
                order_id,
            )
        else:
            stale.append(Lookup(other.order_id, f"{source}_other_order", other.status))
    if stale:
        queue_lookups(session.connection(), connection_id, stale, now=now)


def _send_confirm(send: _Send) -> SendResult:
    order_id = send.claim.order_id
    payment = (send.claim.request or {}).get("paymentReference")
    if order_id is None or not isinstance(payment, str) or not payment.strip():
        return send.refuse("the stored confirm names no order or no paymentReference")
    try:
        ConfirmRequest(payment_reference=payment)
    except ValidationError as exc:
        # Longer than the venue's field: it would be cut there (ChannelMgrOrderAgent
        # ConfirmOrder), so it is not sent; the same body would fail every attempt.
        error = exc.errors(include_url=False, include_input=False)[0]
        return send.refuse(f"the stored paymentReference is invalid: {error['msg']}")
    problem = payment_reference_problem(payment, send.client.connection)
    if problem is not None:
        return send.refuse(f"the stored paymentReference is invalid: {problem}")
    try:
        # Idempotent at the venue: an order already Issued (an earlier attempt landed
        # and its answer was lost) comes back unchanged.
        order = send.venue(send.client.confirm_order, order_id, payment)
    except VenueError as exc:
        return _action_failed(send, exc)
    return send.sent(order)


def _send_replace(send: _Send) -> SendResult:
    claim = send.claim
    try:
        replacement = parse_submission(claim.request or {})
    except SubmissionError as exc:
        return send.refuse(f"the stored request is invalid: {exc}")
    if claim.order_id is None:
        return send.refuse("the stored replace names no order")
    try:
        order = send.venue(send.client.replace_order, claim.order_id, replacement.request)
    except VenueError as exc:
        if isinstance(exc, VenueRejected) and claim.attempts > 1 and not exc.may_be_transient:
            # An earlier attempt may have landed with its answer lost: the order is then
            # in flight (or settled) holding the replacement, and refuses a second one.
            return _resolve_replace(send, replacement, exc)
        return _action_failed(send, exc)
    return send.sent(order, replacement=replacement)


def _send_delete(send: _Send) -> SendResult:
    """deleteOrder, its effect decided by the order's state, confirmed by getOrder.

    The venue answers every successful deleteOrder with the order marked ``Cancelled``
    and no items — also when it then deleted the order outright (a Draft or Error order:
    CMOrderIssuer ``DeleteOrder`` marks it through ``DestroyOrderAssets`` first, and
    ChannelMgrOrderAgent ``DeleteOrder`` answers the record as marked). So the answer's
    status says nothing about what happened: what the order was before the call (the
    mirror's status) says what to expect, and a getOrder says what is: 404 → removed,
    an order → mirrored as it is (an Issued one kept as Cancelled).
    """
    order_id = send.claim.order_id
    if order_id is None:
        return send.refuse("the stored delete names no order")
    before = _mirrored_status(send)
    try:
        answer = send.venue(send.client.delete_order, order_id)
    except VenueError as exc:
        return _action_failed(send, exc)
    try:
        order = send.venue(send.client.get_order, order_id)
    except VenueError as exc:
        if order_gone(exc, order_id):
            return send.sent(None, removed=True)
        # The delete landed; only its confirmation failed. The row is sent, the result
        # says what the state before the call implies, and the mirror is left to the
        # worker's getOrder (a lookup is queued) rather than to the answer's status.
        expected_removal = before in (OrderStatus.DRAFT, OrderStatus.ERROR)
        logger.warning(
            "outbox %d: order %s deleted (was %s); its getOrder failed (%s), left to the worker",
            send.claim.id,
            order_id,
            before or "not mirrored",
            describe_venue_error(exc),
        )
        return send.sent(answer, removed=expected_removal, mirror=False)
    if before in (OrderStatus.DRAFT, OrderStatus.ERROR):
        # The venue keeps a Draft or Error order only if it changed meanwhile.
        logger.warning(
            "outbox %d: order %s was %s, yet the venue kept it as %s",
            send.claim.id,
            order_id,
            before,
            order.status,
        )
    return send.sent(order)


def _mirrored_status(send: _Send) -> OrderStatus | None:
    """The mirror's status of the claimed order; ``None`` when not mirrored (or removed)."""
    with send.sessions.begin() as session:
        return session.scalar(
            sa.select(VenueOrder.status).where(
                VenueOrder.connection_id == send.claim.connection_id,
                VenueOrder.order_id == canonical_guid(send.claim.order_id or ""),
                VenueOrder.removed_at.is_(None),
            )
        )


_SENDERS: dict[OutboxOperation, Callable[[_Send], SendResult]] = {
    OutboxOperation.CREATE: _send_create,
    OutboxOperation.CONFIRM: _send_confirm,
    OutboxOperation.REPLACE: _send_replace,
    OutboxOperation.DELETE: _send_delete,
}


def _action_failed(send: _Send, exc: VenueError) -> SendResult:
    """A confirm, replace or delete that failed: retried, refused, or (404) the order gone."""
    operation = send.claim.operation
    if order_gone(exc, send.claim.order_id or ""):
        if operation is OutboxOperation.DELETE:
            # Gone is what a delete asks for, whoever removed it (or an earlier attempt
            # whose answer was lost).
            return send.sent(None, removed=True, message=NO_LONGER_KNOWN)
        return send.refuse(NO_LONGER_KNOWN, exc.code, removed=True)
    if isinstance(exc, VenueRejected):
        in_flight = exc.order_in_flight
        if exc.may_be_transient and not (operation is OutboxOperation.DELETE and in_flight):
            return send.retry(exc)
        return send.refuse(exc.message or str(exc), exc.code, recheck=True)
    # Unavailable, rate limited, 5xx, a bad body, the key or address is wrong, or a 404
    # that does not name the order (an unmatched route, the gateway's): none is a verdict
    # on the order, so it waits and tries again.
    return send.retry(exc)


def _resolve_replace(send: _Send, replacement: Submission, rejection: VenueRejected) -> SendResult:
    """After a retried replace is refused: ``sent`` if the order holds the replacement."""
    assert send.claim.order_id is not None  # checked by the caller
    try:
        order = send.venue(send.client.get_order, send.claim.order_id)
    except VenueError as exc:
        if order_gone(exc, send.claim.order_id):
            return _action_failed(send, exc)
        return send.retry(exc)
    replaceable = order.status in (OrderStatus.DRAFT, OrderStatus.ERROR)
    if not replaceable and _lines(order) == _requested_lines(replacement.request):
        logger.info(
            "outbox %d: order %s already holds the replacement", send.claim.id, order.order_id
        )
        return send.sent(order, resolved=True, replacement=replacement)
    return send.refuse(rejection.message or str(rejection), rejection.code, observed=order)


def _lines(order: Order) -> list[tuple[str, int, dt.date | None]]:
    return sorted((item.item_number, item.quantity, item.visit_date) for item in order.items)


def _requested_lines(request: OrderRequest) -> list[tuple[str, int, dt.date | None]]:
    return sorted((item.item_number, item.quantity, item.visit_date) for item in request.items)


def _resolve(send: _Send, request: OrderRequest, rejection: VenueRejected) -> SendResult:
    """After a rejected create: the order the venue has under this reference, else the verdict."""
    duplicate = rejection.is_duplicate_reference
    found: Sequence[OrderSummary] = ()
    try:
        found = send.venue(
            send.client.find_by_reference, request.partner_id, request.sell_to_order_reference
        )
        order = send.venue(send.client.get_order, latest_summary(found).order_id) if found else None
    except VenueRejected as exc:
        if duplicate or exc.may_be_transient:
            return send.retry(exc)
        order = None  # the partner itself is refused: the venue holds no order of it
    except VenueError as exc:
        # Only the found order's own 404 (deleted between the listing and the read) says
        # the venue holds nothing; any other failure, another 404 included, is retried.
        if duplicate or not (found and order_gone(exc, latest_summary(found).order_id)):
            return send.retry(exc)
        order = None
    if order is not None:
        return send.sent(order, resolved=True)
    if duplicate:
        # "Already exists", yet nothing by that reference: the venue is mid-change
        # (an Error order being replaced); ask again later.
        return send.retry(rejection)
    return send.refuse(rejection.message or str(rejection), rejection.code)


def latest_summary(found: Sequence[OrderSummary]) -> OrderSummary:
    """Of the orders a look-up by reference found, the one the reference names now.

    Several only in the venue's history of deleted-and-resubmitted Error orders: the one
    received last.
    """
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
    return max(found, key=lambda summary: summary.received_at or epoch)


def _apply_replacement(session: Session, ledger_line_id: int, replacement: Submission) -> None:
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


# --- submitting now ----------------------------------------------------------------------


class SubmitStatus(StrEnum):
    """What a submission came to, for the shop."""

    SENT = "sent"
    """The venue accepted the order (or already had it from an earlier attempt)."""
    RECORDED = "recorded"
    """Recorded; the venue could not take it yet, and the outbox will retry."""
    FAILED = "failed"
    """The venue refused the order; the sale stays in the ledger, marked failed."""
    DUPLICATE = "duplicate"
    """Submitted and sent before; the answer is the order the venue already has."""


@dataclass(frozen=True)
class SubmitOutcome:
    """The answer to one submission: what ``otacm submit`` prints and the API returns.

    Attributes:
        reference: the shop's order number (``sellToOrderReference``).
        status: sent, recorded, failed or duplicate.
        order_id: the venue's orderId, once the venue has the order.
        message: for a person: the venue's refusal, or why it will be retried.
        code: the venue's error code when it refused the order.
        order_status: the order's status at the venue (Submitted, Issued...).
        status_message: the venue's ``statusMessage`` of the order.
        buy_from_order_reference: the venue's own document number of the order.
        partner_id: the partner the order is for.
        connection: the venue connection's name.
        ledger_line_id: the sale's ledger line.
        outbox_id: the sale's createOrder outbox row.
        next_attempt_at: when a recorded order will be tried again.
    """

    reference: str
    status: SubmitStatus
    order_id: str | None = None
    message: str | None = None
    code: str | None = None
    order_status: OrderStatus | None = None
    status_message: str | None = None
    buy_from_order_reference: str | None = None
    partner_id: str | None = None
    connection: str | None = None
    ledger_line_id: int | None = None
    outbox_id: int | None = None
    next_attempt_at: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """The outcome as JSON (camelCase; ``None`` values kept as ``null``).

        ``outcome`` is :attr:`status` (sent, recorded, failed, duplicate); ``status`` is
        the order's status at the venue, named as in the venue's own order JSON.
        """
        return {
            "outcome": str(self.status),
            "reference": self.reference,
            "orderId": self.order_id,
            "status": None if self.order_status is None else str(self.order_status),
            "statusMessage": self.status_message,
            "buyFromOrderReference": self.buy_from_order_reference,
            "message": self.message,
            "code": self.code,
            "partnerId": self.partner_id,
            "connection": self.connection,
            "ledgerLineId": self.ledger_line_id,
            "outboxId": self.outbox_id,
            "nextAttemptAt": None
            if self.next_attempt_at is None
            else self.next_attempt_at.isoformat(),
        }

    def describe(self) -> str:
        """One line for a terminal: reference, status, and the order or the reason."""
        parts = [self.reference, str(self.status)]
        if self.order_id:
            parts.append(f"order {self.order_id}")
        if self.order_status:
            parts.append(str(self.order_status))
        if self.buy_from_order_reference:
            parts.append(self.buy_from_order_reference)
        if self.message:
            parts.append(self.message)
        return "  ".join(parts)


def submit_now(
    sessions: sessionmaker[Session],
    client: VenueClient,
    connection_id: int,
    request: OrderRequest,
    *,
    now: dt.datetime,
    amount: Decimal | None = None,
    currency: str | None = None,
    amount_includes_vat: bool = True,
    connection: str | None = None,
    owner: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> SubmitOutcome:
    """Record a sale and its createOrder, then try once to send it at once.

    A failure that may pass leaves the sale recorded and queued (``recorded``); a
    refusal leaves it recorded and marked (``failed``); a sale already submitted and
    sent answers with the order the venue has (``duplicate``).

    Args:
        sessions: the session factory; recording and sending commit on their own.
        client: the venue client of ``connection_id``.
        connection_id: the venue connection's row id.
        request: the createOrder body.
        now: the current time (aware).
        amount: what the shop charged; with ``currency``.
        currency: ISO 4217 code of ``amount``.
        amount_includes_vat: whether ``amount`` includes VAT.
        connection: the connection's name, for the outcome.
        owner: the lease owner name; a new one (:func:`~receiver.worker.new_owner`) if
            not given.
        lease_seconds: how long the row is held while it is sent.
        max_attempts: as for :func:`send_outbox_row`.

    Returns:
        The outcome.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the sale could not be recorded; nothing was sent.
    """
    with sessions.begin() as session:
        recorded = record_submission(
            session,
            connection_id,
            request,
            now=now,
            amount=amount,
            currency=currency,
            amount_includes_vat=amount_includes_vat,
        )
        outbox_id, state = recorded.outbox.id, recorded.outbox.state
        base = SubmitOutcome(
            reference=request.sell_to_order_reference,
            status=SubmitStatus.RECORDED,
            partner_id=recorded.line.partner_id,
            connection=connection,
            ledger_line_id=recorded.line.id,
            outbox_id=outbox_id,
        )
    if state is OutboxState.SENT:
        return _stored_outcome(sessions, base, connection_id, already=True)

    result = send_outbox_row(
        sessions,
        client,
        outbox_id,
        owner=owner or new_owner(),
        now=now,
        lease_seconds=lease_seconds,
        max_attempts=max_attempts,
    )
    if result.outcome is SendOutcome.SENT and result.order is not None:
        order = result.order
        return _with(
            base,
            status=SubmitStatus.SENT,
            order_id=result.order_id,
            order_status=order.status,
            status_message=order.status_message,
            buy_from_order_reference=order.buy_from_order_reference,
            message=FOUND_IN_ERROR
            if result.found_in_error
            else "found at the venue by its reference"
            if result.resolved_by_reference
            else None,
        )
    if result.outcome is SendOutcome.FAILED:
        return _with(base, status=SubmitStatus.FAILED, message=result.message, code=result.code)
    if result.outcome is SendOutcome.RETRYING:
        return _with(
            base,
            message=f"recorded; the venue could not take it now ({result.message}); will retry",
            next_attempt_at=result.next_attempt_at,
        )
    # Not sent by this call (not due, another sender has it, our database failed, or
    # attempts spent): say what is stored.
    return _stored_outcome(sessions, base, connection_id, already=recorded.already_recorded)


def _stored_outcome(
    sessions: sessionmaker[Session], base: SubmitOutcome, connection_id: int, *, already: bool
) -> SubmitOutcome:
    """The outcome from what is stored for ``base``'s outbox row (and its mirrored order)."""
    with sessions.begin() as session:
        row = session.get(Outbox, base.outbox_id)
        if row is None:  # pragma: no cover - recorded in this call, never deleted
            return base
        if row.state is OutboxState.SENT:
            mirrored = session.scalars(
                sa.select(VenueOrder).where(
                    VenueOrder.connection_id == connection_id,
                    VenueOrder.order_id == row.order_id,
                )
            ).one_or_none()
            return _with(
                base,
                status=SubmitStatus.DUPLICATE if already else SubmitStatus.SENT,
                order_id=row.order_id,
                order_status=None if mirrored is None else mirrored.status,
                status_message=None if mirrored is None else mirrored.status_message,
                buy_from_order_reference=None
                if mirrored is None
                else mirrored.buy_from_order_reference,
                # A sent row keeps a note only when its order was found in Error.
                message=row.last_error,
            )
        if row.state in (OutboxState.FAILED, OutboxState.DEAD):
            return _with(base, status=SubmitStatus.FAILED, message=row.last_error)
        waiting = "being sent" if row.state is OutboxState.LEASED else "queued"
        detail = f" (last failure: {row.last_error})" if row.last_error else ""
        return _with(
            base,
            message=f"recorded and {waiting}; will retry{detail}",
            next_attempt_at=row.next_attempt_at if row.state is OutboxState.PENDING else None,
        )


def _with(base: SubmitOutcome, **changes: Any) -> SubmitOutcome:
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    return SubmitOutcome(**{**values, **changes})


# --- acting on an order now -------------------------------------------------------------


def replacement_body(replacement: Submission) -> dict[str, Any]:
    """The stored body of a replace: the order request, plus the sale's amount if given.

    The amount travels as a string (JSON has no decimals); :func:`parse_submission`
    reads it back exactly when the row is sent.
    """
    body = replacement.request.to_wire()
    if replacement.amount is not None and replacement.currency is not None:
        body["amount"] = str(replacement.amount)
        body["currency"] = replacement.currency
        body["amountIncludesVat"] = replacement.amount_includes_vat
    return body


def act_now(
    sessions: sessionmaker[Session],
    client: VenueClient,
    connection_id: int,
    operation: OutboxOperation,
    order_id: str,
    *,
    now: dt.datetime,
    request: dict[str, Any] | None = None,
    owner: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> SendResult:
    """Record a confirm, replace or delete of an order, then try once to send it at once.

    As :func:`submit_now` for a sale: the row is committed before the call, so a failure
    that may pass leaves it queued for the outbox sender (``RETRYING``); a row behind an
    earlier unfinished row for the same order is only recorded (``NOT_CLAIMED``).

    Args:
        sessions: the session factory; recording and sending commit on their own.
        client: the venue client of ``connection_id``.
        connection_id: the venue connection's row id.
        operation: ``confirm``, ``replace`` or ``delete``.
        order_id: the venue's orderId.
        now: the current time (aware).
        request: the body, as for :func:`record_action`.
        owner: the lease owner name; a new one if not given.
        lease_seconds: how long the row is held while it is sent.
        max_attempts: as for :func:`send_outbox_row`.

    Returns:
        What came of the send.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the action could not be recorded; nothing was sent.
    """
    with sessions.begin() as session:
        outbox_id = record_action(
            session, connection_id, operation, order_id, now=now, request=request
        ).id
    return send_outbox_row(
        sessions,
        client,
        outbox_id,
        owner=owner or new_owner(),
        now=now,
        lease_seconds=lease_seconds,
        max_attempts=max_attempts,
    )


# --- submitting a file -------------------------------------------------------------------


def read_submissions(text: str) -> list[Submission]:
    """The submissions in a file's text: one JSON object, a JSON array, or JSON lines.

    Every entry is validated before any is returned, so a bad file records nothing.
    Numbers are decoded as ``Decimal``, so amounts stay exact.

    Raises:
        SubmissionError: the text is not JSON, or an entry is invalid; the field names
            the entry (``[2].items[0].quantity``, ``line 3: amount``); when several
            entries are invalid, :class:`SubmissionsRefused` lists each one.
    """
    try:
        decoded: Any = decode_json(text, exact_numbers=True)
    except (JsonRefused, RecursionError) as refused:
        raise SubmissionError("", f"not valid JSON: {_refusal(refused)}") from None
    except json.JSONDecodeError as whole:
        if whole.msg != "Extra data":
            raise SubmissionError(
                "", f"not valid JSON: {whole.msg} at line {whole.lineno} column {whole.colno}"
            ) from None
        # Several values one after the other: JSON lines, one object per line.
        entries: list[tuple[str, Any]] = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"line {number}: ", decode_json(line, exact_numbers=True)))
            except json.JSONDecodeError as exc:
                raise SubmissionError(
                    f"line {number}", f"not valid JSON: {exc.msg} at column {exc.colno}"
                ) from None
            except (JsonRefused, RecursionError) as refused:
                raise SubmissionError(
                    f"line {number}", f"not valid JSON: {_refusal(refused)}"
                ) from None
    else:
        if isinstance(decoded, list):
            entries = [(f"[{index}].", entry) for index, entry in enumerate(decoded)]
        else:
            entries = [("", decoded)]
    if not entries:
        raise SubmissionError("", "no orders in the file")
    submissions = []
    refusals = []
    for where, entry in entries:
        try:
            submissions.append(parse_submission(entry))
        except SubmissionError as exc:
            field = f"{where}{exc.field}".rstrip(". :")
            refusals.append(SubmissionError(field, exc.problem, code=exc.code))
    if len(refusals) == 1:
        raise refusals[0]
    if refusals:
        raise SubmissionsRefused(refusals)
    return submissions


def _refusal(exc: JsonRefused | RecursionError) -> str:
    return "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def submit_file(
    settings: Settings,
    path: Path,
    *,
    sessions: sessionmaker[Session],
    clients: Mapping[str, VenueClient],
    now: dt.datetime,
    owner: str | None = None,
) -> list[SubmitOutcome]:
    """``otacm submit FILE``: record and send every order in ``path``.

    The file holds one JSON object, a JSON array of them, or JSON lines; each object is
    the venue's order request plus optional ``amount``, ``currency``,
    ``amountIncludesVat`` and ``connection`` (:func:`parse_submission`). The whole file
    is validated (and each entry's connection resolved) before anything is recorded.
    Each order is then recorded and sent once (:func:`submit_now`); those the venue
    cannot take now stay queued for the outbox sender.

    Args:
        settings: the connections to submit to.
        path: the file.
        sessions: the session factory.
        clients: a venue client for each connection name used by the file; the caller
            creates and closes them.
        now: the current time (aware).
        owner: the lease owner name; a new one if not given.

    Returns:
        One outcome per order, in the file's order.

    Raises:
        SubmissionError: the file is unreadable or invalid, an entry names an unknown
            connection, or no client was given for one; nothing was recorded.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SubmissionError("", f"cannot read {path}: {reason}") from None
    submissions = read_submissions(text)
    chosen = []
    for index, submission in enumerate(submissions):
        try:
            venue = choose_connection(settings, submission.connection)
            check_connection(venue, submission.request)
        except SubmissionError as exc:
            where = f"[{index}]." if len(submissions) > 1 else ""
            raise SubmissionError(f"{where}{exc.field}", exc.problem, code=exc.code) from None
        if venue.name not in clients:
            raise SubmissionError(
                "connection",
                f"no venue client for connection {venue.name!r}",
                code="unknown_connection",
            )
        chosen.append(venue.name)
    with sessions.begin() as session:
        ids = {name: ensure_connection(session, name) for name in sorted(set(chosen))}
    owner = owner or new_owner()
    return [
        submit_now(
            sessions,
            clients[name],
            ids[name],
            submission.request,
            now=now,
            amount=submission.amount,
            currency=submission.currency,
            amount_includes_vat=submission.amount_includes_vat,
            connection=name,
            owner=owner,
            lease_seconds=settings.outbox_lease_seconds,
        )
        for submission, name in zip(submissions, chosen, strict=True)
    ]


def _path_parts(dotted: str) -> Iterator[int | str]:
    """The parts of a dotted path (``items.0.itemNumber``), list indexes as numbers."""
    for part in dotted.split("."):
        yield int(part) if part.isdigit() else part


def _dotted(loc: tuple[int | str, ...]) -> str:
    """A field's path as the partner wrote it: ``items[0].visitTime``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f"{'.' if path else ''}{part}"
    return path


def _blank_to_none(value: str | None) -> str | None:
    # The shop's paymentReference, recorded (not sent) trimmed; blank is none.
    if value is None or not value.strip():
        return None
    return value.strip()
