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

The layers and helpers shared with the end-to-end tests are :mod:`tests.support.stack`'s;
this module adds what only the heartbeat's tests have: the virtual clock, otacm's own venue
client and the jobs run on it, and more ways to look at the venue and the mirror.

Other heartbeat test modules import from here read-only; keep the names stable.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.feed import FeedReport, run_feed
from heartbeat.watchdog import WatchdogReport, check_orders
from orders.worker import WorkerReport
from otacm.settings import Settings
from sandbox import SandboxServer
from storage.lease import new_owner
from storage.models import VenueOrder, ensure_connection
from storage.records import FeedCursor
from storage.types import utcnow
from tests.support.stack import (
    SandboxStack,
    drain_inbox,
    error_line,
    line,
    order_lines,
    read_sessions,
    sandbox_admin,
    sandbox_changes,
    sandbox_settings,
    serve_sandbox,
    settings_changes,
    visit_date,
    wait_until,
)
from venue.client import VenueClient, open_client

# What tests import from here (their own or shared), and the shared fixtures, which are
# registered here by being imported.
__all__ = [
    "HeartbeatStack",
    "error_line",
    "line",
    "order_lines",
    "read_sessions",
    "sandbox_changes",
    "settings_changes",
    "visit_date",
    "wait_until",
]


@dataclass
class HeartbeatStack(SandboxStack):
    """The venue, otacm's database and worker, and the helpers heartbeat tests share.

    Attributes (besides :class:`~tests.support.stack.SandboxStack`'s):
        connection_id: the sandbox connection's row id.
        client: otacm's venue client, used by the heartbeat jobs and the worker.
        sessions: read-write sessions on otacm's database (the jobs' own).
        offset: how far otacm's virtual clock runs ahead of the real time.
        owner: the worker's lease owner name.
    """

    connection_id: int
    client: VenueClient
    sessions: sessionmaker[Session]
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
        overlap: dt.timedelta | None = None,
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
            recheck_horizon=dt.timedelta(days=settings.recheck_horizon_days),
            stuck_after=dt.timedelta(seconds=settings.stuck_after),
            connection_ids=[self.connection_id],
            limit=limit,
        )

    def drain(self, *, max_passes: int = 100) -> WorkerReport:
        """The inbox worker's ``run_once`` until a pass claims nothing; the sum of passes."""
        return drain_inbox(
            self.sessions, self.clients, owner=self.owner, clock=self.now, max_passes=max_passes
        )

    def sync(self) -> tuple[FeedReport, WorkerReport]:
        """A feed pass, then the worker until idle: what one heartbeat does for the feed."""
        report = self.feed()
        return report, self.drain()

    # --- acting as the shop ------------------------------------------------------------

    def create(self, reference: str, **kwargs: Any) -> str:
        """createOrder at the venue with the tests' client; the new orderId."""
        return self.venue.create_order(self.order_request(reference, **kwargs)).order_id

    def create_error(self, reference: str) -> str:
        """An order that will end in Error when processed; its orderId."""
        return self.create(reference, items=[error_line()])

    def restore(self) -> dict[str, Any]:
        """``POST /_sandbox/restore``: the venue's row versions start again from 1."""
        response = self.admin.post("/restore")
        assert response.status_code == 200, response.text
        return dict(response.json())

    # --- looking at the venue ------------------------------------------------------------

    def reset_stats(self) -> None:
        """Zero the venue's counters."""
        assert self.admin.delete("/stats").status_code == 200

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

    def mirrored_ids(self) -> set[str]:
        """The orderIds of every mirrored order, removed ones included."""
        with self.read_sessions.begin() as session:
            return set(session.scalars(sa.select(VenueOrder.order_id)))

    def assert_removed(self, order_id: str) -> VenueOrder:
        """The order is gone at the venue and marked removed in the mirror."""
        assert self.truth(order_id) is None, f"order {order_id} is still at the venue"
        row = self.mirror(order_id)
        assert row is not None, f"order {order_id} was never mirrored"
        assert row.removed_at is not None, f"order {order_id} is not marked removed"
        return row


@pytest.fixture
def sandbox(sandbox_changes: dict[str, Any]) -> Iterator[SandboxServer]:
    """The simulated venue on a free port: no pickup cadence, seeded faults."""
    with serve_sandbox(sandbox_changes) as server:
        yield server


@pytest.fixture
def settings(
    migrated_engine: sa.Engine, sandbox: SandboxServer, settings_changes: dict[str, Any]
) -> Settings:
    """otacm configured for the sandbox's venue, on the migrated test database."""
    own = {"webhook_client_states": [SecretStr("heartbeat-client-state-3f9a")]}
    return sandbox_settings(sandbox, migrated_engine, own, settings_changes)


@pytest.fixture
def stack(
    sandbox: SandboxServer,
    settings: Settings,
    sessions: sessionmaker[Session],
    read_sessions: sessionmaker[Session],
) -> Iterator[HeartbeatStack]:
    """The venue, otacm's database, its venue client and the tests' own; no webhooks."""
    (connection,) = settings.connections
    with sessions.begin() as session:
        connection_id = ensure_connection(session, connection.name)
    with (
        open_client(connection) as client,
        open_client(connection) as venue,
        sandbox_admin(sandbox) as admin,
    ):
        yield HeartbeatStack(
            sandbox=sandbox,
            settings=settings,
            connection_id=connection_id,
            client=client,
            venue=venue,
            sessions=sessions,
            read_sessions=read_sessions,
            admin=admin,
        )
