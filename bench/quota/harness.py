"""One scenario of the quota benchmark: the simulated venue and a partner, in virtual time.

Everything talks over real HTTP on loopback, but time is the benchmark's: the sandbox
runs on a :class:`VirtualClock` that only moves when the benchmark moves it, and every
job of otacm's is called with that clock's ``now``. So ten minutes of a venue's day, with
its 60-second pickup cadence, pass in seconds of wall time, and every delay is measured
in virtual seconds, exactly and repeatably.

The scenario moves one virtual second at a time. In each second, in this order:

1. the partner's worker makes one pass (:func:`orders.worker.run_once`): it fetches
   what the previous second stored in its inbox, at most :data:`CALLS_PER_SECOND`
   orders, the venue's rate limit per API identity (the client's own throttle is set
   aside: it counts wall time, and this run is in virtual time);
2. the venue: the orders arriving in that second are created (by the benchmark's own
   client, not counted as otacm's calls); when a pickup is due, one cycle runs
   (:meth:`sandbox.SandboxServer.tick`) and its webhooks are delivered to the receiver
   before the second ends;
3. the partner's scheduled jobs, when due: the change feed
   (:func:`heartbeat.feed.run_feed`) and the watchdog
   (:func:`heartbeat.watchdog.check_orders`), every ``poll_interval`` (15 s).

:func:`run_otacm` is otacm as deployed: a receiver (``receiver.create_app`` in werkzeug's
threaded server, on a migrated SQLite database) subscribed at the sandbox, the worker and
the two jobs, with webhook faults set through the sandbox (``dropRate``). Its venue calls
are counted by the observer of its venue client, which every call passes.
:func:`run_baseline` is the venue's suggested polling, with nothing of otacm's: every
``poll_interval`` after its creation, getOrder for each order not yet seen settled.

Either stops when every order has settled at the venue and is known to the partner (or
at the horizon). An order's delay runs from the venue settling it (the pickup cycle that
left it Draft, Issued or Error) to the partner knowing it: for otacm, the ``observed_at``
of the order's first settled status change; for the baseline, the poll that saw it.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker
from workload import PlannedOrder, Workload

from heartbeat.feed import run_feed
from heartbeat.metric_figures import SETTLED_STATUSES, refresh_figures
from heartbeat.watchdog import check_orders
from orders.worker import run_once
from otacm.settings import Settings
from receiver.testing import served_receiver
from receiver.webhook import WEBHOOK_PATH
from sandbox import Faults, SandboxConfig, SandboxServer
from sandbox.state import Clock
from storage.engine import make_engine, make_sessions
from storage.lease import new_owner
from storage.migrate import upgrade
from storage.models import StatusChange, VenueOrder, ensure_connection
from storage.types import utcnow
from venue.client import VenueClient, open_client
from venue.connection import VenueConnection
from venue.throttle import Throttle

CALLS_PER_SECOND = 20
"""The venue's rate limit per API identity (6000 per 5 minutes): the worker's getOrders
per virtual second."""

CLIENT_STATE = "quota-bench-client-state-5d1e"
START_AHEAD = dt.timedelta(hours=1)
"""Virtual time starts this far ahead of the wall clock, so that it never falls behind:
the receiver stamps inbox rows with the wall clock, and the worker, on virtual time,
must find them due."""

WEBHOOK_WAIT = 60.0
"""Wall seconds to wait for one pickup's webhooks to be delivered."""


class VirtualClock(Clock):
    """A sandbox clock that stands still until :meth:`set` or :meth:`advance` moves it."""

    def __init__(self, start: dt.datetime) -> None:
        super().__init__()
        self._moment = start
        self._guard = threading.Lock()

    def now(self) -> dt.datetime:
        """The virtual time."""
        with self._guard:
            return self._moment

    @property
    def offset(self) -> dt.timedelta:
        """How far the virtual time is ahead of the wall clock."""
        return self.now() - dt.datetime.now(dt.UTC)

    def advance(self, delta: dt.timedelta) -> dt.datetime:
        """Move the virtual time forward by ``delta``; the new time."""
        with self._guard:
            self._moment += delta
            return self._moment

    def set(self, moment: dt.datetime) -> None:
        """Move the virtual time to ``moment`` (never backwards)."""
        with self._guard:
            self._moment = max(self._moment, moment)


class CallCounter:
    """A venue client's observer: counts every call (each attempt) by endpoint name."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, endpoint: str, status: int | None, seconds: float) -> None:
        with self._lock:
            self.calls[endpoint] += 1


@dataclass(frozen=True)
class Timing:
    """The scheduled jobs' cadence, as otacm's settings give it."""

    poll_interval: int = 15
    feed_overlap: dt.timedelta = dt.timedelta(minutes=10)
    in_flight_after: dt.timedelta = dt.timedelta(seconds=600)
    open_recheck: dt.timedelta = dt.timedelta(seconds=900)
    recheck_horizon: dt.timedelta = dt.timedelta(days=30)
    stuck_after: dt.timedelta = dt.timedelta(seconds=3600)

    @classmethod
    def from_settings(cls, settings: Settings) -> Timing:
        """The cadence of ``settings`` (the poll interval rounded to whole seconds)."""
        return cls(
            poll_interval=round(settings.poll_interval),
            feed_overlap=settings.feed_overlap,
            in_flight_after=dt.timedelta(seconds=settings.in_flight_check_after),
            open_recheck=dt.timedelta(seconds=settings.open_order_recheck),
            recheck_horizon=dt.timedelta(days=settings.recheck_horizon_days),
            stuck_after=dt.timedelta(seconds=settings.stuck_after),
        )


@dataclass
class Result:
    """What one scenario did and measured."""

    scenario: str
    orders: int
    settled: dict[str, dt.datetime] = field(default_factory=dict)
    """Virtual time each order settled at the venue, by orderId."""
    known: dict[str, dt.datetime] = field(default_factory=dict)
    """Virtual time the partner first knew each order settled, by orderId."""
    calls: Counter[str] = field(default_factory=Counter)
    """The partner's venue calls, by endpoint."""
    virtual_seconds: int = 0
    wall_seconds: float = 0.0
    webhooks: dict[str, int] = field(default_factory=dict)
    """The sandbox's webhook counters (sent, dropped, ...)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """otacm's own view from ``GET /metrics``, when it ran."""

    @property
    def delays(self) -> list[float]:
        """Seconds from settling to being known, for each order known, sorted."""
        return sorted(
            (self.known[order_id] - settled).total_seconds()
            for order_id, settled in self.settled.items()
            if order_id in self.known
        )

    @property
    def unknown(self) -> int:
        """Orders settled at the venue that the partner never knew of."""
        return sum(1 for order_id in self.settled if order_id not in self.known)

    @property
    def total_calls(self) -> int:
        """Every venue call the partner made."""
        return sum(self.calls.values())


# --- the venue, in virtual time --------------------------------------------------------


class Venue:
    """The sandbox on its virtual clock, with the benchmark's own client to create orders.

    Args:
        server: the running sandbox.
        clock: its clock.
        client: the benchmark's venue client (its calls are not the partner's).
        start: virtual second 0.
    """

    def __init__(
        self, server: SandboxServer, clock: VirtualClock, client: VenueClient, start: dt.datetime
    ) -> None:
        self.server = server
        self.clock = clock
        self.client = client
        self.start = start
        self.partner_id = next(p.id for p in server.config.partners if p.active)
        self.created: dict[str, PlannedOrder] = {}
        self.settled: dict[str, dt.datetime] = {}
        self._visit_date = (start + dt.timedelta(days=30)).date()

    def at(self, second: int) -> dt.datetime:
        """Move the venue's clock to virtual second ``second``; that time."""
        moment = self.start + dt.timedelta(seconds=second)
        self.clock.set(moment)
        return moment

    def create(self, orders: list[PlannedOrder]) -> list[str]:
        """createOrder for each; their orderIds."""
        created = []
        for planned in orders:
            order = self.client.create_order(planned.request(self.partner_id, self._visit_date))
            self.created[order.order_id] = planned
            created.append(order.order_id)
        return created

    def pickup(self) -> None:
        """One pickup cycle now; wait until its webhooks are delivered (or dropped)."""
        report = self.server.tick()
        now = self.clock.now()
        for order_id, _status in report.processed:
            self.settled.setdefault(order_id, now)
        if not self.server.runtime.dispatcher.wait_idle(WEBHOOK_WAIT):
            raise RuntimeError(f"webhooks still undelivered after {WEBHOOK_WAIT:.0f} s")

    def all_settled(self, workload: Workload) -> bool:
        """Whether every order of the workload has been created and has settled."""
        return len(self.settled) == len(workload.orders)


@contextmanager
def open_venue(*, drop_rate: float, seed: int, start: dt.datetime) -> Iterator[Venue]:
    """The sandbox on a virtual clock at ``start``, with webhook drops at ``drop_rate``."""
    clock = VirtualClock(start)
    config = SandboxConfig(
        pickup_interval=0,
        webhook_backoff=0.05,
        webhook_max_attempts=5,
        faults=Faults(drop_rate=drop_rate, seed=seed),
    )
    with ExitStack() as stack:
        server = stack.enter_context(SandboxServer(config, clock=clock))
        connection = venue_connection(server, partner_ids=[])
        client = stack.enter_context(open_client(connection, throttle=unthrottled()))
        yield Venue(server, clock, client, start)


def venue_connection(server: SandboxServer, *, partner_ids: list[str]) -> VenueConnection:
    """The partner's connection to the sandbox."""
    config = server.config
    return VenueConnection(
        api_base_url=server.url,
        tenant=config.tenant,
        environment=config.environment,
        company=config.company,
        api_key=config.api_key,
        partner_ids=partner_ids,
        webhook_client_states=[SecretStr(CLIENT_STATE)],
    )


def unthrottled() -> Throttle:
    """A throttle that never waits: the run is in virtual time (see the module docstring)."""
    return Throttle(max_in_flight=5, rate=1_000_000)


def start_time() -> dt.datetime:
    """Virtual second 0: :data:`START_AHEAD` of the wall clock, on a whole second."""
    return (dt.datetime.now(dt.UTC) + START_AHEAD).replace(microsecond=0)


# --- otacm -------------------------------------------------------------------------------


def run_otacm(
    scenario: str,
    workload: Workload,
    *,
    drop_rate: float,
    seed: int,
    horizon: int,
    database: Path,
) -> Result:
    """otacm as deployed against the venue, with webhooks dropped at ``drop_rate``.

    Args:
        scenario: the scenario's name, for the table.
        workload: the orders and pickups.
        drop_rate: the share of webhook notifications the venue never sends.
        seed: the sandbox's fault seed.
        horizon: the last virtual second to run to, whatever is unknown by then.
        database: the SQLite file to create the partner's database in.
    """
    result = Result(scenario, len(workload.orders))
    started = time.monotonic()
    url = f"sqlite:///{database}"
    upgrade(url)
    start = start_time()
    with ExitStack() as stack:
        venue = stack.enter_context(open_venue(drop_rate=drop_rate, seed=seed, start=start))
        settings = otacm_settings(url, venue)
        timing = Timing.from_settings(settings)
        receiver_url = stack.enter_context(served_receiver(settings)).url
        venue.client.create_subscription(f"{receiver_url}{WEBHOOK_PATH}", CLIENT_STATE)

        engine = make_engine(url)
        stack.callback(engine.dispose)
        sessions = make_sessions(engine)
        with sessions.begin() as session:
            connection_id = ensure_connection(session, settings.connections[0].name)
        counter = CallCounter()
        client = stack.enter_context(
            open_client(settings.connections[0], throttle=unthrottled(), observer=counter)
        )
        clients = {connection_id: client}
        partners = {connection_id: settings.connections[0].partner_ids}
        owner = new_owner()

        second = 0
        for second in range(horizon + 1):
            now = venue.at(second)
            run_once(
                sessions,
                clients,
                owner=owner,
                now=now,
                batch_size=CALLS_PER_SECOND,
                lease_seconds=settings.inbox_lease_seconds,
            )
            venue.create(workload.arriving(second))
            if second in workload.pickups:
                venue.pickup()
            if second % timing.poll_interval == 0:
                run_feed(sessions, clients, partners, now=now, overlap=timing.feed_overlap)
                check_orders(
                    sessions,
                    now=now,
                    in_flight_after=timing.in_flight_after,
                    open_recheck=timing.open_recheck,
                    recheck_horizon=timing.recheck_horizon,
                    stuck_after=timing.stuck_after,
                    connection_ids=clients.keys(),
                )
            if venue.all_settled(workload) and known_count(sessions) >= len(workload.orders):
                break
        result.virtual_seconds = second
        result.settled = dict(venue.settled)
        result.known = known_times(sessions)
        result.calls = counter.calls
        result.webhooks = dict(venue.server.runtime.stats.snapshot()["webhooks"])
        # /metrics serves the figures as the scheduler's metric_figures job last stored them.
        refresh_figures(sessions, sessions, now=utcnow(), stuck_after=timing.stuck_after)
        result.metrics = scrape_delivery_health(receiver_url, settings.connections[0].name)
        if venue.clock.offset <= dt.timedelta(0):
            raise RuntimeError("virtual time fell behind the wall clock; the run is void")
    result.wall_seconds = time.monotonic() - started
    return result


def otacm_settings(url: str, venue: Venue) -> Settings:
    """otacm's settings for the sandbox: one connection, one partner (as an OTA has)."""
    config = venue.server.config
    return Settings(
        database_url=url,
        api_base_url=venue.server.url,
        tenant=config.tenant,
        environment=config.environment,
        company=config.company,
        api_key=config.api_key,
        partner_ids=[venue.partner_id],
        webhook_client_states=[SecretStr(CLIENT_STATE)],
    )


def _first_settled() -> sa.Select[str, dt.datetime]:
    return (
        sa.select(VenueOrder.order_id, sa.func.min(StatusChange.observed_at))
        .join(StatusChange, StatusChange.venue_order_id == VenueOrder.id)
        .where(StatusChange.status.in_(SETTLED_STATUSES))
        .group_by(VenueOrder.order_id)
    )


def known_count(sessions: sessionmaker[Session]) -> int:
    """How many orders the mirror has seen settled."""
    with sessions.begin() as session:
        counted = sa.select(sa.func.count()).select_from(_first_settled().subquery())
        return session.scalar(counted) or 0


def known_times(sessions: sessionmaker[Session]) -> dict[str, dt.datetime]:
    """When the mirror first saw each order settled (its first settled status change)."""
    with sessions.begin() as session:
        return {order_id: known for order_id, known in session.execute(_first_settled())}


def scrape_delivery_health(receiver_url: str, connection: str) -> dict[str, float]:
    """otacm's own delivery-health gauges for ``connection``, from ``GET /metrics``."""
    body = httpx.get(f"{receiver_url}/metrics", timeout=30).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.labels.get("connection") != connection:
                continue
            if sample.name == "otacm_orders_settled_recent" and sample.value:
                found[f"settled:{sample.labels['learned_from']}"] = sample.value
            elif sample.name == "otacm_settlement_lag_seconds":
                found[f"lag:p{float(sample.labels['quantile']) * 100:g}"] = sample.value
            elif sample.name in ("otacm_settlement_lag_untimed", "otacm_orders_stuck"):
                found[sample.name.removeprefix("otacm_")] = sample.value
    return found


# --- the baseline ------------------------------------------------------------------------


def run_baseline(workload: Workload, *, seed: int, horizon: int, poll_interval: int) -> Result:
    """The venue's suggested polling: getOrder per order every ``poll_interval`` until settled.

    No webhooks, no feed, no database: each order is polled ``poll_interval`` seconds
    after its creation and again every ``poll_interval`` seconds until getOrder shows it
    Draft, Issued or Error.
    """
    result = Result("baseline", len(workload.orders))
    started = time.monotonic()
    with ExitStack() as stack:
        venue = stack.enter_context(open_venue(drop_rate=0.0, seed=seed, start=start_time()))
        counter = CallCounter()
        client = stack.enter_context(
            open_client(
                venue_connection(venue.server, partner_ids=[venue.partner_id]),
                throttle=unthrottled(),
                observer=counter,
            )
        )
        due: dict[int, list[str]] = {}
        known: dict[str, dt.datetime] = {}
        second = 0
        for second in range(horizon + 1):
            now = venue.at(second)
            for order_id in venue.create(workload.arriving(second)):
                due.setdefault(second + poll_interval, []).append(order_id)
            if second in workload.pickups:
                venue.pickup()
            for order_id in due.pop(second, []):
                if client.get_order(order_id).status.settled:
                    known[order_id] = now
                else:
                    due.setdefault(second + poll_interval, []).append(order_id)
            if venue.all_settled(workload) and len(known) == len(workload.orders):
                break
        result.virtual_seconds = second
        result.settled = dict(venue.settled)
        result.known = known
        result.calls = counter.calls
    result.wall_seconds = time.monotonic() - started
    return result


def scratch_directory() -> tempfile.TemporaryDirectory[str]:
    """A temporary directory for the scenarios' databases, removed afterwards."""
    return tempfile.TemporaryDirectory(prefix="otacm-quota-")
