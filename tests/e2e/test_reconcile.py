"""End to end: sales submitted through otacm, issued by the sandbox, reconciled.

Runs on SQLite and on PostgreSQL (``migrated_engine``).
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from otacm.settings import Settings
from reconciler.engine import reconcile
from storage.models import ensure_connection
from storage.records import ReconException, ReconTotal, ReconTrigger
from storage.types import utcnow
from tests.e2e.conftest import E2E, line


def test_group_package_and_single_sales_match_what_the_venue_issued(
    e2e: E2E, sessions: sessionmaker[Session], settings: Settings
) -> None:
    """CMTicketIssuer AccumulatePriceOnWallet / CMCouponIssuer: the venue's group wallet
    carries the whole group's price, a package's wallet its components and coupon, a
    single ticket's wallet its unit price; otacm adds up what the wallets carry, so each
    sale charged at the catalog price matches with no amount mismatch."""
    sales = {
        "REC-GROUP": ([line("31050", 6)], "450.00"),  # 6 x 75.00 on one wallet
        "REC-PACKAGE": ([line("40100", 2)], "320.00"),  # 2 wallets of 80 + 70 + 10
        "REC-SINGLE": ([line("31001", 3)], "300.00"),  # 3 wallets of 100.00
    }
    for reference, (items, amount) in sales.items():
        body = e2e.order_body(reference, items=items)
        body.update(amount=amount, currency="DKK")
        response = e2e.submit(body)
        assert response.status_code == 201, response.text
    e2e.deliver()
    e2e.worker.drain()

    with sessions.begin() as session:
        connection_id = ensure_connection(session, settings.connections[0].name)
    now = utcnow()
    run_id = reconcile(
        sessions,
        connection_id=connection_id,
        period_from=now - dt.timedelta(hours=1),
        period_to=now + dt.timedelta(minutes=1),
        now=now + dt.timedelta(minutes=1),
        trigger=ReconTrigger.MANUAL,
        actor="finance",
        grace=dt.timedelta(minutes=30),
        tolerance=Decimal("0.01"),
    )

    with sessions() as session:
        exceptions = session.scalars(sa.select(ReconException)).all()
        totals = {
            (row.currency, row.category): (row.count, row.ledger_amount, row.venue_amount)
            for row in session.scalars(
                sa.select(ReconTotal).where(ReconTotal.recon_run_id == run_id)
            )
        }
    assert [(e.category, e.subject_key) for e in exceptions] == []
    assert totals == {("DKK", "matched"): (3, Decimal("1070.00"), Decimal("1070.00"))}
