"""The mirror: otacm's copy of the venue's orders, and its only writer.

``venue_order`` with its items, wallets and assets, and ``status_change``, every status
an order was seen in (:mod:`storage.models`), are written here and nowhere else:

- :func:`upsert_order` stores a whole order the venue answered (getOrder, or an outbox
  call's answer) with the :class:`~storage.models.ChangeSource` that brought it;
  :func:`mark_removed` records an order the venue no longer has;
  :func:`note_foreign_order` and its neighbours keep the ids of other partners' orders,
  of which nothing else is stored; an order entering Issued, Draft, Error or Cancelled,
  or removed, records its event for the shop in the same transaction
  (:mod:`orders.shop_events`);
- from the change feed: :func:`add_headers` (header-only rows for orders first seen in
  flight), :func:`update_header` (an in-flight step), :func:`record_row_version`;
- :func:`retire_other_orders`: a sale's other live orders, once an answer named its
  order; :func:`erase_customers`: names and e-mails blanked by the privacy job.

:func:`stuck_condition` is the one definition of a *stuck* order, shared by the
watchdog and the metrics. Every function takes a session and never commits: the caller
owns the transaction. Venue values arrive normalized (:mod:`venue.models`: GUIDs
lower-case, blank texts ``None``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Collection, Iterable, Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orders.inbox import Lookup, queue_lookups
from orders.shop_events import erase_event_names, record_order_event, status_event
from storage.models import (
    Asset,
    ChangeSource,
    ForeignOrder,
    OrderItem,
    OutboxOperation,
    StatusChange,
    VenueOrder,
    Wallet,
)
from storage.records import FeedCursor, FeedMark, ShopEventType
from venue import models as wire
from venue.models import IN_FLIGHT_STATUSES, OrderStatus, OrderSummary
from venue.values import canonical_guid

logger = logging.getLogger(__name__)


def upsert_order(
    session: Session,
    connection_id: int,
    order: wire.Order,
    *,
    source: ChangeSource,
    observed_at: dt.datetime,
    inbox_id: int | None = None,
    creation: bool = False,
) -> VenueOrder:
    """Store a full order as the venue returned it: header, items, wallets, assets.

    The venue's answer is the truth: the header is overwritten and the items (with their
    wallets and assets) are replaced wholesale when they differ from those stored —
    except by the answer of the createOrder that made the order (``creation``), once the
    mirror holds the order. Every other sight of an order (a webhook's getOrder, the
    change feed) comes after its creation, so what the mirror holds is at least as
    recent; and answers reach the database in no fixed order: a create's ``Submitted``
    applied while its sender waited for the write lock would otherwise overwrite the
    ``Issued`` a webhook's getOrder stored meanwhile, sending the order back in flight
    (and settling it twice for the shop). A
    :class:`StatusChange` is appended when the order is new, was marked removed, or its
    status or status message changed. The order row is locked (``FOR UPDATE`` on
    PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already serializes writers), so concurrent
    upserts of one order apply one after the other.

    Args:
        session: the caller's session; flushed, not committed.
        connection_id: the venue connection the order belongs to.
        order: the order from getOrder, createOrder, confirmOrder, replaceOrder...
        source: where the order came from, recorded on the status change.
        observed_at: when the venue gave this answer (aware).
        inbox_id: the inbox row being processed, if any.
        creation: ``order`` is the answer of the createOrder that made it.

    Returns:
        The stored order (as it was, for a creation's answer of an order already held).
    """
    order_id = order.order_id
    row = _locked_order(session, connection_id, order_id)
    if row is not None and creation:
        logger.info("order %s: mirrored before its createOrder answer; kept as it is", order_id)
        return row
    is_new = row is None
    if row is None:
        row = VenueOrder(
            connection_id=connection_id,
            order_id=order_id,
            first_seen_at=observed_at,
            status_changed_at=observed_at,
        )
        _apply_header(row, order)
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            # Another process stored this order first: update its row instead.
            row = _locked_order(session, connection_id, order_id)
            if row is None:
                raise
            is_new = False

    status_message = order.status_message
    status_before = None if is_new or row.removed_at is not None else row.status
    changed = (
        is_new
        or row.removed_at is not None
        or (row.status, row.status_message) != (order.status, status_message)
    )
    _apply_header(row, order)
    row.removed_at = None
    row.fetched_at = observed_at

    digest = _items_digest(order.items)
    if digest != row.items_digest:
        if row.items:
            row.items.clear()
            # Delete the old lines before inserting new ones with the same line numbers.
            session.flush()
        row.items.extend(_item(item) for item in order.items)
        row.items_digest = digest

    if changed:
        row.status_changed_at = observed_at
        session.add(
            StatusChange(
                order=row,
                status=order.status,
                status_message=status_message,
                observed_at=observed_at,
                source=source,
                inbox_id=inbox_id,
            )
        )
    session.flush()
    event = status_event(status_before, order.status)
    if event is not None:
        record_order_event(session, row, event, now=observed_at)
    return row


def mark_removed(
    session: Session,
    connection_id: int,
    order_id: str,
    observed_at: dt.datetime,
    source: ChangeSource,
    *,
    inbox_id: int | None = None,
) -> VenueOrder | None:
    """Record that the venue no longer knows an order (getOrder answered 404).

    The row, its items and its history stay; ``removed_at`` is set and a status change
    with no status is appended, once.

    Args:
        session: the caller's session; flushed, not committed.
        connection_id: the venue connection the order belongs to.
        order_id: the venue's orderId.
        observed_at: when the venue answered (aware).
        source: what found the order gone.
        inbox_id: the inbox row being processed, if any.

    Returns:
        The order, or ``None`` when it was never stored.
    """
    row = _locked_order(session, connection_id, canonical_guid(order_id))
    if row is None or row.removed_at is not None:
        return row
    row.removed_at = observed_at
    row.status_changed_at = observed_at
    session.add(
        StatusChange(
            order=row,
            status=None,
            status_message=None,
            observed_at=observed_at,
            source=source,
            inbox_id=inbox_id,
        )
    )
    session.flush()
    record_order_event(session, row, ShopEventType.REMOVED, now=observed_at)
    return row


def note_foreign_order(
    session: Session, connection_id: int, order_id: str, partner_id: str, now: dt.datetime
) -> None:
    """Remember that ``order_id`` is another partner's (:class:`ForeignOrder`), once.

    Args:
        session: the caller's session; flushed, not committed.
        connection_id: the venue connection the order reached.
        order_id: the venue's orderId.
        partner_id: the order's partner, not configured for the connection.
        now: when it was found (aware).
    """
    order_id = canonical_guid(order_id)
    known = sa.select(ForeignOrder.id).where(
        ForeignOrder.connection_id == connection_id, ForeignOrder.order_id == order_id
    )
    if session.scalar(known) is not None:
        return
    try:
        with session.begin_nested():
            session.add(
                ForeignOrder(
                    connection_id=connection_id,
                    order_id=order_id,
                    partner_id=canonical_guid(partner_id),
                    noted_at=now,
                )
            )
    except IntegrityError:
        pass  # another process noted it first


def foreign_order_ids(
    session: Session, connection_id: int, order_ids: Iterable[str], partner_ids: Collection[str]
) -> set[str]:
    """Of ``order_ids``, those known to belong to a partner not in ``partner_ids``.

    Args:
        session: the caller's session (read only).
        connection_id: the venue connection.
        order_ids: orderIds (any spelling); answered normalized.
        partner_ids: the partners configured for the connection now; a noted order of
            one of them is no longer foreign.
    """
    wanted = sorted({canonical_guid(order_id) for order_id in order_ids})
    if not wanted:
        return set()
    query = sa.select(ForeignOrder.order_id).where(
        ForeignOrder.connection_id == connection_id, ForeignOrder.order_id.in_(wanted)
    )
    if partner_ids:
        query = query.where(ForeignOrder.partner_id.not_in(sorted(partner_ids)))
    return set(session.scalars(query))


def forget_foreign_orders(
    session: Session, connection_id: int, partner_ids: Collection[str], now: dt.datetime
) -> int:
    """Erase the mirrored orders of partners not configured for the connection.

    Orders mirrored before otacm refused other partners' orders, or of a partner since
    removed from the settings, must reach neither reconciliation nor finance, and their
    customers' names and e-mails must not stay. Each such order is deleted from the mirror
    (its items, wallets, assets and status changes with it) and its id alone noted
    (:class:`ForeignOrder`), so a later notification of it costs no venue call. The
    change-feed cursors of partners not configured go too: a partner configured again
    (a mistyped id corrected) has its whole feed read anew, which rebuilds its orders.

    Args:
        session: the caller's session; flushed, not committed.
        connection_id: the venue connection.
        partner_ids: the partners configured for it (normalized, as the settings hold them).
        now: when (aware).

    Returns:
        How many orders were erased (none when no partner is configured).
    """
    if not partner_ids:
        # No partner configured is a setting missing, not a decision to erase the whole
        # mirror; nothing new is mirrored for the connection meanwhile.
        return 0
    foreign = foreign_partners(session, connection_id, partner_ids)
    query = sa.select(VenueOrder.id, VenueOrder.order_id, VenueOrder.partner_id).where(
        VenueOrder.connection_id == connection_id, VenueOrder.partner_id.in_(foreign)
    )
    found = session.execute(query).all() if foreign else []
    for row in found:
        note_foreign_order(session, connection_id, row.order_id, row.partner_id, now)
    for chunk in _chunks([row.id for row in found], 500):
        # Items, wallets, assets and status changes go with the order (ON DELETE CASCADE,
        # enforced on SQLite too: storage.engine turns foreign keys on).
        session.execute(sa.delete(VenueOrder).where(VenueOrder.id.in_(chunk)))
    for feed_table in (FeedCursor, FeedMark):
        session.execute(
            sa.delete(feed_table).where(
                feed_table.connection_id == connection_id,
                feed_table.partner_id.not_in(sorted(partner_ids)),
            )
        )
    session.flush()
    return len(found)


def foreign_partners(
    session: Session, connection_id: int, partner_ids: Collection[str]
) -> list[str]:
    """The partners not in ``partner_ids`` that the connection's mirror holds orders of.

    One index seek per partner the mirror holds (they are few): a ``NOT IN`` over a year
    of orders read every one of them, a second at a million, at every role's start.
    """
    return [p for p in _mirrored_partners(session, connection_id) if p not in partner_ids]


def _mirrored_partners(session: Session, connection_id: int) -> Iterator[str]:
    """The partners the connection's mirror holds orders of, in order."""
    after = ""
    while True:
        partner = session.scalar(
            sa.select(sa.func.min(VenueOrder.partner_id)).where(
                VenueOrder.connection_id == connection_id, VenueOrder.partner_id > after
            )
        )
        if partner is None:
            return
        yield partner
        after = partner


def _chunks(values: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


def _locked_order(session: Session, connection_id: int, order_id: str) -> VenueOrder | None:
    query = (
        sa.select(VenueOrder)
        .where(VenueOrder.connection_id == connection_id, VenueOrder.order_id == order_id)
        .with_for_update()
    )
    return session.scalars(query).one_or_none()


def _apply_header(row: VenueOrder, order: wire.Order) -> None:
    row.partner_id = order.partner_id
    row.sell_to_order_reference = order.sell_to_order_reference
    # Older (synchronous) API versions omit buyFromOrderReference: keep the one we know.
    if order.buy_from_order_reference is not None:
        row.buy_from_order_reference = order.buy_from_order_reference
    row.status = order.status
    row.status_message = order.status_message
    row.received_at = order.received_at
    row.sell_to_email = order.sell_to_email
    row.sell_to_name = order.sell_to_name
    row.sell_to_language = order.sell_to_language
    row.payment_reference = order.payment_reference
    row.job_id = order.job_id
    row.manifest_url = order.manifest_url


def _items_digest(items: Sequence[wire.OrderItem]) -> str:
    text = json.dumps(
        [item.model_dump(mode="json") for item in items],
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _item(item: wire.OrderItem) -> OrderItem:
    return OrderItem(
        line_no=item.line_no,
        item_number=item.item_number,
        description=item.description,
        is_package=item.is_package,
        quantity=item.quantity,
        visit_date=item.visit_date,
        visit_time=item.visit_time,
        sell_to_name=item.sell_to_name,
        sell_to_email=item.sell_to_email,
        sell_to_language=item.sell_to_language,
        wallets=[
            _wallet(wallet, seq_no)
            for wallet, seq_no in zip(item.wallets, _seq_nos(item.wallets), strict=True)
        ],
    )


def _seq_nos(wallets: Sequence[wire.Wallet]) -> Iterable[int]:
    given = [wallet.seq_no for wallet in wallets]
    if None in given or len(set(given)) != len(given):
        # Missing or repeated numbers: number the wallets in the venue's order instead.
        return range(1, len(wallets) + 1)
    return [seq_no for seq_no in given if seq_no is not None]


def _wallet(wallet: wire.Wallet, seq_no: int) -> Wallet:
    return Wallet(
        seq_no=seq_no,
        wallet_id=wallet.wallet_id,
        wallet_reference_number=wallet.wallet_reference_number,
        external_reference_number=wallet.external_reference_number,
        name=wallet.name,
        issued_at=wallet.issued_at,
        unit_price_excl_vat=wallet.unit_price_excl_vat,
        unit_price_incl_vat=wallet.unit_price_incl_vat,
        currency_code=wallet.currency_code,
        manifest_url=wallet.manifest_url,
        assets=[
            Asset(
                position=position,
                asset_row_id=asset.id,
                type=asset.type,
                asset_id=asset.asset_id,
                reference_number=asset.reference_number,
                item_number=asset.item_number,
                description=asset.description,
            )
            for position, asset in enumerate(wallet.assets, start=1)
        ],
    )


# --- a sale's orders --------------------------------------------------------------------


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


NAMES_THE_SALES_ORDER = frozenset({OutboxOperation.CREATE, OutboxOperation.REPLACE})
"""Operations whose answer names the order a sale has now at the venue."""


def retire_other_orders(
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


# --- stuck orders -----------------------------------------------------------------------


def stuck_condition(cutoff: dt.datetime) -> sa.ColumnElement[bool]:
    """Whether a :class:`~storage.models.VenueOrder` is stuck: in flight since before ``cutoff``.

    In flight is Submitted, Scheduled or Processing; a removed order is not stuck. The
    time is ``status_changed_at``, when otacm saw the order enter its current status.

    Args:
        cutoff: orders in their status since before this are stuck (``now - stuck_after``).
    """
    return sa.and_(
        VenueOrder.status.in_(sorted(IN_FLIGHT_STATUSES)),
        VenueOrder.removed_at.is_(None),
        VenueOrder.status_changed_at < cutoff,
    )


# --- from the change feed: headers of orders in flight ----------------------------------

_CHUNK = 500
"""Order ids per ``IN (...)`` list: far below SQLite's limit on bound parameters."""


def locked_orders(
    session: Session, connection_id: int, order_ids: Iterable[str]
) -> list[VenueOrder]:
    """The mirror rows of ``order_ids``, locked against a concurrent worker's upsert.

    ``FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already serializes.
    """
    wanted = sorted(order_ids)
    rows: list[VenueOrder] = []
    for start in range(0, len(wanted), _CHUNK):
        rows.extend(
            session.scalars(
                sa.select(VenueOrder)
                .where(
                    VenueOrder.connection_id == connection_id,
                    VenueOrder.order_id.in_(wanted[start : start + _CHUNK]),
                )
                .order_by(VenueOrder.order_id)
                .with_for_update()
            )
        )
    return rows


def record_row_version(row: VenueOrder, version: int) -> None:
    """Note that the mirror holds ``row`` at the venue's ``rowVersion`` ``version``.

    Either its content is that version's (a summary equal to the mirror: *adopted*), or
    a getOrder is queued that will fetch at least that version.
    """
    row.row_version = version


def update_header(
    session: Session, row: VenueOrder, summary: OrderSummary, now: dt.datetime
) -> None:
    """Record an in-flight step on a known order: status, message, history; no items."""
    message = summary.status_message
    row.status = summary.status
    row.status_message = message
    row.status_changed_at = now
    row.removed_at = None
    # The content held belongs to no version now; the settled fetch will be adopted.
    row.row_version = None
    if row.buy_from_order_reference is None:
        row.buy_from_order_reference = summary.buy_from_order_reference
    session.add(_polled_change(row, summary.status, message, now))


def add_headers(
    session: Session, connection_id: int, summaries: Sequence[OrderSummary], now: dt.datetime
) -> int:
    """Header-only mirror rows for unknown in-flight orders, with their first status.

    Returns:
        How many rows were added: an order the worker stored meanwhile (from a fetch, so
        newer than a summary) is left alone.
    """
    try:
        with session.begin_nested():
            session.add_all(_header(connection_id, s, now) for s in summaries)
    except IntegrityError:
        added = 0
        for summary in summaries:
            try:
                with session.begin_nested():
                    session.add(_header(connection_id, summary, now))
            except IntegrityError:
                continue
            added += 1
        return added
    return len(summaries)


def _header(connection_id: int, summary: OrderSummary, now: dt.datetime) -> VenueOrder:
    """A mirror row from a summary: the header only, as the feed first saw the order."""
    message = summary.status_message
    row = VenueOrder(
        connection_id=connection_id,
        order_id=summary.order_id,
        partner_id=summary.partner_id,
        sell_to_order_reference=summary.sell_to_order_reference,
        buy_from_order_reference=summary.buy_from_order_reference,
        status=summary.status,
        status_message=message,
        status_changed_at=now,
        received_at=summary.received_at,
        sell_to_email=summary.sell_to_email,
        sell_to_name=summary.sell_to_name,
        sell_to_language=summary.sell_to_language,
        payment_reference=summary.payment_reference,
        job_id=summary.job_id,
        manifest_url=summary.manifest_url,
        row_version=None,
        first_seen_at=now,
    )
    _polled_change(row, summary.status, message, now)
    return row


def _polled_change(
    row: VenueOrder, status: OrderStatus, message: str | None, now: dt.datetime
) -> StatusChange:
    # Appended to ``row.status_changes`` through the relationship; a new row brings it
    # into the session, a row already there needs ``session.add``.
    return StatusChange(
        order=row, status=status, status_message=message, observed_at=now, source=ChangeSource.POLL
    )


# --- erasing customers ------------------------------------------------------------------


def erase_customers(session: Session, pks: Sequence[int], now: dt.datetime) -> None:
    """Blank the customers' names and e-mails of these mirrored orders, lines and wallets.

    The order is marked erased (``personal_data_erased_at``, kept if it was already), so
    that a later fetch of it stores no name again (:mod:`storage.flush`); the copies in
    its events for the shop are blanked too.
    """
    chosen = sorted(pks)
    session.execute(
        sa.update(VenueOrder)
        .where(VenueOrder.id.in_(chosen))
        .values(
            sell_to_name=None,
            sell_to_email=None,
            personal_data_erased_at=sa.func.coalesce(VenueOrder.personal_data_erased_at, now),
        )
        .execution_options(synchronize_session=False)
    )
    items = sa.select(OrderItem.id).where(OrderItem.venue_order_id.in_(chosen))
    session.execute(
        sa.update(OrderItem)
        .where(OrderItem.venue_order_id.in_(chosen))
        .values(sell_to_name=None, sell_to_email=None)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        sa.update(Wallet)
        .where(Wallet.order_item_id.in_(items.scalar_subquery()))
        .values(name=None)
        .execution_options(synchronize_session=False)
    )
    erase_event_names(session, chosen)
