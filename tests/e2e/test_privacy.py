"""Customers' names and e-mails: erased after the visit and on request, finance's data kept.

Sales go through the whole stack (``POST /api/orders``, the venue's processing, its
webhooks, the worker's getOrder), so every place that keeps a name or an e-mail is
filled as in production: the ledger's request, the outbox's body, the mirror's header,
lines and wallets. Erasure is then run as the scheduler and ``otacm privacy erase`` run
it, and the database is searched whole.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.privacy import email_hash, erase_due, erase_subject
from orders.mirror import upsert_order
from reconciler.engine import reconcile
from storage.models import Base, ChangeSource
from storage.records import ErasureKind, PrivacyErasure, ReconException, ReconTotal, ReconTrigger
from tests.e2e.conftest import E2E, line, visit_date
from tests.support.database import texts_in_database

SOON = {
    "buyer": ("Soon Buyer", "soon.buyer@example.com"),
    "line": ("Line Guest", "line.guest@example.com"),
    "holder": ("Wallet Holder",),
}
LATER = ("Later Buyer", "later.buyer@example.com")

# Columns an erasure may change; every other stored value must stay as it was.
ERASABLE = {
    "venue_order": {"sell_to_name", "sell_to_email", "personal_data_erased_at", "updated_at"},
    "order_item": {"sell_to_name", "sell_to_email"},
    "wallet": {"name"},
    "ledger_line": {"request", "personal_data_erased_at", "updated_at"},
    "outbox": {"request"},
    # Processed notifications are deleted after the horizon, and their status changes
    # lose the link to them.
    "inbox": "all",
    "status_change": {"inbox_id"},
    # An event for the shop carries the order as it was, holders' names included.
    "shop_event": {"payload"},
    "privacy_erasure": "all",
    # Reconciliation runs are compared by what they find (:func:`reconciled`).
    "recon_run": "all",
    "recon_total": "all",
    "recon_exception": "all",
    "exception_event": "all",
}


def submit_sales(e2e: E2E) -> dict[str, str]:
    """Two sales with names and e-mails everywhere, settled and mirrored; their orderIds."""
    soon = e2e.order_body(
        "PRIV-SOON",
        items=[
            line(visitDate=visit_date(10), wallet={"names": list(SOON["holder"])}),
            line(
                "31001",
                visitDate=visit_date(12),
                sellToName=SOON["line"][0],
                sellToEmail=SOON["line"][1],
            ),
        ],
    )
    soon.update(sellToName=SOON["buyer"][0], sellToEmail=SOON["buyer"][1])
    later = e2e.order_body("PRIV-LATER", items=[line(visitDate=visit_date(200))])
    later.update(sellToName=LATER[0], sellToEmail=LATER[1])
    ids = {}
    # The catalog's 31001 costs 100.00 a ticket: both sales match what the venue issued.
    for name, body, amount in (("soon", soon, "200.00"), ("later", later, "100.00")):
        body.update(amount=amount, currency="DKK")
        answer = e2e.submit(body)
        assert answer.status_code == 201, answer.text
        ids[name] = answer.json()["orderId"]
    e2e.deliver()
    e2e.worker.drain()
    e2e.assert_mirrored(ids.values())
    return ids


def finance_view(sessions: sessionmaker[Session]) -> dict[str, list[tuple[Any, ...]]]:
    """Every stored value an erasure must leave alone, by table (:data:`ERASABLE`)."""
    kept: dict[str, list[tuple[Any, ...]]] = {}
    with sessions.begin() as session:
        for table in Base.metadata.sorted_tables:
            skip = ERASABLE.get(table.name, set())
            if skip == "all":
                continue
            columns = [column for column in table.columns if column.name not in skip]
            query = sa.select(*columns).order_by(*table.primary_key.columns)
            kept[table.name] = [tuple(row) for row in session.execute(query)]
    return kept


def reconciled(e2e: E2E, now: dt.datetime) -> tuple[dict[Any, Any], set[tuple[str, str]]]:
    """A reconciliation run over the sales' period: its totals and its exceptions."""
    (connection_id,) = e2e.worker.clients
    run_id = reconcile(
        e2e.worker.sessions,
        connection_id=connection_id,
        period_from=now - dt.timedelta(days=1),
        period_to=now + dt.timedelta(days=1),
        now=now,
        trigger=ReconTrigger.MANUAL,
        actor="tester",
        grace=dt.timedelta(minutes=30),
        tolerance=Decimal("0.01"),
    )
    with e2e.read_sessions.begin() as session:
        totals = {
            (t.currency, t.category): (t.count, t.ledger_amount, t.venue_amount)
            for t in session.scalars(sa.select(ReconTotal).where(ReconTotal.recon_run_id == run_id))
        }
        exceptions = {
            (e.category, e.subject_key)
            for e in session.scalars(sa.select(ReconException))
            if e.state == "open"
        }
    return totals, exceptions


def test_names_and_emails_past_the_horizon_are_erased_and_finance_sees_the_same(
    e2e: E2E,
) -> None:
    """150 days on, with 90 days' retention: the sale visited 10-12 days from now has no
    name or e-mail left in any text or JSON column (ledger, outbox, mirror header, lines,
    wallets; its notifications deleted); the sale visiting in 200 days keeps them; every
    other stored value is as it was, reconciliation finds the same, and a later getOrder
    of the erased order (the venue still has the names) stores none of them."""
    ids = submit_sales(e2e)
    sessions = e2e.worker.sessions
    now = dt.datetime.now(dt.UTC)
    stored = texts_in_database(sessions)
    for text in (*SOON["buyer"], *SOON["line"], *SOON["holder"], *LATER):
        assert text in stored
    before = finance_view(sessions)
    reconciled_before = reconciled(e2e, now)
    assert reconciled_before == ({("DKK", "matched"): (2, Decimal(300), Decimal(300))}, set())

    later = now + dt.timedelta(days=150)
    report = erase_due(sessions, now=later, keep_days=90, batch_size=1)

    assert (report.orders, report.ledger_lines, report.kept_unsent) == (1, 1, 0)
    assert report.outbox_rows == 1
    assert report.inbox_rows >= 2  # every processed notification is past the horizon
    stored = texts_in_database(sessions)
    for text in (*SOON["buyer"], *SOON["line"], *SOON["holder"]):
        assert text not in stored
    for text in LATER:
        assert text in stored
    assert "PRIV-SOON" in stored and ids["soon"] in stored
    assert finance_view(sessions) == before
    assert reconciled(e2e, now) == reconciled_before
    with e2e.read_sessions.begin() as session:
        (record,) = session.scalars(sa.select(PrivacyErasure)).all()
        assert (record.kind, record.actor) == (ErasureKind.RETENTION, "otacm")
        assert record.counts == report.as_dict()

    # The venue keeps the names: fetching the order again stores none of them.
    (connection_id,) = e2e.worker.clients
    with sessions.begin() as session:
        upsert_order(
            session,
            connection_id,
            e2e.truth(ids["soon"]),
            source=ChangeSource.FETCH,
            observed_at=later,
        )
    stored = texts_in_database(sessions)
    for text in (*SOON["buyer"], *SOON["line"], *SOON["holder"]):
        assert text not in stored

    again = erase_due(sessions, now=later, keep_days=90)
    assert again.erased == 0


def test_a_persons_request_erases_their_data_now_and_is_recorded_by_hash(e2e: E2E) -> None:
    """``erase_subject`` by e-mail (any case) erases the sale visiting in 200 days at once
    — mirror, ledger, outbox — records who, when, the address's hash and the counts,
    and leaves the other sale whole; an address never stored erases nothing, says so in
    its record, and a second run of the same request finds nothing left."""
    submit_sales(e2e)
    sessions = e2e.worker.sessions
    now = dt.datetime.now(dt.UTC)
    reconciled_before = reconciled(e2e, now)

    done = erase_subject(sessions, email=" Later.Buyer@Example.com", actor="dpo", now=now)

    assert (done.report.orders, done.report.ledger_lines, done.report.outbox_rows) == (1, 1, 1)
    stored = texts_in_database(sessions)
    for text in LATER:
        assert text not in stored
    for text in (*SOON["buyer"], *SOON["line"], *SOON["holder"]):
        assert text in stored
    assert LATER[1] not in stored.lower()
    assert reconciled(e2e, now) == reconciled_before
    with e2e.read_sessions.begin() as session:
        record = session.get_one(PrivacyErasure, done.record_id)
    assert (record.kind, record.actor, record.connection_id) == (ErasureKind.EMAIL, "dpo", None)
    assert record.selector == email_hash(LATER[1]) == done.selector
    assert record.counts == done.report.as_dict()

    nobody = erase_subject(sessions, email="nobody@example.com", actor="dpo", now=now)
    assert nobody.report.erased == 0
    repeat = erase_subject(sessions, email=LATER[1], actor="dpo", now=now)
    assert repeat.report.erased == 0
    with e2e.read_sessions.begin() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(PrivacyErasure)) == 3


def test_a_request_by_reference_erases_that_order_only(e2e: E2E) -> None:
    """``erase_subject`` by the shop's reference (any case) erases that sale's order, line
    and call, nothing of the other sale."""
    submit_sales(e2e)
    sessions = e2e.worker.sessions

    done = erase_subject(sessions, reference="priv-soon", actor="dpo", now=dt.datetime.now(dt.UTC))

    assert (done.report.orders, done.report.ledger_lines, done.report.outbox_rows) == (1, 1, 1)
    stored = texts_in_database(sessions)
    for text in (*SOON["buyer"], *SOON["line"], *SOON["holder"]):
        assert text not in stored
    for text in LATER:
        assert text in stored
    assert done.selector == "priv-soon"
