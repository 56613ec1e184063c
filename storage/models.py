"""The database schema of the order flow: connections, the ledger, the mirror, inbox and outbox.

Everything stored belongs to one venue connection (:class:`VenueConnection`). The tables,
by the stage of the flow that fills them:

- ledger: :class:`LedgerLine` — the shop's sales, one per (partner, shop reference);
- receive: :class:`Inbox` — webhook notifications and poll findings, stored before they
  are acted on (:func:`inbox_dedup_key` says which are the same); :class:`Outbox` — calls
  to the venue recorded before they are made;
- mirror: :class:`VenueOrder` with :class:`OrderItem`, :class:`Wallet`, :class:`Asset`,
  and :class:`StatusChange`, every status an order was seen in (written by
  :mod:`orders.mirror` only); :class:`ForeignOrder`, other partners' order ids.

What otacm records of its own work (feed marks, job runs, reconciliation runs and
exceptions, sign-ins, erasures) is :mod:`storage.records`'s. Every "nothing doubled" rule
is a unique constraint, so ``IntegrityError`` means "already had it". Times are aware
UTC (:class:`~storage.types.UTCDateTime`), money is ``Decimal``
(:class:`~storage.types.Money`) with its currency beside it. Enum-like columns are
strings with a CHECK constraint, read back as the ``StrEnum`` members below. The rules
every flush keeps are :mod:`storage.flush`'s; importing this module changes nothing
global.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, validates

from storage.totals import order_totals
from storage.types import Money, UTCDateTime, utcnow
from storage.visits import request_visit_date
from venue.models import OrderStatus
from venue.values import normalize_reference, reference_set_key

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Constraint names are deterministic, so migrations can name what they alter or drop."""


# A 64-bit surrogate key; SQLite only auto-increments a column declared INTEGER.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


GUID_CHARS = 64
"""The width of a GUID column: room for any id the venue sends, braces and all."""


GUID = sa.String(GUID_CHARS)


REFERENCE = sa.String(100)


CURRENCY = sa.String(3)
"""An ISO 4217 code, as the shop's ledger gives it."""


VENUE_CURRENCY = sa.String(10)
"""A currency as the venue writes it: Business Central's ``Currency.Code`` is a Code[10]
(CMOrderWallet ``CurrencyCode``), the company's own code, not necessarily ISO 4217."""


ACTOR = sa.String(100)


class Base(DeclarativeBase):
    """The declarative base; its metadata is what the migrations must build."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


def enum_column(enum_class: type[StrEnum], name: str, length: int = 16) -> sa.Enum:
    """A string column limited to ``enum_class``'s values by a CHECK named ``name``.

    Not a native PostgreSQL enum: adding a value is then a plain constraint change.
    """
    return sa.Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=length,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


def _where(condition: str) -> dict[str, Any]:
    """A partial index's condition, for both dialects."""
    return {"postgresql_where": sa.text(condition), "sqlite_where": sa.text(condition)}


def _not_erased_index() -> sa.Index:
    """The rows whose personal data is not erased yet, by last visit date (partial).

    Partial, so that it holds only those rows (the last months, not the history) and
    the planner knows it: with one index on (erased_at, visit date), PostgreSQL
    estimated the erased and the visited rows as independent, and read the whole table
    to find a batch of due rows, under a LIMIT.
    """
    return sa.Index(None, "last_visit_date", **_where("personal_data_erased_at IS NULL"))


IN_FLIGHT = sa.text("state IN ('pending', 'leased')")
"""A queue's rows still to be worked. Literal text, the same in the partial indexes and in
the claims (:mod:`storage.lease`): SQLite uses a partial index only for a query repeating
its condition term for term, literals and all (a bound parameter does not match)."""

NOT_CREATE = "operation <> 'create'"
"""The outbox's calls pruning may delete once sent (heartbeat.retention), as literal text."""


def _in_flight_index(table: str) -> sa.Index:
    """A queue's :data:`IN_FLIGHT` rows by connection and id (partial): what a claim reads,
    one connection at a time, in id order, whatever the history the table keeps."""
    name, where = f"ix_{table}_in_flight", IN_FLIGHT
    return sa.Index(name, "connection_id", "id", postgresql_where=where, sqlite_where=where)


class LedgerState(StrEnum):
    """What became of a sale in the shop."""

    ACTIVE = "active"
    CANCELLED = "cancelled"
    REFUNDED = "refunded"


class LedgerSource(StrEnum):
    """How a sale entered the ledger."""

    IMPORT = "import"
    SUBMIT = "submit"


class ChangeSource(StrEnum):
    """Where otacm learned of an order's status."""

    WEBHOOK = "webhook"
    POLL = "poll"
    FEED = "feed"
    FETCH = "fetch"
    SUBMIT = "submit"
    REPLACE = "replace"
    CONFIRM = "confirm"
    DELETE = "delete"
    IMPORT = "import"


class InboxSource(StrEnum):
    """What put a row in the inbox: a webhook, or a poll that found a change."""

    WEBHOOK = "webhook"
    POLL = "poll"
    FEED = "feed"


class InboxState(StrEnum):
    """Where an inbox row is in its processing."""

    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    DEAD = "dead"


class OutboxOperation(StrEnum):
    """The venue call an outbox row stands for."""

    CREATE = "create"
    REPLACE = "replace"
    CONFIRM = "confirm"
    DELETE = "delete"


class OutboxState(StrEnum):
    """Where an outbox row is: waiting, being sent, sent, refused (failed), given up (dead)."""

    PENDING = "pending"
    LEASED = "leased"
    SENT = "sent"
    FAILED = "failed"
    DEAD = "dead"


class VenueConnection(Base):
    """A venue the OTA sells for, as named in the settings; owner of every other row."""

    __tablename__ = "venue_connection"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class LedgerLine(Base):
    """One sale in the shop's ledger: what finance expects the venue to have.

    ``reference_key`` is ``shop_reference`` in the venue's form (trimmed, upper-cased);
    it is set whenever ``shop_reference`` is, and is what "the same sale" means.
    """

    __tablename__ = "ledger_line"
    __table_args__ = (
        sa.UniqueConstraint("connection_id", "partner_id", "reference_key"),
        sa.Index(None, "connection_id", "sold_at"),
        _not_erased_index(),
        sa.CheckConstraint("quantity >= 0", name="quantity_not_negative"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    connection_id: Mapped[int] = mapped_column(sa.ForeignKey("venue_connection.id"))
    partner_id: Mapped[str] = mapped_column(GUID)
    shop_reference: Mapped[str] = mapped_column(REFERENCE)
    reference_key: Mapped[str] = mapped_column(REFERENCE)
    sold_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    quantity: Mapped[int]
    amount: Mapped[Decimal] = mapped_column(Money)
    currency: Mapped[str] = mapped_column(CURRENCY)
    amount_includes_vat: Mapped[bool] = mapped_column(default=True)
    payment_reference: Mapped[str | None] = mapped_column(REFERENCE)
    # The buyFromOrderReference the shop recorded, when it recorded one.
    venue_reference: Mapped[str | None] = mapped_column(sa.String(50))
    external_reference_numbers: Mapped[list[str] | None] = mapped_column(sa.JSON)
    # The listed numbers as one comparable text (:func:`~venue.values.reference_set_key`),
    # set whenever they are: what a reconciliation compares with the wallets'.
    external_references_key: Mapped[str | None] = mapped_column(sa.Text)
    state: Mapped[LedgerState] = mapped_column(
        enum_column(LedgerState, "state"), default=LedgerState.ACTIVE
    )
    source: Mapped[LedgerSource] = mapped_column(enum_column(LedgerSource, "source"))
    # The order request as submitted through otacm (camelCase wire JSON).
    request: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    # The latest visit date of the request's lines and scheduled components (set with
    # ``request``), and when the request's names and e-mails were erased: what the
    # erasure of personal data (heartbeat.privacy) selects by.
    last_visit_date: Mapped[dt.date | None]
    personal_data_erased_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    @validates("shop_reference")
    def _set_reference_key(self, key: str, value: str) -> str:
        self.reference_key = normalize_reference(value)
        return value

    @validates("request")
    def _set_last_visit_date(self, key: str, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # A request stored anew (a re-submission, a replacement) is the shop's new data:
        # its visit date starts the retention of its names and e-mails again.
        self.last_visit_date = request_visit_date(value)
        self.personal_data_erased_at = None
        return value

    @validates("external_reference_numbers")
    def _set_external_references_key(self, key: str, value: list[str] | None) -> list[str] | None:
        self.external_references_key = reference_set_key(value or ())
        return value


class VenueOrder(Base):
    """The local copy of one venue order: its header as the venue last returned it.

    ``removed_at`` is set when the venue no longer knows the order (deleted while Draft
    or Error); the row and its history stay. ``items_digest`` fingerprints the items last
    stored, so an unchanged getOrder answer rewrites nothing.
    """

    __tablename__ = "venue_order"
    __table_args__ = (
        sa.UniqueConstraint("connection_id", "order_id"),
        sa.Index(None, "connection_id", "partner_id", "reference_key"),
        sa.Index(None, "connection_id", "buy_from_order_reference"),
        # Also the orders in Error the venue still holds (/metrics), from the index alone.
        sa.Index(None, "connection_id", "status", "removed_at"),
        _not_erased_index(),
        sa.Index("ix_venue_order_change", "change_seq", "id"),
        # A reconciliation's orphans: the orders of its period, by their time
        # (reconciler.findings); first seen, of those the venue gave no receivedAt.
        sa.Index(None, "connection_id", "received_at"),
        sa.Index(None, "connection_id", "first_seen_at", **_where("received_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    connection_id: Mapped[int] = mapped_column(sa.ForeignKey("venue_connection.id"))
    order_id: Mapped[str] = mapped_column(GUID)
    partner_id: Mapped[str] = mapped_column(GUID)
    sell_to_order_reference: Mapped[str] = mapped_column(REFERENCE)
    reference_key: Mapped[str] = mapped_column(REFERENCE)
    buy_from_order_reference: Mapped[str | None] = mapped_column(sa.String(50))
    status: Mapped[OrderStatus] = mapped_column(enum_column(OrderStatus, "status"))
    status_message: Mapped[str | None] = mapped_column(sa.Text)
    status_changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    sell_to_email: Mapped[str | None] = mapped_column(sa.Text)
    sell_to_name: Mapped[str | None] = mapped_column(sa.Text)
    sell_to_language: Mapped[str | None] = mapped_column(sa.String(16))
    payment_reference: Mapped[str | None] = mapped_column(REFERENCE)
    job_id: Mapped[str | None] = mapped_column(GUID)
    manifest_url: Mapped[str | None] = mapped_column(sa.Text)
    row_version: Mapped[int | None] = mapped_column(sa.BigInteger)
    items_digest: Mapped[str | None] = mapped_column(sa.String(64))
    # What the items and wallets add up to (:meth:`summarize_items`), kept on the order
    # so that a reconciliation reads one row per order instead of joining and grouping
    # every item and wallet on each run.
    items_quantity: Mapped[int | None] = mapped_column(sa.BigInteger)
    amount_incl_vat: Mapped[Decimal | None] = mapped_column(Money)
    amount_excl_vat: Mapped[Decimal | None] = mapped_column(Money)
    wallet_currencies: Mapped[str | None] = mapped_column(sa.Text)
    wallet_external_references: Mapped[str | None] = mapped_column(sa.Text)
    # The latest visit date of the order's lines, kept with the totals; and when the
    # order's names and e-mails were erased (heartbeat.privacy): from then on the
    # mirror stores none of the order's again (:mod:`storage.flush`).
    last_visit_date: Mapped[dt.date | None]
    personal_data_erased_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    removed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    first_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    fetched_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # The earliest ``timestamp`` of the venue's webhooks for this order that the worker
    # applied (:meth:`note_webhooks`): the settlement's evidence for the delivery-lag
    # metric, kept here so that the inbox needs no index by order, which every webhook
    # would otherwise write at a random place.
    first_notified_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # The commit that last changed what the shop reads of the order, numbered in commit
    # order, and its time: the shop's change feed (storage.changes).
    change_seq: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    changed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    def note_webhooks(self, notified_at: Iterable[dt.datetime | None]) -> None:
        """Remember the earliest of these webhook times, if earlier than the one kept."""
        known = [moment for moment in notified_at if moment is not None]
        if self.first_notified_at is not None:
            known.append(self.first_notified_at)
        if known:
            self.first_notified_at = min(known)

    items: Mapped[list[OrderItem]] = relationship(
        back_populates="order",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="OrderItem.line_no",
    )
    status_changes: Mapped[list[StatusChange]] = relationship(
        back_populates="order",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="StatusChange.id",
    )

    @validates("sell_to_order_reference")
    def _set_reference_key(self, key: str, value: str) -> str:
        self.reference_key = normalize_reference(value)
        return value

    def summarize_items(self) -> None:
        """Set the order's totals (:func:`order_totals`) from its items and wallets as they are.

        Runs before every flush that adds an order or changes its items or wallets
        (:mod:`storage.flush`).
        """
        for name, value in dataclasses.asdict(order_totals(self.items)).items():
            setattr(self, name, value)
        self.last_visit_date = max(
            (item.visit_date for item in self.items if item.visit_date is not None), default=None
        )


class OrderItem(Base):
    """A line of a venue order."""

    __tablename__ = "order_item"
    __table_args__ = (sa.UniqueConstraint("venue_order_id", "line_no"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    venue_order_id: Mapped[int] = mapped_column(sa.ForeignKey("venue_order.id", ondelete="CASCADE"))
    line_no: Mapped[int]
    item_number: Mapped[str] = mapped_column(sa.String(50))
    description: Mapped[str | None] = mapped_column(sa.Text)
    is_package: Mapped[bool] = mapped_column(default=False)
    quantity: Mapped[int]
    visit_date: Mapped[dt.date | None]
    visit_time: Mapped[dt.time | None]
    sell_to_name: Mapped[str | None] = mapped_column(sa.Text)
    sell_to_email: Mapped[str | None] = mapped_column(sa.Text)
    sell_to_language: Mapped[str | None] = mapped_column(sa.String(16))

    order: Mapped[VenueOrder] = relationship(back_populates="items")
    wallets: Mapped[list[Wallet]] = relationship(
        back_populates="item",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Wallet.seq_no",
    )


class Wallet(Base):
    """A wallet of an order line: one admission or package, its price and its assets.

    ``wallet_id`` is the venue's walletId (all zeros before minting), not a row id.
    """

    __tablename__ = "wallet"
    __table_args__ = (
        sa.UniqueConstraint("order_item_id", "seq_no"),
        sa.Index(None, "wallet_reference_number"),
        sa.Index(None, "external_reference_number"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    order_item_id: Mapped[int] = mapped_column(sa.ForeignKey("order_item.id", ondelete="CASCADE"))
    seq_no: Mapped[int]
    wallet_id: Mapped[str | None] = mapped_column(GUID)
    wallet_reference_number: Mapped[str | None] = mapped_column(sa.String(50))
    external_reference_number: Mapped[str | None] = mapped_column(REFERENCE)
    name: Mapped[str | None] = mapped_column(sa.Text)
    issued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    unit_price_excl_vat: Mapped[Decimal | None] = mapped_column(Money)
    unit_price_incl_vat: Mapped[Decimal | None] = mapped_column(Money)
    currency_code: Mapped[str | None] = mapped_column(VENUE_CURRENCY)
    manifest_url: Mapped[str | None] = mapped_column(sa.Text)

    item: Mapped[OrderItem] = relationship(back_populates="wallets")
    assets: Mapped[list[Asset]] = relationship(
        back_populates="wallet",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Asset.position",
    )


class Asset(Base):
    """A minted ticket or coupon in a wallet.

    ``wallet_id`` here is the wallet *row*; ``asset_row_id`` is the venue's ``id`` of the
    asset and ``asset_id`` its ``assetId``. ``position`` keeps the venue's order.
    """

    __tablename__ = "asset"
    __table_args__ = (
        sa.UniqueConstraint("wallet_id", "position"),
        sa.Index(None, "reference_number"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    wallet_id: Mapped[int] = mapped_column(sa.ForeignKey("wallet.id", ondelete="CASCADE"))
    position: Mapped[int]
    asset_row_id: Mapped[str | None] = mapped_column(GUID)
    type: Mapped[str | None] = mapped_column(sa.String(32))
    asset_id: Mapped[str | None] = mapped_column(GUID)
    reference_number: Mapped[str | None] = mapped_column(REFERENCE)
    item_number: Mapped[str | None] = mapped_column(sa.String(50))
    description: Mapped[str | None] = mapped_column(sa.Text)

    wallet: Mapped[Wallet] = relationship(back_populates="assets")


class StatusChange(Base):
    """A status an order was seen in, when, and from where.

    ``status`` is ``None`` when the order was found removed at the venue.
    """

    __tablename__ = "status_change"
    __table_args__ = (
        sa.Index(None, "venue_order_id", "observed_at"),
        sa.Index(None, "inbox_id"),
        # The delivery-health window: a range of recent changes (heartbeat.metric_figures).
        sa.Index(None, "observed_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    venue_order_id: Mapped[int] = mapped_column(sa.ForeignKey("venue_order.id", ondelete="CASCADE"))
    status: Mapped[OrderStatus | None] = mapped_column(enum_column(OrderStatus, "status"))
    status_message: Mapped[str | None] = mapped_column(sa.Text)
    observed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    source: Mapped[ChangeSource] = mapped_column(enum_column(ChangeSource, "source"))
    inbox_id: Mapped[int | None] = mapped_column(sa.ForeignKey("inbox.id", ondelete="SET NULL"))

    order: Mapped[VenueOrder] = relationship(back_populates="status_changes")


class ForeignOrder(Base):
    """An order of a partner not configured for the connection: its id alone, never mirrored.

    The venue's webhooks and getOrder are company-wide (CMOrderWebhooks; ChannelMgrOrderAgent
    ``GetOrder`` has no partner check), so other partners' orders reach otacm. The first
    getOrder that shows one is the last: its id is kept here (with its partner, to let it
    in should that partner be configured later) and nothing else of it — no names,
    e-mails or references — so later notifications of it are settled with no venue call.
    """

    __tablename__ = "foreign_order"
    __table_args__ = (sa.UniqueConstraint("connection_id", "order_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    connection_id: Mapped[int] = mapped_column(sa.ForeignKey("venue_connection.id"))
    order_id: Mapped[str] = mapped_column(GUID)
    partner_id: Mapped[str] = mapped_column(GUID)
    noted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Inbox(Base):
    """A notification (or poll finding) stored before it is acted on.

    ``payload`` is the notification without its ``clientState`` (a secret), as
    :func:`canonical_payload` writes it; ``dedup_key`` is :func:`inbox_dedup_key` of that
    text (led by the notification's time), so an exact repeat is stored once. Workers claim
    due rows from the in-flight ones (pending or leased: :data:`IN_FLIGHT`, a partial
    index by connection and id) and hold them with a lease.

    Every index here is written by each notification stored, on the webhook's hot path,
    so there are only those four, whose new entries arrive in about their order (the id,
    the key led by time, pending rows due at once, the in-flight rows by connection and
    id; the last holds only the rows still to be worked). There is no index by order:
    what asks "is this order waiting in the inbox" asks it of the in-flight rows (found
    by state), which the worker keeps few; the delivery-lag metric reads
    :attr:`VenueOrder.first_notified_at`.
    """

    __tablename__ = "inbox"
    __table_args__ = (
        sa.UniqueConstraint("connection_id", "dedup_key"),
        sa.Index(None, "state", "next_attempt_at"),
        _in_flight_index("inbox"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # Not a foreign key: checking one locks the connection's row for every notification
    # stored (migration 0007 says why, and what it guarded instead).
    connection_id: Mapped[int]
    source: Mapped[InboxSource] = mapped_column(enum_column(InboxSource, "source"))
    event_name: Mapped[str] = mapped_column(sa.String(100))
    order_id: Mapped[str | None] = mapped_column(GUID)
    buy_from_order_reference: Mapped[str | None] = mapped_column(sa.String(50))
    # The status the notification announced: a hint, perhaps stale, so not an enum.
    notified_status: Mapped[str | None] = mapped_column(sa.String(32))
    notified_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    payload: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    dedup_key: Mapped[str] = mapped_column(sa.String(64))
    state: Mapped[InboxState] = mapped_column(
        enum_column(InboxState, "state"), default=InboxState.PENDING
    )
    attempts: Mapped[int] = mapped_column(default=0)
    lease_owner: Mapped[str | None] = mapped_column(ACTOR)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    processed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Outbox(Base):
    """A call to the venue, recorded in the same transaction as the sale it serves.

    ``order_id`` is the order the call targets (replace, confirm, delete) or, once a
    create is sent, the order it made.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        sa.Index(None, "state", "next_attempt_at"),
        _in_flight_index("outbox"),
        sa.Index(None, "ledger_line_id"),
        # The calls on one order, found when its personal data is erased.
        sa.Index(None, "order_id"),
        sa.Index(None, "state", "sent_at", **_where(NOT_CREATE)),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    connection_id: Mapped[int] = mapped_column(sa.ForeignKey("venue_connection.id"))
    # None for a call on a venue order that has no sale in the ledger (an orphan).
    ledger_line_id: Mapped[int | None] = mapped_column(sa.ForeignKey("ledger_line.id"))
    operation: Mapped[OutboxOperation] = mapped_column(enum_column(OutboxOperation, "operation"))
    request: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    state: Mapped[OutboxState] = mapped_column(
        enum_column(OutboxState, "state"), default=OutboxState.PENDING
    )
    attempts: Mapped[int] = mapped_column(default=0)
    lease_owner: Mapped[str | None] = mapped_column(ACTOR)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    order_id: Mapped[str | None] = mapped_column(GUID)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


def ensure_connection(session: Session, name: str) -> int:
    """The id of the venue connection ``name``, creating its row if it is new.

    Safe when several processes start at once: a concurrent insert of the same name is
    absorbed by a savepoint and the existing row is read.

    Args:
        session: the caller's session; not committed.
        name: the connection's name from the settings.

    Returns:
        The connection's id.
    """
    query = sa.select(VenueConnection.id).where(VenueConnection.name == name)
    existing = session.scalar(query)
    if existing is not None:
        return existing
    try:
        with session.begin_nested():
            row = VenueConnection(name=name)
            session.add(row)
    except IntegrityError:
        return session.execute(query).scalar_one()
    return row.id


def canonical_payload(notification: Mapping[str, Any]) -> str:
    """A notification as :attr:`Inbox.payload` keeps it: canonical JSON, no ``clientState``.

    Canonical (sorted keys, no spaces) so that the same notification is the same text
    whatever order its fields came in: the text :func:`inbox_dedup_key` hashes. The
    ``clientState`` is a secret, and differs across a rotation but not in meaning.
    """
    canonical = {key: value for key, value in notification.items() if key != "clientState"}
    return _CANONICAL_JSON.encode(canonical)


# What json.dumps(sort_keys=True, separators=(",", ":"), default=str) builds per call,
# made once: this runs for every notification stored.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def inbox_dedup_key(payload: str, timestamp: object = None) -> str:
    """The :attr:`Inbox.dedup_key` of a :func:`canonical_payload`: equal only for exact repeats.

    The SHA-256 of the payload, led by the digits of the notification's own
    ``timestamp`` field when it has one (``timestamp``: that field, as received). The
    key stays a function of the payload alone, so a repeat still finds its first copy;
    the lead makes new keys arrive in about the order of the unique index, so storing a
    batch touches the index's last pages instead of one random page per notification
    (which, on SQLite, a commit writes out whole).
    """
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()
    if not isinstance(timestamp, str):
        return digest
    lead = _NOT_ASCII_DIGITS.sub("", timestamp)
    return (lead[:_DEDUP_KEY_LEAD] + digest)[:_DEDUP_KEY_LENGTH]


# A key is 64 characters (Inbox.dedup_key): at most 20 digits of time (to the
# microsecond and a little more), the rest (at least 176 bits) of the payload's hash.
_DEDUP_KEY_LENGTH = 64


_NOT_ASCII_DIGITS = re.compile("[^0-9]+")


_DEDUP_KEY_LEAD = 20


# The rest of the schema: importing this module registers every table with Base.metadata,
# which migrations, the schema comparison and the tests' clean-ups read whole.
from storage import records as _records  # noqa: E402, F401
from storage import venue_limits as _venue_limits  # noqa: E402, F401
