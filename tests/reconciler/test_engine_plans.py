"""A reconciliation reads its period through indexes by time, not the history before it.

The plans are each database's own EXPLAIN of the statements a real run sends (captured
on their way to the driver), over a mirror and a ledger holding a long history before
the period and a few sales and orders in it: the shape where a run that reads history
costs most. SQLite is left without statistics, as otacm runs it; PostgreSQL is
analyzed, as autovacuum would.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from reconciler.engine import reconcile
from reconciler.findings import FINDINGS
from storage.models import LedgerLine, VenueOrder, ensure_connection
from storage.records import ReconTotal, ReconTrigger
from tests.reconciler.test_engine import plant_every_case
from tests.support.plans import query_plan, sent_statements

PARTNER = "7d1c2f3a-0000-4000-8000-000000000001"
PERIOD_FROM = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
PERIOD_TO = dt.datetime(2026, 5, 8, tzinfo=dt.UTC)
NOW = dt.datetime(2026, 5, 8, 12, 0, tzinfo=dt.UTC)
HISTORY = 4000
"""Sales and orders before the period (each sale with its order)."""
IN_PERIOD = 40
"""Sales in the period, each with its order; a few more orders without a sale."""

INDEX_READ = re.compile(
    r"(?:USING INDEX|USING COVERING INDEX|Index Scan using|Index Only Scan using|Index Scan on)"
    r" (\w+)"
)
"""A plan's step reading an index, in SQLite's words and PostgreSQL's; the index's name."""

TABLE_SCAN = re.compile(r"\bSCAN (?:l|o|ledger_line|venue_order)\b|Seq Scan")
"""A step reading a whole table of the ledger or the mirror (SQLite's ``SCAN compared``
is its own subquery's rows, not a table)."""


def _sale(connection_id: int, number: int, at: dt.datetime) -> dict[str, Any]:
    reference = f"REF-{number:06d}"
    return {
        "connection_id": connection_id,
        "partner_id": PARTNER,
        "shop_reference": reference,
        "reference_key": reference,
        "sold_at": at,
        "quantity": 1,
        "amount": Decimal("25.00"),
        "currency": "EUR",
        "amount_includes_vat": True,
        "state": "active",
        "source": "import",
    }


def _order(
    connection_id: int, number: int, at: dt.datetime, *, received: bool = True
) -> dict[str, Any]:
    reference = f"REF-{number:06d}"
    return {
        "connection_id": connection_id,
        "order_id": f"00000000-0000-4000-8000-{number:012d}",
        "partner_id": PARTNER,
        "sell_to_order_reference": reference,
        "reference_key": reference,
        "status": "Issued",
        "status_changed_at": at,
        "received_at": at if received else None,
        "first_seen_at": at,
        "items_quantity": 1,
        "amount_incl_vat": Decimal("25.00"),
        "amount_excl_vat": Decimal("20.66"),
        "wallet_currencies": "EUR",
    }


def _fill(sessions: sessionmaker[Session]) -> int:
    """History before the period, a little in it; returns the connection's id.

    In the period: :data:`IN_PERIOD` sales with their orders (half of them without
    ``received_at``), and three orphans (one without ``received_at``); one sale of the
    period whose order came before it, and one order of the period whose sale was sold
    before it: what a run must read outside its period.
    """
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "castle")
        sales, orders = [], []
        for number in range(HISTORY):
            at = PERIOD_FROM - dt.timedelta(days=1 + number % 400, minutes=number)
            sales.append(_sale(connection_id, number, at))
            orders.append(_order(connection_id, number, at, received=number % 5 != 0))
        for number in range(HISTORY, HISTORY + IN_PERIOD):
            at = PERIOD_FROM + dt.timedelta(hours=1 + number - HISTORY)
            sales.append(_sale(connection_id, number, at))
            orders.append(_order(connection_id, number, at, received=number % 2 == 0))
        for number, received in ((900_001, True), (900_002, True), (900_003, False)):
            orders.append(
                _order(connection_id, number, PERIOD_FROM + dt.timedelta(days=2), received=received)
            )
        # A sale of the period whose order the venue received the day before it, and an
        # order of the period whose sale was sold the week before.
        sales.append(_sale(connection_id, 800_001, PERIOD_FROM + dt.timedelta(days=1)))
        orders.append(_order(connection_id, 800_001, PERIOD_FROM - dt.timedelta(days=1)))
        sales.append(_sale(connection_id, 800_002, PERIOD_FROM - dt.timedelta(days=7)))
        orders.append(_order(connection_id, 800_002, PERIOD_FROM + dt.timedelta(days=1)))
        session.execute(sa.insert(LedgerLine), sales)
        session.execute(sa.insert(VenueOrder), orders)
    return connection_id


@pytest.mark.parametrize("partners", [None, [PARTNER]], ids=["every-partner", "configured"])
def test_a_run_reads_its_period_through_the_indexes_by_time(
    sessions: sessionmaker[Session], migrated_engine: sa.Engine, partners: list[str] | None
) -> None:
    """The sales come from the ledger's index by sold_at and their orders from the
    mirror's index by reference, one sale at a time; the orphans from the mirror's
    indexes by received_at and (no receivedAt) first_seen_at, and their sales from the
    ledger's unique index: no step reads a whole table. And the run finds what the
    period holds, including what lies across its edges."""
    connection_id = _fill(sessions)
    if migrated_engine.dialect.name == "postgresql":
        with migrated_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE ledger_line")
            conn.exec_driver_sql("ANALYZE venue_order")

    with sent_statements(migrated_engine, f"INSERT INTO {FINDINGS} ") as sent:
        run_id = reconcile(
            sessions,
            connection_id=connection_id,
            period_from=PERIOD_FROM,
            period_to=PERIOD_TO,
            now=NOW,
            trigger=ReconTrigger.MANUAL,
            actor="test",
            grace=dt.timedelta(hours=1),
            tolerance=Decimal("0.01"),
            partner_ids=partners,
        )
    sales, received, unreceived = (
        query_plan(migrated_engine, statement[statement.index("SELECT") :], parameters)
        for statement, parameters in sent
    )

    assert INDEX_READ.findall(sales) == [
        "ix_ledger_line_connection_id_sold_at",
        "ix_venue_order_connection_id_partner_id_reference_key",
    ], sales
    ledger_key = (
        "uq_ledger_line_connection_id_partner_id_reference_key",
        "sqlite_autoindex_ledger_line_1",
    )
    assert INDEX_READ.findall(received)[0] == "ix_venue_order_connection_id_received_at", received
    assert INDEX_READ.findall(received)[1] in ledger_key, received
    assert INDEX_READ.findall(unreceived)[0] == "ix_venue_order_connection_id_first_seen_at"
    assert INDEX_READ.findall(unreceived)[1] in ledger_key, unreceived
    for plan in (sales, received, unreceived):
        assert not TABLE_SCAN.search(plan), plan
    with sessions() as session:
        totals = {
            total.category: total.count
            for total in session.scalars(
                sa.select(ReconTotal).where(ReconTotal.recon_run_id == run_id)
            )
        }
    assert totals == {"matched": IN_PERIOD + 1, "orphan": 3}


BATCH_STEP = re.compile(
    r"SEARCH (?:f|c|temp\.recon_closing) USING INTEGER PRIMARY KEY \(rowid>\? AND rowid<\?\)"
)
"""SQLite's step reading a batch's own rows, by their rowids."""

EXCEPTIONS_WALKED = re.compile(
    r"SCAN (?:recon_exception|e)\b|(?:recon_exception|\be) USING (?:COVERING )?INDEX ix_"
)
"""A step walking the connection's exceptions: a scan, or an index by connection."""


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_each_batch_of_a_runs_writes_reads_its_own_rows_only(
    sessions: sessionmaker[Session], migrated_engine: sa.Engine
) -> None:
    """SQLite: every statement of a write batch starts from the batch's findings (or
    exceptions to close) by rowid and looks each exception up by its key or id, so a
    batch costs what its rows do, never what the connection's exceptions do."""
    planted = plant_every_case(sessions)
    plans: dict[str, str] = {}

    def explain(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if "rowid > ?" in statement:
            rows = cursor.connection.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            plans[" ".join(statement.split())] = "\n".join(str(row[-1]) for row in rows)

    sa.event.listen(migrated_engine, "before_cursor_execute", explain)
    try:
        for round_no in (1, 2):
            if round_no == 2:
                with sessions.begin() as session:  # the orphan goes: this run closes it
                    session.execute(
                        sa.update(VenueOrder)
                        .where(VenueOrder.order_id == planted.orphan_key.removeprefix("order:"))
                        .values(removed_at=NOW)
                    )
            reconcile(
                sessions,
                connection_id=planted.connection_id,
                period_from=PERIOD_FROM,
                period_to=PERIOD_TO,
                now=NOW,
                trigger=ReconTrigger.MANUAL,
                actor="test",
                grace=dt.timedelta(hours=1),
                tolerance=Decimal("0.01"),
            )
    finally:
        sa.event.remove(migrated_engine, "before_cursor_execute", explain)
    # Four statements per batch of findings, two per batch of exceptions closed.
    assert len(plans) == 6, list(plans)
    assert any("'closed'" in statement for statement in plans)
    for statement, plan in plans.items():
        assert BATCH_STEP.search(plan), (statement, plan)
        assert not EXCEPTIONS_WALKED.search(plan), (statement, plan)
