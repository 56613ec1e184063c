"""Events to the shop, recorded in the transaction of the change that causes them.

The shop is told when an order's fate changes: its status becomes Issued, Draft, Error or
Cancelled (``order.issued``, ``order.draft``, ``order.error``, ``order.cancelled``), the
venue no longer has it (``order.removed``), or the venue refused a sale outright
(``order.submission_failed``). :mod:`orders.mirror` and the outbox's refusal call the
functions here with the session of their change, so an event exists exactly when its
change committed: a rolled-back change records nothing, and a committed one cannot lose
its event (an outbox, as the venue calls are).

Each event (:class:`~storage.records.ShopEvent`) carries:

- ``event_id``, ``msg_`` and 32 hex digits: the Standard Webhooks ``webhook-id``, the
  same on every attempt, by which the shop drops a repeat;
- ``order_seq``, the order's events numbered 1, 2, … (unique per order; the order's row
  is locked by the mirror's write, so two writers of one order take turns);
- the payload: the order as the read API returns it (:func:`orders.shop_view.shop_order`,
  by alias), as it stood at the change.

With it, one :class:`~storage.records.ShopDelivery` per shop endpoint configured for the
order's connection, pending now; :mod:`orders.shop_delivery` sends them after commit.
Which endpoints serve which connection is configuration, which this package does not
read: the process that builds a session factory names them on it once
(:func:`deliver_to`), and every session of that factory records deliveries for them.
"""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from orders.shop_view import shop_order
from storage.models import VenueConnection, VenueOrder
from storage.records import DeliveryState, ShopDelivery, ShopEvent, ShopEventType
from storage.types import utcnow
from venue.models import OrderStatus

STATUS_EVENTS = {
    OrderStatus.ISSUED: ShopEventType.ISSUED,
    OrderStatus.DRAFT: ShopEventType.DRAFT,
    OrderStatus.ERROR: ShopEventType.ERROR,
    OrderStatus.CANCELLED: ShopEventType.CANCELLED,
}
"""The statuses the shop is told an order entered, and the event that tells it."""

_ENDPOINTS = "otacm.shop_endpoints"
"""The key in ``Session.info`` of the shop endpoints' names per connection name."""


def deliver_to(sessions: sessionmaker[Session], endpoints: Mapping[str, Sequence[str]]) -> None:
    """Record deliveries, with every event of ``sessions``' sessions, to these endpoints.

    Args:
        sessions: a session factory (:func:`storage.engine.make_sessions`).
        endpoints: per venue connection's name, the names of the shop endpoints that
            receive its events; a connection not named has none.
    """
    chosen = {name: tuple(names) for name, names in endpoints.items() if names}
    info = dict(sessions.kw.get("info") or {})
    info[_ENDPOINTS] = chosen
    sessions.configure(info=info)


def new_event_id() -> str:
    """A new Standard Webhooks message id: ``msg_`` and 32 random hex digits."""
    return f"msg_{uuid.uuid4().hex}"


def status_event(before: OrderStatus | None, after: OrderStatus) -> ShopEventType | None:
    """The event for an order whose status went from ``before`` to ``after``, if any.

    Args:
        before: the status the mirror held; ``None`` for an order new to the mirror, or
            one marked removed that came back.
        after: the status it holds now.
    """
    if before is after:
        return None
    return STATUS_EVENTS.get(after)


def record_order_event(
    session: Session, order: VenueOrder, event_type: ShopEventType, *, now: dt.datetime
) -> ShopEvent:
    """Record ``event_type`` for ``order``, with its deliveries, in the caller's transaction.

    The caller holds the order's row lock (the mirror's writes take it), so the next
    ``order_seq`` read here is the order's alone.

    Args:
        session: the session of the change; flushed, not committed.
        order: the mirrored order, as just written (flushed).
        event_type: what the shop is told.
        now: when the change was made (aware).

    Returns:
        The event.
    """
    last = session.scalar(
        sa.select(sa.func.max(ShopEvent.order_seq)).where(ShopEvent.venue_order_id == order.id)
    )
    connection = _connection_name(session, order.connection_id)
    # This change is the order's latest: the commit stamps ``changed_at`` only after the
    # payload is built, so the payload says it, not the change before.
    view = shop_order(order, connection).model_copy(update={"changed_at": now})
    payload = view.model_dump(mode="json", by_alias=True)
    return _record(
        session,
        connection_id=order.connection_id,
        connection=connection,
        venue_order_id=order.id,
        order_seq=(last or 0) + 1,
        event_type=event_type,
        payload=payload,
        now=now,
    )


def record_submission_failed(
    session: Session,
    connection_id: int,
    *,
    reference: str | None,
    partner_id: str | None,
    code: str | None,
    message: str,
    now: dt.datetime | None = None,
) -> ShopEvent:
    """Record ``order.submission_failed``: the venue refused a sale's createOrder for good.

    There is no order, so the event is the first and only of its own (``order_seq`` 1).

    Args:
        session: the session that marks the outbox row failed; not committed.
        connection_id: the venue connection the sale was sent to.
        reference: the shop's reference of the sale (``sellToOrderReference``).
        partner_id: the sale's partner.
        code: the venue's error code, when it gave one.
        message: the venue's message.
        now: when (aware); the current time when omitted.
    """
    payload: dict[str, Any] = {
        "sellToOrderReference": reference,
        "partnerId": partner_id,
        "code": code,
        "message": message,
    }
    connection = _connection_name(session, connection_id)
    payload["connection"] = connection
    return _record(
        session,
        connection_id=connection_id,
        connection=connection,
        venue_order_id=None,
        order_seq=1,
        event_type=ShopEventType.SUBMISSION_FAILED,
        payload=payload,
        now=now or utcnow(),
    )


def _record(
    session: Session,
    *,
    connection_id: int,
    connection: str,
    venue_order_id: int | None,
    order_seq: int,
    event_type: ShopEventType,
    payload: dict[str, Any],
    now: dt.datetime,
) -> ShopEvent:
    event = ShopEvent(
        event_id=new_event_id(),
        connection_id=connection_id,
        venue_order_id=venue_order_id,
        order_seq=order_seq,
        type=event_type,
        payload=payload,
        created_at=now,
    )
    endpoints: Mapping[str, Sequence[str]] = session.info.get(_ENDPOINTS, {})
    event.deliveries = [
        ShopDelivery(
            connection_id=connection_id,
            endpoint=endpoint,
            venue_order_id=venue_order_id,
            order_seq=order_seq,
            state=DeliveryState.PENDING,
            attempts=0,
            next_attempt_at=now,
            retry_from=now,
        )
        for endpoint in endpoints.get(connection, ())
    ]
    session.add(event)
    session.flush()
    return event


def _connection_name(session: Session, connection_id: int) -> str:
    return session.execute(
        sa.select(VenueConnection.name).where(VenueConnection.id == connection_id)
    ).scalar_one()


def erase_event_names(session: Session, venue_order_ids: Sequence[int]) -> int:
    """Blank the ticket holders' names in the stored events of these orders.

    An event keeps the order as it stood, names included, until it is pruned; when the
    mirror erases an order's customers (:func:`orders.mirror.erase_customers`), its
    events' copies go too. An event not yet delivered is then sent without them.

    Returns:
        How many events changed.
    """
    changed = 0
    ids = sorted(venue_order_ids)
    for start in range(0, len(ids), 500):
        query = sa.select(ShopEvent).where(ShopEvent.venue_order_id.in_(ids[start : start + 500]))
        for event in session.scalars(query):
            payload = copy.deepcopy(event.payload)
            named = False
            for item in payload.get("items") or ():
                for wallet in item.get("wallets") or ():
                    if wallet.get("name") is not None:
                        wallet["name"] = None
                        named = True
            if named:
                event.payload = payload
                changed += 1
    session.flush()
    return changed
