"""The gauges the receiver reads from the database at each scrape (:class:`DatabaseCollector`).

Read at scrape time by a custom collector, so every process reports the same values
(:mod:`receiver.metrics` serves them with the per-process counters). A scrape issues
only cheap reads, whatever the history: indexed counts of the rows that are still work,
the handful of job and subscription rows, and the figures the scheduler computed
(:mod:`heartbeat.metric_figures`, every ``OTACM_METRIC_FIGURES_INTERVAL`` seconds):

- the inbox: ``otacm_inbox_depth{connection,state}`` for the states that are work
  (pending, leased, dead; ``done`` rows are history, and counting them would scan the
  table), ``otacm_inbox_oldest_pending_age_seconds{connection}``,
  ``otacm_dead_letters{connection,queue="inbox"|"outbox"}``;
- from the scheduler's figures: delivery health, over the orders that first settled
  (Draft, Issued, Error or Cancelled) within the last 24 h:
  ``otacm_orders_settled_recent{connection,learned_from}``, by the source of the
  status change that first showed the order settled (``learned_from!="webhook"`` is
  "settled with no webhook"), and the summary
  ``otacm_settlement_lag_seconds{connection,quantile="0.5"|"0.95"}`` (with ``_count``
  and ``_sum``), from the venue settling an order to otacm knowing it; orders for
  which the venue left no settlement time are counted in
  ``otacm_settlement_lag_untimed{connection}`` instead (see
  :func:`heartbeat.metric_figures.settlement_lag`); ``otacm_orders_stuck{connection}``
  (in flight past ``stuck_after``) and ``otacm_orders_in_error{connection}`` (Error
  and not removed at the venue); ``otacm_recon_exceptions_open{connection,category}``:
  reconciliation exceptions waiting for finance (state open, reopened ones included);
  and ``otacm_metric_figures_age_seconds``, how long ago they were computed (they
  are absent, and so is their age, until the job first ran);
- ``otacm_job_last_success_timestamp_seconds{job_name}``,
  ``otacm_job_failures{job_name}`` (consecutive) and
  ``otacm_job_interval_seconds{job_name}`` of the scheduled jobs, from the ``job_run``
  table (``job_name``, not ``job``: Prometheus gives every scraped series a ``job``
  label of its own, the scrape job's, and would rename ours ``exported_job``);
- the webhook subscription, as the scheduled check last found it
  (``subscription_check``): ``otacm_subscription_usable{connection}`` and
  ``otacm_subscription_recreated_timestamp_seconds{connection}``;
- the shop's deliveries that are still work (:mod:`orders.shop_delivery_metrics`):
  ``otacm_shop_deliveries{connection,endpoint,state}`` (pending, leased, dead) and
  ``otacm_shop_delivery_oldest_undelivered_age_seconds{connection,endpoint}``, for every
  configured endpoint of each connection (zeros when nothing waits);
- ``otacm_database_up`` (0 when the queries failed; the other gauges are then absent,
  not zero).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.metric_figures import (
    EXCEPTION_CATEGORIES,
    LAG_QUANTILES,
    ConnectionFigures,
    read_figures,
)
from orders.shop_delivery_metrics import BACKLOG_STATES, EndpointBacklog, read_backlog
from receiver.errors import DATABASE_UNAVAILABLE, describe_database_error
from storage.models import (
    ChangeSource,
    Inbox,
    InboxState,
    Outbox,
    OutboxState,
    VenueConnection,
)
from storage.records import JobRun, SubscriptionCheck
from storage.types import utcnow

logger = logging.getLogger(__name__)

DEPTH_STATES = (InboxState.PENDING, InboxState.LEASED, InboxState.DEAD)
"""The inbox states ``otacm_inbox_depth`` reports: rows that are still someone's work."""

LAG_METRIC = "otacm_settlement_lag_seconds"


class DatabaseCollector(Collector):
    """Gauges read from the database at each scrape: the inbox, the scheduler's figures
    (delivery health, stuck and Error orders, open exceptions), jobs and subscriptions.

    Every query is cheap however large the tables grow: the inbox's are bounded by the
    rows that are still work, the figures are one row, and the jobs and subscription
    checks a handful of rows.

    Args:
        read_sessions: a read-only session factory (it never takes SQLite's write lock).
        connection_names: the configured connections, reported (as zeros) even when
            they have no rows, so that alerts see a series rather than its absence.
        clock: the current time, aware UTC.
        shop_endpoints: per connection's name, the shop endpoints configured for it,
            reported (as zeros) likewise.
    """

    def __init__(
        self,
        read_sessions: sessionmaker[Session],
        connection_names: Sequence[str],
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        shop_endpoints: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self._read_sessions = read_sessions
        self._connection_names = tuple(connection_names)
        self._clock = clock
        self._shop_endpoints = {
            (name, endpoint)
            for name, endpoints in (shop_endpoints or {}).items()
            for endpoint in endpoints
        }

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
                stored = read_figures(session)
                jobs = _read_jobs(session)
                subscriptions = _read_subscriptions(session)
                shop_backlog = read_backlog(session)
        except DATABASE_UNAVAILABLE as exc:
            # The database's trouble, not a bug: report it as a value, not a failed scrape.
            logger.warning("metrics: cannot read the database: %s", describe_database_error(exc))
            up.add_metric([], 0)
            yield up
            return
        figures = stored.figures.connections if stored is not None else {}
        names = sorted({*self._connection_names, *inbox.connections(), *figures})
        for name in names:
            _add_inbox(families, name, inbox, now)
            if stored is not None:
                # A connection the job has not seen yet (configured since) has nothing.
                _add_figures(families, lag, name, figures.get(name, ConnectionFigures()))
        if stored is not None:
            age = max((now - stored.computed_at).total_seconds(), 0.0)
            families["figures_age"].add_metric([], age)
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
        _add_shop_backlog(families, shop_backlog, self._shop_endpoints, now)
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


def _add_shop_backlog(
    families: dict[str, GaugeMetricFamily],
    backlog: Mapping[tuple[str, str], EndpointBacklog],
    configured: set[tuple[str, str]],
    now: dt.datetime,
) -> None:
    for name, endpoint in sorted({*configured, *backlog}):
        found = backlog.get((name, endpoint), EndpointBacklog())
        for state in BACKLOG_STATES:
            families["shop_deliveries"].add_metric(
                [name, endpoint, state.value], found.counts.get(state, 0)
            )
        families["shop_oldest"].add_metric([name, endpoint], found.oldest_age(now))


# --- the figures the scheduler computes -----------------------------------------------


def _add_figures(
    families: dict[str, GaugeMetricFamily], lag: Metric, name: str, found: ConnectionFigures
) -> None:
    for source in ChangeSource:
        families["settled"].add_metric([name, source.value], found.settled.get(source, 0))
    for q in LAG_QUANTILES:
        labels = {"connection": name, "quantile": str(q)}
        lag.add_sample(LAG_METRIC, labels, found.lag_quantile(q))
    lag.add_sample(f"{LAG_METRIC}_count", {"connection": name}, found.lag_count)
    lag.add_sample(f"{LAG_METRIC}_sum", {"connection": name}, found.lag_sum)
    families["untimed"].add_metric([name], found.untimed)
    families["stuck"].add_metric([name], found.stuck)
    families["in_error"].add_metric([name], found.in_error)
    for category in EXCEPTION_CATEGORIES:
        families["exceptions_open"].add_metric(
            [name, category.value], found.exceptions_open.get(category.value, 0)
        )


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


# --- subscriptions -------------------------------------------------------------------


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
        "figures_age": GaugeMetricFamily(
            "otacm_metric_figures_age_seconds",
            "Seconds since the scheduler computed delivery health, stuck and Error orders "
            "and open exceptions (absent until it first did).",
        ),
        "shop_deliveries": GaugeMetricFamily(
            "otacm_shop_deliveries",
            "Events to the shop still to be delivered (pending, leased) or given up "
            "(dead, waiting for a replay), by venue connection, shop endpoint and state.",
            labels=["connection", "endpoint", "state"],
        ),
        "shop_oldest": GaugeMetricFamily(
            "otacm_shop_delivery_oldest_undelivered_age_seconds",
            "Seconds since the oldest pending or leased delivery to a shop endpoint was "
            "recorded or replayed (0 when none).",
            labels=["connection", "endpoint"],
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
