"""Retention of the shop's events: deliveries made long ago, and the events they leave.

Part of the pruning (:mod:`heartbeat.retention`), after ``OTACM_RETAIN_SHOP_EVENTS_DAYS``:

- a **delivery** (``shop_delivery``) goes once it was ``delivered`` that long ago; pending,
  leased and dead ones stay whatever their age (a sender or a person still acts on them);
- an **event** (``shop_event``) goes once it was recorded that long ago and no delivery
  of it is left (or every one left goes with it), but for its order's newest event:
  the next event of an order is numbered from the highest ``order_seq`` it has
  (:func:`orders.shop_events.record_order_event`), so that one stays, whatever its age,
  until a newer one exists. A sale the venue refused (no order) has only its own event.

Whether an order's events can go is decided for the whole order at once (:func:`_sweep`:
its events are a handful, read through the ``(venue_order_id, order_seq)`` key), when
one of its deliveries goes, or when the walk of the events reaches one of them. The
deliveries are read oldest first through ``(state, delivered_at)``; the events are
walked once, by ``created_at``, from a mark (:class:`~storage.records.PruneMark`), as
the status changes are. Between them every event is looked at when it may go: an event
kept at its walk for a delivery not yet gone is looked at again when that delivery goes;
an order's newest event, when a newer one's delivery goes or the walk reaches it.

**Personal data**: an event's payload is the order as the shop reads it, ticket holders'
names included (customers' e-mails are never in it). Pruning deletes those copies after
the retention; an order's newest event, kept past it with no delivery left, keeps only
its number and type (its payload is emptied: nothing sends or shows it again). An event
still to be sent, or dead, keeps its payload for the sender and a replay; the erasure of
personal data (:func:`orders.shop_events.erase_event_names`) blanks the names in those
at ``OTACM_PERSONAL_DATA_DAYS``, as before.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.orm import Session

from storage.records import DeliveryState, PruneMark, ShopDelivery, ShopEvent

DELIVERY_TABLE = "shop_delivery"
EVENT_TABLE = "shop_event"

_MARK = EVENT_TABLE
_CHUNK = 500
"""Keys per ``IN`` list: far below every driver's limit on parameters."""

Mark = tuple[dt.datetime, int]
"""A place in the walk of the events: the ``created_at`` and id of the last one walked."""


@dataclass
class Going:
    """What one step deletes (or, in a dry run, would)."""

    deliveries: set[int] = field(default_factory=set)
    events: set[int] = field(default_factory=set)
    emptied: set[int] = field(default_factory=set)
    """Kept events (an order's newest) whose payload is emptied: only their number is
    needed (module docstring)."""

    def add(self, other: Going) -> None:
        """Take ``other``'s rows too."""
        self.deliveries |= other.deliveries
        self.events |= other.events
        self.emptied |= other.emptied


def prune_delivered(session: Session, before: dt.datetime, size: int) -> tuple[Going, bool]:
    """Delete the next ``size`` deliveries delivered before ``before``, oldest first, and
    the events of their orders that may go now (:func:`_sweep`).

    Returns:
        What went, and whether a full batch was read (more may be due).
    """
    rows = session.execute(_delivered(before).limit(size)).all()
    if not rows:
        return Going(), False
    going = Going(deliveries={row.id for row in rows})
    going.add(_sweep(session, {row.shop_event_id for row in rows}, before))
    _delete(session, going)
    return going, len(rows) == size


def prune_events(session: Session, before: dt.datetime, size: int) -> tuple[Going, bool]:
    """Walk the next ``size`` events recorded before ``before`` from the stored mark,
    delete those of their orders that may go (:func:`_sweep`), and move the mark on.

    Returns:
        What went, and whether any event was walked (``False``: the walk is over).
    """
    walked, reached = _walk(session, before, size, _mark(session))
    if reached is None:
        return Going(), False
    going = _sweep(session, walked, before)
    _delete(session, going)
    stored = session.get(PruneMark, _MARK)
    if stored is None:
        session.add(PruneMark(name=_MARK, reached_at=reached[0], reached_id=reached[1]))
    else:
        stored.reached_at, stored.reached_id = reached
    return going, True


def count_due(session: Session, before: dt.datetime, size: int) -> tuple[int, int]:
    """How many deliveries and events a run would delete now (reads only).

    Every delivery delivered before ``before`` goes; the events are those of the orders
    a run looks at (the orders of those deliveries, and of the events the walk has still
    to reach) that may go.
    """
    deliveries = session.scalar(
        sa.select(sa.func.count()).select_from(_delivered(before).subquery())
    )
    looked_at: set[int] = set()
    place: Mark | None = None
    while True:
        query = _delivered(before)
        if place is not None:
            query = query.where(_past(ShopDelivery.delivered_at, ShopDelivery.id, place))
        rows = session.execute(query.limit(size)).all()
        if not rows:
            break
        looked_at.update(row.shop_event_id for row in rows)
        place = (rows[-1].delivered_at, rows[-1].id)
    mark = _mark(session)
    while True:
        walked, mark = _walk(session, before, size, mark)
        if mark is None:
            break
        looked_at.update(walked)
    events = _sweep(session, looked_at, before).events
    return int(deliveries or 0), len(events)


# --- reading -----------------------------------------------------------------------------


def _delivered(before: dt.datetime) -> sa.Select[int, int, dt.datetime | None]:
    """The deliveries delivered before ``before``, oldest first: a range of the
    ``(state, delivered_at)`` index."""
    d = ShopDelivery
    return (
        sa.select(d.id, d.shop_event_id, d.delivered_at)
        .where(d.state == DeliveryState.DELIVERED, d.delivered_at < before)
        .order_by(d.delivered_at, d.id)
    )


def _mark(session: Session) -> Mark | None:
    row = session.get(PruneMark, _MARK)
    return None if row is None else (row.reached_at, row.reached_id)


def _walk(
    session: Session, before: dt.datetime, size: int, mark: Mark | None
) -> tuple[list[int], Mark | None]:
    """The next ``size`` events recorded before ``before`` past ``mark``, in time order (a
    range of the ``created_at`` index), and the mark reached (``None``: none was left)."""
    query = sa.select(ShopEvent.id, ShopEvent.created_at).where(ShopEvent.created_at < before)
    if mark is not None:
        query = query.where(_past(ShopEvent.created_at, ShopEvent.id, mark))
    rows = session.execute(query.order_by(ShopEvent.created_at, ShopEvent.id).limit(size)).all()
    if not rows:
        return [], None
    return [row.id for row in rows], (rows[-1].created_at, rows[-1].id)


def _past(
    moment: sa.orm.InstrumentedAttribute[dt.datetime | None]
    | sa.orm.InstrumentedAttribute[dt.datetime],
    key: sa.orm.InstrumentedAttribute[int],
    mark: Mark,
) -> sa.ColumnElement[bool]:
    """Rows after ``mark`` in (time, id) order. Not a row-value comparison: the time is
    bound with its column's type, as it is stored."""
    return sa.or_(moment > mark[0], sa.and_(moment == mark[0], key > mark[1]))


def _chunks(values: Iterable[int]) -> Iterable[list[int]]:
    ordered = sorted(set(values))
    for start in range(0, len(ordered), _CHUNK):
        yield ordered[start : start + _CHUNK]


def _sweep(session: Session, event_ids: Iterable[int], before: dt.datetime) -> Going:
    """The events that may go among those of the orders of ``event_ids`` (and those of
    them that have no order), with their deliveries.

    An event may go when it was recorded before ``before``, is not its order's newest
    (highest ``order_seq``), and every delivery of it left was delivered before
    ``before`` (those go with it). Reads only.
    """
    orders: set[int] = set()
    orderless: set[int] = set()
    for chunk in _chunks(event_ids):
        for event_id, order_id in session.execute(
            sa.select(ShopEvent.id, ShopEvent.venue_order_id).where(ShopEvent.id.in_(chunk))
        ):
            if order_id is None:
                orderless.add(event_id)
            else:
                orders.add(order_id)
    candidates: list[int] = []
    kept_newest: list[int] = []
    for chunk in _chunks(orders):
        # Every event of each order: the newest is known only from all of them.
        rows = session.execute(
            sa.select(
                ShopEvent.id, ShopEvent.venue_order_id, ShopEvent.order_seq, ShopEvent.created_at
            ).where(ShopEvent.venue_order_id.in_(chunk))
        ).all()
        newest: dict[int, int] = {}
        for row in rows:
            newest[row.venue_order_id] = max(newest.get(row.venue_order_id, 0), row.order_seq)
        for row in rows:
            if row.created_at < before:
                old = row.order_seq < newest[row.venue_order_id]
                (candidates if old else kept_newest).append(row.id)
    for chunk in _chunks(orderless):
        candidates.extend(
            session.scalars(
                sa.select(ShopEvent.id).where(
                    ShopEvent.id.in_(chunk), ShopEvent.created_at < before
                )
            )
        )
    going = _with_deliveries_done(session, candidates, before)
    # An order's newest event past retention with no delivery left is kept for its
    # number alone: nothing sends or shows it again, so its copy of the order (holders'
    # names included) goes.
    numbers_only = _with_deliveries_done(session, kept_newest, before)
    going.deliveries |= numbers_only.deliveries
    going.emptied = numbers_only.events
    return going


def _with_deliveries_done(
    session: Session, candidates: Sequence[int], before: dt.datetime
) -> Going:
    """Of ``candidates``, the events whose every delivery was delivered before
    ``before``, with those deliveries (read through the ``(shop_event_id, endpoint)`` key)."""
    going = Going()
    for chunk in _chunks(candidates):
        held: set[int] = set()
        done: dict[int, list[int]] = {}
        for delivery_id, event_id, state, delivered_at in session.execute(
            sa.select(
                ShopDelivery.id,
                ShopDelivery.shop_event_id,
                ShopDelivery.state,
                ShopDelivery.delivered_at,
            ).where(ShopDelivery.shop_event_id.in_(chunk))
        ):
            if (
                state is DeliveryState.DELIVERED
                and delivered_at is not None
                and delivered_at < before
            ):
                done.setdefault(event_id, []).append(delivery_id)
            else:
                held.add(event_id)  # in flight or dead: a sender or a person needs it
        for event_id in chunk:
            if event_id not in held:
                going.events.add(event_id)
                going.deliveries.update(done.get(event_id, ()))
    return going


def _delete(session: Session, going: Going) -> None:
    """Delete the deliveries, then the events (whose deliveries are gone by then); empty
    the payloads of the events kept for their number."""
    for chunk in _chunks(going.emptied):
        session.execute(
            sa.update(ShopEvent)
            .where(ShopEvent.id.in_(chunk))
            .values(payload={})
            .execution_options(synchronize_session=False)
        )
    for model, ids in ((ShopDelivery, going.deliveries), (ShopEvent, going.events)):
        for chunk in _chunks(ids):
            session.execute(
                sa.delete(model)
                .where(model.id.in_(chunk))
                .execution_options(synchronize_session=False)
            )
