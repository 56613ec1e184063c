"""Pruning the shop's events (``heartbeat.shop_retention``, through ``heartbeat.retention``)
on SQLite and PostgreSQL: delivered deliveries past retention go, events with none left go
but each order's newest, which still numbers the order's next event; deliveries in flight
and dead ones stay with their events; a dry run changes nothing."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.retention import Retention, prune
from orders.mirror import upsert_order
from orders.shop_events import deliver_to, record_submission_failed
from otacm.cli import main
from storage.models import ChangeSource, VenueOrder, ensure_connection
from storage.records import DeliveryState, PruneMark, ShopDelivery, ShopEvent
from tests.heartbeat.test_retention import INDEX_READ, pruned_reading
from tests.orders.test_shop_events import order
from tests.support.plans import query_plan

NOW = dt.datetime(2027, 6, 1, 12, 0, tzinfo=dt.UTC)
RETENTION = Retention(inbox_days=0, outbox_days=0, status_change_days=0, shop_event_days=30)
SHOP_TABLES = ("shop_delivery", "shop_event")


def days_ago(days: float) -> dt.datetime:
    return NOW - dt.timedelta(days=days)


@pytest.fixture
def connection_id(sessions: sessionmaker[Session]) -> int:
    """The venue connection ``default``, whose events go to the endpoint ``shop``."""
    deliver_to(sessions, {"default": ["shop"]})
    with sessions.begin() as session:
        return ensure_connection(session, "default")


def mirror(
    sessions: sessionmaker[Session], connection_id: int, n: int, status: str, days: float
) -> None:
    """Order ``n`` mirrored in ``status`` ``days`` ago: an event with its delivery."""
    with sessions.begin() as session:
        upsert_order(
            session,
            connection_id,
            order(n, status),
            source=ChangeSource.WEBHOOK,
            observed_at=days_ago(days),
        )


def refused_sale(sessions: sessionmaker[Session], connection_id: int, n: int, days: float) -> None:
    """A sale the venue refused ``days`` ago: an event of no order."""
    with sessions.begin() as session:
        record_submission_failed(
            session,
            connection_id,
            reference=f"SHOP-R{n}",
            partner_id=None,
            code="invalid",
            message="refused",
            now=days_ago(days),
        )


def settle(
    sessions: sessionmaker[Session],
    reference: str | None,
    seq: int,
    state: DeliveryState,
    days: float | None = None,
) -> None:
    """The delivery of ``reference``'s event ``seq`` (``None``: the refused sales') left in
    ``state``, delivered ``days`` ago."""
    with sessions.begin() as session:
        for event in _events_of(session, reference):
            if event.order_seq == seq:
                for delivery in event.deliveries:
                    delivery.state = state
                    delivery.attempts = 1
                    if days is not None:
                        delivery.delivered_at = days_ago(days)


def _events_of(session: Session, reference: str | None) -> list[ShopEvent]:
    query = sa.select(ShopEvent).outerjoin(VenueOrder, VenueOrder.id == ShopEvent.venue_order_id)
    if reference is None:
        query = query.where(ShopEvent.venue_order_id.is_(None))
    else:
        query = query.where(VenueOrder.sell_to_order_reference == reference)
    return list(session.scalars(query.order_by(ShopEvent.id)))


def kept(sessions: sessionmaker[Session]) -> dict[str, list[tuple[int, str | None]]]:
    """Per order's reference (``refused`` for the refused sales), its events left: their
    sequence and their deliveries' states."""
    found: dict[str, list[tuple[int, str | None]]] = {}
    with sessions() as session:
        rows = session.execute(
            sa.select(
                VenueOrder.sell_to_order_reference,
                ShopEvent.order_seq,
                ShopEvent.payload,
                ShopDelivery.state,
            )
            .select_from(ShopEvent)
            .outerjoin(VenueOrder, VenueOrder.id == ShopEvent.venue_order_id)
            .outerjoin(ShopDelivery, ShopDelivery.shop_event_id == ShopEvent.id)
            .order_by(ShopEvent.id)
        )
        for reference, seq, payload, state in rows:
            name = reference or f"refused {payload['sellToOrderReference']}"
            found.setdefault(name, []).append((seq, None if state is None else str(state)))
    return found


def everything(session: Session) -> dict[str, Any]:
    """Every row of the two tables and the marks, to compare before and after."""
    return {
        "events": session.execute(
            sa.select(ShopEvent.id, ShopEvent.order_seq).order_by(ShopEvent.id)
        ).all(),
        "deliveries": session.execute(
            sa.select(ShopDelivery.id, ShopDelivery.state).order_by(ShopDelivery.id)
        ).all(),
        "marks": session.execute(sa.select(PruneMark.name, PruneMark.reached_id)).all(),
    }


def rows(report: Any) -> dict[str, int]:
    return {t.table: t.rows for t in report.tables if t.table in SHOP_TABLES}


def history(sessions: sessionmaker[Session], connection_id: int) -> None:
    """Orders and refused sales whose events and deliveries stand in every case."""
    # SHOP-1: both events delivered long ago. The first goes; the second is the newest.
    mirror(sessions, connection_id, 1, "Draft", 45)
    mirror(sessions, connection_id, 1, "Issued", 40)
    settle(sessions, "SHOP-1", 1, DeliveryState.DELIVERED, 45)
    settle(sessions, "SHOP-1", 2, DeliveryState.DELIVERED, 40)
    # SHOP-2: the first given up (dead), the second waiting behind it: all stay.
    mirror(sessions, connection_id, 2, "Draft", 45)
    mirror(sessions, connection_id, 2, "Issued", 44)
    settle(sessions, "SHOP-2", 1, DeliveryState.DEAD)
    # SHOP-3: an old event delivered long ago goes; the newer one, recent, stays.
    mirror(sessions, connection_id, 3, "Draft", 50)
    mirror(sessions, connection_id, 3, "Issued", 10)
    settle(sessions, "SHOP-3", 1, DeliveryState.DELIVERED, 50)
    settle(sessions, "SHOP-3", 2, DeliveryState.DELIVERED, 10)
    # SHOP-4: recorded long ago but delivered within the retention (after a replay).
    mirror(sessions, connection_id, 4, "Draft", 60)
    mirror(sessions, connection_id, 4, "Issued", 59)
    settle(sessions, "SHOP-4", 1, DeliveryState.DELIVERED, 5)
    settle(sessions, "SHOP-4", 2, DeliveryState.DELIVERED, 5)
    # SHOP-5: recorded while no endpoint was configured: no delivery at all.
    deliver_to(sessions, {})
    mirror(sessions, connection_id, 5, "Draft", 45)
    mirror(sessions, connection_id, 5, "Issued", 44)
    # Refused sales: one delivered long ago goes, one leased (being sent) stays.
    deliver_to(sessions, {"default": ["shop"]})
    refused_sale(sessions, connection_id, 1, 45)
    settle(sessions, None, 1, DeliveryState.DELIVERED, 45)
    refused_sale(sessions, connection_id, 2, 45)
    with sessions.begin() as session:
        _events_of(session, None)[1].deliveries[0].state = DeliveryState.LEASED


def test_delivered_events_go_but_each_orders_newest_and_those_still_in_flight_or_dead(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Past 30 days: delivered deliveries go, and the events left with none, but for each
    order's newest; events whose delivery is pending, leased or dead stay with it."""
    history(sessions, connection_id)

    report = prune(sessions, now=NOW, retention=RETENTION, batch_size=2)

    assert rows(report) == {"shop_delivery": 4, "shop_event": 4}
    assert all(t.done for t in report.tables)
    assert kept(sessions) == {
        "SHOP-1": [(2, None)],
        "SHOP-2": [(1, "dead"), (2, "pending")],
        "SHOP-3": [(2, "delivered")],
        "SHOP-4": [(1, "delivered"), (2, "delivered")],
        "SHOP-5": [(2, None)],
        "refused SHOP-R2": [(1, "leased")],
    }
    again = prune(sessions, now=NOW, retention=RETENTION)
    assert rows(again) == {"shop_delivery": 0, "shop_event": 0}
    # A newest event kept past retention with no delivery left keeps its number, not its
    # copy of the order (holders' names); one still waiting or recent keeps it whole.
    with sessions() as session:
        payloads = {
            (reference, event.order_seq): event.payload
            for reference in ("SHOP-1", "SHOP-2", "SHOP-3", "SHOP-5")
            for event in _events_of(session, reference)
        }
    assert payloads[("SHOP-1", 2)] == payloads[("SHOP-5", 2)] == {}
    assert payloads[("SHOP-2", 2)]["sellToOrderReference"] == "SHOP-2"
    assert payloads[("SHOP-3", 2)]["items"][0]["wallets"]


def test_the_kept_newest_event_numbers_the_orders_next_and_goes_once_a_newer_one_can(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """After pruning, an order's next event follows its newest kept one (no number used
    twice); once that newer event's delivery is past retention, the old one goes too."""
    history(sessions, connection_id)
    prune(sessions, now=NOW, retention=RETENTION)

    mirror(sessions, connection_id, 1, "Cancelled", 0)
    mirror(sessions, connection_id, 5, "Cancelled", 0)
    settle(sessions, "SHOP-1", 3, DeliveryState.DELIVERED, 0)

    assert kept(sessions)["SHOP-1"] == [(2, None), (3, "delivered")]
    assert kept(sessions)["SHOP-5"] == [(2, None), (3, "pending")]
    later = NOW + dt.timedelta(days=31)
    report = prune(sessions, now=later, retention=RETENTION)

    # SHOP-1's old newest goes with the newer one's delivery; SHOP-5's, found by the walk
    # of the events, though its newer one still waits; SHOP-4's first, once its delivery
    # (made within the retention before) is past it.
    assert rows(report) == {"shop_delivery": 4, "shop_event": 3}
    assert kept(sessions) == {
        "SHOP-1": [(3, None)],
        "SHOP-2": [(1, "dead"), (2, "pending")],
        "SHOP-3": [(2, None)],
        "SHOP-4": [(2, None)],
        "SHOP-5": [(3, "pending")],
        "refused SHOP-R2": [(1, "leased")],
    }


def test_a_dry_run_changes_nothing_and_counts_what_the_run_then_deletes(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """`--dry-run` counts both tables exactly, deletes nothing and moves no mark."""
    history(sessions, connection_id)
    with sessions() as session:
        before = everything(session)

    dry = prune(sessions, now=NOW, retention=RETENTION, dry_run=True, batch_size=2)
    with sessions() as session:
        assert everything(session) == before
    real = prune(sessions, now=NOW, retention=RETENTION, batch_size=2)

    assert rows(dry) == rows(real) == {"shop_delivery": 4, "shop_event": 4}


def test_a_retention_of_zero_keeps_every_event(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """`OTACM_RETAIN_SHOP_EVENTS_DAYS=0` prunes none of them."""
    history(sessions, connection_id)
    with sessions() as session:
        before = everything(session)

    report = prune(sessions, now=NOW, retention=Retention(0, 0, 0, shop_event_days=0))

    assert [(t.table, t.before) for t in report.tables if t.table in SHOP_TABLES] == [
        ("shop_delivery", None),
        ("shop_event", None),
    ]
    with sessions() as session:
        assert everything(session) == before


@pytest.fixture
def cli_environment(migrated_engine: sa.Engine) -> Iterator[dict[str, str]]:
    """The environment `otacm db prune` needs: the database, nothing of a venue."""
    yield {"OTACM_DATABASE_URL": migrated_engine.url.render_as_string(hide_password=False)}


def test_otacm_db_prune_json_reports_the_shop_tables(
    sessions: sessionmaker[Session], connection_id: int, cli_environment: dict[str, str]
) -> None:
    """`otacm db prune --json` has a row per shop table with its cutoff
    (OTACM_RETAIN_SHOP_EVENTS_DAYS, 30 by default), and the dry run's counts."""
    now = dt.datetime.now(dt.UTC)
    with sessions.begin() as session:
        upsert_order(
            session,
            connection_id,
            order(1, "Draft"),
            source=ChangeSource.WEBHOOK,
            observed_at=now - dt.timedelta(days=40),
        )
        upsert_order(
            session,
            connection_id,
            order(1, "Issued"),
            source=ChangeSource.WEBHOOK,
            observed_at=now - dt.timedelta(days=40),
        )
        session.execute(
            sa.update(ShopDelivery).values(
                state=DeliveryState.DELIVERED, delivered_at=now - dt.timedelta(days=40)
            )
        )

    dry = CliRunner().invoke(main, ["db", "prune", "--dry-run", "--json"], env=cli_environment)
    real = CliRunner().invoke(main, ["db", "prune", "--json"], env=cli_environment)

    assert dry.exit_code == 0, dry.output
    assert real.exit_code == 0, real.output
    for output, dry_run in ((dry.stdout, True), (real.stdout, False)):
        shown = json.loads(output)
        assert shown["dry_run"] is dry_run
        tables = {t["table"]: t for t in shown["tables"]}
        assert (tables["shop_delivery"]["rows"], tables["shop_event"]["rows"]) == (2, 1)
        cutoff = dt.datetime.fromisoformat(tables["shop_event"]["before"])
        assert now - dt.timedelta(days=30, minutes=5) < cutoff < now - dt.timedelta(days=29)
    assert kept(sessions) == {"SHOP-1": [(2, None)]}


def test_pruning_reads_the_deliveries_and_the_events_through_an_index_by_time(
    sessions: sessionmaker[Session], migrated_engine: sa.Engine, connection_id: int
) -> None:
    """Over a history it keeps (deliveries delivered within the retention, pending ones),
    the read of the delivered deliveries and the walk of the events are ranges of an
    index by time, never the whole table."""
    with sessions.begin() as session:
        for n in range(1, 601):
            upsert_order(
                session,
                connection_id,
                order(n, "Issued"),
                source=ChangeSource.WEBHOOK,
                observed_at=days_ago(n % 20),
            )
        session.execute(
            sa.update(ShopDelivery)
            .where(ShopDelivery.id % 2 == 0)
            .values(state=DeliveryState.DELIVERED, delivered_at=days_ago(1))
        )
    mirror(sessions, connection_id, 1000, "Draft", 41)
    mirror(sessions, connection_id, 1000, "Issued", 40)
    settle(sessions, "SHOP-1000", 1, DeliveryState.DELIVERED, 41)
    settle(sessions, "SHOP-1000", 2, DeliveryState.DELIVERED, 40)
    if migrated_engine.dialect.name == "postgresql":
        with migrated_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE")
    report, sent = pruned_reading(migrated_engine, sessions, now=NOW, retention=RETENTION)

    assert rows(report) == {"shop_delivery": 2, "shop_event": 1}
    delivered = next(
        (s, p) for s, p in sent if re.search(r"FROM shop_delivery\b.*delivered_at <", s, re.S)
    )
    walked = next((s, p) for s, p in sent if re.search(r"FROM shop_event\b.*created_at <", s, re.S))
    for (statement, parameters), index in (
        (delivered, "ix_shop_delivery_state_delivered_at"),
        (walked, "ix_shop_event_created_at"),
    ):
        plan = query_plan(migrated_engine, statement, parameters)
        assert INDEX_READ.findall(plan)[0] == index, plan
        assert not re.search(r"\bSCAN shop_\w+\b(?! USING)|Seq Scan", plan), plan
