"""Submitting a sale now: record it, then try once to send it while the caller waits.

:func:`submit_now` is what ``POST /api/orders`` (:mod:`receiver.api`) and ``otacm
submit`` (:func:`submit_file`, a file of one or many sales) do: the sale is recorded
(:func:`orders.outbox.record_submission`) and committed before the call, so a failure
that may pass leaves it queued for the scheduler's outbox sender, and the caller is
told so within seconds (:data:`SUBMIT_NOW_RETRY`). A repeat of a recorded sale is
answered with what is stored (:class:`SubmitOutcome`), never sent twice.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from sqlalchemy.orm import Session, sessionmaker

from orders.attempt import FOUND_IN_ERROR, SendOutcome
from orders.outbox import DEFAULT_LEASE_SECONDS, DEFAULT_MAX_ATTEMPTS, record_submission
from orders.sender import send_outbox_row
from orders.submission import SubmissionError, check_connection, choose_connection, read_submissions
from storage.lease import new_owner
from storage.models import Outbox, OutboxState, VenueOrder, ensure_connection
from venue.client import VenueClient
from venue.connection import VenueConnection
from venue.models import OrderRequest, OrderStatus
from venue.retry import RetryPolicy

SUBMIT_NOW_RETRY = RetryPolicy(attempts=2, deadline=10.0, wait_initial=0.5, wait_max=2.0)
"""The client retry policy for sending while someone waits (``POST /api/orders``): the
outbox retries later anyway, so the caller gets "recorded, will retry" within seconds."""


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


class SubmitAnswer(BaseModel):
    """What ``POST /api/orders`` answers and ``otacm submit --json`` prints for a sale."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    outcome: SubmitStatus = Field(
        description="sent, duplicate, recorded (the outbox retries) or failed (refused)."
    )
    reference: str = Field(description="The shop's order number.")
    order_id: str | None = Field(description="The venue's orderId, once it has the order.")
    status: OrderStatus | None = Field(description="The order's status at the venue.")
    status_message: str | None
    buy_from_order_reference: str | None = Field(
        description="The venue's document number for the order."
    )
    message: str | None = Field(description="The venue's refusal, or why it is retried.")
    code: str | None = Field(description="The venue's error code when it refused.")
    partner_id: str | None
    connection: str | None
    ledger_line_id: int | None
    outbox_id: int | None
    next_attempt_at: dt.datetime | None = Field(description="When a recorded sale is tried again.")


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

    def answer(self) -> SubmitAnswer:
        """The outcome for the shop: ``outcome`` is :attr:`status` (sent, recorded, failed,
        duplicate); ``status`` is the order's status at the venue."""
        return SubmitAnswer(
            outcome=self.status,
            reference=self.reference,
            order_id=self.order_id,
            status=self.order_status,
            status_message=self.status_message,
            buy_from_order_reference=self.buy_from_order_reference,
            message=self.message,
            code=self.code,
            partner_id=self.partner_id,
            connection=self.connection,
            ledger_line_id=self.ledger_line_id,
            outbox_id=self.outbox_id,
            next_attempt_at=self.next_attempt_at,
        )

    def to_json(self) -> dict[str, Any]:
        """:meth:`answer` as JSON (camelCase; ``None`` values kept as ``null``)."""
        return self.answer().model_dump(mode="json", by_alias=True)

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
        owner: the lease owner name; a new one (:func:`~storage.lease.new_owner`) if
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


def submit_file(
    connections: Sequence[VenueConnection],
    path: Path,
    *,
    sessions: sessionmaker[Session],
    clients: Mapping[str, VenueClient],
    now: dt.datetime,
    owner: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> list[SubmitOutcome]:
    """``otacm submit FILE``: record and send every order in ``path``.

    The file holds one JSON object, a JSON array of them, or JSON lines; each object is the venue's
    order request plus optional ``amount``, ``currency``, ``amountIncludesVat`` and ``connection``
    (:func:`orders.submission.parse_submission`). The whole file is validated (and each entry's
    connection resolved) before anything is recorded. Each order is then recorded and sent once
    (:func:`submit_now`); those the venue cannot take now stay queued for the outbox sender.

    Args:
        connections: the venue connections to submit to.
        path: the file.
        sessions: the session factory.
        clients: a venue client for each connection name used by the file; the caller
            creates and closes them.
        now: the current time (aware).
        owner: the lease owner name; a new one if not given.
        lease_seconds: how long each row is held while it is sent
            (``OTACM_OUTBOX_LEASE_SECONDS``).

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
            venue = choose_connection(connections, submission.connection)
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
            lease_seconds=lease_seconds,
        )
        for submission, name in zip(submissions, chosen, strict=True)
    ]
