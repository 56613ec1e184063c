"""Fixtures for the heartbeat's tests: the venue, otacm's database and worker, no webhooks.

One layer each: ``sandbox`` (the simulated venue on a free port, no pickup cadence:
tests call :meth:`HeartbeatStack.tick`) → ``settings`` pointing otacm at it, on the
``migrated_engine`` database (SQLite, then PostgreSQL) → ``stack``, which bundles the
venue client the heartbeat and the worker share, a second client the tests act with (as
the shop or another sales channel would), the virtual clock and the helpers:
:meth:`~HeartbeatStack.feed` (one :func:`heartbeat.feed.run_feed` pass),
:meth:`~HeartbeatStack.watchdog` (one :func:`heartbeat.watchdog.check_orders` pass) and
:meth:`~HeartbeatStack.drain` (the inbox worker until idle).

No receiver is subscribed to the sandbox's webhooks: every notification is as good as
dropped, so whatever the mirror learns, the heartbeat found. Tests change a layer by
parametrizing ``sandbox_changes`` (the :class:`SandboxConfig`) or ``settings_changes``
(the :class:`Settings`). Time is virtual: :meth:`HeartbeatStack.advance` moves otacm's
clock and the venue's together, so nothing sleeps.

Other heartbeat test modules import from here read-only; keep the names stable.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.orm import Session, selectinload, sessionmaker

from heartbeat.feed import FeedReport, run_feed
from heartbeat.watchdog import WatchdogReport, check_orders
from otacm.settings import Settings
from receiver.worker import WorkerReport, new_owner, run_once
from sandbox import Faults, SandboxConfig, SandboxServer
from sandbox.pipeline import CycleReport
from storage.engine import make_sessions
from storage.models import (
    Base,
    FeedCursor,
    Inbox,
    OrderItem,
    VenueOrder,
    Wallet,
    ensure_connection,
)
from storage.types import utcnow
from tests.e2e.conftest import line, order_lines, visit_date, wait_until
from venue.client import VenueClient, open_client
from venue.models import Order, OrderRequest, OrderStatus

__all__ = [
    "HeartbeatStack",
    "error_line",
    "line",
    "order_lines",
    "visit_date",
    "wait_until",
]

WORKER_LEASE_SECONDS = 30.0


def error_line() -> dict[str, Any]:
    """An order line the venue accepts but fails to issue: the order ends in Error.

    A package line whose ``componentSchedule`` names an item that is not one of the
    package's ticket components (the sandbox checks schedules at processing, as the
    venue does).
    """
    return line(
        "40100",
        wallet={"componentSchedule": [{"itemNumber": "99999", "visitDate": visit_date()}]},
    )


def _blanks_as_none(value: Any) -> Any:
    """``value`` with every ``""`` inside as ``None``, as the mirror stores the venue's blanks."""
    if value == "":
        return None
    if isinstance(value, list | tuple):
        return type(value)(_blanks_as_none(part) for part in value)
    return value


@dataclass
class HeartbeatStack:
    """The venue, otacm's database and worker, and the helpers heartbeat tests share.

    Attributes:
        sandbox: the simulated venue.
        settings: otacm's settings (one connection: the sandbox).
        connection_id: that connection's row id.
        client: otacm's venue client, used by the heartbeat jobs and the worker.
        venue: the tests' own venue client, for acting as the shop would (create,
            confirm, replace, delete). Its calls count at the venue too.
        sessions: read-write sessions on otacm's database (the jobs' own).
        read_sessions: read-only sessions, for the checks.
        admin: an HTTP client of the sandbox's ``/_sandbox`` endpoints.
        offset: how far otacm's virtual clock runs ahead of the real time.
        owner: the worker's lease owner name.
    """

    sandbox: SandboxServer
    settings: Settings
    connection_id: int
    client: VenueClient
    venue: VenueClient
    sessions: sessionmaker[Session]
    read_sessions: sessionmaker[Session]
    admin: httpx.Client
    offset: dt.timedelta = dt.timedelta(0)
    owner: str = field(default_factory=new_owner)

    # --- time ----------------------------------------------------------------------

    def now(self) -> dt.datetime:
        """otacm's current (virtual) time."""
        return utcnow() + self.offset

    def advance(self, seconds: float, *, venue: bool = True) -> None:
        """Move otacm's clock forward, and the venue's with it unless ``venue`` is false."""
        self.offset += dt.timedelta(seconds=seconds)
        if venue:
            response = self.admin.post("/clock", json={"advanceSeconds": seconds})
            assert response.status_code == 200, response.text

    # --- otacm's jobs ----------------------------------------------------------------

    @property
    def partner_id(self) -> str:
        """The sandbox's first (active) partner."""
        return self.settings.connections[0].partner_ids[0]

    @property
    def clients(self) -> dict[int, VenueClient]:
        """otacm's venue client by connection id, as the scheduler's runtime holds them."""
        return {self.connection_id: self.client}

    @property
    def partners(self) -> dict[int, list[str]]:
        """The partners to follow by connection id, as the scheduler passes them."""
        return {self.connection_id: list(self.settings.connections[0].partner_ids)}

    def feed(
        self,
        *,
        client: VenueClient | None = None,
        overlap: int | None = None,
        page_size: int | None = None,
    ) -> FeedReport:
        """One pass of :func:`heartbeat.feed.run_feed` over every partner, at :meth:`now`."""
        clients: Mapping[int, VenueClient] = (
            self.clients if client is None else {self.connection_id: client}
        )
        return run_feed(
            self.sessions,
            clients,
            self.partners,
            now=self.now(),
            overlap=self.settings.feed_overlap if overlap is None else overlap,
            page_size=page_size,
        )

    def watchdog(self, *, limit: int = 500) -> WatchdogReport:
        """One pass of :func:`heartbeat.watchdog.check_orders` with the settings' thresholds."""
        settings = self.settings
        return check_orders(
            self.sessions,
            now=self.now(),
            in_flight_after=dt.timedelta(seconds=settings.in_flight_check_after),
            open_recheck=dt.timedelta(seconds=settings.open_order_recheck),
            stuck_after=dt.timedelta(seconds=settings.stuck_after),
            connection_ids=[self.connection_id],
            limit=limit,
        )

    def drain(self, *, max_passes: int = 100) -> WorkerReport:
        """The inbox worker's ``run_once`` until a pass claims nothing; the sum of passes."""
        total = WorkerReport()
        for _ in range(max_passes):
            report = run_once(
                self.sessions,
                self.clients,
                owner=self.owner,
                now=self.now(),
                lease_seconds=WORKER_LEASE_SECONDS,
            )
            total.add(report)
            if not report.claimed:
                return total
        raise AssertionError(f"the worker still claimed rows after {max_passes} passes")

    def sync(self) -> tuple[FeedReport, WorkerReport]:
        """A feed pass, then the worker until idle: what one heartbeat does for the feed."""
        report = self.feed()
        return report, self.drain()

    # --- acting as the shop ------------------------------------------------------------

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

    def create(self, reference: str, **kwargs: Any) -> str:
        """createOrder at the venue with the tests' client; the new orderId."""
        return self.venue.create_order(self.order_request(reference, **kwargs)).order_id

    def create_error(self, reference: str) -> str:
        """An order that will end in Error when processed; its orderId."""
        return self.create(reference, items=[error_line()])

    def tick(self) -> CycleReport:
        """One pickup cycle at the venue: Submitted orders settle (no webhook reaches us)."""
        return self.sandbox.tick()

    def faults(self, **changes: Any) -> dict[str, Any]:
        """``POST /_sandbox/faults`` (camelCase names); the faults now in force."""
        response = self.admin.post("/faults", json=changes)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def restore(self) -> dict[str, Any]:
        """``POST /_sandbox/restore``: the venue's row versions start again from 1."""
        response = self.admin.post("/restore")
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

    def reset_stats(self) -> None:
        """Zero the venue's counters."""
        assert self.admin.delete("/stats").status_code == 200

    def truth(self, order_id: str) -> Order | None:
        """The order as getOrder would show it (read in-process: not counted), or ``None``."""
        record = self.sandbox.runtime.store.get(order_id)
        return None if record is None else record.order

    def truth_row_version(self, order_id: str) -> int:
        """The venue's current row version of an order."""
        record = self.sandbox.runtime.store.get(order_id)
        assert record is not None, f"order {order_id} is not at the venue"
        return record.row_version

    # --- looking at otacm ---------------------------------------------------------------

    def cursor(self, partner_id: str | None = None) -> int | None:
        """The feed's stored high-water mark for a partner (the first by default)."""
        with self.read_sessions.begin() as session:
            return session.scalar(
                sa.select(FeedCursor.last_row_version).where(
                    FeedCursor.connection_id == self.connection_id,
                    FeedCursor.partner_id == (partner_id or self.partner_id),
                )
            )

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

    def mirrored_ids(self) -> set[str]:
        """The orderIds of every mirrored order, removed ones included."""
        with self.read_sessions.begin() as session:
            return set(session.scalars(sa.select(VenueOrder.order_id)))

    def history(self, order_id: str) -> list[tuple[str | None, str]]:
        """The order's status changes as (status, source), oldest first."""
        row = self.mirror(order_id)
        assert row is not None, f"order {order_id} is not mirrored"
        return [
            (None if c.status is None else str(c.status), str(c.source)) for c in row.status_changes
        ]

    def assert_mirrored(self, order_ids: list[str]) -> dict[str, VenueOrder]:
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

    def assert_removed(self, order_id: str) -> VenueOrder:
        """The order is gone at the venue and marked removed in the mirror."""
        assert self.truth(order_id) is None, f"order {order_id} is still at the venue"
        row = self.mirror(order_id)
        assert row is not None, f"order {order_id} was never mirrored"
        assert row.removed_at is not None, f"order {order_id} is not marked removed"
        return row

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every otacm table, by table, in primary-key order."""
        tables: dict[str, list[tuple[Any, ...]]] = {}
        with self.read_sessions.begin() as session:
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
    """The simulated venue on a free port: no pickup cadence, seeded faults."""
    values: dict[str, Any] = {
        "pickup_interval": 0,
        "webhook_backoff": 0.05,
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
        "webhook_client_states": [SecretStr("heartbeat-client-state-3f9a")],
    }
    return Settings(**{**values, **settings_changes})


@pytest.fixture
def stack(
    sandbox: SandboxServer,
    settings: Settings,
    sessions: sessionmaker[Session],
    migrated_engine: sa.Engine,
) -> Iterator[HeartbeatStack]:
    """The venue, otacm's database, its venue client and the tests' own; no webhooks."""
    (connection,) = settings.connections
    with sessions.begin() as session:
        connection_id = ensure_connection(session, connection.name)
    with (
        open_client(connection) as client,
        open_client(connection) as venue,
        httpx.Client(base_url=f"{sandbox.url}/_sandbox", timeout=10) as admin,
    ):
        yield HeartbeatStack(
            sandbox=sandbox,
            settings=settings,
            connection_id=connection_id,
            client=client,
            venue=venue,
            sessions=sessions,
            read_sessions=make_sessions(migrated_engine, read_only=True),
            admin=admin,
        )
