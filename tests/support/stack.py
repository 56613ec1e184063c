"""otacm against the sandbox over real HTTP: the layers and helpers the stack tests share.

The layers, one each: :func:`serve_sandbox` (the simulated venue on a free port, no
pickup cadence: tests tick it) → :func:`sandbox_settings` (otacm configured for it, on
the test database) → :func:`receiver` (``receiver.create_app`` in werkzeug's threaded
server) → :func:`drain_inbox` (the inbox worker until idle). Tests change a layer by
parametrizing the ``sandbox_changes`` and ``settings_changes`` fixtures.

:class:`SandboxStack` holds what every stack has (the sandbox, the settings, a venue
client of the tests' own, the sandbox's admin endpoints, read-only sessions) and the
helpers on it: acting at the venue as the shop would, looking at the venue, and reading
the mirror back. ``tests/e2e``'s :class:`~tests.e2e.conftest.E2E` and
``tests/heartbeat``'s :class:`~tests.heartbeat.conftest.HeartbeatStack` extend it.

Nothing waits on a fixed sleep: :func:`wait_until` polls against a deadline.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload, sessionmaker

from orders.worker import WorkerReport, run_once
from otacm.settings import Settings
from receiver.testing import LiveReceiver, served_receiver
from sandbox import Faults, SandboxConfig, SandboxServer
from sandbox.pipeline import CycleReport
from storage.engine import make_sessions
from storage.models import Base, Inbox, OrderItem, VenueOrder, Wallet
from storage.types import utcnow
from venue.client import VenueClient
from venue.models import Order, OrderRequest, OrderStatus

T = TypeVar("T")

WORKER_LEASE_SECONDS = 30.0
FAULT_SEED = 20240515
"""The sandbox's fault dice: the same faults, run after run."""


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


# --- orders ------------------------------------------------------------------------------


SOLD_OUT_ITEM = "31099"
"""The sandbox catalog's item whose capacity is exhausted."""


def visit_date(days: int = 30) -> str:
    """A visit date ``days`` from now, as YYYY-MM-DD (the venue refuses past dates)."""
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).date().isoformat()


def line(item: str = "31001", quantity: int = 1, **extra: Any) -> dict[str, Any]:
    """One order line of the sandbox's catalog, as the venue accepts it (visitTime too)."""
    return {
        "itemNumber": item,
        "visitDate": visit_date(),
        "visitTime": "10:30:00",
        "quantity": quantity,
        **extra,
    }


def error_line() -> dict[str, Any]:
    """An order line the venue accepts but fails to issue: the order ends in Error.

    The sandbox catalog's sold-out item: createOrder takes it, and its ticket import
    fails at processing (CMTicketIssuer RunTicketImport; the capacity is exceeded).
    """
    return line(SOLD_OUT_ITEM)


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


def _blanks_as_none(value: Any) -> Any:
    """``value`` with every ``""`` inside as ``None``, as the mirror stores the venue's blanks."""
    if value == "":
        return None
    if isinstance(value, list | tuple):
        return type(value)(_blanks_as_none(part) for part in value)
    return value


# --- the layers ----------------------------------------------------------------------------


@pytest.fixture
def sandbox_changes() -> dict[str, Any]:
    """Changes to the sandbox's config; tests parametrize this to change the venue."""
    return {}


@pytest.fixture
def settings_changes() -> dict[str, Any]:
    """Changes to otacm's settings; tests parametrize this."""
    return {}


@contextmanager
def serve_sandbox(*layers: Mapping[str, Any]) -> Iterator[SandboxServer]:
    """The simulated venue on a free port: no pickup cadence, fast webhook retries.

    Its faults are seeded (:data:`FAULT_SEED`); ``layers`` of config values follow,
    each overriding the ones before (a conftest's own, then ``sandbox_changes``).
    """
    values: dict[str, Any] = {
        "pickup_interval": 0,
        "webhook_backoff": 0.05,
        "faults": Faults(seed=FAULT_SEED),
    }
    for layer in layers:
        values.update(layer)
    with SandboxServer(SandboxConfig(**values)) as server:
        yield server


def sandbox_settings(
    sandbox: SandboxServer, database: sa.Engine, *layers: Mapping[str, Any]
) -> Settings:
    """otacm configured for the sandbox's venue (its first active partner) on ``database``.

    Only the first active partner: the venue's webhooks and getOrder are company-wide
    (CMOrderWebhooks, ChannelMgrOrderAgent ``GetOrder``), so the other active partners'
    orders reach otacm too, which must leave them unmirrored; configuring every partner
    would hide that. ``layers`` of settings values follow, each overriding the ones
    before (a conftest's own, then ``settings_changes``).
    """
    config = sandbox.config
    values: dict[str, Any] = {
        "database_url": database.url.render_as_string(hide_password=False),
        "api_base_url": sandbox.url,
        "tenant": config.tenant,
        "environment": config.environment,
        "company": config.company,
        "api_key": config.api_key,
        "partner_ids": [next(partner.id for partner in config.partners if partner.active)],
    }
    for layer in layers:
        values.update(layer)
    return Settings(**values)


def sandbox_admin(sandbox: SandboxServer) -> httpx.Client:
    """An HTTP client of the sandbox's ``/_sandbox`` endpoints; the caller closes it."""
    return httpx.Client(base_url=f"{sandbox.url}/_sandbox", timeout=10)


@pytest.fixture
def read_sessions(migrated_engine: sa.Engine) -> sessionmaker[Session]:
    """Read-only sessions for the checks (on SQLite they never take the write lock)."""
    return make_sessions(migrated_engine, read_only=True)


@pytest.fixture
def receiver(settings: Settings) -> Iterator[LiveReceiver]:
    """The receiver app in werkzeug's threaded server; stopped, and its engine disposed."""
    with served_receiver(settings) as live:
        yield live


def drain_inbox(
    sessions: sessionmaker[Session],
    clients: Mapping[int, VenueClient],
    *,
    owner: str,
    clock: Callable[[], dt.datetime] = utcnow,
    max_passes: int = 100,
) -> WorkerReport:
    """The inbox worker's ``run_once`` until a pass claims nothing; the sum of the passes.

    Args:
        sessions: read-write sessions on otacm's database.
        clients: the venue client of each connection, by connection id.
        owner: the worker's lease owner name.
        clock: otacm's time, read at each pass (a test's virtual clock, or the real one).
        max_passes: how many passes before the worker counts as never idle.

    Raises:
        AssertionError: the worker still claimed rows after ``max_passes`` passes.
    """
    total = WorkerReport()
    for _ in range(max_passes):
        report = run_once(
            sessions,
            clients,
            owner=owner,
            now=clock(),
            lease_seconds=WORKER_LEASE_SECONDS,
        )
        total.add(report)
        if not report.claimed:
            return total
    raise AssertionError(f"the worker still claimed rows after {max_passes} passes")


# --- the stack -----------------------------------------------------------------------------


@dataclass
class SandboxStack:
    """What every stack against the sandbox holds, and the helpers on it.

    Attributes:
        sandbox: the simulated venue.
        settings: otacm's settings (one connection: the sandbox).
        venue: the tests' own venue client, for acting as the shop (or another sales
            channel) would. Its calls count at the venue too.
        admin: an HTTP client of the sandbox's ``/_sandbox`` endpoints.
        read_sessions: read-only sessions on otacm's database, for the checks.
    """

    sandbox: SandboxServer
    settings: Settings
    venue: VenueClient
    admin: httpx.Client
    read_sessions: sessionmaker[Session]

    # --- acting ----------------------------------------------------------------------

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

    def order_request(self, reference: str, **kwargs: Any) -> OrderRequest:
        """:meth:`order_body` as the venue client's request model."""
        return OrderRequest.model_validate(self.order_body(reference, **kwargs))

    def tick(self) -> CycleReport:
        """One pickup cycle at the venue: Submitted orders settle, webhooks are queued."""
        return self.sandbox.tick()

    def faults(self, **changes: Any) -> dict[str, Any]:
        """``POST /_sandbox/faults`` (camelCase names); the faults now in force."""
        response = self.admin.post("/faults", json=changes)
        assert response.status_code == 200, response.text
        return dict(response.json())

    # --- looking at the venue ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """``GET /_sandbox/stats``."""
        response = self.admin.get("/stats")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def calls(self, endpoint: str) -> int:
        """How many calls the venue answered at ``endpoint`` (``getOrder``...), any status."""
        return sum(self.stats()["calls"].get(endpoint, {}).values())

    def truth(self, order_id: str) -> Order | None:
        """The order as getOrder would show it (read in-process: not counted), or ``None``."""
        record = self.sandbox.runtime.store.get(order_id)
        return None if record is None else record.order

    # --- looking at otacm ---------------------------------------------------------------

    def inbox(self) -> list[Inbox]:
        """Every inbox row, oldest first."""
        with self.read_sessions.begin() as session:
            return list(session.scalars(sa.select(Inbox).order_by(Inbox.id)))

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
        with self.read_sessions.begin() as session:
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

    def assert_mirrored(self, order_ids: Iterable[str]) -> dict[str, VenueOrder]:
        """Each order is mirrored once, exactly as the venue's getOrder shows it now."""
        mirrored = {}
        for order_id in order_ids:
            truth = self.truth(order_id)
            assert truth is not None, f"order {order_id} is not at the venue"
            row = self.mirror(order_id)
            assert row is not None, f"order {order_id} ({truth.status}) is not mirrored"
            assert (row.status, row.removed_at) == (truth.status, None), order_id
            assert row.status_message == (truth.status_message or None), order_id
            assert row.buy_from_order_reference == truth.buy_from_order_reference, order_id
            assert row.sell_to_order_reference == truth.sell_to_order_reference, order_id
            assert row.payment_reference == truth.payment_reference, order_id
            assert row.manifest_url == truth.manifest_url, order_id
            assert _blanks_as_none(order_lines(row)) == _blanks_as_none(order_lines(truth)), (
                order_id
            )
            if truth.status in (OrderStatus.ISSUED, OrderStatus.DRAFT):
                wallets = [w for item in row.items for w in item.wallets]
                assert wallets, order_id
                assert all(w.wallet_reference_number and w.assets for w in wallets), order_id
            mirrored[order_id] = row
        return mirrored

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every otacm table, by table, in primary-key order."""
        tables: dict[str, list[tuple[Any, ...]]] = {}
        with self.read_sessions.begin() as session:
            for table in Base.metadata.sorted_tables:
                query = sa.select(table).order_by(*table.primary_key.columns)
                tables[table.name] = [tuple(row) for row in session.execute(query)]
        return tables
