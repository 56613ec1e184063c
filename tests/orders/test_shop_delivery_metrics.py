"""The shop's deliveries on /metrics: the senders' counters over real HTTP, and the gauges
of what waits read from the database, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.orm import Session, sessionmaker

from orders.shop_delivery import replay
from orders.shop_events import deliver_to
from receiver.database_metrics import DatabaseCollector
from storage.records import DeliveryState, ShopDelivery
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
    """Only the sender that settles a delivery counts it: one whose lease another took
    over counts nothing."""
    endpoint = f"lost-{sessions.kw['bind'].dialect.name}"
    deliver_to(sessions, {"default": [endpoint]})
    shop = serve(Shop([new_secret()]))
    send = sender(sessions, shop, name=endpoint)
    mirror(sessions, connection_id, 1, "Issued", T0)
    before = attempts(endpoint, "delivered")
    original = send._post

    def post_then_lose(claim):  # type: ignore[no-untyped-def]
        attempt = original(claim)
        with sessions.begin() as session:
            session.execute(sa.update(ShopDelivery).values(lease_owner="another-sender"))
        return attempt

    send._post = post_then_lose  # type: ignore[method-assign]

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
