"""The shared key: 1, 2 and 4 worker processes and 2 schedulers on one venue API key.

In real time, against the sandbox with 200 ms of latency per call and its gateway
enforcing the venue's limits per API identity (:mod:`sandbox.limits`; 429 beyond them).
Each scenario starts from a fresh sandbox holding ``orders`` Issued orders and a fresh
otacm database whose inbox holds one row per order (the change feed's first pass, run
here before the clock starts), then starts the scenario's ``otacm worker`` processes and
two ``otacm scheduler`` processes, all with the same key, and waits until every row is
done. It reports what the sandbox saw of the key — the most calls in process at once,
the most in any window of the rate's period, the 429s it sent — and the orders mirrored
per second, in all and per worker, from the first order mirrored to the last.

The gateway's rate is the venue's 20 a second, counted over a window of
:data:`PERIOD` seconds instead of 5 minutes, so that a run of a minute spans many
windows; otacm is configured with the same margin below it as its defaults keep below
the venue's (4 in flight of 5, 90 % of the rate). The "before" scenario is one worker
fetching one order at a time, as the worker did before it kept several calls in flight.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import SecretStr

from heartbeat.feed import run_feed
from sandbox import SandboxConfig, SandboxServer
from sandbox.limits import identity_label
from storage.engine import make_engine, make_sessions
from storage.migrate import upgrade
from storage.models import Inbox, InboxState, ensure_connection
from venue.client import open_client
from venue.connection import VenueConnection
from venue.throttle import Throttle

REPOSITORY = Path(__file__).resolve().parents[2]
LATENCY_MS = 200
GATEWAY_IN_FLIGHT = 5
PERIOD = 5.0
GATEWAY_RATE = 100
"""The venue's limits per identity: 5 in flight, 20 a second (here 100 per 5 s)."""
CLIENT_IN_FLIGHT = 4
CLIENT_RATE = 90
"""otacm's: one place and a tenth of the rate below the gateway's, as its defaults."""
FETCH_CONCURRENCY = 4
SCHEDULERS = 2
DRAIN_TIMEOUT = 900.0
POLL = 0.1
"""Seconds between two looks at how many orders are mirrored."""


@dataclass(frozen=True)
class Scenario:
    """One run: how many workers, each keeping how many getOrder calls in flight."""

    name: str
    workers: int
    fetch_concurrency: int
    schedulers: int = SCHEDULERS


SCENARIOS = (
    Scenario("1 worker, 1 in flight (before)", 1, 1),
    Scenario("1 worker", 1, FETCH_CONCURRENCY),
    Scenario("2 workers", 2, FETCH_CONCURRENCY),
    Scenario("4 workers", 4, FETCH_CONCURRENCY),
)


@dataclass
class SharedResult:
    """What one scenario measured."""

    scenario: str
    database: str
    workers: int
    schedulers: int
    fetch_concurrency: int
    orders: int
    done: int = 0
    seconds: float = 0.0
    gateway: dict[str, Any] = field(default_factory=dict)
    """The sandbox's counters for the key: requests, maxInFlight, maxInWindow, throttled."""
    calls: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        """Orders mirrored per second, all workers together."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def per_worker(self) -> float:
        """Orders mirrored per second per worker."""
        return self.per_second / self.workers

    @property
    def within(self) -> bool:
        """Whether the sandbox saw the key within its limits and refused nothing."""
        gateway = self.gateway
        return (
            gateway.get("maxInFlight", 0) <= GATEWAY_IN_FLIGHT
            and gateway.get("maxInWindow", 0) <= GATEWAY_RATE
            and gateway.get("throttled", 0) == 0
        )

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON."""
        return {
            "database": self.database,
            "workers": self.workers,
            "schedulers": self.schedulers,
            "fetch_concurrency": self.fetch_concurrency,
            "orders": self.orders,
            "done": self.done,
            "seconds": round(self.seconds, 2),
            "orders_per_second": round(self.per_second, 2),
            "orders_per_second_per_worker": round(self.per_worker, 2),
            "gateway": self.gateway,
            "calls": self.calls,
            "within_limits": self.within,
        }


HEADER = (
    f"{'scenario':<32} {'db':<10} {'orders':>6} {'s':>6} {'orders/s':>8} {'per worker':>10} "
    f"{'calls':>6} {'max in flight':>13} {'max per 5 s':>11} {'429s':>5}"
)


def format_row(result: SharedResult) -> str:
    """One line of the shared-key table."""
    gateway = result.gateway
    return (
        f"{result.scenario:<32} {result.database:<10} {result.done:>6} {result.seconds:>6.1f} "
        f"{result.per_second:>8.1f} {result.per_worker:>10.1f} {gateway.get('requests', 0):>6} "
        f"{gateway.get('maxInFlight', 0):>7} of {GATEWAY_IN_FLIGHT:<3} "
        f"{gateway.get('maxInWindow', 0):>5} of {GATEWAY_RATE:<3} {gateway.get('throttled', 0):>5}"
    )


def _order_body(partner: str, number: int, visit: dt.date) -> dict[str, Any]:
    return {
        "partnerId": partner,
        "sellToOrderReference": f"SHARED-{number:06d}",
        "sellToEmail": "guest@example.com",
        "sellToName": "Bench Guest",
        "sellToLanguage": "ENU",
        "paymentReference": f"PAY-{number:06d}",
        "items": [
            {
                "itemNumber": "31001",
                "visitDate": visit.isoformat(),
                "visitTime": "10:30:00",
                "quantity": 1,
            }
        ],
    }


def _connection(server: SandboxServer, partner: str) -> VenueConnection:
    config = server.config
    return VenueConnection(
        api_base_url=server.url,
        tenant=config.tenant,
        environment=config.environment,
        company=config.company,
        api_key=config.api_key,
        partner_ids=[partner],
        webhook_client_states=[SecretStr("shared-key-bench-state")],
        venue_max_in_flight=CLIENT_IN_FLIGHT,
        venue_rate_limit=CLIENT_RATE,
        venue_rate_period=PERIOD,
    )


def _environment(url: str, connection: VenueConnection, scenario: Scenario) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTACM_")}
    environment.update(
        {
            "OTACM_DATABASE_URL": url,
            "OTACM_API_BASE_URL": connection.api_base_url,
            "OTACM_TENANT": connection.tenant,
            "OTACM_ENVIRONMENT": connection.environment,
            "OTACM_COMPANY": connection.company,
            "OTACM_API_KEY": connection.api_key.get_secret_value(),
            "OTACM_PARTNER_IDS": ",".join(connection.partner_ids),
            "OTACM_WEBHOOK_CLIENT_STATES": "shared-key-bench-state",
            "OTACM_VENUE_MAX_IN_FLIGHT": str(CLIENT_IN_FLIGHT),
            "OTACM_VENUE_RATE_LIMIT": str(CLIENT_RATE),
            "OTACM_VENUE_RATE_PERIOD": str(PERIOD),
            "OTACM_WORKER_FETCH_CONCURRENCY": str(scenario.fetch_concurrency),
            "OTACM_WORKER_BATCH_SIZE": "20",
            "OTACM_POLL_INTERVAL": "10",
        }
    )
    return environment


@contextmanager
def _processes(environment: dict[str, str], roles: list[str], logs: Path) -> Iterator[None]:
    """``otacm <role>`` for each role, stopped with SIGTERM (then killed) on exit."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        for number, role in enumerate(roles):
            with (logs / f"{role}-{number}.log").open("wb") as log:
                started.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "otacm", "--log-level", "WARNING", role],
                        cwd=REPOSITORY,
                        env=environment,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield
    finally:
        for process in started:
            process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _done(engine: sa.Engine) -> int:
    """Inbox rows done (each order's is committed on its own, as it is applied)."""
    with engine.connect() as db:
        return int(db.scalar(sa.select(sa.func.count()).where(Inbox.state == InboxState.DONE)) or 0)


def run_scenario(
    scenario: Scenario, *, orders: int, database: str, url: str, logs: Path
) -> SharedResult:
    """One scenario on a new database ``url`` (see the module docstring)."""
    result = SharedResult(
        scenario.name,
        database,
        scenario.workers,
        scenario.schedulers,
        scenario.fetch_concurrency,
        orders,
    )
    config = SandboxConfig(
        pickup_interval=0,
        gateway_max_in_flight=GATEWAY_IN_FLIGHT,
        gateway_rate_limit=GATEWAY_RATE,
        gateway_rate_period=PERIOD,
    )
    upgrade(url)
    with ExitStack() as stack:
        server = stack.enter_context(SandboxServer(config))
        runtime = server.runtime
        partner = next(p.id for p in config.partners if p.active)
        visit = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).date()
        for number in range(orders):
            runtime.orders.create(_order_body(partner, number, visit))
        runtime.pipeline.run_cycle()
        connection = _connection(server, partner)

        engine = make_engine(url)
        stack.callback(engine.dispose)
        sessions = make_sessions(engine)
        with sessions.begin() as session:
            connection_id = ensure_connection(session, connection.name)
        # The feed's first pass fills the inbox; its few list calls are not the run's.
        quick = Throttle(max_in_flight=5, rate=1_000_000)
        with open_client(connection, throttle=quick) as client:
            run_feed(
                sessions,
                {connection_id: client},
                {connection_id: connection.partner_ids},
                now=dt.datetime.now(dt.UTC),
                overlap=dt.timedelta(minutes=10),
            )
        runtime.faults.update({"latencyMs": LATENCY_MS})
        runtime.stats.reset()
        runtime.limits.reset()

        roles = ["scheduler"] * scenario.schedulers + ["worker"] * scenario.workers
        deadline = time.monotonic() + DRAIN_TIMEOUT
        first: float | None = None
        with _processes(_environment(url, connection, scenario), roles, logs):
            done = 0
            while done < orders and time.monotonic() < deadline:
                time.sleep(POLL)
                done = _done(engine)
                if done and first is None:
                    first = time.monotonic()
            last = time.monotonic()
        result.done = done
        if first is not None and done > 1:
            # From the first order mirrored to the last, as seen every POLL seconds: the
            # processes' start-up is not the workers' pace.
            result.seconds = (last - first) * done / (done - 1)
        key = identity_label(config.api_key.get_secret_value())
        result.gateway = runtime.limits.snapshot()["identities"].get(key, {})
        result.calls = runtime.stats.snapshot()["calls"]
    return result
