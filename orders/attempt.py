"""One attempt at sending a claimed outbox row: its venue calls and how it ends.

:class:`Send` holds the claim while it is sent. Every venue call goes through
:meth:`Send.venue`, which renews the lease before each call after the first;
:func:`kept_leased` renews it on a timer meanwhile (every third of the lease,
:data:`RENEWALS_PER_LEASE`), so a slow venue never lets another sender take the row.
The attempt ends in one of three ways, each written in a transaction of its own and
only while the row is still this sender's (:meth:`~storage.lease.LeasedQueue.settle`):
:meth:`Send.sent` (the row ``sent``, the answer mirrored through :mod:`orders.mirror`
with the operation's :class:`~storage.models.ChangeSource` — no webhook fires for
confirm or delete, so the answer is the only news of them; a replacement that landed
also updates the sale's ledger line), :meth:`Send.refuse` (``failed`` with the venue's
message; the order queued for a fresh getOrder, since a refusal says the mirror was
stale) and :meth:`Send.retry` (back to ``pending`` after :func:`storage.lease.backoff`,
``dead`` after ``max_attempts``). :class:`SendResult` says what came of it.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from orders.inbox import Lookup, queue_lookups
from orders.mirror import (
    NAMES_THE_SALES_ORDER,
    mark_removed,
    note_foreign_order,
    retire_other_orders,
    upsert_order,
)
from orders.outbox import DEFAULT_LEASE_SECONDS, OUTBOX_QUEUE, OutboxClaim, apply_replacement
from orders.shop_events import record_submission_failed
from orders.submission import Submission
from storage.flush import ColumnOverflow
from storage.lease import LAST_ERROR_MAX_CHARS, NO_SYNC, backoff
from storage.models import ChangeSource, Outbox, OutboxOperation, OutboxState
from venue.client import VenueClient
from venue.errors import VenueError, describe_venue_error
from venue.models import Order
from venue.values import normalize_reference

logger = logging.getLogger(__name__)


RENEWALS_PER_LEASE = 3
"""A live sender renews its row's lease this many times per lease: two renewals can
fail (a database hiccup, a loaded machine) before the lease runs out."""


Clock = Callable[[], dt.datetime]
"""The current time (aware), read by a sender each time it claims or renews a lease."""


T = TypeVar("T")


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


def moving_from(now: dt.datetime) -> Clock:
    """A clock that reads ``now`` at first and then moves on with the monotonic clock."""
    started = time.monotonic()
    return lambda: now + dt.timedelta(seconds=time.monotonic() - started)


NO_LONGER_KNOWN = "the venue no longer knows the order"
"""The row's ``last_error`` when the venue answers an action on an order with 404."""


_CHANGE_SOURCES = {
    OutboxOperation.CREATE: ChangeSource.SUBMIT,
    OutboxOperation.CONFIRM: ChangeSource.CONFIRM,
    OutboxOperation.REPLACE: ChangeSource.REPLACE,
    OutboxOperation.DELETE: ChangeSource.DELETE,
}


class LeaseLost(Exception):
    """The row's lease could not be renewed before a venue call: another sender has it."""


@dataclass
class Send:
    """One claimed row being sent: its venue calls, and the three ways its attempt ends.

    Every venue call goes through :meth:`venue`, which renews the lease before each call
    after the first (and finds out there when another sender has the row); meanwhile
    :func:`kept_leased` renews it on a timer, so the row stays this sender's however
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
            LeaseLost: the lease had expired and another sender claimed the row.
        """
        if self.calls:
            self._renew()
        self.calls += 1
        return call(*args)

    def _renew(self) -> None:
        if not self.extend_lease():
            raise LeaseLost

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
        (:func:`retire_other_orders`). ``found_in_error`` keeps ``message`` on the row.
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
                updated = OUTBOX_QUEUE.settle(
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
                            session,
                            claim.connection_id,
                            order,
                            source=source,
                            observed_at=now,
                            creation=claim.operation is OutboxOperation.CREATE and not resolved,
                        )
                    if replacement is not None and claim.ledger_line_id is not None:
                        apply_replacement(session, claim.ledger_line_id, replacement)
                    if mirror and not removed and claim.operation in NAMES_THE_SALES_ORDER:
                        retire_other_orders(session, claim.connection_id, order_id, now, source)
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

        A refused createOrder also records ``order.submission_failed`` for the shop
        (:func:`orders.shop_events.record_submission_failed`), in the same transaction.

        For an action on an order, what the refusal says about the order is recorded with
        it: ``removed`` marks it removed (a 404), ``observed`` mirrors the order as just
        fetched, and ``recheck`` queues a getOrder for the worker (the mirror was stale).
        """
        claim, now = self.claim, self.now
        source = _CHANGE_SOURCES[claim.operation]
        with self.sessions.begin() as session:
            updated = OUTBOX_QUEUE.settle(
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
            if updated and claim.operation is OutboxOperation.CREATE:
                # The sale will not become an order: the shop is told, with the refusal.
                request = claim.request or {}
                record_submission_failed(
                    session,
                    claim.connection_id,
                    reference=_text(request.get("sellToOrderReference")),
                    partner_id=_text(request.get("partnerId")),
                    code=code,
                    message=message,
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
            state = OUTBOX_QUEUE.retry(
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
def kept_leased(send: Send) -> Iterator[None]:
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


def _text(value: object) -> str | None:
    """A stored request's field as text, when it is text."""
    return value if isinstance(value, str) else None
