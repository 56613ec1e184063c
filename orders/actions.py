"""Actions on an order the venue has: a person's replace or cancel, and any action sent now.

An order is named by the venue's orderId, the shop's reference (``sellToOrderReference``,
any case) or the venue's own ``buyFromOrderReference``, as
:func:`orders.story.find_orders` finds it. What ``orders show`` prints, the order's
story, is :mod:`orders.story`'s: it needs no outbox.

``orders replace`` and ``orders cancel`` act on the order the reference names now (the
latest the venue still has): :func:`replace_order` and :func:`cancel_order` record the
replaceOrder or deleteOrder in the outbox and send it at once (:func:`act_now`, which the
scheduler's confirmations use too); an answer that may pass leaves it queued for the
scheduler. They check what cannot change (a replacement's partner and reference), but send
whatever the mirror says of the order's state: the venue decides, the mirror may lag it (an
order shown Submitted may be in Error by now), and a refusal costs one call and changes
nothing but the record of it.

Customer names and e-mails are left out of everything printed: this output ends up in
terminals, tickets and chat.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from orders.attempt import SendOutcome, SendResult
from orders.outbox import DEFAULT_LEASE_SECONDS, DEFAULT_MAX_ATTEMPTS, record_action
from orders.sender import send_outbox_row
from orders.story import find_orders
from orders.submission import Submission, SubmissionError, read_submissions, replacement_body
from storage.lease import new_owner
from storage.models import OutboxOperation, VenueConnection, VenueOrder
from venue.client import VenueClient
from venue.models import OrderStatus
from venue.values import canonical_guid, normalize_reference


class OrderActionError(Exception):
    """An action a person asked for cannot be sent; nothing was recorded. The message says why."""


class ActionStatus(StrEnum):
    """What ``orders replace`` or ``orders cancel`` came to."""

    REPLACED = "replaced"
    """The venue took the replacement; the order is in flight again (Submitted), or
    already settled on the older synchronous API."""
    CANCELLED = "cancelled"
    """The venue keeps the order as Cancelled; its wallets are destroyed."""
    REMOVED = "removed"
    """The order was a Draft or in Error: the venue removed it outright (or had already)."""
    QUEUED = "queued"
    """Recorded; the venue could not take it now, and the scheduler sends it again."""
    REFUSED = "refused"
    """The venue refused it; its message says why."""


@dataclass(frozen=True)
class ActionOutcome:
    """The answer to ``orders replace`` or ``orders cancel``: what the command prints.

    Attributes:
        reference: the shop's order number.
        status: what came of the action.
        connection: the venue connection's name.
        order_id: the venue's orderId.
        order_status: the order's status at the venue afterwards, when the venue said.
        message: the venue's refusal, or why the action waits.
        outbox_id: the action's outbox row.
        next_attempt_at: when a queued action is tried again.
    """

    reference: str
    status: ActionStatus
    connection: str
    order_id: str
    order_status: OrderStatus | None = None
    message: str | None = None
    outbox_id: int | None = None
    next_attempt_at: dt.datetime | None = None

    @property
    def done(self) -> bool:
        """Whether the venue carried the action out."""
        return self.status in (ActionStatus.REPLACED, ActionStatus.CANCELLED, ActionStatus.REMOVED)

    def to_json(self) -> dict[str, Any]:
        """The outcome as JSON (camelCase); ``status`` is the order's at the venue."""
        return {
            "outcome": str(self.status),
            "reference": self.reference,
            "connection": self.connection,
            "orderId": self.order_id,
            "status": None if self.order_status is None else str(self.order_status),
            "message": self.message,
            "outboxId": self.outbox_id,
            "nextAttemptAt": None
            if self.next_attempt_at is None
            else self.next_attempt_at.isoformat(),
        }

    def describe(self) -> str:
        """One line for a terminal: reference, outcome, order, and the status or reason."""
        parts = [self.reference, str(self.status), f"order {self.order_id}"]
        if self.order_status is not None:
            parts.append(f"now {self.order_status}")
        if self.message:
            parts.append(self.message)
        return "  ".join(parts)


@dataclass(frozen=True)
class _Target:
    connection_id: int
    connection: str
    order_id: str
    partner_id: str
    reference: str
    reference_key: str


def current_order(session: Session, key: str, connection_id: int | None = None) -> VenueOrder:
    """The order ``key`` names now: the latest the venue still has (not marked removed).

    A reference can name several orders over time (an Error order replaced by a new
    submission gets a new orderId); the one received last is current.

    Args:
        session: the caller's session.
        key: an orderId, shop reference or venue reference.
        connection_id: only this connection's orders; ``None`` for any.

    Raises:
        OrderActionError: no such order, or orders of several connections match.
    """
    found = [
        order
        for order in find_orders(session, key)
        if order.removed_at is None and connection_id in (None, order.connection_id)
    ]
    if not found:
        raise OrderActionError(
            f"no stored order under {key!r} that the venue still has"
            " (`otacm orders show` lists what is stored)"
        )
    if len({order.connection_id for order in found}) > 1:
        raise OrderActionError(
            f"orders of several venue connections are stored under {key!r}: name one with"
            " --connection"
        )
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
    return max(found, key=lambda order: (order.received_at or epoch, order.first_seen_at, order.id))


def read_replacement(path: Path) -> Submission:
    """The one order request in ``path`` (as ``otacm submit`` reads a file).

    Raises:
        SubmissionError: the file is unreadable, not JSON, invalid, or holds several orders.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SubmissionError("", f"cannot read {path}: {reason}") from None
    found = read_submissions(text)
    if len(found) != 1:
        raise SubmissionError("", f"a replacement is one order, and the file holds {len(found)}")
    return found[0]


def replace_order(
    sessions: sessionmaker[Session],
    clients: Mapping[str, VenueClient],
    key: str,
    replacement: Submission,
    *,
    now: dt.datetime,
    connection: str | None = None,
    owner: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> ActionOutcome:
    """``otacm orders replace``: send ``replacement`` for the order ``key`` names now.

    The replacement must name the order's partner and reference (the venue keeps both
    immutable). Whatever the mirror says of the order's state, the venue is asked: only
    a Draft or Error order can be replaced, and the venue's refusal names its status.
    A replacement that lands also updates the sale's ledger line (request, quantity,
    references, and amount when the file gives one).

    Args:
        sessions: the session factory.
        clients: a venue client per connection name; the caller creates and closes them.
        key: an orderId, shop reference or venue reference.
        replacement: the new order request (:func:`read_replacement`).
        now: the current time (aware).
        connection: the venue connection's name, to choose among several; the file's
            ``connection`` is used when this is not given.
        owner: the lease owner name; a new one if not given.
        lease_seconds: how long the row is held while it is sent
            (``OTACM_OUTBOX_LEASE_SECONDS``).

    Raises:
        OrderActionError: no such order, the file's partner or reference differ from the
            order's, or no client for its connection; nothing was recorded.
    """
    if connection and replacement.connection and connection != replacement.connection:
        raise OrderActionError(
            f"--connection {connection!r} and the file's connection"
            f" {replacement.connection!r} differ"
        )
    target = _target(sessions, key, connection or replacement.connection)
    request = replacement.request
    partner = canonical_guid(request.partner_id)
    if partner != target.partner_id:
        raise OrderActionError(
            f"partnerId {request.partner_id!r} in the file is not the order's"
            f" ({target.partner_id}); the venue keeps it immutable"
        )
    if normalize_reference(request.sell_to_order_reference) != target.reference_key:
        raise OrderActionError(
            f"sellToOrderReference {request.sell_to_order_reference!r} in the file is not"
            f" the order's ({target.reference}); the venue keeps it immutable"
        )
    result = act_now(
        sessions,
        _client(clients, target),
        target.connection_id,
        OutboxOperation.REPLACE,
        target.order_id,
        request=replacement_body(replacement),
        now=now,
        owner=owner,
        lease_seconds=lease_seconds,
    )
    return _outcome(target, OutboxOperation.REPLACE, result)


def cancel_order(
    sessions: sessionmaker[Session],
    clients: Mapping[str, VenueClient],
    key: str,
    *,
    now: dt.datetime,
    connection: str | None = None,
    owner: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> ActionOutcome:
    """``otacm orders cancel``: deleteOrder of the order ``key`` names now.

    An Issued order is kept by the venue as Cancelled (wallets destroyed); a Draft or
    Error order is removed outright. The venue refuses an order in flight (Submitted,
    Scheduled, Processing): run the command again once it has settled.

    Args:
        sessions: the session factory.
        clients: a venue client per connection name; the caller creates and closes them.
        key: an orderId, shop reference or venue reference.
        now: the current time (aware).
        connection: the venue connection's name, to choose among several.
        owner: the lease owner name; a new one if not given.
        lease_seconds: how long the row is held while it is sent
            (``OTACM_OUTBOX_LEASE_SECONDS``).

    Raises:
        OrderActionError: no such order, or no client for its connection; nothing was
            recorded.
    """
    target = _target(sessions, key, connection)
    result = act_now(
        sessions,
        _client(clients, target),
        target.connection_id,
        OutboxOperation.DELETE,
        target.order_id,
        now=now,
        owner=owner,
        lease_seconds=lease_seconds,
    )
    return _outcome(target, OutboxOperation.DELETE, result)


def _target(sessions: sessionmaker[Session], key: str, connection: str | None) -> _Target:
    with sessions.begin() as session:
        connection_id = None
        if connection is not None:
            connection_id = session.scalar(
                sa.select(VenueConnection.id).where(VenueConnection.name == connection)
            )
            if connection_id is None:
                raise OrderActionError(f"no order of venue connection {connection!r} is stored")
        order = current_order(session, key, connection_id)
        return _Target(
            connection_id=order.connection_id,
            connection=session.get_one(VenueConnection, order.connection_id).name,
            order_id=order.order_id,
            partner_id=order.partner_id,
            reference=order.sell_to_order_reference,
            reference_key=order.reference_key,
        )


def _client(clients: Mapping[str, VenueClient], target: _Target) -> VenueClient:
    client = clients.get(target.connection)
    if client is None:
        raise OrderActionError(
            f"order {target.order_id} belongs to venue connection {target.connection!r},"
            " which is not configured"
        )
    return client


def _outcome(target: _Target, operation: OutboxOperation, result: SendResult) -> ActionOutcome:
    order_status = None if result.order is None else result.order.status
    message = result.message
    next_attempt_at = None
    if result.outcome is SendOutcome.SENT:
        if result.removed:
            status, order_status = ActionStatus.REMOVED, None
        elif operation is OutboxOperation.REPLACE:
            status = ActionStatus.REPLACED
        else:
            status = ActionStatus.CANCELLED
    elif result.outcome in (SendOutcome.FAILED, SendOutcome.DEAD):
        status, order_status = ActionStatus.REFUSED, None
    elif result.outcome is SendOutcome.RETRYING:
        status = ActionStatus.QUEUED
        message = f"the venue could not take it now ({message}); the scheduler retries"
        next_attempt_at = result.next_attempt_at
    else:
        # Not sent by this call: behind an earlier action on the order, another sender
        # has it, or our database failed after the call. It is recorded either way.
        status = ActionStatus.QUEUED
        message = "recorded; the scheduler sends it after the earlier actions on this order"
    return ActionOutcome(
        reference=target.reference,
        status=status,
        connection=target.connection,
        order_id=target.order_id,
        order_status=order_status,
        message=message,
        outbox_id=result.outbox_id,
        next_attempt_at=next_attempt_at,
    )


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

    As :func:`orders.submit.submit_now` for a sale: the row is committed before the call, so a
    failure that may pass leaves it queued for the outbox sender (``RETRYING``); a row behind an
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
