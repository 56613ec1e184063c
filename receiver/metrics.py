"""The receiver's Prometheus metrics and the ``GET /metrics`` view.

Two kinds of metric, because a receiver runs as several gunicorn worker processes:

- **Per-process counters** of what this process did (:class:`WebhookCounters`):
  ``otacm_webhook_notifications_total{outcome="stored"|"duplicate"}`` and
  ``otacm_webhook_rejections_total{code}`` (webhook POSTs answered with an error, by the
  error code of :mod:`receiver.errors`). A scrape reaches one worker at random, so in a
  multi-process deployment set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory, wiped
  before the processes start) in the environment of every otacm process:
  prometheus-client then writes each process's counters to files there, and the
  scrape adds them up (``MultiProcessCollector``). The variable must be set before
  ``prometheus_client`` is first imported, as the library decides then; only counters
  are kept per process, so no gunicorn ``child_exit`` hook is needed.
- **Gauges derived from the database** (:class:`InboxCollector`), computed at scrape
  time by a custom collector, so every process reports the same values:
  ``otacm_inbox_depth{connection,state}`` for the states that are work (pending, leased,
  dead; ``done`` rows are history, and counting them would scan the table),
  ``otacm_inbox_oldest_pending_age_seconds{connection}``,
  ``otacm_dead_letters{connection,queue="inbox"|"outbox"}``, and ``otacm_database_up``
  (0 when the queries failed; the other gauges are then absent, not zero).

- **Venue calls** (:class:`VenueCallMetrics`), counted wherever a venue client runs (the
  API's submissions here; getOrder in the worker; the scheduler's jobs):
  ``otacm_venue_calls_total{endpoint,status}`` and the latency histogram
  ``otacm_venue_call_seconds{endpoint}``, labelled by the API's endpoint names
  (``getOrder``), never by path. The worker and scheduler are other processes: their
  calls reach this endpoint when they share its ``PROMETHEUS_MULTIPROC_DIR`` (``otacm
  serve`` gives all three one directory; on a scaled node, give every role the same one).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence

import sqlalchemy as sa
from flask import Blueprint, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from receiver.context import current_receiver
from receiver.errors import DATABASE_UNAVAILABLE, describe_database_error
from storage.models import Inbox, InboxState, Outbox, OutboxState, VenueConnection
from storage.types import utcnow

logger = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

DEPTH_STATES = (InboxState.PENDING, InboxState.LEASED, InboxState.DEAD)
"""The inbox states ``otacm_inbox_depth`` reports: rows that are still someone's work."""


def multiprocess_mode() -> bool:
    """Whether prometheus-client keeps this process's values in ``PROMETHEUS_MULTIPROC_DIR``.

    Asked of the library rather than of the environment, because the library decided
    when it was imported, and that decision is what the counters follow.
    """
    return bool(getattr(prometheus_values.ValueClass, "_multiprocess", False))


class WebhookCounters:
    """The webhook view's per-process counters, with their hot-path children bound once."""

    def __init__(self, registry: CollectorRegistry) -> None:
        notifications = Counter(
            "otacm_webhook_notifications",
            "Webhook notifications received, by outcome: stored, or an exact repeat.",
            ["outcome"],
            registry=registry,
        )
        self.stored = notifications.labels(outcome="stored")
        self.duplicate = notifications.labels(outcome="duplicate")
        self._rejections = Counter(
            "otacm_webhook_rejections",
            "Webhook POSTs answered with an error (nothing stored), by error code.",
            ["code"],
            registry=registry,
        )

    def rejected(self, code: str) -> None:
        """Count one webhook POST answered with the error ``code``."""
        self._rejections.labels(code=code).inc()


class VenueCallMetrics:
    """Counts and times every call to the venue; its :meth:`observe` is a client's observer."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        # registry=None is prometheus-client's default registry: what a worker process
        # writes to PROMETHEUS_MULTIPROC_DIR for the web role's scrape.
        self._calls = Counter(
            "otacm_venue_calls",
            "Calls to the venue's API, by endpoint and HTTP status ('none': no answer).",
            ["endpoint", "status"],
            registry=registry or REGISTRY,
        )
        self._seconds = Histogram(
            "otacm_venue_call_seconds",
            "Time of each call to the venue's API, by endpoint.",
            ["endpoint"],
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry or REGISTRY,
        )

    def observe(self, endpoint: str, status: int | None, seconds: float) -> None:
        """Record one call (a :data:`venue.client.CallObserver`)."""
        self._calls.labels(endpoint, str(status) if status is not None else "none").inc()
        self._seconds.labels(endpoint).observe(seconds)


class InboxCollector(Collector):
    """Gauges read from the database at each scrape: inbox depth, age, dead letters.

    Args:
        read_sessions: a read-only session factory (it never takes SQLite's write lock).
        connection_names: the configured connections, reported (as zeros) even when
            they have no rows, so that alerts see a series rather than its absence.
        clock: the current time, aware UTC.
    """

    def __init__(
        self,
        read_sessions: sessionmaker[Session],
        connection_names: Sequence[str],
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._read_sessions = read_sessions
        self._connection_names = tuple(connection_names)
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        """The families this collector yields, without samples (and without a query)."""
        return list(_families().values())

    def collect(self) -> Iterable[Metric]:
        """Query the database and yield the gauges; ``otacm_database_up`` 0 if it fails."""
        families = _families()
        up = families["up"]
        try:
            depth, oldest, outbox_dead = self._query()
        except DATABASE_UNAVAILABLE as exc:
            # The database's trouble, not a bug: report it as a value, not a failed scrape.
            logger.warning("metrics: cannot read the inbox: %s", describe_database_error(exc))
            up.add_metric([], 0)
            yield up
            return
        now = self._clock()
        names = sorted({*self._connection_names, *(name for name, _ in depth), *outbox_dead})
        for name in names:
            for state in DEPTH_STATES:
                families["depth"].add_metric([name, state.value], depth.get((name, state), 0))
            received_at = oldest.get(name)
            age = max((now - received_at).total_seconds(), 0.0) if received_at else 0.0
            families["age"].add_metric([name], age)
            families["dead"].add_metric([name, "inbox"], depth.get((name, InboxState.DEAD), 0))
            families["dead"].add_metric([name, "outbox"], outbox_dead.get(name, 0))
        up.add_metric([], 1)
        yield from families.values()

    def _query(
        self,
    ) -> tuple[dict[tuple[str, InboxState], int], dict[str, dt.datetime], dict[str, int]]:
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
        with self._read_sessions.begin() as session:
            for name, state, count, first_received in session.execute(inbox):
                depth[(name, state)] = count
                if state == InboxState.PENDING and first_received is not None:
                    oldest[name] = first_received
            outbox_dead = {name: count for name, count in session.execute(outbox)}
        return depth, oldest, outbox_dead


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
        "up": GaugeMetricFamily(
            "otacm_database_up",
            "1 when the last scrape could read the database, else 0.",
        ),
    }


class Metrics:
    """The receiver's metrics: its registry, the webhook counters, the inbox collector.

    Args:
        read_sessions: for :class:`InboxCollector`.
        connection_names: the configured venue connections.
    """

    def __init__(
        self, read_sessions: sessionmaker[Session], connection_names: Sequence[str]
    ) -> None:
        self.registry = CollectorRegistry()
        """Where this process's metrics are registered; other parts may add theirs."""
        self.webhook = WebhookCounters(self.registry)
        self.venue_calls = VenueCallMetrics(self.registry)
        self.inbox = InboxCollector(read_sessions, connection_names)
        self.registry.register(self.inbox)
        if multiprocess_mode():
            # The counters of every process are in the directory's files; exposing
            # self.registry as well would report this process's twice.
            self._scrape = CollectorRegistry()
            MultiProcessCollector(self._scrape)  # type: ignore[no-untyped-call]
            self._scrape.register(self.inbox)
        else:
            self._scrape = self.registry

    def render(self) -> bytes:
        """Everything, in Prometheus' text exposition format."""
        return generate_latest(self._scrape)


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics of the receiver (and of the processes sharing its directory)."""
    body = current_receiver().metrics.render()
    return Response(body, status=200, content_type=CONTENT_TYPE_LATEST)
