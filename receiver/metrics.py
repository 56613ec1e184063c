"""The receiver's Prometheus metrics and the ``GET /metrics`` view.

Two kinds of metric, because a receiver runs as several gunicorn worker processes:

- **Per-process counters** of what this process did (:class:`WebhookCounters`):
  ``otacm_webhook_notifications_total{outcome="stored"|"duplicate"}`` and
  ``otacm_webhook_rejections_total{code}`` (webhook POSTs answered with an error, by the
  error code of :mod:`receiver.errors`). A scrape reaches one worker at random, so in a
  multi-process deployment set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory, wiped
  before the processes start) in the environment of every otacm process:
  prometheus-client then writes each process's counters to files there, and the
  scrape adds them up (``MultiProcessCollector``); a process that exited still counts
  what it counted. The variable must be set before ``prometheus_client`` is first
  imported, as the library decides then. gunicorn's master tells the library of each
  worker that exits (:func:`forget_process`, from its ``child_exit`` hook), the
  library's documented pattern, so that live gauges would not outlive their process.
- **HTTP answers** (:class:`HttpAnswers`), per process like the webhook counters:
  ``otacm_http_responses_total{endpoint,status}``, every answer Flask gives (health,
  metrics, the API, the finance pages, errors), by Flask endpoint name (``none`` for a
  path that matches none) and status. Webhook POSTs take a shortcut around Flask and
  are counted by the webhook counters instead.
- **Gauges derived from the database** (:class:`~receiver.database_metrics.DatabaseCollector`,
  whose module lists them), read at scrape time, so every process reports the same
  values: the inbox, the scheduled jobs, the webhook subscription and
  ``otacm_database_up``; and delivery health, stuck and Error orders and open
  reconciliation exceptions as the scheduler last computed them, with their age.
- **Venue calls** (:class:`VenueCallMetrics`), counted wherever a venue client runs (the
  API's submissions here; getOrder in the worker; the scheduler's jobs):
  ``otacm_venue_calls_total{endpoint,status}`` and the latency histogram
  ``otacm_venue_call_seconds{endpoint}``, labelled by the API's endpoint names
  (``getOrder``), never by path. The worker and scheduler are other processes: their
  calls reach this endpoint when they share its ``PROMETHEUS_MULTIPROC_DIR`` (``otacm
  serve`` gives all three one directory; on a scaled node, give every role the same one).
- **Shop deliveries** (:class:`~orders.shop_delivery_metrics.DeliveryCounters`), counted
  by the worker's senders and reaching this endpoint the same way:
  ``otacm_shop_delivery_attempts_total{connection,endpoint,outcome}`` and
  ``otacm_shop_delivery_latency_seconds{connection,endpoint}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flask import Blueprint, Response, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from sqlalchemy.orm import Session, sessionmaker

from orders.shop_delivery_metrics import DeliveryCounters
from receiver.context import current_receiver
from receiver.database_metrics import DatabaseCollector

bp = Blueprint("metrics", __name__)


def multiprocess_mode() -> bool:
    """Whether prometheus-client keeps this process's values in ``PROMETHEUS_MULTIPROC_DIR``.

    Asked of the library rather than of the environment, because the library decided
    when it was imported, and that decision is what the counters follow.
    """
    return bool(getattr(prometheus_values.ValueClass, "_multiprocess", False))


def forget_process(pid: int) -> None:
    """Tell prometheus-client that process ``pid`` has exited (``mark_process_dead``).

    Its live gauges' files are removed from the directory, so the scrape no longer shows
    them; its counters and histograms stay, as counts it made. Nothing to do outside
    multiprocess mode.
    """
    if multiprocess_mode():
        mark_process_dead(pid)  # type: ignore[no-untyped-call]


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


class HttpAnswers:
    """Counts the answers Flask gives, by endpoint and status (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._answers = Counter(
            "otacm_http_responses",
            "HTTP answers given through Flask, by endpoint name ('none': no route matched) "
            "and status; webhook POSTs are in otacm_webhook_* instead.",
            ["endpoint", "status"],
            registry=registry,
        )

    def count(self, endpoint: str | None, status: int) -> None:
        """Count one answer of ``status`` from ``endpoint`` (``None``: no route matched)."""
        self._answers.labels(endpoint or "none", str(status)).inc()


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
        """Record one call (a :data:`venue.endpoints.CallObserver`)."""
        self._calls.labels(endpoint, str(status) if status is not None else "none").inc()
        self._seconds.labels(endpoint).observe(seconds)


class Metrics:
    """The receiver's metrics: its registry, the webhook counters, the database collector.

    Args:
        read_sessions: for :class:`DatabaseCollector`.
        connection_names: the configured venue connections.
        shop_endpoints: per connection's name, its shop endpoints' names.
    """

    def __init__(
        self,
        read_sessions: sessionmaker[Session],
        connection_names: Sequence[str],
        shop_endpoints: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        """Where this process's metrics are registered; other parts may add theirs."""
        self.webhook = WebhookCounters(self.registry)
        self.http = HttpAnswers(self.registry)
        self.venue_calls = VenueCallMetrics(self.registry)
        # The worker's senders count into their process's own; these expose the families.
        self.shop_deliveries = DeliveryCounters(self.registry)
        self.database = DatabaseCollector(
            read_sessions, connection_names, shop_endpoints=shop_endpoints
        )
        self.registry.register(self.database)
        if multiprocess_mode():
            # The counters of every process are in the directory's files; exposing
            # self.registry as well would report this process's twice.
            self._scrape = CollectorRegistry()
            MultiProcessCollector(self._scrape)  # type: ignore[no-untyped-call]
            self._scrape.register(self.database)
        else:
            self._scrape = self.registry

    def render(self) -> bytes:
        """Everything, in Prometheus' text exposition format."""
        return generate_latest(self._scrape)


@bp.after_app_request
def count_answer(response: Response) -> Response:
    """Count every answer Flask gives, error pages included (their handlers' answers pass
    here too)."""
    current_receiver().metrics.http.count(request.endpoint, response.status_code)
    return response


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics of the receiver (and of the processes sharing its directory)."""
    body = current_receiver().metrics.render()
    return Response(body, status=200, content_type=CONTENT_TYPE_LATEST)
