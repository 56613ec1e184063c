"""Fixtures for the end-to-end tests, one layer each, every hop over real HTTP.

migrated database (``migrated_engine``: SQLite, then PostgreSQL) → ``sandbox`` (the
simulated venue on a free port, no pickup cadence: tests call :meth:`E2E.deliver`) →
``settings`` pointing otacm at it → ``receiver`` (``receiver.create_app`` in werkzeug's
threaded server) → ``worker`` (``run_once``/``run_forever`` with a venue client of its
own) → ``e2e``, which subscribes the receiver's URL at the sandbox and bundles the
helpers the tests share. ``gunicorn_e2e`` is the same stack with the real ``otacm web``
under gunicorn in place of werkzeug; ``otacm`` starts any role as a subprocess.

The layers and helpers the heartbeat's tests share are :mod:`tests.support.stack`'s and
:mod:`tests.support.processes`'; this module adds what only the end-to-end tests have:
webhooks subscribed and delivered, the API token, the worker on a thread.

Tests change a layer by parametrizing ``sandbox_changes`` (the :class:`SandboxConfig`)
or ``settings_changes`` (the :class:`Settings`). Nothing waits on a fixed sleep: every
wait polls against a deadline (:func:`wait_until`) or on the sandbox's own
``wait_idle``.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from orders.worker import WorkerReport, run_forever
from otacm.settings import Settings
from receiver.webhook import WEBHOOK_PATH
from sandbox import SandboxServer
from sandbox.pipeline import CycleReport
from storage.lease import new_owner
from storage.models import StatusChange, ensure_connection
from storage.testing import free_port
from tests.support.lanes import starts_processes
from tests.support.processes import ROOT, OtacmProcess, otacm_environment, run_otacm
from tests.support.stack import (
    WORKER_LEASE_SECONDS,
    LiveReceiver,
    SandboxStack,
    drain_inbox,
    line,
    order_lines,
    read_sessions,
    receiver,
    sandbox_admin,
    sandbox_changes,
    sandbox_settings,
    serve_sandbox,
    settings_changes,
    visit_date,
    wait_until,
)
from venue.client import VenueClient, open_client
from venue.models import Order

# What tests import from here (their own or shared), and the shared fixtures, which are
# registered here by being imported.
__all__ = [
    "API_TOKEN",
    "CLIENT_STATE",
    "E2E",
    "ROOT",
    "LiveReceiver",
    "OtacmProcess",
    "free_port",
    "line",
    "metric",
    "order_lines",
    "otacm_environment",
    "read_sessions",
    "receiver",
    "run_otacm",
    "sandbox_changes",
    "settings_changes",
    "visit_date",
    "wait_until",
]

CLIENT_STATE = "e2e-client-state-7c1f0a9d2b"
API_TOKEN = "e2e-api-token-4b8e2d"


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition; 0 when the series is absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


# --- the worker ----------------------------------------------------------------------------


class Worker:
    """The inbox worker in this process, with the venue client of the one connection."""

    def __init__(self, sessions: sessionmaker[Session], clients: dict[int, VenueClient]) -> None:
        self.sessions = sessions
        self.clients = clients
        self.owner = new_owner()

    def drain(self, *, max_passes: int = 100) -> WorkerReport:
        """``run_once`` until a pass claims nothing; the sum of the passes."""
        return drain_inbox(self.sessions, self.clients, owner=self.owner, max_passes=max_passes)

    @contextmanager
    def running(self, *, lease_seconds: float = WORKER_LEASE_SECONDS) -> Iterator[None]:
        """``run_forever`` on a thread for the ``with`` block; stopped and joined after."""
        stop = threading.Event()
        thread = threading.Thread(
            target=run_forever,
            args=(self.sessions, self.clients),
            kwargs={
                "owner": new_owner(),
                "stop": stop,
                "poll_interval": 0.05,
                "lease_seconds": lease_seconds,
            },
            name="e2e-worker",
            daemon=True,
        )
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)
            assert not thread.is_alive(), "the worker thread did not stop"


# --- otacm as subprocesses -----------------------------------------------------------------


@pytest.fixture
@starts_processes
def otacm(tmp_path: Path) -> Iterator[Callable[..., OtacmProcess]]:
    """Start ``otacm`` subprocesses; all stopped after the test, their output shown on failure."""
    started: list[OtacmProcess] = []

    def start(*args: str, environment: dict[str, str]) -> OtacmProcess:
        log = tmp_path / f"otacm-{len(started)}-{args[0]}.log"
        process = OtacmProcess(list(args), environment, log)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
        # Captured, so pytest shows it only when the test failed.
        sys.stderr.write(f"--- otacm {' '.join(process.args)} ---\n{process.output()}\n")


# --- the stack -----------------------------------------------------------------------------


@dataclass
class E2E(SandboxStack):
    """The whole stack of one test, and the helpers its tests share.

    Attributes (besides :class:`~tests.support.stack.SandboxStack`'s):
        worker: the inbox worker.
        receiver_url: where the receiver listens (``http://127.0.0.1:PORT``).
        http: an HTTP client of the receiver.
        subscription_id: the sandbox's subscription of the receiver's webhook URL.
    """

    worker: Worker
    receiver_url: str
    http: httpx.Client
    subscription_id: str

    @property
    def sessions(self) -> sessionmaker[Session]:
        """Read-only sessions on otacm's database, for the checks (``read_sessions``)."""
        return self.read_sessions

    # --- acting --------------------------------------------------------------------

    def submit(self, body: dict[str, Any], *, token: str | None = API_TOKEN) -> httpx.Response:
        """``POST /api/orders`` at the receiver, with the API token."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.http.post("/api/orders", json=body, headers=headers)

    def create(self, reference: str, **kwargs: Any) -> Order:
        """createOrder straight at the venue (no ledger line), as another channel would."""
        return self.venue.create_order(self.order_request(reference, **kwargs))

    def create_many(self, count: int, prefix: str, **kwargs: Any) -> list[str]:
        """``count`` orders created at the venue; their orderIds, in creation order."""
        return [self.create(f"{prefix}-{n:03d}", **kwargs).order_id for n in range(count)]

    def settle_webhooks(self, timeout: float = 15.0) -> None:
        """Wait until the sandbox has nothing queued or in flight for any receiver."""
        assert self.sandbox.runtime.dispatcher.wait_idle(timeout), self.stats()["webhooks"]

    def deliver(self, timeout: float = 15.0) -> CycleReport:
        """One pickup cycle, then wait until its webhooks are delivered (or given up)."""
        report = self.tick()
        self.settle_webhooks(timeout)
        return report

    # --- looking -------------------------------------------------------------------

    def truth(self, order_id: str) -> Order:
        """The order as the venue's getOrder shows it (read in-process: not counted).

        Raises:
            sandbox.errors.ResourceNotFound: the venue has no such order.
        """
        return self.sandbox.runtime.orders.get(order_id).order

    def notified(self) -> list[str]:
        """The orderIds of the inbox rows, in the order they arrived."""
        return [str(row.order_id) for row in self.inbox()]

    def inbox_states(self) -> Counter[str]:
        """How many inbox rows are in each state."""
        return Counter(str(row.state) for row in self.inbox())

    def status_change_counts(self) -> Counter[tuple[int, str | None]]:
        """How many status changes each (order row, status) has."""
        with self.read_sessions.begin() as session:
            pairs = session.execute(sa.select(StatusChange.venue_order_id, StatusChange.status))
            return Counter(
                (order, None if status is None else str(status)) for order, status in pairs
            )


@pytest.fixture
def sandbox(sandbox_changes: dict[str, Any]) -> Iterator[SandboxServer]:
    """The simulated venue on a free port: no pickup cadence, fast webhook retries."""
    own = {"webhook_max_attempts": 10, "webhook_timeout": 10.0}
    with serve_sandbox(own, sandbox_changes) as server:
        yield server


@pytest.fixture
def settings(
    migrated_engine: sa.Engine, sandbox: SandboxServer, settings_changes: dict[str, Any]
) -> Settings:
    """otacm configured for the sandbox's venue, on the migrated test database."""
    own: dict[str, Any] = {
        "webhook_client_states": [SecretStr(CLIENT_STATE)],
        "api_tokens": [SecretStr(API_TOKEN)],
        "db_lock_timeout": 2.0,
        "webhook_max_bytes": 64 * 1024,
    }
    return sandbox_settings(sandbox, migrated_engine, own, settings_changes)


@pytest.fixture
def venue(settings: Settings) -> Iterator[VenueClient]:
    """A venue client of the sandbox connection (the tests' own; the worker has another)."""
    with open_client(settings.connections[0]) as client:
        yield client


@pytest.fixture
def worker(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[Worker]:
    """The inbox worker, with a venue client of its own."""
    (connection,) = settings.connections
    with sessions.begin() as session:
        connection_id = ensure_connection(session, connection.name)
    with open_client(connection) as client:
        yield Worker(sessions, {connection_id: client})


@contextmanager
def open_stack(
    receiver_url: str,
    *,
    sandbox: SandboxServer,
    settings: Settings,
    venue: VenueClient,
    worker: Worker,
    read_sessions: sessionmaker[Session],
) -> Iterator[E2E]:
    """The stack around a receiver at ``receiver_url``, subscribed at the sandbox."""
    with ExitStack() as stack:
        admin = stack.enter_context(sandbox_admin(sandbox))
        http = stack.enter_context(httpx.Client(base_url=receiver_url, timeout=30))
        subscription = venue.create_subscription(f"{receiver_url}{WEBHOOK_PATH}", CLIENT_STATE)
        assert subscription.id
        yield E2E(
            sandbox=sandbox,
            settings=settings,
            venue=venue,
            worker=worker,
            admin=admin,
            read_sessions=read_sessions,
            receiver_url=receiver_url,
            http=http,
            subscription_id=subscription.id,
        )


@pytest.fixture
def e2e(
    receiver: LiveReceiver,
    sandbox: SandboxServer,
    settings: Settings,
    venue: VenueClient,
    worker: Worker,
    read_sessions: sessionmaker[Session],
) -> Iterator[E2E]:
    """The whole stack with the receiver in werkzeug's server, subscribed at the sandbox."""
    with open_stack(
        receiver.url,
        sandbox=sandbox,
        settings=settings,
        venue=venue,
        worker=worker,
        read_sessions=read_sessions,
    ) as stack:
        yield stack


@pytest.fixture
def gunicorn_e2e(
    otacm: Callable[..., OtacmProcess],
    tmp_path: Path,
    sandbox: SandboxServer,
    settings: Settings,
    venue: VenueClient,
    worker: Worker,
    read_sessions: sessionmaker[Session],
) -> Iterator[E2E]:
    """The whole stack with the real ``otacm web`` (gunicorn, two workers) as the receiver."""
    port = free_port()
    metrics_directory = tmp_path / "prometheus"
    metrics_directory.mkdir()
    web = otacm(
        "web",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
        environment=otacm_environment(settings, PROMETHEUS_MULTIPROC_DIR=str(metrics_directory)),
    )
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=5) as probe:

        def ready() -> bool:
            assert web.alive(), f"otacm web exited with {web.popen.returncode}:\n{web.output()}"
            try:
                return probe.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 60, what="otacm web to answer /readyz")
    with open_stack(
        url,
        sandbox=sandbox,
        settings=settings,
        venue=venue,
        worker=worker,
        read_sessions=read_sessions,
    ) as stack:
        yield stack
    assert web.stop() == 0, web.output()
    assert "Control socket listening" not in web.output()
