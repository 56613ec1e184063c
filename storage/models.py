"""The database schema of otacm, and the writes every part of it shares.

Everything stored belongs to one venue connection (:class:`VenueConnection`). The tables,
by the stage of the flow that fills them:

- ledger: :class:`LedgerLine` — the shop's sales, one per (partner, shop reference);
- receive: :class:`Inbox` — webhook notifications and poll findings, stored before they
  are acted on; :class:`Outbox` — calls to the venue recorded before they are made;
- mirror: :class:`VenueOrder` with :class:`OrderItem`, :class:`Wallet`, :class:`Asset`,
  and :class:`StatusChange`, every status an order was seen in;
- heartbeat: :class:`FeedCursor` (the change feed's high-water mark) and
  :class:`JobRun` (each scheduled job's last run and when it is next due);
- reconcile and report: :class:`ReconRun`, :class:`ReconTotal`, :class:`ReconException`
  and :class:`ExceptionEvent`;
- personal data: :class:`PrivacyErasure`, each erasure of customers' names and e-mails.

Every "nothing doubled" rule is a unique constraint, so ``IntegrityError`` means "already
had it". Times are aware UTC (:class:`~storage.types.UTCDateTime`), money is ``Decimal``
(:class:`~storage.types.Money`) with its currency beside it. Enum-like columns are
strings with a CHECK constraint, read back as the ``StrEnum`` members below.

The functions at the end (:func:`ensure_connection`, :func:`upsert_order`,
:func:`mark_removed`) take a session and never commit: the
caller owns the transaction. The rules every flush keeps (orders' totals, values their
columns can hold, erased orders staying erased) are hooks that
:func:`register_flush_hooks` puts on a session factory, the one
:func:`storage.engine.make_sessions` makes: importing this module changes nothing
global.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
    validates,
)

from storage.types import MONEY_MAX, Money, UTCDateTime, utcnow
from venue import models as wire
from venue.models import OrderStatus, canonical_guid, normalize_reference, reference_set_key

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


def _enum(enum_class: type[StrEnum], name: str, length: int = 16) -> sa.Enum:
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


def _not_erased_index() -> sa.Index:
    """The rows whose personal data is not erased yet, by last visit date (partial).

    Partial, so that it holds only those rows (the last months, not the history) and
    the planner knows it: with one index on (erased_at, visit date), PostgreSQL
    estimated the erased and the visited rows as independent, and read the whole table
    to find a batch of due rows, under a LIMIT.
    """
    condition = sa.text("personal_data_erased_at IS NULL")
    return sa.Index(None, "last_visit_date", postgresql_where=condition, sqlite_where=condition)


# --- enumerations ----------------------------------------------------------------------


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


class ReconTrigger(StrEnum):
    """Who started a reconciliation run."""

    MANUAL = "manual"
    SCHEDULED = "scheduled"


class ReconRunState(StrEnum):
    """A reconciliation run's progress."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


class ExceptionState(StrEnum):
    """A reconciliation exception's state in finance's review."""

    OPEN = "open"
    RESOLVED = "resolved"
    ACCEPTED = "accepted"
    CLOSED = "closed"


class ExceptionAction(StrEnum):
    """What happened to a reconciliation exception, for its history."""

    OPENED = "opened"
    SEEN = "seen"
    CLOSED = "closed"
    REOPENED = "reopened"
    RESOLVED = "resolved"
    ACCEPTED = "accepted"


# --- tenants ---------------------------------------------------------------------------


class VenueConnection(Base):
    """A venue the OTA sells for, as named in the settings; owner of every other row."""

    __tablename__ = "venue_connection"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


# --- ledger ----------------------------------------------------------------------------


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
    # The listed numbers as one comparable text (:func:`~venue.models.reference_set_key`),
    # set whenever they are: what a reconciliation compares with the wallets'.
    external_references_key: Mapped[str | None] = mapped_column(sa.Text)
    state: Mapped[LedgerState] = mapped_column(
        _enum(LedgerState, "state"), default=LedgerState.ACTIVE
    )
    source: Mapped[LedgerSource] = mapped_column(_enum(LedgerSource, "source"))
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


# --- the mirror of the venue's orders --------------------------------------------------


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
        sa.Index(None, "connection_id", "status"),
        _not_erased_index(),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    connection_id: Mapped[int] = mapped_column(sa.ForeignKey("venue_connection.id"))
    order_id: Mapped[str] = mapped_column(GUID)
    partner_id: Mapped[str] = mapped_column(GUID)
    sell_to_order_reference: Mapped[str] = mapped_column(REFERENCE)
    reference_key: Mapped[str] = mapped_column(REFERENCE)
    buy_from_order_reference: Mapped[str | None] = mapped_column(sa.String(50))
    status: Mapped[OrderStatus] = mapped_column(_enum(OrderStatus, "status"))
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
    # mirror stores none of the order's again (:func:`_keep_erased_orders_erased`).
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
        (:func:`_summarize_orders`).
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
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    venue_order_id: Mapped[int] = mapped_column(sa.ForeignKey("venue_order.id", ondelete="CASCADE"))
    status: Mapped[OrderStatus | None] = mapped_column(_enum(OrderStatus, "status"))
    status_message: Mapped[str | None] = mapped_column(sa.Text)
    observed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    source: Mapped[ChangeSource] = mapped_column(_enum(ChangeSource, "source"))
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


# --- inbox and outbox ------------------------------------------------------------------


class Inbox(Base):
    """A notification (or poll finding) stored before it is acted on.

    ``payload`` is the notification without its ``clientState`` (a secret), as
    :func:`canonical_payload` writes it; ``dedup_key`` is :func:`inbox_dedup_key` of that
    text (led by the notification's time), so an exact repeat is stored once. Workers claim
    rows by ``(state, next_attempt_at)`` and hold them with a lease.

    Every index here is written by each notification stored, on the webhook's hot path,
    so there are only those three, whose new entries arrive in about their order (the id,
    the key led by time, pending rows due at once). There is no index by order: what
    asks "is this order waiting in the inbox" asks it of the in-flight rows (pending or
    leased, found by state), which the worker keeps few; the delivery-lag metric reads
    :attr:`VenueOrder.first_notified_at`.
    """

    __tablename__ = "inbox"
    __table_args__ = (
        sa.UniqueConstraint("connection_id", "dedup_key"),
        sa.Index(None, "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # Not a foreign key: checking one locks the connection's row for every notification
    # stored (migration 0007 says why, and what it guarded instead).
    connection_id: Mapped[int]
    source: Mapped[InboxSource] = mapped_column(_enum(InboxSource, "source"))
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
        _enum(InboxState, "state"), default=InboxState.PENDING
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
        sa.Index(None, "ledger_line_id"),
        # The calls on one order, found when its personal data is erased.
        sa.Index(None, "order_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    connection_id: Mapped[int] = mapped_column(sa.ForeignKey("venue_connection.id"))
    # None for a call on a venue order that has no sale in the ledger (an orphan).
    ledger_line_id: Mapped[int | None] = mapped_column(sa.ForeignKey("ledger_line.id"))
    operation: Mapped[OutboxOperation] = mapped_column(_enum(OutboxOperation, "operation"))
    request: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    state: Mapped[OutboxState] = mapped_column(
        _enum(OutboxState, "state"), default=OutboxState.PENDING
    )
    attempts: Mapped[int] = mapped_column(default=0)
    lease_owner: Mapped[str | None] = mapped_column(ACTOR)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    order_id: Mapped[str | None] = mapped_column(GUID)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


# --- heartbeat -------------------------------------------------------------------------


class FeedCursor(Base):
    """The highest ``rowVersion`` read from a partner's change feed."""

    __tablename__ = "feed_cursor"

    connection_id: Mapped[int] = mapped_column(
        sa.ForeignKey("venue_connection.id"), primary_key=True
    )
    partner_id: Mapped[str] = mapped_column(GUID, primary_key=True)
    last_row_version: Mapped[int] = mapped_column(sa.BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class FeedMark(Base):
    """A value the feed cursor reached, and when: the cursor's recent history.

    ``rowVersion`` is one counter for the venue's whole database, so a number of
    versions below the high-water mark says nothing about time; the feed re-reads from
    the mark as it stood a configured number of minutes ago, which this history tells
    (:mod:`heartbeat.feed`). Rows older than that window are pruned, but for the newest
    of them.
    """

    __tablename__ = "feed_mark"

    connection_id: Mapped[int] = mapped_column(
        sa.ForeignKey("venue_connection.id"), primary_key=True
    )
    partner_id: Mapped[str] = mapped_column(GUID, primary_key=True)
    row_version: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    recorded_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class JobRun(Base):
    """The run record of the scheduled job ``name``, shared by every scheduler process.

    Who may run a job *right now* is decided by a database lock
    (:func:`heartbeat.coordination.job_lock`), not by this row; the row says when the
    job last ran and when it is next due, so that several schedulers ticking on their
    own clocks run it once per interval between them, not once each. ``finished_at`` is
    ``None`` while a run is under way, or when its process died mid-run;
    ``last_success_at`` is when the last successful run ended. ``runs``
    counts the runs started; ``failures`` the failed runs since the last success.
    ``last_error`` is the last failure's exception type and message, never a secret.
    """

    __tablename__ = "job_run"

    name: Mapped[str] = mapped_column(sa.String(100), primary_key=True)
    owner: Mapped[str] = mapped_column(ACTOR)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_success_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    next_due_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    runs: Mapped[int] = mapped_column(default=0)
    failures: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(sa.Text)


class SubscriptionCheck(Base):
    """What the scheduled subscription check last found at a venue connection.

    Written by :func:`heartbeat.subscriptions.check_subscriptions` at every run, read by
    ``/metrics``: whether the connection's webhook subscription was usable after the
    check (found, or made), when a check last had to make one because none was usable
    (missing or inactive: webhooks were not arriving until then), and the last failure,
    a message built from identifiers (never a client state).
    """

    __tablename__ = "subscription_check"

    connection_id: Mapped[int] = mapped_column(
        sa.ForeignKey("venue_connection.id"), primary_key=True
    )
    checked_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    usable: Mapped[bool]
    recreated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(sa.Text)


# --- reconciliation --------------------------------------------------------------------


class ReconRun(Base):
    """One comparison of the ledger with the mirror over a period."""

    __tablename__ = "recon_run"
    __table_args__ = (sa.Index(None, "connection_id", "started_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    connection_id: Mapped[int] = mapped_column(sa.ForeignKey("venue_connection.id"))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    period_from: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    period_to: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    trigger: Mapped[ReconTrigger] = mapped_column(_enum(ReconTrigger, "trigger"))
    state: Mapped[ReconRunState] = mapped_column(
        _enum(ReconRunState, "state"), default=ReconRunState.RUNNING
    )
    # The finance user who started a manual run; None for scheduled runs.
    actor: Mapped[str | None] = mapped_column(ACTOR)
    error: Mapped[str | None] = mapped_column(sa.Text)

    totals: Mapped[list[ReconTotal]] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True
    )


class ReconTotal(Base):
    """A run's count and amounts for one currency and category."""

    __tablename__ = "recon_total"
    __table_args__ = (sa.UniqueConstraint("recon_run_id", "currency", "category"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    recon_run_id: Mapped[int] = mapped_column(sa.ForeignKey("recon_run.id", ondelete="CASCADE"))
    # The sale's currency, or an orphan order's as the venue wrote it.
    currency: Mapped[str] = mapped_column(VENUE_CURRENCY)
    category: Mapped[str] = mapped_column(sa.String(32))
    count: Mapped[int]
    ledger_amount: Mapped[Decimal] = mapped_column(Money)
    venue_amount: Mapped[Decimal] = mapped_column(Money)

    run: Mapped[ReconRun] = relationship(back_populates="totals")


class ReconException(Base):
    """A difference between ledger and mirror, tracked across runs until it is closed.

    ``subject_key`` names what differs (a reference key, an order id); with the category
    it identifies the exception, so a difference seen again is the same exception.
    ``subject_at`` is when the subject happened (the sale's ``sold_at``, an orphan
    order's ``received_at``): a run closes only the exceptions whose subject lies in its
    period and that it did not find again.
    """

    __tablename__ = "recon_exception"
    __table_args__ = (
        sa.UniqueConstraint("connection_id", "category", "subject_key"),
        sa.Index(None, "connection_id", "state"),
        sa.Index(None, "connection_id", "subject_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    connection_id: Mapped[int] = mapped_column(sa.ForeignKey("venue_connection.id"))
    category: Mapped[str] = mapped_column(sa.String(32))
    # ledger:<partner id>:<reference key> or order:<order id>; longer than a reference.
    subject_key: Mapped[str] = mapped_column(sa.String(200))
    subject_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    ledger_line_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("ledger_line.id", ondelete="SET NULL")
    )
    venue_order_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("venue_order.id", ondelete="SET NULL")
    )
    currency: Mapped[str | None] = mapped_column(VENUE_CURRENCY)
    ledger_amount: Mapped[Decimal | None] = mapped_column(Money)
    venue_amount: Mapped[Decimal | None] = mapped_column(Money)
    details: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    state: Mapped[ExceptionState] = mapped_column(
        _enum(ExceptionState, "state"), default=ExceptionState.OPEN
    )
    first_seen_run_id: Mapped[int] = mapped_column(sa.ForeignKey("recon_run.id"))
    last_seen_run_id: Mapped[int] = mapped_column(sa.ForeignKey("recon_run.id"))
    closed_run_id: Mapped[int | None] = mapped_column(sa.ForeignKey("recon_run.id"))
    first_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    events: Mapped[list[ExceptionEvent]] = relationship(
        back_populates="exception",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="ExceptionEvent.id",
    )


class ExceptionEvent(Base):
    """One entry in an exception's history: what happened, who did it, and why."""

    __tablename__ = "exception_event"
    __table_args__ = (sa.Index(None, "recon_exception_id", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    recon_exception_id: Mapped[int] = mapped_column(
        sa.ForeignKey("recon_exception.id", ondelete="CASCADE")
    )
    recon_run_id: Mapped[int | None] = mapped_column(sa.ForeignKey("recon_run.id"))
    action: Mapped[ExceptionAction] = mapped_column(_enum(ExceptionAction, "action"))
    actor: Mapped[str | None] = mapped_column(ACTOR)
    note: Mapped[str | None] = mapped_column(sa.Text)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)

    exception: Mapped[ReconException] = relationship(back_populates="events")


# --- shared writes ---------------------------------------------------------------------


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


def upsert_order(
    session: Session,
    connection_id: int,
    order: wire.Order,
    *,
    source: ChangeSource,
    observed_at: dt.datetime,
    inbox_id: int | None = None,
) -> VenueOrder:
    """Store a full order as the venue returned it: header, items, wallets, assets.

    The venue's answer is the truth: the header is overwritten and the items (with their
    wallets and assets) are replaced wholesale when they differ from those stored. A
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

    Returns:
        The stored order.
    """
    order_id = order.order_id
    row = _locked_order(session, connection_id, order_id)
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
    query = sa.select(VenueOrder.id, VenueOrder.order_id, VenueOrder.partner_id).where(
        VenueOrder.connection_id == connection_id,
        VenueOrder.partner_id.not_in(sorted(partner_ids)),
    )
    found = session.execute(query).all()
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


def _chunks(values: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


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


class WalletFigures(Protocol):
    """What the totals read of a wallet (a :class:`Wallet`, or a row with these fields)."""

    @property
    def unit_price_incl_vat(self) -> Decimal | None: ...
    @property
    def unit_price_excl_vat(self) -> Decimal | None: ...
    @property
    def currency_code(self) -> str | None: ...
    @property
    def external_reference_number(self) -> str | None: ...


class ItemFigures(Protocol):
    """What the totals read of an item (an :class:`OrderItem`, or a row with these fields)."""

    @property
    def quantity(self) -> int: ...
    @property
    def wallets(self) -> Sequence[WalletFigures]: ...


@dataclasses.dataclass(frozen=True)
class OrderTotals:
    """What an order's items and wallets come to; the columns of the same names keep it.

    Attributes:
        items_quantity: the items' quantities added up (``None`` without items).
        amount_incl_vat: what the items come to with VAT (see :func:`order_totals`).
        amount_excl_vat: the same without VAT.
        wallet_currencies: the wallets' currency codes, upper-cased, each once, sorted,
            joined by "/" (``"EUR"``, ``"EUR/GBP"``).
        wallet_external_references: the wallets' external reference numbers as one
            :func:`~venue.models.reference_set_key`.
    """

    items_quantity: int | None
    amount_incl_vat: Decimal | None
    amount_excl_vat: Decimal | None
    wallet_currencies: str | None
    wallet_external_references: str | None


def order_totals(items: Sequence[ItemFigures]) -> OrderTotals:
    """The totals of an order with these items.

    The amounts are what the wallets carry, added up: the venue prices each wallet with
    everything it holds (CMTicketIssuer ``AccumulatePriceOnWallet``, CMCouponIssuer), so a
    single ticket's wallet carries its unit price, a group ticket's one wallet the
    per-person price times the quantity, and a package's wallet its components and
    coupons together. Only priced wallets add up; an amount is ``None`` when no wallet
    has a price on its VAT basis.
    """
    wallets = [wallet for item in items for wallet in item.wallets]
    currencies = {
        wallet.currency_code.strip().upper()
        for wallet in wallets
        if wallet.currency_code and wallet.currency_code.strip()
    }
    return OrderTotals(
        items_quantity=sum(item.quantity for item in items) if items else None,
        amount_incl_vat=_amount(items, lambda wallet: wallet.unit_price_incl_vat),
        amount_excl_vat=_amount(items, lambda wallet: wallet.unit_price_excl_vat),
        wallet_currencies="/".join(sorted(currencies)) or None,
        wallet_external_references=reference_set_key(
            wallet.external_reference_number for wallet in wallets
        ),
    )


def _amount(
    items: Sequence[ItemFigures], price: Callable[[WalletFigures], Decimal | None]
) -> Decimal | None:
    prices = [
        known for item in items for wallet in item.wallets if (known := price(wallet)) is not None
    ]
    return sum(prices, Decimal(0)) if prices else None


def _summarize_orders(session: Session, flush_context: Any, instances: Any) -> None:
    """Keep every order's totals in step with its items and wallets, whoever writes them.

    An order is summed again when it is new, its list of items changed, or one of its
    items or wallets is new or changed; a change to the header alone leaves them be.
    """
    orders: dict[int, VenueOrder] = {}
    for row in (*session.new, *session.dirty):
        order: VenueOrder | None = None
        if isinstance(row, VenueOrder):
            if row in session.new or sa.inspect(row).attrs["items"].history.has_changes():
                order = row
        elif isinstance(row, OrderItem):
            order = row.order
        elif isinstance(row, Wallet) and row.item is not None:
            order = row.item.order
        if order is not None:
            orders[id(order)] = order
    for order in orders.values():
        order.summarize_items()


class ColumnOverflow(sa.exc.SQLAlchemyError):
    """A value its column cannot hold: text wider than its width, a number out of range.

    PostgreSQL refuses such a value while SQLite keeps it whole, so every flush checks
    first (:func:`_refuse_overflowing_values`) and the answer is the same on both: this
    error, which code handling database errors takes as it would PostgreSQL's. The
    message names the table, the column and its limit, never the value (it may be a
    customer's).
    """

    def __init__(self, table: str, column: str, limit: str) -> None:
        super().__init__(f"{table}.{column}: {limit}")
        self.table = table
        self.column = column


# An integer column's range on PostgreSQL (SQLite's INTEGER holds 64 bits whatever the
# declared type); Money is a BIGINT of micro-units.
INTEGER_MAX = 2**31 - 1
"""The largest value of an ``INTEGER`` column (``Mapped[int]``), such as a quantity."""
_INTEGER_LIMITS: tuple[tuple[type[sa.types.TypeEngine[Any]], int, str], ...] = (
    (sa.BigInteger, 2**63 - 1, "outside a 64-bit integer"),
    (sa.SmallInteger, 2**15 - 1, "outside a 16-bit integer"),
    (sa.Integer, INTEGER_MAX, "outside a 32-bit integer"),
)
_Check = Callable[[Any], str | None]


def _width_check(width: int) -> _Check:
    limit = f"longer than {width} characters"
    return lambda value: limit if isinstance(value, str) and len(value) > width else None


def _range_check(largest: int | Decimal, limit: str) -> _Check:
    bound = Decimal(largest)

    def check(value: Any) -> str | None:
        if isinstance(value, int | Decimal) and not isinstance(value, bool):
            return limit if abs(Decimal(value)) > bound else None
        return None

    return check


@functools.cache
def _column_checks(mapper: sa.orm.Mapper[Any]) -> tuple[tuple[str, str, _Check], ...]:
    """``(attribute, column, check)`` for each column of ``mapper`` with a limit to keep."""
    checks: list[tuple[str, str, _Check]] = []
    for prop in mapper.column_attrs:
        for column in prop.columns:
            kind = column.type
            if isinstance(kind, Money):
                checks.append((prop.key, column.name, _range_check(MONEY_MAX, "out of range")))
            elif isinstance(kind, sa.String) and kind.length is not None:
                checks.append((prop.key, column.name, _width_check(kind.length)))
            else:
                for integer, largest, limit in _INTEGER_LIMITS:
                    if isinstance(kind, integer):
                        checks.append((prop.key, column.name, _range_check(largest, limit)))
                        break
    return tuple(checks)


def _refuse_overflowing_values(session: Session, flush_context: Any, instances: Any) -> None:
    """Raise :class:`ColumnOverflow` before a row is written that a column cannot hold."""
    for row in (*session.new, *session.dirty):
        state = sa.inspect(row)
        for key, column, check in _column_checks(state.mapper):
            # The state's dict, not getattr: an attribute not loaded is not being written.
            limit = check(state.dict.get(key))
            if limit is not None:
                raise ColumnOverflow(state.mapper.local_table.name, column, limit)


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


# --- finance sign-ins ------------------------------------------------------------------


class FinanceSession(Base):
    """A finance user's sign-in, checked at every request to the finance pages.

    The browser's cookie holds a random token; the row is found by its SHA-256 (``id``),
    so the table alone cannot be replayed as cookies. A sign-in ends at ``expires_at``
    (an absolute lifetime), after an idle time without requests (``last_seen_at``,
    touched at most once a minute), when revoked (sign-out, ``otacm finance
    sign-out-all``), or when the user's password hash in the settings no longer has the
    ``password_fingerprint`` (a SHA-256 of the hash) it was signed in with.
    """

    __tablename__ = "finance_session"
    __table_args__ = (sa.Index(None, "user_name"), sa.Index(None, "expires_at"))

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    user_name: Mapped[str] = mapped_column(ACTOR)
    password_fingerprint: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class SignInAttempt(Base):
    """One sign-in attempt at the finance pages: the throttle counts the failed ones.

    ``user_name`` is the name typed in (known or not, cut to the column's width), so
    the throttle treats an unknown name as it treats a user's; ``address`` is the
    client's address as the app sees it. Rows older than the throttle's window are
    deleted at the next attempt.
    """

    __tablename__ = "sign_in_attempt"
    __table_args__ = (
        sa.Index(None, "user_name", "at"),
        sa.Index(None, "address", "at"),
        sa.Index(None, "at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_name: Mapped[str] = mapped_column(ACTOR)
    address: Mapped[str] = mapped_column(sa.String(100))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    ok: Mapped[bool]


# --- personal data ---------------------------------------------------------------------


class ErasureKind(StrEnum):
    """What an erasure of personal data answered."""

    RETENTION = "retention"
    """The scheduled erasure of what is past its retention (``OTACM_PERSONAL_DATA_DAYS``)."""
    EMAIL = "email"
    """A data subject's request, naming their e-mail address."""
    REFERENCE = "reference"
    """A data subject's request, naming an order by its reference or orderId."""


class PrivacyErasure(Base):
    """One erasure of customers' names and e-mails: who, when, what selected, how much.

    ``selector`` never holds an e-mail address: for :attr:`ErasureKind.EMAIL` it is the
    SHA-256 of the address (trimmed, lower-cased), so a request can be shown handled by
    hashing the address again; for a reference, the reference as given; for the
    retention, the cutoff date. ``counts`` is the rows changed per table.
    """

    __tablename__ = "privacy_erasure"
    __table_args__ = (sa.Index(None, "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    kind: Mapped[ErasureKind] = mapped_column(_enum(ErasureKind, "kind"))
    actor: Mapped[str] = mapped_column(ACTOR)
    selector: Mapped[str] = mapped_column(REFERENCE)
    # None when the erasure covered every connection.
    connection_id: Mapped[int | None] = mapped_column(sa.ForeignKey("venue_connection.id"))
    counts: Mapped[dict[str, int]] = mapped_column(sa.JSON)


def request_visit_date(request: Mapping[str, Any] | None) -> dt.date | None:
    """The latest visit date an order request names: its lines' and scheduled components'.

    Dates that do not read as ``YYYY-MM-DD`` are passed over (a stored request was
    checked when it came, but this also reads whatever an older release stored).

    Args:
        request: an order request as stored (camelCase wire JSON), or ``None``.
    """
    if not isinstance(request, Mapping):
        return None
    found: list[dt.date] = []
    items = request.get("items")
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, Mapping):
            continue
        dates = [item.get("visitDate")]
        wallet = item.get("wallet")
        schedule = wallet.get("componentSchedule") if isinstance(wallet, Mapping) else None
        for entry in schedule if isinstance(schedule, list) else ():
            if isinstance(entry, Mapping):
                dates.append(entry.get("visitDate"))
        for text in dates:
            if isinstance(text, str):
                try:
                    found.append(dt.date.fromisoformat(text))
                except ValueError:
                    continue
    return max(found, default=None)


def _keep_erased_orders_erased(session: Session, flush_context: Any, instances: Any) -> None:
    """Store no name or e-mail of an order whose personal data was erased.

    The venue keeps its orders' names and e-mails, and hands them back with every
    getOrder (the watchdog re-reads Draft and Error orders for ever): without this, an
    erased order would hold them again at its next fetch.
    """
    for row in (*session.new, *session.dirty):
        if isinstance(row, VenueOrder):
            if row.personal_data_erased_at is not None:
                row.sell_to_name = row.sell_to_email = None
        elif isinstance(row, OrderItem):
            if row.order is not None and row.order.personal_data_erased_at is not None:
                row.sell_to_name = row.sell_to_email = None
        elif isinstance(row, Wallet):
            order = row.item.order if row.item is not None else None
            if order is not None and order.personal_data_erased_at is not None:
                row.name = None


FLUSH_HOOKS = (_summarize_orders, _refuse_overflowing_values, _keep_erased_orders_erased)
"""What runs before every flush of otacm's sessions, in this order."""


def register_flush_hooks(sessions: sessionmaker[Session]) -> None:
    """Make every session of ``sessions`` keep the rules of :data:`FLUSH_HOOKS` whoever
    writes through it: orders' totals, values their columns can hold, erased orders
    without names or e-mails.

    On the factory, not on SQLAlchemy's ``Session`` class: a session made elsewhere (a
    library's, a test's) is left alone, and importing this module changes nothing.
    :func:`storage.engine.make_sessions` calls it for every factory it makes.
    """
    for hook in FLUSH_HOOKS:
        sa.event.listen(sessions, "before_flush", hook)
