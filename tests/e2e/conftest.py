"""Fixtures for the end-to-end tests, one layer each, every hop over real HTTP.

migrated database (``migrated_engine``: SQLite, then PostgreSQL) → ``sandbox`` (the
simulated venue on a free port, no pickup cadence: tests call :meth:`E2E.deliver`) →
``settings`` pointing otacm at it → ``receiver`` (``receiver.create_app`` in werkzeug's
threaded server) → ``worker`` (``run_once``/``run_forever`` with a venue client of its
own) → ``e2e``, which subscribes the receiver's URL at the sandbox and bundles the
helpers the tests share. ``gunicorn_e2e`` is the same stack with the real ``otacm web``
under gunicorn in place of werkzeug; ``otacm`` starts any role as a subprocess.

Tests change a layer by parametrizing ``sandbox_changes`` (the :class:`SandboxConfig`)
or ``settings_changes`` (the :class:`Settings`). Nothing waits on a fixed sleep: every
wait polls against a deadline (:func:`wait_until`) or on the sandbox's own
``wait_idle``.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy.orm import Session, selectinload, sessionmaker
from werkzeug.serving import make_server

from otacm.settings import Settings
from receiver import create_app
from receiver.context import EXTENSION, Receiver
from receiver.webhook import WEBHOOK_PATH
from receiver.worker import WorkerReport, new_owner, run_forever, run_once
from sandbox import Faults, SandboxConfig, SandboxServer
from sandbox.pipeline import CycleReport
from storage.engine import make_sessions
from storage.models import (
    Base,
    Inbox,
    OrderItem,
    StatusChange,
    VenueOrder,
    Wallet,
    ensure_connection,
)
from storage.types import utcnow
from venue.client import VenueClient, open_client
from venue.models import Order, OrderRequest, OrderStatus

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
CLIENT_STATE = "e2e-client-state-7c1f0a9d2b"
API_TOKEN = "e2e-api-token-4b8e2d"
WORKER_LEASE_SECONDS = 30.0


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, *, what: str = "it") -> T:
    """Poll ``predicate`` until it returns something truthy; that value.

    Raises:
        AssertionError: ``timeout`` seconds passed first; names ``what`` and the last value.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout}s for {what}; last value: {result!r}")
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition; 0 when the series is absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


# --- orders ------------------------------------------------------------------------------


def visit_date(days: int = 30) -> str:
    """A visit date ``days`` from now, as YYYY-MM-DD (the venue refuses past dates)."""
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).date().isoformat()


def line(item: str = "31001", quantity: int = 1, **extra: Any) -> dict[str, Any]:
    """One order line of the sandbox's catalog."""
    return {"itemNumber": item, "visitDate": visit_date(), "quantity": quantity, **extra}


# --- the mirror, as comparable values ----------------------------------------------------


def order_lines(order: Order | VenueOrder) -> list[Any]:
    """An order's lines, wallets, prices and assets as comparable values.

    The venue's wire model and the mirror's rows share these attribute names, so one
    function reads both: the mirror is right when both give the same list. The venue's
    "" (no value, as in a wallet shell's reference) is stored as NULL, so both read None.
    """
    return [
        (
            item.line_no,
            item.item_number,
            item.quantity,
            [
                (
                    wallet.seq_no,
                    wallet.wallet_id,
                    wallet.wallet_reference_number or None,
                    wallet.external_reference_number or None,
                    wallet.issued_at,
                    wallet.unit_price_excl_vat,
                    wallet.unit_price_incl_vat,
                    wallet.currency_code,
                    wallet.manifest_url,
                    [(a.type, a.reference_number, a.item_number) for a in wallet.assets],
                )
                for wallet in item.wallets
            ],
        )
        for item in order.items
    ]


# --- the worker ----------------------------------------------------------------------------


class Worker:
    """The inbox worker in this process, with the venue client of the one connection."""

    def __init__(self, sessions: sessionmaker[Session], clients: dict[int, VenueClient]) -> None:
        self.sessions = sessions
        self.clients = clients
        self.owner = new_owner()

    def drain(self, *, max_passes: int = 100) -> WorkerReport:
        """``run_once`` until a pass claims nothing; the sum of the passes."""
        total = WorkerReport()
        for _ in range(max_passes):
            report = run_once(
                self.sessions,
                self.clients,
                owner=self.owner,
                now=utcnow(),
                lease_seconds=WORKER_LEASE_SECONDS,
            )
            total.add(report)
            if not report.claimed:
                return total
        raise AssertionError(f"the worker still claimed rows after {max_passes} passes")

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


def otacm_environment(settings: Settings, **extra: str) -> dict[str, str]:
    """This process's environment without ``OTACM_*``, plus ``settings`` as ``OTACM_*``."""
    (venue,) = settings.connections
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("OTACM_") and name != "PROMETHEUS_MULTIPROC_DIR"
    }
    environment.update(
        {
            "OTACM_DATABASE_URL": settings.database_url,
            "OTACM_API_BASE_URL": venue.api_base_url,
            "OTACM_TENANT": venue.tenant,
            "OTACM_ENVIRONMENT": venue.environment,
            "OTACM_COMPANY": venue.company,
            "OTACM_API_KEY": venue.api_key.get_secret_value(),
            "OTACM_PARTNER_IDS": ",".join(venue.partner_ids),
            "OTACM_WEBHOOK_CLIENT_STATES": ",".join(
                state.get_secret_value() for state in venue.webhook_client_states
            ),
            "OTACM_API_TOKENS": ",".join(t.get_secret_value() for t in settings.api_tokens),
            "OTACM_DB_LOCK_TIMEOUT": str(settings.db_lock_timeout),
            "OTACM_WEBHOOK_MAX_BYTES": str(settings.webhook_max_bytes),
            "OTACM_INBOX_LEASE_SECONDS": str(settings.inbox_lease_seconds),
            "OTACM_WORKER_BATCH_SIZE": str(settings.worker_batch_size),
            "OTACM_LOG_LEVEL": "INFO",
            **extra,
        }
    )
    return environment


class OtacmProcess:
    """``python -m otacm ARGS`` as a subprocess, its output in a file."""

    def __init__(self, args: list[str], environment: dict[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        self._output = log.open("wb")
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "otacm", *args],
                cwd=ROOT,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            self._output.close()
            raise

    def output(self) -> str:
        """Everything the process has written so far."""
        if not self._output.closed:
            self._output.flush()
        return self.log.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def kill(self) -> int:
        """SIGKILL: no clean-up, no goodbye; its exit status."""
        self.popen.send_signal(signal.SIGKILL)
        return self.popen.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it lingers; its exit status. Closes the log."""
        try:
            if self.popen.poll() is None:
                self.popen.terminate()
                try:
                    self.popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(timeout=30)
            return self.popen.returncode
        finally:
            self._output.close()


@pytest.fixture
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


def run_otacm(*args: str, environment: dict[str, str], timeout: float = 60) -> str:
    """Run an ``otacm`` command to its end; its standard output.

    Raises:
        AssertionError: it exited non-zero; with its output.
    """
    done = subprocess.run(
        [sys.executable, "-m", "otacm", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"otacm {' '.join(args)}: {done.returncode}\n{done.stderr}"
    return done.stdout


# --- the stack -----------------------------------------------------------------------------


@dataclass
class E2E:
    """The whole stack of one test, and the helpers its tests share.

    Attributes:
        sandbox: the simulated venue.
        settings: otacm's settings (the one connection is the sandbox).
        venue: a venue client of the connection, for tests that act as the venue's user.
        worker: the inbox worker.
        sessions: read-only sessions on otacm's database, for the checks.
        admin: an HTTP client of the sandbox's ``/_sandbox`` endpoints.
        receiver_url: where the receiver listens (``http://127.0.0.1:PORT``).
        http: an HTTP client of the receiver.
        subscription_id: the sandbox's subscription of the receiver's webhook URL.
    """

    sandbox: SandboxServer
    settings: Settings
    venue: VenueClient
    worker: Worker
    sessions: sessionmaker[Session]
    admin: httpx.Client
    receiver_url: str
    http: httpx.Client
    subscription_id: str

    # --- acting --------------------------------------------------------------------

    @property
    def partner_id(self) -> str:
        """The sandbox's first (active) partner."""
        return self.settings.connections[0].partner_ids[0]

    def order_body(
        self, reference: str, *, paid: bool = True, items: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """A valid createOrder body; unpaid (no paymentReference) orders end as Draft."""
        body: dict[str, Any] = {
            "partnerId": self.partner_id,
            "sellToOrderReference": reference,
            "sellToEmail": "guest@example.com",
            "sellToName": "Jane Doe",
            "sellToLanguage": "ENU",
            "items": items if items is not None else [line()],
        }
        if paid:
            body["paymentReference"] = f"PAY-{reference}"
        return body

    def submit(self, body: dict[str, Any], *, token: str | None = API_TOKEN) -> httpx.Response:
        """``POST /api/orders`` at the receiver, with the API token."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.http.post("/api/orders", json=body, headers=headers)

    def order_request(self, reference: str, **kwargs: Any) -> OrderRequest:
        """:meth:`order_body` as the venue client's request model."""
        return OrderRequest.model_validate(self.order_body(reference, **kwargs))

    def create(self, reference: str, **kwargs: Any) -> Order:
        """createOrder straight at the venue (no ledger line), as another channel would."""
        return self.venue.create_order(self.order_request(reference, **kwargs))

    def create_many(self, count: int, prefix: str, **kwargs: Any) -> list[str]:
        """``count`` orders created at the venue; their orderIds, in creation order."""
        return [self.create(f"{prefix}-{n:03d}", **kwargs).order_id for n in range(count)]

    def tick(self) -> CycleReport:
        """One pickup cycle at the sandbox: Submitted orders settle, webhooks are queued."""
        return self.sandbox.tick()

    def settle_webhooks(self, timeout: float = 15.0) -> None:
        """Wait until the sandbox has nothing queued or in flight for any receiver."""
        assert self.sandbox.runtime.dispatcher.wait_idle(timeout), self.stats()["webhooks"]

    def deliver(self, timeout: float = 15.0) -> CycleReport:
        """One pickup cycle, then wait until its webhooks are delivered (or given up)."""
        report = self.tick()
        self.settle_webhooks(timeout)
        return report

    def faults(self, **changes: Any) -> dict[str, Any]:
        """``POST /_sandbox/faults`` (camelCase names); the faults now in force."""
        response = self.admin.post("/faults", json=changes)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def stats(self) -> dict[str, Any]:
        """``GET /_sandbox/stats``."""
        response = self.admin.get("/stats")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def calls(self, endpoint: str) -> int:
        """How many calls the sandbox answered at ``endpoint`` (``getOrder``...), any status."""
        return sum(self.stats()["calls"].get(endpoint, {}).values())

    # --- looking -------------------------------------------------------------------

    def truth(self, order_id: str) -> Order:
        """The order as the venue's getOrder shows it (read in-process: not counted)."""
        return self.sandbox.runtime.orders.get(order_id).order

    def inbox(self) -> list[Inbox]:
        """Every inbox row, oldest first."""
        with self.sessions.begin() as session:
            return list(session.scalars(sa.select(Inbox).order_by(Inbox.id)))

    def notified(self) -> list[str]:
        """The orderIds of the inbox rows, in the order they arrived."""
        return [str(row.order_id) for row in self.inbox()]

    def inbox_states(self) -> Counter[str]:
        """How many inbox rows are in each state."""
        return Counter(str(row.state) for row in self.inbox())

    def mirror(self, order_id: str) -> VenueOrder | None:
        """The mirrored order with its lines, wallets, assets and history, if stored."""
        query = (
            sa.select(VenueOrder)
            .where(VenueOrder.order_id == order_id)
            .options(
                selectinload(VenueOrder.items)
                .selectinload(OrderItem.wallets)
                .selectinload(Wallet.assets),
                selectinload(VenueOrder.status_changes),
            )
        )
        with self.sessions.begin() as session:
            rows = list(session.scalars(query))
        assert len(rows) <= 1, f"order {order_id} is mirrored {len(rows)} times"
        return rows[0] if rows else None

    def history(self, order_id: str) -> list[tuple[str | None, str]]:
        """The order's status changes as (status, source), oldest first."""
        row = self.mirror(order_id)
        assert row is not None, f"order {order_id} is not mirrored"
        return [
            (None if c.status is None else str(c.status), str(c.source)) for c in row.status_changes
        ]

    def status_change_counts(self) -> Counter[tuple[int, str | None]]:
        """How many status changes each (order row, status) has."""
        with self.sessions.begin() as session:
            pairs = session.execute(sa.select(StatusChange.venue_order_id, StatusChange.status))
            return Counter(
                (order, None if status is None else str(status)) for order, status in pairs
            )

    def assert_mirrored(self, order_ids: Iterable[str]) -> dict[str, VenueOrder]:
        """Each order is mirrored once, exactly as the venue's getOrder shows it now."""
        mirrored = {}
        for order_id in order_ids:
            truth = self.truth(order_id)
            row = self.mirror(order_id)
            assert row is not None, f"order {order_id} ({truth.status}) is not mirrored"
            assert row.status == truth.status, order_id
            assert row.removed_at is None, order_id
            assert row.buy_from_order_reference == truth.buy_from_order_reference, order_id
            assert row.sell_to_order_reference == truth.sell_to_order_reference, order_id
            assert row.payment_reference == truth.payment_reference, order_id
            assert row.manifest_url == truth.manifest_url, order_id
            assert order_lines(row) == order_lines(truth), order_id
            if truth.status in (OrderStatus.ISSUED, OrderStatus.DRAFT):
                wallets = [w for item in row.items for w in item.wallets]
                assert wallets, order_id
                assert all(w.wallet_reference_number and w.assets for w in wallets), order_id
            mirrored[order_id] = row
        return mirrored

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every otacm table, by table, in primary-key order."""
        tables: dict[str, list[tuple[Any, ...]]] = {}
        with self.sessions.begin() as session:
            for table in Base.metadata.sorted_tables:
                query = sa.select(table).order_by(*table.primary_key.columns)
                tables[table.name] = [tuple(row) for row in session.execute(query)]
        return tables


@pytest.fixture
def sandbox_changes() -> dict[str, Any]:
    """Changes to the sandbox's config; tests parametrize this to change the venue."""
    return {}


@pytest.fixture
def sandbox(sandbox_changes: dict[str, Any]) -> Iterator[SandboxServer]:
    """The simulated venue on a free port: no pickup cadence, fast webhook retries."""
    values: dict[str, Any] = {
        "pickup_interval": 0,
        "webhook_backoff": 0.05,
        "webhook_max_attempts": 10,
        "webhook_timeout": 10.0,
        "faults": Faults(seed=20240515),
    }
    with SandboxServer(SandboxConfig(**{**values, **sandbox_changes})) as server:
        yield server


@pytest.fixture
def settings_changes() -> dict[str, Any]:
    """Changes to otacm's settings; tests parametrize this."""
    return {}


@pytest.fixture
def settings(
    migrated_engine: sa.Engine, sandbox: SandboxServer, settings_changes: dict[str, Any]
) -> Settings:
    """otacm configured for the sandbox's venue, on the migrated test database."""
    config = sandbox.config
    values: dict[str, Any] = {
        "database_url": migrated_engine.url.render_as_string(hide_password=False),
        "api_base_url": sandbox.url,
        "tenant": config.tenant,
        "environment": config.environment,
        "company": config.company,
        "api_key": config.api_key,
        "partner_ids": [partner.id for partner in config.partners if partner.active],
        "webhook_client_states": [SecretStr(CLIENT_STATE)],
        "api_tokens": [SecretStr(API_TOKEN)],
        "db_lock_timeout": 2.0,
        "webhook_max_bytes": 64 * 1024,
    }
    return Settings(**{**values, **settings_changes})


@pytest.fixture
def read_sessions(migrated_engine: sa.Engine) -> sessionmaker[Session]:
    """Read-only sessions for the checks (on SQLite they never take the write lock)."""
    return make_sessions(migrated_engine, read_only=True)


@dataclass
class LiveReceiver:
    """``receiver.create_app(settings)`` served on a real port."""

    url: str
    receiver: Receiver


@pytest.fixture
def receiver(settings: Settings) -> Iterator[LiveReceiver]:
    """The receiver app in werkzeug's threaded server; stopped, and its engine disposed."""
    app = create_app(settings)
    receiver: Receiver = app.extensions[EXTENSION]
    try:
        server = make_server("127.0.0.1", 0, app, threaded=True)
    except BaseException:
        receiver.close()
        raise
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="receiver", daemon=True
    )
    thread.start()
    try:
        yield LiveReceiver(f"http://127.0.0.1:{server.server_port}", receiver)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
        receiver.close()


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
        admin = stack.enter_context(httpx.Client(base_url=f"{sandbox.url}/_sandbox", timeout=10))
        http = stack.enter_context(httpx.Client(base_url=receiver_url, timeout=30))
        subscription = venue.create_subscription(f"{receiver_url}{WEBHOOK_PATH}", CLIENT_STATE)
        assert subscription.id
        yield E2E(
            sandbox=sandbox,
            settings=settings,
            venue=venue,
            worker=worker,
            sessions=read_sessions,
            admin=admin,
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
