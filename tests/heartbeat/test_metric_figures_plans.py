"""``/metrics``' backlog counts read their indexes, not every row: plans and results.

The figures job counts the orders in Error the venue still holds and the open
reconciliation exceptions by category. Both backlogs stay as the history grows (at 10M
orders: 101k Error orders, read row by row in 0.5-2.7 s; a million open exceptions,
fetched and counted in 1.4-2.1 s), so each is counted from an index that holds it: the
plans are read from each database's EXPLAIN of the statements the job sends (captured on
their way to the driver), over a mirror and a ledger of thousands of rows. SQLite is left
without statistics, as otacm runs it; PostgreSQL is vacuumed and analyzed, as autovacuum
would.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.metric_figures import compute_figures
from storage.models import VenueOrder, ensure_connection
from tests.finance.conftest import MANY_CATEGORIES, seed_many
from tests.support.plans import query_plan, sent_statements
from venue.models import OrderStatus

NOW = dt.datetime.now(dt.UTC)
ORDERS = 6000
OPEN_EXCEPTIONS = 3000


def _orders(connection_id: int) -> list[dict[str, Any]]:
    """``ORDERS`` orders: every 100th in Error, every other of those removed at the venue."""
    rows = []
    for number in range(ORDERS):
        in_error = number % 100 == 0
        rows.append(
            {
                "connection_id": connection_id,
                "order_id": str(uuid.uuid4()),
                "partner_id": str(uuid.uuid4()),
                "sell_to_order_reference": f"SHOP-{number:06d}",
                "reference_key": f"SHOP-{number:06d}",
                "status": OrderStatus.ERROR if in_error else OrderStatus.ISSUED,
                "status_changed_at": NOW - dt.timedelta(days=1),
                "first_seen_at": NOW - dt.timedelta(days=1),
                "removed_at": NOW if in_error and number % 200 == 0 else None,
                "updated_at": NOW,
            }
        )
    return rows


def test_the_backlogs_are_counted_from_their_indexes(
    sessions: sessionmaker[Session], migrated_engine: sa.Engine
) -> None:
    """The Error orders are counted from ``(connection_id, status, removed_at)`` and the
    open exceptions from ``(connection_id, state, category)`` (from the index alone, on
    SQLite); the counts leave out the removed orders and the resolved and closed
    exceptions."""
    many = seed_many(sessions, OPEN_EXCEPTIONS, closed=OPEN_EXCEPTIONS)
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "venue-a")
        session.execute(sa.insert(VenueOrder), _orders(connection_id))
    sqlite = migrated_engine.dialect.name == "sqlite"
    if not sqlite:
        with migrated_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql("VACUUM ANALYZE")

    with sent_statements(migrated_engine, "SELECT") as sent, sessions.begin() as session:
        figures = compute_figures(session, now=NOW, stuck_after=dt.timedelta(hours=1))

    found = figures.connections["venue-a"]
    assert found.in_error == ORDERS // 200
    expected = Counter(
        MANY_CATEGORIES[index % 3] for index in range(OPEN_EXCEPTIONS) if index % 7 != 0
    )
    assert found.exceptions_open == dict(expected)
    assert len(many.closed) == OPEN_EXCEPTIONS  # closed ones exist, and are not counted

    (orders,) = [(s, p) for s, p in sent if "removed_at IS NULL" in s]
    (exceptions,) = [(s, p) for s, p in sent if "FROM recon_exception" in s]
    orders_plan = query_plan(migrated_engine, *orders)
    exceptions_plan = query_plan(migrated_engine, *exceptions)
    orders_index = "ix_venue_order_connection_id_status_removed_at"
    exceptions_index = "ix_recon_exception_connection_id_state_category"
    if sqlite:
        assert f"USING COVERING INDEX {orders_index}" in orders_plan, orders_plan
        assert f"USING COVERING INDEX {exceptions_index}" in exceptions_plan, exceptions_plan
    else:
        assert orders_index in orders_plan, orders_plan
        assert exceptions_index in exceptions_plan, exceptions_plan
