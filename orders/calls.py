"""What each outbox operation calls at the venue, and how each answer is applied.

:data:`SENDERS` maps an operation to its function, given one :class:`orders.attempt.Send`:

- an order → the row is ``sent`` and the order mirrored; a replaceOrder that lands also
  updates the sale's ledger line (its request, quantity, references, and the amount when
  the replacement carries one);
- deleteOrder answers "Cancelled" whether the venue kept the order (Issued, Cancelled)
  or then removed it (Draft, Error), so its answer's status is never read: a getOrder
  after it decides — 404 → the row is ``sent`` and the order marked removed, an order →
  mirrored as it is (Cancelled); when that getOrder fails, the mirror's status before
  the call says what to expect and the worker's getOrder settles the mirror;
- createOrder's duplicate-reference 400 (an earlier attempt landed but its answer was
  lost) → the order is found by reference, fetched, mirrored, and the row is ``sent``;
  a replaceOrder refused on a retry is checked the same way (the order now holds the
  replacement: an earlier attempt landed); confirmOrder is idempotent at the venue
  (confirming an Issued order returns it unchanged), and deleting a Cancelled one too;
- 429, 503, 504, transport errors, a 400 that :attr:`~venue.errors.VenueRejected.may_be_transient`
  and anything that is not the order's fault (401, 403, 5xx) → back to ``pending``,
  ``dead`` after ``max_attempts``. One exception: deleteOrder of an order in flight
  (:attr:`~venue.errors.VenueRejected.order_in_flight`) is ``failed`` — a cancel is a
  person's decision, and carrying it out minutes later, after the order was issued, is
  not what they were told; they run it again once it settled;
- a 404 naming the order (:func:`~venue.errors.order_gone`) → ``failed`` ("the venue no
  longer knows the order") and the order marked removed; for deleteOrder it is the goal
  reached: ``sent``, the order marked removed. Any other 404 (an unmatched route, the
  gateway's) is retried like a 5xx;
- any other rejection → ``failed`` with the venue's message (createOrder: unless a
  look-up by reference finds the venue kept an order after all, as the older API does
  with a failed issuance in Error). A sale's ledger line stays: finance must see the
  sale that was never issued.

A create claimed again (its earlier attempt failed, or its sender died or lost our
database with the lease held) is looked up before it is sent again, since the earlier
call may have reached the venue: the mirror first, then listOrdersByPartner by
``sellToOrderReference``. An order found settles the row ``sent`` with it — one in Error
too, marked so and never sent again (:data:`FOUND_IN_ERROR`), because the venue would
delete it and issue the new one with no person deciding (``otacm orders replace`` is
that person's way); only a look-up the venue answered with nothing lets the create go.
Whenever a create or replace answer names the sale's order, its other live orders are
retired (:func:`orders.mirror.retire_other_orders`).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from pydantic import ValidationError

from orders.attempt import FOUND_IN_ERROR, NO_LONGER_KNOWN, Send, SendResult
from orders.mirror import sale_orders
from orders.submission import (
    Submission,
    SubmissionError,
    dotted_path,
    parse_submission,
    payment_reference_problem,
)
from storage.models import OutboxOperation, VenueOrder
from venue.errors import VenueError, VenueRejected, describe_venue_error, order_gone
from venue.models import ConfirmRequest, Order, OrderRequest, OrderStatus, OrderSummary
from venue.values import canonical_guid, normalize_reference

logger = logging.getLogger(__name__)


def _send_create(send: Send) -> SendResult:
    try:
        request = OrderRequest.model_validate(send.claim.request or {})
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        return send.refuse(
            f"the stored request is invalid: {dotted_path(error['loc'])}: {error['msg']}"
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


def _look_up_sale(send: Send, request: OrderRequest) -> SendResult | None:
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


def _send_confirm(send: Send) -> SendResult:
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


def _send_replace(send: Send) -> SendResult:
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


def _send_delete(send: Send) -> SendResult:
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


def _mirrored_status(send: Send) -> OrderStatus | None:
    """The mirror's status of the claimed order; ``None`` when not mirrored (or removed)."""
    with send.sessions.begin() as session:
        return session.scalar(
            sa.select(VenueOrder.status).where(
                VenueOrder.connection_id == send.claim.connection_id,
                VenueOrder.order_id == canonical_guid(send.claim.order_id or ""),
                VenueOrder.removed_at.is_(None),
            )
        )


SENDERS: dict[OutboxOperation, Callable[[Send], SendResult]] = {
    OutboxOperation.CREATE: _send_create,
    OutboxOperation.CONFIRM: _send_confirm,
    OutboxOperation.REPLACE: _send_replace,
    OutboxOperation.DELETE: _send_delete,
}


def _action_failed(send: Send, exc: VenueError) -> SendResult:
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


def _resolve_replace(send: Send, replacement: Submission, rejection: VenueRejected) -> SendResult:
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


def _resolve(send: Send, request: OrderRequest, rejection: VenueRejected) -> SendResult:
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
