"""The tables of what otacm records of its own work.

- heartbeat: :class:`FeedCursor` and :class:`FeedMark` (the change feed's high-water
  mark and its history), :class:`JobRun` (each scheduled job's last run and when it is
  next due), :class:`SubscriptionCheck` (the last check of each webhook subscription);
- reconcile and report: :class:`ReconRun`, :class:`ReconTotal`, :class:`ReconException`
  and :class:`ExceptionEvent`;
- the finance pages: :class:`FinanceSession` and :class:`SignInAttempt`;
- personal data: :class:`PrivacyErasure`, each erasure of customers' names and e-mails;
- the shop's change feed: :class:`ChangeCounter` (:mod:`storage.changes`);
- events to the shop: :class:`ShopEvent`, each event recorded with the mirror change that
  caused it, and :class:`ShopDelivery`, its delivery to each endpoint configured for its
  connection (:mod:`orders.shop_events`, :mod:`orders.shop_delivery`).
- retention: :class:`PruneMark`, how far the pruning of old rows has gone.

They share :class:`storage.models.Base` and its conventions.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from storage.models import (
    ACTOR,
    GUID,
    IN_FLIGHT,
    REFERENCE,
    VENUE_CURRENCY,
    Base,
    BigId,
    enum_column,
)
from storage.types import Money, UTCDateTime, utcnow


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
    """The run record of the scheduled job ``name`` (or of one unit of a split job, such as
    one partner's change feed), shared by every scheduler process.

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

    name: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    owner: Mapped[str] = mapped_column(ACTOR)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_success_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    next_due_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    runs: Mapped[int] = mapped_column(default=0)
    failures: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(sa.Text)


class MetricFigures(Base):
    """Figures of ``/metrics`` too costly to compute at each scrape, as last computed.

    The scheduled job ``metric_figures`` (:func:`heartbeat.metric_figures.refresh_figures`)
    rewrites the row ``name`` every ``OTACM_METRIC_FIGURES_INTERVAL`` seconds; a scrape
    reads it and reports its age (``otacm_metric_figures_age_seconds``). ``figures`` is
    the JSON of :class:`heartbeat.metric_figures.Figures`.
    """

    __tablename__ = "metric_figures"

    name: Mapped[str] = mapped_column(sa.String(100), primary_key=True)
    computed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    figures: Mapped[dict[str, Any]] = mapped_column(sa.JSON)


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


class ReconRun(Base):
    """One comparison of the ledger with the mirror over a period."""

    __tablename__ = "recon_run"
    # started_at, id: the runs list pages newest first (keyset) over every connection.
    __table_args__ = (
        sa.Index(None, "connection_id", "started_at"),
        sa.Index(None, "started_at", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    connection_id: Mapped[int] = mapped_column(sa.ForeignKey("venue_connection.id"))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    period_from: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    period_to: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    trigger: Mapped[ReconTrigger] = mapped_column(enum_column(ReconTrigger, "trigger"))
    state: Mapped[ReconRunState] = mapped_column(
        enum_column(ReconRunState, "state"), default=ReconRunState.RUNNING
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
        # Also finance's backlog by category (/metrics), read from the index alone.
        sa.Index(None, "connection_id", "state", "category"),
        sa.Index(None, "connection_id", "subject_at"),
        # The exceptions on an order: pruning keeps its story whole while one is not closed.
        sa.Index(None, "venue_order_id"),
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
        enum_column(ExceptionState, "state"), default=ExceptionState.OPEN
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
    # recon_run_id, recon_exception_id, action: a run's exceptions in order of their id,
    # read page by page (keyset) and counted from the index alone, however many events
    # other runs wrote.
    __table_args__ = (
        sa.Index(None, "recon_exception_id", "at"),
        sa.Index(None, "recon_run_id", "recon_exception_id", "action"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    recon_exception_id: Mapped[int] = mapped_column(
        sa.ForeignKey("recon_exception.id", ondelete="CASCADE")
    )
    recon_run_id: Mapped[int | None] = mapped_column(sa.ForeignKey("recon_run.id"))
    action: Mapped[ExceptionAction] = mapped_column(enum_column(ExceptionAction, "action"))
    actor: Mapped[str | None] = mapped_column(ACTOR)
    note: Mapped[str | None] = mapped_column(sa.Text)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)

    exception: Mapped[ReconException] = relationship(back_populates="events")


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
    kind: Mapped[ErasureKind] = mapped_column(enum_column(ErasureKind, "kind"))
    actor: Mapped[str] = mapped_column(ACTOR)
    selector: Mapped[str] = mapped_column(REFERENCE)
    # None when the erasure covered every connection.
    connection_id: Mapped[int | None] = mapped_column(sa.ForeignKey("venue_connection.id"))
    counts: Mapped[dict[str, int]] = mapped_column(sa.JSON)


class ChangeCounter(Base):
    """A counter numbering commits in commit order: the row ``mirror`` numbers the commits
    that change what the shop reads of orders (:mod:`storage.changes`)."""

    __tablename__ = "change_counter"

    name: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    value: Mapped[int] = mapped_column(sa.BigInteger)


class ShopEventType(StrEnum):
    """What an event tells the shop about an order."""

    ISSUED = "order.issued"
    DRAFT = "order.draft"
    ERROR = "order.error"
    CANCELLED = "order.cancelled"
    REMOVED = "order.removed"
    SUBMISSION_FAILED = "order.submission_failed"


class DeliveryState(StrEnum):
    """Where an event's delivery to one endpoint is: waiting, being sent, received, given up."""

    PENDING = "pending"
    LEASED = "leased"
    DELIVERED = "delivered"
    DEAD = "dead"


SHOP_ENDPOINT = sa.String(64)
"""A shop endpoint's name, as the settings give it."""


class ShopEvent(Base):
    """An event for the shop, recorded in the transaction of the change that caused it.

    ``event_id`` (``msg_…``) is the Standard Webhooks ``webhook-id``: the same on every
    attempt, so the shop can drop a repeat. ``order_seq`` numbers an order's events 1, 2,
    … (unique per order): its deliveries go out in that order. A sale the venue refused
    has no order (``venue_order_id`` empty, ``order_seq`` 1). ``payload`` is the order as
    the read API returns it (``ShopOrder``, by alias), as it stood when recorded; for a
    refused sale, its reference, partner and the venue's code and message.
    """

    __tablename__ = "shop_event"
    __table_args__ = (
        sa.UniqueConstraint("venue_order_id", "order_seq"),
        sa.Index(None, "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    connection_id: Mapped[int] = mapped_column(sa.ForeignKey("venue_connection.id"))
    # Events go with their order when the mirror erases it (another partner's order).
    venue_order_id: Mapped[int | None] = mapped_column(
        BigId, sa.ForeignKey("venue_order.id", ondelete="CASCADE")
    )
    order_seq: Mapped[int]
    type: Mapped[ShopEventType] = mapped_column(enum_column(ShopEventType, "type", length=32))
    payload: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)

    deliveries: Mapped[list[ShopDelivery]] = relationship(
        back_populates="event", cascade="all, delete-orphan", passive_deletes=True
    )


class ShopDelivery(Base):
    """One event's delivery to one shop endpoint: a leased queue row.

    ``pending`` until ``next_attempt_at``, ``leased`` to one sender thread until
    ``lease_expires_at`` (a claim also moves ``next_attempt_at`` to that time, so what is
    due is one range of the in-flight index whatever the state), then ``delivered`` or
    ``dead``. ``venue_order_id`` and ``order_seq`` repeat the event's, so that a claim
    can pass over a delivery while an earlier one of its order to the same endpoint is
    in flight. ``retry_from`` starts the retry horizon: when recorded, or replayed.
    ``last_status`` and ``last_error`` describe the last attempt (the HTTP status; the
    failure, bounded, never a secret or the body).
    """

    __tablename__ = "shop_delivery"
    __table_args__ = (
        sa.UniqueConstraint("shop_event_id", "endpoint"),
        sa.Index(
            "ix_shop_delivery_in_flight",
            "endpoint",
            "next_attempt_at",
            postgresql_where=IN_FLIGHT,
            sqlite_where=IN_FLIGHT,
        ),
        sa.Index(
            "ix_shop_delivery_in_flight_order",
            "endpoint",
            "venue_order_id",
            "order_seq",
            postgresql_where=IN_FLIGHT,
            sqlite_where=IN_FLIGHT,
        ),
        sa.Index(None, "state", "endpoint"),
        # What retention prunes, oldest first (heartbeat.shop_retention).
        sa.Index(None, "state", "delivered_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    shop_event_id: Mapped[int] = mapped_column(
        BigId, sa.ForeignKey("shop_event.id", ondelete="CASCADE")
    )
    connection_id: Mapped[int]
    endpoint: Mapped[str] = mapped_column(SHOP_ENDPOINT)
    venue_order_id: Mapped[int | None] = mapped_column(BigId)
    order_seq: Mapped[int]
    state: Mapped[DeliveryState] = mapped_column(
        enum_column(DeliveryState, "state"), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    retry_from: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(ACTOR)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_status: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(sa.String(300))
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    event: Mapped[ShopEvent] = relationship(back_populates="deliveries")


class ShopEndpointHold(Base):
    """Until when a shop endpoint asked, by ``Retry-After``, not to be sent to.

    Every sender of the endpoint (any process, and one started after the answer) reads it
    before it claims: the deliveries pending at the answer are moved past the hold too,
    but one recorded during it would otherwise go out early.
    """

    __tablename__ = "shop_endpoint_hold"

    endpoint: Mapped[str] = mapped_column(SHOP_ENDPOINT, primary_key=True)
    hold_until: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class PruneMark(Base):
    """How far the pruning of a table has gone (:mod:`heartbeat.retention`).

    ``name`` is the table's; ``reached_at`` and ``reached_id`` are the time and id of the
    last row the pruning looked at, in the order it walks them, so the next run goes on
    from there instead of walking again what it kept.
    """

    __tablename__ = "prune_mark"

    name: Mapped[str] = mapped_column(sa.String(100), primary_key=True)
    reached_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    reached_id: Mapped[int] = mapped_column(sa.BigInteger)
