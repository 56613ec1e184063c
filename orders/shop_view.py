"""What the shop reads of an order: its fate, its tickets and its timeline.

The shop's read API (``GET /api/orders…``) and, later, its events carry an order as
:class:`ShopOrder`: the header (status, status message, the venue's document number
``buyFromOrderReference``), every line with its wallets (reference numbers, external
reference, ticket holder's name, manifest URL, prices) and assets, and the timeline of
status changes. The same pydantic models describe the API in its OpenAPI document, so
the document cannot drift from what is sent. Field names are the venue's (camelCase);
money is a decimal string, exact as stored; times are ISO 8601 UTC.

:func:`changed_orders` is the shop's change feed: orders in the order the commits that
last changed them were numbered (:mod:`storage.changes`), paged by a cursor that names
the position ``(change_seq, id)`` as it is (``"12.345"``). A page read with a cursor
holds every order changed after it that had committed when the page was read; an order
changed again later comes again, after the cursor of the page that showed it. So a
reader that keeps the last cursor loses nothing and sees an order again only when it
changed again.

Customers' e-mail addresses are left out (the shop has them); ticket holders' names are
the shop's own, given with the order, and come back on the wallets until the privacy job
erases them.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from decimal import Decimal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel
from sqlalchemy.orm import Session, selectinload

from storage.models import OrderItem, StatusChange, VenueConnection, VenueOrder, Wallet
from venue.models import OrderStatus
from venue.values import canonical_guid, normalize_reference

PAGE_SIZE = 100
"""Orders per page of the change feed unless the shop asks for fewer."""

PAGE_SIZE_MAX = 500
"""The most orders one page of the change feed holds."""


class _Shop(BaseModel):
    # from_attributes: lines, wallets and assets are read straight from the mirror's rows,
    # whose columns have these fields' names.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, from_attributes=True
    )


class ShopAsset(_Shop):
    """A ticket or coupon minted on a wallet."""

    type: str | None = Field(description="`ticket` or `coupon`, as the venue names it.")
    asset_id: str | None
    reference_number: str | None = Field(description="The number printed on the ticket.")
    item_number: str | None
    description: str | None


class ShopWallet(_Shop):
    """One wallet of an order line: what the customer receives."""

    seq_no: int
    wallet_id: str | None
    wallet_reference_number: str | None
    external_reference_number: str | None = Field(
        description="The shop's own reference for this wallet, as submitted."
    )
    name: str | None = Field(description="The ticket holder's name; empty once erased.")
    issued_at: dt.datetime | None
    unit_price_excl_vat: Decimal | None
    unit_price_incl_vat: Decimal | None
    currency_code: str | None
    manifest_url: str | None = Field(description="Where the customer's tickets are shown.")
    assets: list[ShopAsset]


class ShopItem(_Shop):
    """One line of an order."""

    line_no: int
    item_number: str
    description: str | None
    is_package: bool
    quantity: int
    visit_date: dt.date | None
    # A string, not a JSON Schema "time": that one needs an offset, and the venue's
    # visit time is the venue's local time, without one.
    visit_time: str | None = Field(
        pattern=r"^\d{2}:\d{2}:\d{2}$", description="The venue's local time, HH:MM:SS."
    )

    @field_validator("visit_time", mode="before")
    @classmethod
    def _time_text(cls, value: object) -> object:
        return value.isoformat("seconds") if isinstance(value, dt.time) else value

    wallets: list[ShopWallet]


class ShopStatusChange(_Shop):
    """One step of the order's timeline, as otacm learned it."""

    at: dt.datetime
    status: OrderStatus | None = Field(description="Empty: the venue removed the order.")
    status_message: str | None
    source: str = Field(description="How otacm learned it: webhook, poll, feed, fetch…")


class ShopOrder(_Shop):
    """An order as otacm holds it: its fate, its tickets and its timeline."""

    order_id: str = Field(description="The venue's id of the order (a GUID).")
    connection: str = Field(description="The venue connection the order belongs to.")
    partner_id: str
    sell_to_order_reference: str = Field(description="The shop's order number.")
    buy_from_order_reference: str | None = Field(
        description="The venue's document number for the order."
    )
    status: OrderStatus
    status_message: str | None = Field(description="Why, when the status is Error.")
    status_changed_at: dt.datetime
    removed_at: dt.datetime | None = Field(
        description="When otacm saw the venue no longer knows the order (deleted)."
    )
    received_at: dt.datetime | None
    payment_reference: str | None
    job_id: str | None
    manifest_url: str | None
    items: list[ShopItem]
    timeline: list[ShopStatusChange]
    changed_at: dt.datetime | None = Field(description="When the order last changed for the shop.")


class ShopOrderPage(_Shop):
    """A page of the change feed: orders in the order they last changed."""

    orders: list[ShopOrder]
    cursor: str = Field(
        description="Pass as `cursor` to read what changed after this page; keep it when "
        "the page is empty, and read again later."
    )
    more: bool = Field(description="Whether more orders had changed when this was read.")


CURSOR_PATTERN = r"^[0-9]{1,18}\.[0-9]{1,18}$"
"""What a cursor looks like: a position in the feed, ``change_seq.id``. Any such text is
a position, so a cursor that matches can always be read from."""


class BadCursor(ValueError):
    """A cursor that names no position of the feed."""


def encode_cursor(change_seq: int, row_id: int) -> str:
    """The cursor after the order ``(change_seq, row_id)``."""
    return f"{change_seq}.{row_id}"


def decode_cursor(cursor: str) -> tuple[int, int]:
    """The position a cursor names.

    Raises:
        BadCursor: it does not match :data:`CURSOR_PATTERN`.
    """
    if re.fullmatch(CURSOR_PATTERN, cursor) is None:
        raise BadCursor("cursor: not a cursor this API handed out")
    seq, row_id = cursor.split(".")
    return int(seq), int(row_id)


START = encode_cursor(0, 0)
"""The cursor before every order."""


def _with_content(query: sa.Select[VenueOrder]) -> sa.Select[VenueOrder]:
    return query.options(
        selectinload(VenueOrder.items).selectinload(OrderItem.wallets).selectinload(Wallet.assets),
        selectinload(VenueOrder.status_changes),
    )


def orders_by_reference(
    session: Session, reference: str, *, connection_id: int | None = None
) -> list[VenueOrder]:
    """The orders with this shop reference, newest first (an Error order replaced by a
    new submission leaves the old one, removed, behind it)."""
    query = sa.select(VenueOrder).where(VenueOrder.reference_key == normalize_reference(reference))
    if connection_id is not None:
        query = query.where(VenueOrder.connection_id == connection_id)
    query = query.order_by(VenueOrder.first_seen_at.desc(), VenueOrder.id.desc())
    return list(session.scalars(_with_content(query)))


def order_by_id(session: Session, order_id: str) -> VenueOrder | None:
    """The order with this venue orderId (any case, with or without braces)."""
    query = sa.select(VenueOrder).where(VenueOrder.order_id == canonical_guid(order_id))
    return session.scalars(_with_content(query)).first()


def changed_orders(
    session: Session,
    after: tuple[int, int],
    *,
    limit: int = PAGE_SIZE,
    statuses: Sequence[OrderStatus] = (),
    changed_since: dt.datetime | None = None,
    connection_id: int | None = None,
) -> tuple[list[VenueOrder], tuple[int, int], bool]:
    """One page of the change feed after the position ``after``.

    Returns:
        The orders, the position after the last one (``after`` when there is none) and
        whether more were there to read.
    """
    seq, row_id = after
    query = sa.select(VenueOrder).where(
        sa.tuple_(VenueOrder.change_seq, VenueOrder.id) > sa.tuple_(sa.literal(seq), row_id)
    )
    if statuses:
        query = query.where(VenueOrder.status.in_(list(statuses)))
    if changed_since is not None:
        query = query.where(VenueOrder.changed_at >= changed_since)
    if connection_id is not None:
        query = query.where(VenueOrder.connection_id == connection_id)
    query = query.order_by(VenueOrder.change_seq, VenueOrder.id).limit(limit + 1)
    rows = list(session.scalars(_with_content(query)))
    more = len(rows) > limit
    rows = rows[:limit]
    end = (rows[-1].change_seq, rows[-1].id) if rows else after
    return rows, end, more


def connection_names(session: Session) -> dict[int, str]:
    """Every connection's name by id."""
    rows = session.execute(sa.select(VenueConnection.id, VenueConnection.name))
    return {connection_id: name for connection_id, name in rows}


def shop_order(order: VenueOrder, connection: str) -> ShopOrder:
    """``order`` (loaded with its items, wallets, assets and status changes) for the shop."""
    return ShopOrder(
        order_id=order.order_id,
        connection=connection,
        partner_id=order.partner_id,
        sell_to_order_reference=order.sell_to_order_reference,
        buy_from_order_reference=order.buy_from_order_reference,
        status=order.status,
        status_message=order.status_message,
        status_changed_at=order.status_changed_at,
        removed_at=order.removed_at,
        received_at=order.received_at,
        payment_reference=order.payment_reference,
        job_id=order.job_id,
        manifest_url=order.manifest_url,
        items=[ShopItem.model_validate(item) for item in order.items],
        timeline=[_step(change) for change in order.status_changes],
        changed_at=order.changed_at,
    )


def _step(change: StatusChange) -> ShopStatusChange:
    return ShopStatusChange(
        at=change.observed_at,
        status=change.status,
        status_message=change.status_message,
        source=change.source.value,
    )
