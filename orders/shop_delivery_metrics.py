"""The Prometheus metrics of the shop's deliveries: what the senders did, and what waits.

Two kinds, as for the venue's calls and the inbox (:mod:`receiver.metrics`):

- **Counters of the senders** (:class:`DeliveryCounters`), kept by the process that sends
  (the worker role) and reaching the web role's ``/metrics`` through the shared
  ``PROMETHEUS_MULTIPROC_DIR``: ``otacm_shop_delivery_attempts_total{connection,endpoint,
  outcome}``, each attempt as it settled (``delivered``; ``retried``: 408, 429, a 5xx, a
  timeout or a failed connection within the retry horizon; ``dead``: refused, or past
  the horizon), and the histogram ``otacm_shop_delivery_latency_seconds{connection,
  endpoint}``, from an event being recorded (its change committing) to its delivery,
  retries included. An attempt whose lease was lost (another sender took the row over)
  is not counted: the one that settles it counts it.
- **What waits** (:func:`read_backlog`), read from the database at each scrape, like the
  inbox's depth: ``otacm_shop_deliveries{connection,endpoint,state}`` for pending,
  leased and dead, and ``otacm_shop_delivery_oldest_undelivered_age_seconds{connection,
  endpoint}``. Only the rows that are still work are read (searches of an index of the
  in-flight rows or led by the state): delivered history does not make a scrape slower.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import sqlalchemy as sa
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from sqlalchemy.orm import Session

from storage.models import IN_FLIGHT, VenueConnection
from storage.records import DeliveryState, ShopDelivery

ATTEMPT_OUTCOMES = {
    DeliveryState.DELIVERED: "delivered",
    DeliveryState.PENDING: "retried",
    DeliveryState.DEAD: "dead",
}
"""The state an attempt left its delivery in, and the outcome it is counted under."""

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
"""Seconds from record to delivery: sub-second when the endpoint answers, then the
backoff's steps (5 s doubling to an hour) up to the retry horizon's days."""

BACKLOG_STATES = (DeliveryState.PENDING, DeliveryState.LEASED, DeliveryState.DEAD)
"""The states ``otacm_shop_deliveries`` reports: the rows that are still someone's work."""

UNKNOWN_CONNECTION = "unknown"
"""The connection label of a delivery whose event does not name one (none do today)."""


class SettledClaim(Protocol):
    """What counting a settled attempt reads of its claim
    (:class:`orders.shop_delivery.DeliveryClaim` has it)."""

    @property
    def payload(self) -> dict[str, object]: ...

    @property
    def created_at(self) -> dt.datetime: ...


class DeliveryCounters:
    """The senders' counters (module docstring), registered in ``registry``.

    Args:
        registry: where to register them; ``None`` is prometheus-client's default
            registry, which is what a sending process writes to the multiprocess
            directory for the web role's scrape. The web role registers its own
            (:class:`receiver.metrics.Metrics`) so that the families are exposed
            before the first attempt.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._attempts = Counter(
            "otacm_shop_delivery_attempts",
            "Attempts to deliver an event to a shop endpoint, by what they left the "
            "delivery in: delivered, retried (to be tried again) or dead (given up).",
            ["connection", "endpoint", "outcome"],
            registry=registry or REGISTRY,
        )
        self._latency = Histogram(
            "otacm_shop_delivery_latency_seconds",
            "Seconds from an event being recorded (its change committed) to a shop "
            "endpoint receiving it, retries included.",
            ["connection", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry or REGISTRY,
        )

    def settled(
        self,
        endpoint: str,
        state: DeliveryState,
        claims: Sequence[SettledClaim],
        now: dt.datetime,
    ) -> None:
        """Count attempts to ``endpoint`` that left their deliveries in ``state`` at ``now``.

        Args:
            endpoint: the endpoint's name.
            state: delivered, pending (to be retried) or dead.
            claims: the claims whose attempts settled so (their leases still held).
            now: when they settled, on the sender's clock.
        """
        outcome = ATTEMPT_OUTCOMES[state]
        for claim in claims:
            connection = claim.payload.get("connection")
            name = connection if isinstance(connection, str) else UNKNOWN_CONNECTION
            self._attempts.labels(name, endpoint, outcome).inc()
            if state is DeliveryState.DELIVERED:
                latency = max((now - claim.created_at).total_seconds(), 0.0)
                self._latency.labels(name, endpoint).observe(latency)


_process_counters: DeliveryCounters | None = None
_process_lock = threading.Lock()


def process_counters() -> DeliveryCounters:
    """This process's senders' counters, in the default registry (made at first use:
    a family registers once per registry, and every sender thread shares them)."""
    global _process_counters
    with _process_lock:
        if _process_counters is None:
            _process_counters = DeliveryCounters(registry=None)
        return _process_counters


def count_settled(
    endpoint: str, settled: Sequence[tuple[DeliveryState, Sequence[SettledClaim]]], now: dt.datetime
) -> None:
    """Count a sender's settled attempts, once their transaction committed.

    Args:
        endpoint: the endpoint's name.
        settled: per state the attempts left their deliveries in, their claims.
        now: when they settled, on the sender's clock.
    """
    counters = process_counters()
    for state, claims in settled:
        counters.settled(endpoint, state, claims, now)


# --- what waits ---------------------------------------------------------------------------


@dataclass
class EndpointBacklog:
    """One connection's deliveries to one endpoint that are still work.

    Attributes:
        counts: rows by state (pending, leased, dead).
        oldest: when the oldest pending or leased delivery was recorded (or replayed),
            ``None`` when none is.
    """

    counts: dict[DeliveryState, int] = field(default_factory=dict)
    oldest: dt.datetime | None = None

    def oldest_age(self, now: dt.datetime) -> float:
        """Seconds the oldest undelivered delivery has waited at ``now``; 0 when none."""
        if self.oldest is None:
            return 0.0
        return max((now - self.oldest).total_seconds(), 0.0)


def read_backlog(session: Session) -> dict[tuple[str, str], EndpointBacklog]:
    """The deliveries still to be sent, or given up, by connection name and endpoint.

    Two grouped reads of the rows that are work, each a search of an index of the
    in-flight rows (its condition as the literal text, which SQLite needs to use it) or
    led by the state, as the planner picks. The oldest is by ``retry_from``: when the delivery was
    recorded, or replayed (a replay starts its wait again, as it starts its horizon).
    """
    d = ShopDelivery
    in_flight = (
        sa.select(
            VenueConnection.name, d.endpoint, d.state, sa.func.count(), sa.func.min(d.retry_from)
        )
        .select_from(d)
        .join(VenueConnection, VenueConnection.id == d.connection_id)
        .where(IN_FLIGHT)
        .group_by(VenueConnection.name, d.endpoint, d.state)
    )
    dead = (
        sa.select(VenueConnection.name, d.endpoint, sa.func.count())
        .select_from(d)
        .join(VenueConnection, VenueConnection.id == d.connection_id)
        .where(d.state == DeliveryState.DEAD)
        .group_by(VenueConnection.name, d.endpoint)
    )
    found: dict[tuple[str, str], EndpointBacklog] = {}
    for name, endpoint, state, count, oldest in session.execute(in_flight):
        backlog = found.setdefault((name, endpoint), EndpointBacklog())
        backlog.counts[state] = count
        if oldest is not None and (backlog.oldest is None or oldest < backlog.oldest):
            backlog.oldest = oldest
    for name, endpoint, count in session.execute(dead):
        found.setdefault((name, endpoint), EndpointBacklog()).counts[DeliveryState.DEAD] = count
    return found
