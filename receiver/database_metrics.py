"""The gauges the receiver reads from the database at each scrape (:class:`DatabaseCollector`).

Computed at scrape time by a custom collector, so every process reports the same values
(:mod:`receiver.metrics` serves them with the per-process counters):

- the inbox: ``otacm_inbox_depth{connection,state}`` for the states that are work
  (pending, leased, dead; ``done`` rows are history, and counting them would scan the
  table), ``otacm_inbox_oldest_pending_age_seconds{connection}``,
  ``otacm_dead_letters{connection,queue="inbox"|"outbox"}``;
- delivery health, over the orders that first settled (Draft, Issued, Error or
  Cancelled) within the last :data:`DELIVERY_WINDOW` (24 h):
  ``otacm_orders_settled_recent{connection,learned_from}``, by the source of the
  status change that first showed the order settled (``learned_from!="webhook"`` is
  "settled with no webhook"), and the summary
  ``otacm_settlement_lag_seconds{connection,quantile="0.5"|"0.95"}`` (with ``_count``
  and ``_sum``), from the venue settling an order to otacm knowing it; orders for
  which the venue left no settlement time are counted in
  ``otacm_settlement_lag_untimed{connection}`` instead (see :func:`settlement_lag`);
- ``otacm_orders_stuck{connection}`` (in flight past ``stuck_after``, as
  :func:`orders.mirror.stuck_condition` defines it) and
  ``otacm_orders_in_error{connection}`` (Error and not removed at the venue);
- ``otacm_job_last_success_timestamp_seconds{job_name}``,
  ``otacm_job_failures{job_name}`` (consecutive) and
  ``otacm_job_interval_seconds{job_name}`` of the scheduled jobs, from the ``job_run``
  table (``job_name``, not ``job``: Prometheus gives every scraped series a ``job``
  label of its own, the scrape job's, and would rename ours ``exported_job``);
- ``otacm_recon_exceptions_open{connection,category}``: reconciliation exceptions
  waiting for finance (state open, reopened ones included), a series per exception
  category;
- the webhook subscription, as the scheduled check last found it
  (``subscription_check``): ``otacm_subscription_usable{connection}`` and
  ``otacm_subscription_recreated_timestamp_seconds{connection}``;
- ``otacm_database_up`` (0 when the queries failed; the other gauges are then absent,
  not zero).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, aliased, sessionmaker

from orders.mirror import stuck_condition
from receiver.errors import DATABASE_UNAVAILABLE, describe_database_error
from reconciler.categories import Category
from storage.models import (
    ChangeSource,
    Inbox,
    InboxState,
    OrderItem,
    Outbox,
    OutboxState,
    StatusChange,
    VenueConnection,
    VenueOrder,
    Wallet,
)
from storage.records import ExceptionState, JobRun, ReconException, SubscriptionCheck
from storage.types import utcnow
from venue.models import OrderStatus

logger = logging.getLogger(__name__)

DEPTH_STATES = (InboxState.PENDING, InboxState.LEASED, InboxState.DEAD)
"""The inbox states ``otacm_inbox_depth`` reports: rows that are still someone's work."""

SETTLED_STATUSES = (
    OrderStatus.DRAFT,
    OrderStatus.ISSUED,
    OrderStatus.ERROR,
    OrderStatus.CANCELLED,
)
"""The statuses in which an order counts as settled for delivery health. Cancelled too:
an order first seen Cancelled settled (and was cancelled) while otacm was not looking."""

DELIVERY_WINDOW = dt.timedelta(hours=24)
"""Delivery health covers the orders that first settled within this window."""

WINDOW_MAX_CHANGES = 200_000
"""The newest status changes the window is read from (see :func:`first_settlements`)."""

LAG_QUANTILES = (0.5, 0.95)
LAG_METRIC = "otacm_settlement_lag_seconds"


class DatabaseCollector(Collector):
    """Gauges read from the database at each scrape: the inbox, delivery health, jobs,
    open reconciliation exceptions and the webhook subscriptions.

    Every query is bounded so that a scrape stays cheap as the tables grow: the inbox's
    by the rows that are still work, delivery health by a recent window (see
    :func:`first_settlements`), stuck and Error orders by the ``(connection_id, status)``
    index, open exceptions by the ``(connection_id, state)`` index, and the jobs and
    subscription checks by their handful of rows.

    Args:
        read_sessions: a read-only session factory (it never takes SQLite's write lock).
        connection_names: the configured connections, reported (as zeros) even when
            they have no rows, so that alerts see a series rather than its absence.
        stuck_after: how long an order may stay in flight before it counts as stuck
            (the setting ``stuck_after``).
        clock: the current time, aware UTC.
    """

    def __init__(
        self,
        read_sessions: sessionmaker[Session],
        connection_names: Sequence[str],
        *,
        stuck_after: dt.timedelta,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._read_sessions = read_sessions
        self._connection_names = tuple(connection_names)
        self._stuck_after = stuck_after
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        """The families this collector yields, without samples (and without a query)."""
        return [*_families().values(), _lag_family()]

    def collect(self) -> Iterable[Metric]:
        """Query the database and yield the gauges; ``otacm_database_up`` 0 if it fails."""
        families = _families()
        lag = _lag_family()
        up = families["up"]
        now = self._clock()
        try:
            with self._read_sessions.begin() as session:
                inbox = _read_inbox(session)
                delivery = _read_delivery(session, now=now, stuck_after=self._stuck_after)
                jobs = _read_jobs(session)
                exceptions = _read_open_exceptions(session)
                subscriptions = _read_subscriptions(session)
        except DATABASE_UNAVAILABLE as exc:
            # The database's trouble, not a bug: report it as a value, not a failed scrape.
            logger.warning("metrics: cannot read the database: %s", describe_database_error(exc))
            up.add_metric([], 0)
            yield up
            return
        names = sorted(
            {
                *self._connection_names,
                *inbox.connections(),
                *delivery.connections(),
                *(name for name, _ in exceptions),
            }
        )
        for name in names:
            _add_inbox(families, name, inbox, now)
            _add_delivery(families, lag, name, delivery)
            for category in EXCEPTION_CATEGORIES:
                families["exceptions_open"].add_metric(
                    [name, category.value], exceptions.get((name, category.value), 0)
                )
        for job in jobs:
            if job.last_success is not None:
                families["job_success"].add_metric([job.name], job.last_success.timestamp())
            families["job_failures"].add_metric([job.name], job.failures)
            families["job_interval"].add_metric([job.name], job.interval)
        # Only the configured connections: a check row left by a connection taken out of
        # the settings is no one's subscription any more.
        for name in self._connection_names:
            check = subscriptions.get(name)
            if check is None:
                continue
            families["subscription_usable"].add_metric([name], 1 if check.usable else 0)
            if check.recreated_at is not None:
                families["subscription_recreated"].add_metric(
                    [name], check.recreated_at.timestamp()
                )
        up.add_metric([], 1)
        yield from families.values()
        yield lag


# --- the inbox ------------------------------------------------------------------------


@dataclass
class _Inbox:
    depth: dict[tuple[str, InboxState], int]
    oldest: dict[str, dt.datetime]
    outbox_dead: dict[str, int]

    def connections(self) -> set[str]:
        return {*(name for name, _ in self.depth), *self.outbox_dead}


def _read_inbox(session: Session) -> _Inbox:
    # Two grouped queries over the rows that are work, each served by the
    # (state, next_attempt_at) index: the scrape stays cheap as done rows pile up.
    inbox = (
        sa.select(
            VenueConnection.name,
            Inbox.state,
            sa.func.count(),
            sa.func.min(Inbox.received_at),
        )
        .select_from(Inbox)
        .join(VenueConnection, VenueConnection.id == Inbox.connection_id)
        .where(Inbox.state.in_(DEPTH_STATES))
        .group_by(VenueConnection.name, Inbox.state)
    )
    outbox = (
        sa.select(VenueConnection.name, sa.func.count())
        .select_from(Outbox)
        .join(VenueConnection, VenueConnection.id == Outbox.connection_id)
        .where(Outbox.state == OutboxState.DEAD)
        .group_by(VenueConnection.name)
    )
    depth: dict[tuple[str, InboxState], int] = {}
    oldest: dict[str, dt.datetime] = {}
    for name, state, count, first_received in session.execute(inbox):
        depth[(name, state)] = count
        if state == InboxState.PENDING and first_received is not None:
            oldest[name] = first_received
    outbox_dead = {name: count for name, count in session.execute(outbox)}
    return _Inbox(depth, oldest, outbox_dead)


def _add_inbox(
    families: dict[str, GaugeMetricFamily], name: str, inbox: _Inbox, now: dt.datetime
) -> None:
    for state in DEPTH_STATES:
        families["depth"].add_metric([name, state.value], inbox.depth.get((name, state), 0))
    received_at = inbox.oldest.get(name)
    age = max((now - received_at).total_seconds(), 0.0) if received_at else 0.0
    families["age"].add_metric([name], age)
    families["dead"].add_metric([name, "inbox"], inbox.depth.get((name, InboxState.DEAD), 0))
    families["dead"].add_metric([name, "outbox"], inbox.outbox_dead.get(name, 0))


# --- delivery health ------------------------------------------------------------------


def first_settlements(since: dt.datetime, *, max_changes: int = WINDOW_MAX_CHANGES) -> sa.Subquery:
    """Each order's first settled status change, for orders that first settled since ``since``.

    Settled means Draft, Issued, Error or Cancelled (:data:`SETTLED_STATUSES`); the
    first is the lowest id (the order in which otacm wrote them). An order re-settled
    after a replaceOrder counts once, at its first settlement: one settled before
    ``since`` is left out even when it settled again within the window.

    The window is read from the newest ``max_changes`` status changes only (a range of
    the primary key), so the query's cost is bounded however large the table grows,
    with no index on ``observed_at``; the cut only bites when more status changes than
    that were written within the window (some 50,000 orders a day, at four changes
    each). Whether an order settled *before* the window is asked per candidate through
    the ``(venue_order_id, observed_at)`` index. Measured with a million status changes
    (250,000 orders over 60 days): the delivery-health queries of a scrape take about
    0.2 s on SQLite and on PostgreSQL, most of it reading that range.

    Args:
        since: the window's start (aware).
        max_changes: how many of the newest status changes to read the window from.

    Returns:
        A subquery with ``id`` (the status change), ``venue_order_id``, ``observed_at``
        (when otacm learned of the settlement) and ``source`` (from where).
    """
    newest = sa.select(sa.func.max(StatusChange.id)).scalar_subquery()
    earlier = aliased(StatusChange, name="earlier")
    settled_before = sa.exists().where(
        earlier.venue_order_id == StatusChange.venue_order_id,
        earlier.status.in_(SETTLED_STATUSES),
        earlier.id < StatusChange.id,
    )
    # No GROUP BY: a settled change with no settled change before it is its order's
    # first, and grouping would tempt SQLite to walk a whole index in group order.
    return (
        sa.select(
            StatusChange.id,
            StatusChange.venue_order_id,
            StatusChange.observed_at,
            StatusChange.source,
        )
        .where(
            StatusChange.id > sa.func.coalesce(newest, 0) - max_changes,
            StatusChange.observed_at >= since,
            StatusChange.status.in_(SETTLED_STATUSES),
            ~settled_before,
        )
        .subquery("first_settlements")
    )


def settlement_lag(
    known_at: dt.datetime, notified_at: dt.datetime | None, issued_at: dt.datetime | None
) -> float | None:
    """Seconds from the venue settling an order to otacm knowing it, or ``None``.

    The venue gives no settlement time as such. Two things it does give are no earlier
    than the settlement: the ``timestamp`` of the webhook that announced it (the earliest
    the worker applied, ``VenueOrder.first_notified_at``) and the ``issuedAt`` of the
    wallets it minted. The earlier of them stands for the settlement. An order with neither
    (settled with no webhook and no wallet: an Error or Cancelled order whose webhook
    never came) has no lag. A negative difference (clocks apart, or evidence of a later
    re-settlement) counts as 0.

    Args:
        known_at: the ``observed_at`` of the order's first settled status change.
        notified_at: the earliest webhook timestamp for the order, if any.
        issued_at: the earliest ``issuedAt`` of its wallets, if any.
    """
    evidence = [moment for moment in (notified_at, issued_at) if moment is not None]
    if not evidence:
        return None
    return max((known_at - min(evidence)).total_seconds(), 0.0)


def quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolated linearly between the closest ranks.

    The same definition as PostgreSQL's ``percentile_cont``; ``nan`` for no values.
    """
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


@dataclass
class _Delivery:
    settled: dict[tuple[str, ChangeSource], int] = field(default_factory=dict)
    lags: dict[str, list[float]] = field(default_factory=dict)
    untimed: dict[str, int] = field(default_factory=dict)
    stuck: dict[str, int] = field(default_factory=dict)
    in_error: dict[str, int] = field(default_factory=dict)

    def connections(self) -> set[str]:
        return {
            *(name for name, _ in self.settled),
            *self.lags,
            *self.untimed,
            *self.stuck,
            *self.in_error,
        }


def _read_delivery(session: Session, *, now: dt.datetime, stuck_after: dt.timedelta) -> _Delivery:
    delivery = _Delivery()
    first = first_settlements(now - DELIVERY_WINDOW)
    # The settlement's evidence, per order: its first webhook's time, kept on the order,
    # and its wallets' earliest issue (an index search of the items' and wallets' keys).
    issued = (
        sa.select(sa.func.min(Wallet.issued_at))
        .join(OrderItem, OrderItem.id == Wallet.order_item_id)
        .where(OrderItem.venue_order_id == VenueOrder.id)
        .scalar_subquery()
    )
    # One row per order of the window (at most WINDOW_MAX_CHANGES of them; a few
    # thousand a day in practice): the counts and the lags come from one read of it.
    settlements = (
        sa.select(
            VenueConnection.name,
            first.c.source,
            first.c.observed_at,
            VenueOrder.first_notified_at,
            issued,
        )
        .select_from(first)
        .join(VenueOrder, VenueOrder.id == first.c.venue_order_id)
        .join(VenueConnection, VenueConnection.id == VenueOrder.connection_id)
    )
    for name, source, known_at, notified_at, issued_at in session.execute(settlements):
        key = (name, source)
        delivery.settled[key] = delivery.settled.get(key, 0) + 1
        lag = settlement_lag(known_at, notified_at, issued_at)
        if lag is None:
            delivery.untimed[name] = delivery.untimed.get(name, 0) + 1
        else:
            delivery.lags.setdefault(name, []).append(lag)

    # In-flight and Error orders are few. Counted per connection, so that each count is
    # a search of the (connection_id, status) index: grouped over the whole table, the
    # planners scan it.
    def count(condition: sa.ColumnElement[bool]) -> sa.ScalarSelect[int]:
        return (
            sa.select(sa.func.count())
            .select_from(VenueOrder)
            .where(VenueOrder.connection_id == VenueConnection.id, condition)
            .scalar_subquery()
        )

    in_error = sa.and_(VenueOrder.status == OrderStatus.ERROR, VenueOrder.removed_at.is_(None))
    orders = sa.select(
        VenueConnection.name, count(stuck_condition(now - stuck_after)), count(in_error)
    )
    for name, stuck, error in session.execute(orders):
        delivery.stuck[name] = stuck
        delivery.in_error[name] = error
    return delivery


def _add_delivery(
    families: dict[str, GaugeMetricFamily], lag: Metric, name: str, delivery: _Delivery
) -> None:
    for source in ChangeSource:
        families["settled"].add_metric(
            [name, source.value], delivery.settled.get((name, source), 0)
        )
    lags = sorted(delivery.lags.get(name, []))
    for q in LAG_QUANTILES:
        lag.add_sample(LAG_METRIC, {"connection": name, "quantile": str(q)}, quantile(lags, q))
    lag.add_sample(f"{LAG_METRIC}_count", {"connection": name}, len(lags))
    lag.add_sample(f"{LAG_METRIC}_sum", {"connection": name}, math.fsum(lags))
    families["untimed"].add_metric([name], delivery.untimed.get(name, 0))
    families["stuck"].add_metric([name], delivery.stuck.get(name, 0))
    families["in_error"].add_metric([name], delivery.in_error.get(name, 0))


# --- scheduled jobs -------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    name: str
    last_success: dt.datetime | None
    failures: int
    interval: float


def _read_jobs(session: Session) -> list[_Job]:
    """Each scheduled job's last success, consecutive failures and interval, from its run
    record.

    A job that never succeeded has no ``otacm_job_last_success_timestamp_seconds``
    sample; ``otacm_job_failures`` says why. The interval is the one its last run was
    started with: every start sets ``next_due_at`` one interval after ``started_at``
    (:func:`heartbeat.coordination.run_job`), so an alert can measure silence in runs
    missed, whatever the settings say on the node that scrapes.
    """
    query = sa.select(
        JobRun.name, JobRun.last_success_at, JobRun.failures, JobRun.started_at, JobRun.next_due_at
    )
    return [
        _Job(name, last_success_at, failures, (next_due_at - started_at).total_seconds())
        for name, last_success_at, failures, started_at, next_due_at in session.execute(
            query.order_by(JobRun.name)
        )
    ]


# --- reconciliation exceptions and subscriptions ------------------------------------------

EXCEPTION_CATEGORIES = tuple(category for category in Category if category.is_exception)
"""The categories ``otacm_recon_exceptions_open`` has a series for (zero when none)."""


def _read_open_exceptions(session: Session) -> dict[tuple[str, str], int]:
    """Open reconciliation exceptions by connection name and category.

    One query per connection, each a search of the ``(connection_id, state)`` index, and
    the rows (the open exceptions: finance's backlog, not history) counted here. Grouped
    in SQL, SQLite's planner prefers the unique ``(connection_id, category, ...)`` index,
    which reads every exception of the connection, closed ones too (measured with
    200,000 exceptions over two connections, 2,000 of them open: 0.25 s a scrape that
    way, 0.05 s this way; PostgreSQL 0.02 s); grouped over every connection at once, the
    planners may scan the table.
    """
    counts: dict[tuple[str, str], int] = {}
    connections = session.execute(sa.select(VenueConnection.id, VenueConnection.name)).all()
    for connection_id, name in connections:
        query = sa.select(ReconException.category).where(
            ReconException.connection_id == connection_id,
            ReconException.state == ExceptionState.OPEN,
        )
        for category in session.scalars(query):
            counts[(name, category)] = counts.get((name, category), 0) + 1
    return counts


@dataclass(frozen=True)
class _Subscription:
    usable: bool
    recreated_at: dt.datetime | None


def _read_subscriptions(session: Session) -> dict[str, _Subscription]:
    """What the last subscription check found, by connection name (a row per connection)."""
    query = sa.select(
        VenueConnection.name, SubscriptionCheck.usable, SubscriptionCheck.recreated_at
    ).join(VenueConnection, VenueConnection.id == SubscriptionCheck.connection_id)
    return {
        name: _Subscription(usable, recreated_at)
        for name, usable, recreated_at in session.execute(query)
    }


def _families() -> dict[str, GaugeMetricFamily]:
    return {
        "depth": GaugeMetricFamily(
            "otacm_inbox_depth",
            "Inbox rows that are still work, by venue connection and state.",
            labels=["connection", "state"],
        ),
        "age": GaugeMetricFamily(
            "otacm_inbox_oldest_pending_age_seconds",
            "Seconds since the oldest pending inbox row was received (0 when none).",
            labels=["connection"],
        ),
        "dead": GaugeMetricFamily(
            "otacm_dead_letters",
            "Rows given up after their last attempt, waiting for a person, by queue.",
            labels=["connection", "queue"],
        ),
        "settled": GaugeMetricFamily(
            "otacm_orders_settled_recent",
            "Orders that first settled in the last 24 h, by where otacm learned it "
            "(learned_from != webhook: settled with no webhook).",
            labels=["connection", "learned_from"],
        ),
        "untimed": GaugeMetricFamily(
            "otacm_settlement_lag_untimed",
            "Orders settled in the last 24 h with no settlement time from the venue "
            "(no webhook, no wallet), left out of otacm_settlement_lag_seconds.",
            labels=["connection"],
        ),
        "stuck": GaugeMetricFamily(
            "otacm_orders_stuck",
            "Orders in flight at the venue for longer than stuck_after.",
            labels=["connection"],
        ),
        "in_error": GaugeMetricFamily(
            "otacm_orders_in_error",
            "Orders in Error at the venue (not deleted), waiting for a replace or a delete.",
            labels=["connection"],
        ),
        "job_success": GaugeMetricFamily(
            "otacm_job_last_success_timestamp_seconds",
            "When each scheduled job last finished without an error (Unix time).",
            labels=["job_name"],
        ),
        "job_failures": GaugeMetricFamily(
            "otacm_job_failures",
            "Consecutive failed runs of each scheduled job (0 after a success).",
            labels=["job_name"],
        ),
        "job_interval": GaugeMetricFamily(
            "otacm_job_interval_seconds",
            "Seconds between runs of each scheduled job, as its last run was scheduled.",
            labels=["job_name"],
        ),
        "exceptions_open": GaugeMetricFamily(
            "otacm_recon_exceptions_open",
            "Reconciliation exceptions waiting for finance (open or reopened), by category.",
            labels=["connection", "category"],
        ),
        "subscription_usable": GaugeMetricFamily(
            "otacm_subscription_usable",
            "1 when the last subscription check left a usable webhook subscription at the "
            "connection (found or made), 0 when it could not (see the check's log).",
            labels=["connection"],
        ),
        "subscription_recreated": GaugeMetricFamily(
            "otacm_subscription_recreated_timestamp_seconds",
            "When the subscription check last had to make a subscription because none was "
            "usable (missing or inactive: webhooks were not arriving), Unix time.",
            labels=["connection"],
        ),
        "up": GaugeMetricFamily(
            "otacm_database_up",
            "1 when the last scrape could read the database, else 0.",
        ),
    }


def _lag_family() -> Metric:
    return Metric(
        LAG_METRIC,
        "Seconds from the venue settling an order to otacm knowing it, over the orders "
        "that first settled in the last 24 h (count and sum over the same orders).",
        "summary",
    )
