"""The shop's deliveries on /metrics: the senders' counters over real HTTP, and the gauges
of what waits read from the database, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from orders.shop_delivery_metrics import read_backlog
from orders.shop_events import deliver_to
from orders.shop_replay import replay
from receiver.database_metrics import DatabaseCollector
from storage.migrate import upgrade
from storage.records import DeliveryState, ShopDelivery, ShopEvent
from tests.heartbeat.test_retention import INDEX_READ
from tests.orders.test_shop_events import (
    Clock,
    Shop,
    events,
    mirror,
    new_secret,
    sender,
    serve,
)
from tests.storage.test_models import T0, connection_id
from tests.support.plans import query_plan

__all__ = ["connection_id", "serve"]  # fixtures, used by name

ATTEMPTS = "otacm_shop_delivery_attempts_total"
LATENCY = "otacm_shop_delivery_latency_seconds"


def attempts(endpoint: str, outcome: str) -> float:
    """This process's count of attempts to ``endpoint`` of connection ``default``."""
    labels = {"connection": "default", "endpoint": endpoint, "outcome": outcome}
    return REGISTRY.get_sample_value(ATTEMPTS, labels) or 0.0


def latency(endpoint: str, suffix: str, le: str | None = None) -> float:
    """A sample of the latency histogram of ``endpoint`` (``_count``, ``_sum``, ``_bucket``)."""
    labels = {"connection": "default", "endpoint": endpoint}
    if le is not None:
        labels["le"] = le
    return REGISTRY.get_sample_value(LATENCY + suffix, labels) or 0.0


def test_each_settled_attempt_is_counted_by_outcome_and_a_delivery_times_its_latency(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """A 503 is counted retried, a 422 dead, a 200 delivered with the seconds from the
    event's record to its delivery (the sender's clock) in the histogram."""
    endpoint = f"counted-{sessions.kw['bind'].dialect.name}"
    deliver_to(sessions, {"default": [endpoint]})
    answers: dict[str, Iterator[int]] = {}
    shop = serve(Shop([new_secret()], answer=lambda event_id: next(answers[event_id])))
    clock = Clock(T0)
    send = sender(sessions, shop, name=endpoint, clock=clock)
    before = {o: attempts(endpoint, o) for o in ("delivered", "retried", "dead")}
    mirror(sessions, connection_id, 1, "Issued", T0)
    [first] = events(sessions)
    answers[first.event_id] = iter([503, 200])

    assert send.run_once().retrying == 1  # order 1: 503
    mirror(sessions, connection_id, 2, "Error", T0)
    [second] = [e for e in events(sessions) if e.event_id != first.event_id]
    answers[second.event_id] = iter([422])
    clock.now = T0 + dt.timedelta(seconds=40)
    report = send.run_once()  # order 1 again: 200; order 2: 422

    assert (report.delivered, report.dead) == (1, 1)
    counted = {o: attempts(endpoint, o) - before[o] for o in before}
    assert counted == {"delivered": 1, "retried": 1, "dead": 1}
    assert latency(endpoint, "_count") == 1
    assert latency(endpoint, "_sum") == 40
    assert latency(endpoint, "_bucket", "30.0") == 0
    assert latency(endpoint, "_bucket", "60.0") == 1


def test_an_attempt_whose_lease_was_lost_is_not_counted(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """Only the sender that settles a delivery counts it: one whose lease another sender
    took over while its POST was in flight counts nothing."""
    if sessions.kw["bind"].dialect.name == "sqlite":
        pytest.skip("on SQLite one sender holds the endpoint: no other can take a lease over")
    endpoint = f"lost-{sessions.kw['bind'].dialect.name}"
    deliver_to(sessions, {"default": [endpoint]})

    def taken_over_meanwhile(event_id: str) -> int:
        # The lease expired while the shop was answering, and another sender claimed it.
        with sessions.begin() as session:
            session.execute(sa.update(ShopDelivery).values(lease_owner="another-sender"))
        return 200

    shop = serve(Shop([new_secret()], answer=taken_over_meanwhile))
    send = sender(sessions, shop, name=endpoint)
    mirror(sessions, connection_id, 1, "Issued", T0)
    before = attempts(endpoint, "delivered")

    assert send.run_once().lease_lost == 1
    assert attempts(endpoint, "delivered") == before


def gauges(collector: DatabaseCollector) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The collector's shop-delivery samples, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in collector.collect()
        if family.name.startswith("otacm_shop_")
        for sample in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    """A sample's key in :func:`gauges`."""
    return name, frozenset(labels.items())


def test_the_scrape_reports_deliveries_waiting_and_given_up_per_endpoint(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """Pending, leased and dead deliveries by connection and endpoint, the age of the
    oldest undelivered one (a replay starts its wait again), zeros for a configured endpoint
    with nothing waiting; delivered ones are history, not counted."""
    deliver_to(sessions, {"default": ["shop", "slow"]})
    now = T0 + dt.timedelta(minutes=10)
    collector = DatabaseCollector(
        sessions,
        ["default"],
        clock=lambda: now,
        shop_endpoints={"default": ["shop", "slow", "idle"]},
    )
    mirror(sessions, connection_id, 1, "Issued", T0)
    mirror(sessions, connection_id, 2, "Error", T0 + dt.timedelta(minutes=4))
    shop = serve(Shop([new_secret()], answer=lambda _: 422))
    assert sender(sessions, shop, name="shop").run_once().dead == 1  # order 1 only: in order

    found = gauges(collector)

    deliveries = "otacm_shop_deliveries"
    oldest = "otacm_shop_delivery_oldest_undelivered_age_seconds"
    expected = {
        ("shop", "pending"): 1,
        ("shop", "leased"): 0,
        ("shop", "dead"): 1,
        ("slow", "pending"): 2,
        ("slow", "leased"): 0,
        ("slow", "dead"): 0,
        ("idle", "pending"): 0,
        ("idle", "leased"): 0,
        ("idle", "dead"): 0,
    }
    for (endpoint, state), value in expected.items():
        labels = {"connection": "default", "endpoint": endpoint, "state": state}
        assert found[key(deliveries, **labels)] == value, (endpoint, state)
    assert found[key(oldest, connection="default", endpoint="shop")] == 6 * 60
    assert found[key(oldest, connection="default", endpoint="slow")] == 10 * 60
    assert found[key(oldest, connection="default", endpoint="idle")] == 0

    with sessions.begin() as session:
        replay(session, endpoint="shop", now=T0 + dt.timedelta(minutes=8))
        session.execute(
            sa.update(ShopDelivery)
            .where(ShopDelivery.endpoint == "slow")
            .values(state=DeliveryState.DELIVERED, delivered_at=now)
        )
    found = gauges(collector)

    assert found[key(deliveries, connection="default", endpoint="shop", state="pending")] == 2
    assert found[key(deliveries, connection="default", endpoint="shop", state="dead")] == 0
    assert found[key(deliveries, connection="default", endpoint="slow", state="pending")] == 0
    # Order 2's, recorded at minute 4: the replayed one waits since minute 8, not 0.
    assert found[key(oldest, connection="default", endpoint="shop")] == 6 * 60
    assert found[key(oldest, connection="default", endpoint="slow")] == 0


def test_a_leased_delivery_counts_as_leased_and_undelivered(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """A delivery a sender holds is in flight: leased, and its age counts."""
    deliver_to(sessions, {"default": ["shop"]})
    mirror(sessions, connection_id, 1, "Issued", T0)
    with sessions.begin() as session:
        session.execute(
            sa.update(ShopDelivery).values(state=DeliveryState.LEASED, lease_owner="sender-1")
        )
    collector = DatabaseCollector(
        sessions, ["default"], clock=lambda: T0 + dt.timedelta(seconds=90)
    )

    found = gauges(collector)

    labels = {"connection": "default", "endpoint": "shop"}
    assert found[key("otacm_shop_deliveries", **labels, state="leased")] == 1
    assert found[key("otacm_shop_deliveries", **labels, state="pending")] == 0
    assert found[key("otacm_shop_delivery_oldest_undelivered_age_seconds", **labels)] == 90


# --- across processes -----------------------------------------------------------------------

_SENDING_PROCESS = textwrap.dedent(
    """
    import sys
    from orders.shop_delivery import Endpoint, EndpointSender
    from orders.shop_events import deliver_to
    from storage.engine import make_engine, make_sessions
    from storage.models import ensure_connection
    from tests.orders.test_shop_events import mirror
    from tests.storage.test_models import T0

    url, shop_url, secret = sys.argv[1:]
    engine = make_engine(url)
    sessions = make_sessions(engine)
    deliver_to(sessions, {"venue-a": ["shop"]})
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "venue-a")
    mirror(sessions, connection_id, 1, "Issued", T0)
    sender = EndpointSender(
        Endpoint("shop", shop_url, (secret,)),
        sessions,
        make_sessions(engine, read_only=True),
        "worker-1",
        horizon=dt.timedelta(days=3),
        timeout=5.0,
        clock=lambda: T0 + dt.timedelta(seconds=2),
    )
    assert sender.run_once().delivered == 1
    sender.close()
    engine.dispose()
    """
).replace("import sys", "import datetime as dt\nimport sys", 1)

_SCRAPING_PROCESS = textwrap.dedent(
    """
    import sys
    from otacm.settings import Settings
    from receiver import create_app
    from tests.receiver.conftest import venue_connection
    from tests.receiver.notifications import STATE_A

    url, shop_url, secret = sys.argv[1:]
    app = create_app(Settings(
        database_url=url,
        connections=[venue_connection("venue-a", STATE_A)],
        shop_endpoints=[{"name": "shop", "url": shop_url, "secrets": [secret]}],
    ))
    sys.stdout.write(app.test_client().get("/metrics").get_data(as_text=True))
    app.extensions["otacm"].close()
    """
)


@pytest.mark.process
def test_the_senders_counts_reach_the_web_roles_metrics_through_the_shared_directory(
    tmp_path: Path, serve: Callable[[Shop], Shop]
) -> None:
    """A worker process's sender counts its delivery; a web process sharing its
    PROMETHEUS_MULTIPROC_DIR shows the count, the latency and nothing left waiting."""
    url = f"sqlite:///{tmp_path / 'otacm.sqlite3'}"
    upgrade(url)
    directory = tmp_path / "prometheus"
    directory.mkdir()
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTACM_")},
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
    }
    secret = new_secret()
    shop = serve(Shop([secret]))
    root = Path(__file__).resolve().parents[2]

    outputs = [
        subprocess.run(
            [sys.executable, "-c", script, url, shop.url, secret],
            cwd=root,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        for script in (_SENDING_PROCESS, _SCRAPING_PROCESS)
    ]

    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(outputs[1])
        for sample in family.samples
    }
    labels = {"connection": "venue-a", "endpoint": "shop"}
    assert [r.body["type"] for r in shop.accepted()] == ["order.issued"]
    assert samples[key(ATTEMPTS, **labels, outcome="delivered")] == 1
    assert samples[key(LATENCY + "_count", **labels)] == 1
    assert samples[key(LATENCY + "_sum", **labels)] == 2
    assert samples[key("otacm_shop_deliveries", **labels, state="pending")] == 0


def test_the_scrape_reads_only_the_deliveries_still_to_send_or_given_up(
    sessions: sessionmaker[Session], migrated_engine: sa.Engine, connection_id: int
) -> None:
    """Over 3,000 delivered deliveries (history), the scrape's reads are searches of an
    index of the in-flight rows or led by the state, never a scan of the table."""
    with sessions.begin() as session:
        events = session.scalars(
            sa.insert(ShopEvent).returning(ShopEvent.id),
            [
                {
                    "event_id": f"msg_{n:032x}",
                    "connection_id": connection_id,
                    "venue_order_id": None,
                    "order_seq": 1,
                    "type": "order.submission_failed",
                    "payload": {},
                    "created_at": T0,
                }
                for n in range(3010)
            ],
        ).all()
        states = ["delivered"] * 3000 + ["pending"] * 5 + ["leased"] * 3 + ["dead"] * 2
        session.execute(
            sa.insert(ShopDelivery),
            [
                {
                    "shop_event_id": event,
                    "connection_id": connection_id,
                    "endpoint": "shop",
                    "order_seq": 1,
                    "state": state,
                    "attempts": 1,
                    "next_attempt_at": T0,
                    "retry_from": T0,
                }
                for event, state in zip(events, states, strict=True)
            ],
        )
    if migrated_engine.dialect.name == "postgresql":
        with migrated_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE")
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        sent.append((statement, parameters))

    sa.event.listen(migrated_engine, "before_cursor_execute", capture)
    try:
        with sessions() as session:
            found = read_backlog(session)
    finally:
        sa.event.remove(migrated_engine, "before_cursor_execute", capture)

    backlog = found[("default", "shop")]
    assert backlog.counts == {
        DeliveryState.PENDING: 5,
        DeliveryState.LEASED: 3,
        DeliveryState.DEAD: 2,
    }
    reads = [(s, p) for s, p in sent if "FROM shop_delivery" in s]
    assert len(reads) == 2
    # Indexes holding only the rows in flight, or led by the state: a search of them
    # reads the rows that are work, whatever the history.
    by_state = {
        "ix_shop_delivery_in_flight",
        "ix_shop_delivery_in_flight_order",
        "ix_shop_delivery_state_endpoint",
        "ix_shop_delivery_state_delivered_at",
    }
    for statement, parameters in reads:
        plan = query_plan(migrated_engine, statement, parameters)
        assert not re.search(r"\bSCAN shop_delivery\b(?! USING)|Seq Scan on shop_delivery", plan)
        assert set(INDEX_READ.findall(plan)) & by_state, plan
