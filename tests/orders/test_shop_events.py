"""Events to the shop: recorded with the mirror change, sent signed over real HTTP, in order.

A receiving shop (:class:`Shop`) verifies every request's Standard Webhooks signature
with the ``standardwebhooks`` library, with each secret it knows; the senders' clock is
virtual where the test is about time (an outage, the retry horizon), while signatures
carry the real time, as the library checks them against it.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from orders.mirror import erase_customers, mark_removed, upsert_order
from orders.shop_delivery import (
    BATCH_SIZE,
    Endpoint,
    EndpointSender,
    start_senders,
)
from orders.shop_events import deliver_to
from orders.shop_leases import claim_deliveries
from orders.shop_replay import ReplayRefused, list_deliveries, replay
from orders.submit import SubmitStatus
from storage.engine import make_sessions
from storage.models import ChangeSource, VenueOrder
from storage.records import DeliveryState, ShopDelivery, ShopEvent, ShopEventType
from tests.orders.test_outbox import answer, client, submit, venue
from tests.storage.test_models import ORDER_ID, T0, connection_id, parse, wire_order
from tests.support.stack import wait_until

__all__ = ["client", "connection_id", "venue"]  # fixtures, used by name

MINUTE = dt.timedelta(minutes=1)


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@dataclass
class Request:
    """One POST the shop received, and what it answered."""

    event_id: str
    body: dict[str, Any]
    status: int


@dataclass
class Shop:
    """A shop endpoint over real HTTP: verifies each signature with every secret it knows.

    ``answer`` chooses each request's status from its event id, ``retry_after`` its
    ``Retry-After`` header (none when it gives ``None``); ``hold``, when given, keeps
    every request waiting until it is set (a slow endpoint), ``arrived`` being set as
    each comes.
    """

    secrets: list[str]
    answer: Callable[[str], int] = lambda event_id: 200
    retry_after: Callable[[str], str | None] = lambda event_id: None
    hold: threading.Event | None = None
    arrived: threading.Event = field(default_factory=threading.Event)
    requests: list[Request] = field(default_factory=list)
    unverified: int = 0
    url: str = ""

    def accepted(self) -> list[Request]:
        """The requests answered 2xx, in the order they came."""
        return [r for r in self.requests if 200 <= r.status < 300]


class ShopServer(ThreadingHTTPServer):
    """A threaded server whose listen queue takes a sender's every connection at once
    (the default, 5, refuses some of 16 under load: not what a test is about)."""

    request_queue_size = 64


@pytest.fixture
def serve() -> Iterator[Callable[[Shop], Shop]]:
    """Serves each :class:`Shop` given on a port of its own, for the test's length."""
    servers: list[ThreadingHTTPServer] = []

    def start(shop: Shop) -> Shop:
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {name: value for name, value in self.headers.items()}
                try:
                    for secret in shop.secrets:
                        Webhook(secret).verify(body, headers)
                except WebhookVerificationError:
                    with lock:
                        shop.unverified += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                shop.arrived.set()
                if shop.hold is not None:
                    shop.hold.wait()
                event_id = headers["webhook-id"]
                status = shop.answer(event_id)
                retry_after = shop.retry_after(event_id)
                with lock:
                    shop.requests.append(Request(event_id, json.loads(body), status))
                self.send_response(status)
                if retry_after is not None:
                    self.send_header("retry-after", retry_after)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ShopServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        shop.url = f"http://127.0.0.1:{server.server_address[1]}/otacm/events"
        return shop

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class Clock:
    """A virtual clock the senders read."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def sender(
    sessions: sessionmaker[Session],
    shop: Shop,
    *,
    name: str = "shop",
    secrets: list[str] | None = None,
    clock: Clock | None = None,
    horizon: dt.timedelta = dt.timedelta(days=3),
) -> EndpointSender:
    """The sender of the endpoint ``name`` at ``shop``'s URL."""
    engine = sessions.kw["bind"]
    return EndpointSender(
        Endpoint(name, shop.url, tuple(secrets if secrets is not None else shop.secrets)),
        sessions,
        make_sessions(engine, read_only=True),
        owner=f"test-{name}",
        horizon=horizon,
        timeout=5.0,
        clock=clock or Clock(T0),
    )


def order(n: int, status: str) -> Any:
    """Order ``n`` (its own id and reference) in ``status``, as getOrder answers it."""
    raw = wire_order(status, minted=status == "Issued")
    raw["orderId"] = f"5f0c1d2e-3a4b-4c5d-8e9f-{n:012x}"
    raw["sellToOrderReference"] = f"SHOP-{n}"
    return parse(raw)


def mirror(
    sessions: sessionmaker[Session], connection_id: int, n: int, status: str, at: dt.datetime
) -> None:
    """Order ``n`` mirrored in ``status`` at ``at``, in a transaction of its own."""
    with sessions.begin() as session:
        upsert_order(
            session, connection_id, order(n, status), source=ChangeSource.WEBHOOK, observed_at=at
        )


def deliveries(sessions: sessionmaker[Session]) -> list[ShopDelivery]:
    """Every delivery, by id."""
    with sessions() as session:
        return list(session.scalars(sa.select(ShopDelivery).order_by(ShopDelivery.id)))


def events(sessions: sessionmaker[Session]) -> list[ShopEvent]:
    """Every event, by id."""
    with sessions() as session:
        return list(session.scalars(sa.select(ShopEvent).order_by(ShopEvent.id)))


def drain(sender: EndpointSender, clock: Clock, step: dt.timedelta, until: dt.datetime) -> None:
    """Passes of ``sender``, the clock moving ``step`` after each, up to ``until``."""
    while clock.now <= until:
        while sender.run_once().claimed:
            pass
        clock.now += step


def test_an_order_entering_a_status_the_shop_is_told_of_records_one_event_per_change(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Submitted tells nothing; Issued, then removed, are events 1 and 2 of the order, each
    with the order as the read API shows it and a delivery to every endpoint."""
    deliver_to(sessions, {"default": ["shop", "crm"], "other": ["elsewhere"]})
    raw = wire_order("Submitted")
    with sessions.begin() as session:
        upsert_order(
            session, connection_id, parse(raw), source=ChangeSource.WEBHOOK, observed_at=T0
        )
    for minute in (1, 2):  # the same status twice: one event
        with sessions.begin() as session:
            issued = parse(wire_order("Issued", minted=True))
            at = T0 + minute * MINUTE
            upsert_order(session, connection_id, issued, source=ChangeSource.FETCH, observed_at=at)
    with sessions.begin() as session:
        mark_removed(session, connection_id, ORDER_ID, T0 + 3 * MINUTE, ChangeSource.FETCH)

    found = events(sessions)
    assert [(e.type, e.order_seq) for e in found] == [
        (ShopEventType.ISSUED, 1),
        (ShopEventType.REMOVED, 2),
    ]
    assert all(e.event_id.startswith("msg_") and len(e.event_id) == 36 for e in found)
    assert found[0].event_id != found[1].event_id
    issued_payload, removed_payload = (e.payload for e in found)
    assert (issued_payload["orderId"], issued_payload["status"]) == (ORDER_ID, "Issued")
    assert issued_payload["sellToOrderReference"] == "SHOP-1001"
    assert issued_payload["items"][0]["wallets"][0]["walletReferenceNumber"]
    assert [step["status"] for step in issued_payload["timeline"]] == ["Submitted", "Issued"]
    assert issued_payload["removedAt"] is None
    assert removed_payload["removedAt"] is not None
    # Each payload says when this change was made, not the one before it.
    assert dt.datetime.fromisoformat(issued_payload["changedAt"]) == T0 + MINUTE
    assert dt.datetime.fromisoformat(removed_payload["changedAt"]) == T0 + 3 * MINUTE
    assert sorted((d.endpoint, d.order_seq, d.state) for d in deliveries(sessions)) == [
        ("crm", 1, DeliveryState.PENDING),
        ("crm", 2, DeliveryState.PENDING),
        ("shop", 1, DeliveryState.PENDING),
        ("shop", 2, DeliveryState.PENDING),
    ]


def test_a_rolled_back_mirror_change_records_and_sends_nothing(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """The change and its event share a transaction: rolled back, the shop hears nothing."""
    deliver_to(sessions, {"default": ["shop"]})
    shop = serve(Shop([new_secret()]))

    with pytest.raises(RuntimeError), sessions.begin() as session:
        upsert_order(
            session,
            connection_id,
            parse(wire_order("Issued", minted=True)),
            source=ChangeSource.WEBHOOK,
            observed_at=T0,
        )
        raise RuntimeError("the transaction fails after the mirror's write")

    report = sender(sessions, shop).run_once()
    assert report.claimed == 0
    assert (events(sessions), deliveries(sessions), shop.requests) == ([], [], [])


def test_events_are_signed_by_every_secret_during_a_rotation(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """With two secrets configured, each shop (knowing the old, the new, or both) verifies
    every event; the body is the event: type, timestamp, sequence and the order."""
    old, new = new_secret(), new_secret()
    deliver_to(sessions, {"default": ["old", "new", "both"]})
    shops = {
        name: serve(Shop(secrets))
        for name, secrets in (("old", [old]), ("new", [new]), ("both", [old, new]))
    }
    mirror(sessions, connection_id, 1, "Draft", T0)
    mirror(sessions, connection_id, 1, "Issued", T0 + MINUTE)

    later = Clock(T0 + 5 * MINUTE)
    for name, shop in shops.items():
        send = sender(sessions, shop, name=name, secrets=[old, new], clock=later)
        report = send.run_once()
        assert (report.claimed, report.delivered) == (1, 1)  # the Issued event waits its turn
        assert send.run_once().delivered == 1

    [draft, issued] = events(sessions)
    for shop in shops.values():
        assert shop.unverified == 0
        assert [r.event_id for r in shop.requests] == [draft.event_id, issued.event_id]
        body = shop.requests[1].body
        assert (body["type"], body["sequence"]) == ("order.issued", 2)
        assert body["timestamp"] == "2026-05-15T09:31:00Z"
        assert body["data"]["status"] == "Issued"
        assert body["data"]["sellToOrderReference"] == "SHOP-1"
    assert {d.state for d in deliveries(sessions)} == {DeliveryState.DELIVERED}


def test_a_shop_that_does_not_know_the_secret_is_not_told(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """A signature by another secret fails the library's check (so the check is real)."""
    deliver_to(sessions, {"default": ["shop"]})
    shop = serve(Shop([new_secret()]))
    mirror(sessions, connection_id, 1, "Issued", T0)

    sender(sessions, shop, secrets=[new_secret()]).run_once()

    assert (shop.unverified, shop.requests) == (1, [])
    [delivery] = deliveries(sessions)
    assert (delivery.state, delivery.last_status) == (DeliveryState.DEAD, 401)


def test_an_endpoint_down_ten_minutes_gets_every_event_after_in_order_none_twice(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """503 for ten minutes of virtual time while orders go Draft, Issued, Cancelled: then
    every event arrives, each order's in its sequence, no event id accepted twice."""
    deliver_to(sessions, {"default": ["shop"]})
    clock = Clock(T0)
    back_at = T0 + 10 * MINUTE
    shop = serve(Shop([new_secret()], answer=lambda _: 503 if clock.now < back_at else 200))
    send = sender(sessions, shop, clock=clock)
    orders = range(1, 6)
    for step, status in enumerate(("Draft", "Issued", "Cancelled")):
        for n in orders:
            mirror(sessions, connection_id, n, status, T0 + step * MINUTE)
        clock.now = T0 + step * MINUTE
        send.run_once()

    drain(send, clock, dt.timedelta(seconds=20), until=T0 + 40 * MINUTE)

    recorded = events(sessions)
    assert len(recorded) == 15
    assert {d.state for d in deliveries(sessions)} == {DeliveryState.DELIVERED}
    refused = [r for r in shop.requests if r.status == 503]
    accepted = shop.accepted()
    assert refused, "the endpoint was tried while down"
    assert shop.unverified == 0
    assert sorted(r.event_id for r in accepted) == sorted(e.event_id for e in recorded)
    by_order: dict[str, list[int]] = {}
    for request in accepted:
        by_order.setdefault(request.body["data"]["orderId"], []).append(request.body["sequence"])
    assert sorted(by_order.values()) == [[1, 2, 3]] * 5
    assert [
        r.body["type"] for r in accepted if r.body["data"]["sellToOrderReference"] == "SHOP-3"
    ] == [
        "order.draft",
        "order.issued",
        "order.cancelled",
    ]


def test_a_claim_takes_one_event_of_an_order_at_a_time(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """An order's later events wait while an earlier one is in flight to the endpoint."""
    deliver_to(sessions, {"default": ["shop"]})
    for step, status in enumerate(("Draft", "Issued", "Cancelled")):
        mirror(sessions, connection_id, 1, status, T0 + step * MINUTE)
    mirror(sessions, connection_id, 2, "Issued", T0)

    first = claim_deliveries(
        sessions, "shop", owner="a", now=T0 + 5 * MINUTE, limit=BATCH_SIZE, lease_seconds=60
    )
    second = claim_deliveries(
        sessions, "shop", owner="b", now=T0 + 5 * MINUTE, limit=BATCH_SIZE, lease_seconds=60
    )

    assert sorted((c.payload["sellToOrderReference"], c.order_seq) for c in first) == [
        ("SHOP-1", 1),
        ("SHOP-2", 1),
    ]
    assert second == []


def test_a_refused_event_is_dead_at_once_and_a_replay_sends_the_same_event(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """A 4xx other than 408 and 429 is the shop refusing: dead after one attempt, listed,
    and sent again by a replay with the same webhook-id."""
    deliver_to(sessions, {"default": ["shop"]})
    answers = iter([422, 200])
    shop = serve(Shop([new_secret()], answer=lambda _: next(answers)))
    send = sender(sessions, shop)
    mirror(sessions, connection_id, 1, "Error", T0)

    report = send.run_once()
    again = send.run_once()

    assert (report.claimed, report.dead, again.claimed) == (1, 1, 0)
    with sessions() as session:
        [dead] = list_deliveries(session, state=DeliveryState.DEAD)
    assert (dead.type, dead.reference, dead.attempts, dead.last_status) == (
        "order.error",
        "SHOP-1",
        1,
        422,
    )
    with sessions.begin() as session, pytest.raises(ReplayRefused, match="no shop delivery"):
        replay(session, delivery_id=dead.id + 1, now=T0)
    with sessions.begin() as session:
        assert replay(session, delivery_id=dead.id, now=T0) == [dead.id]
    assert send.run_once().delivered == 1
    with sessions.begin() as session, pytest.raises(ReplayRefused, match="delivered, not dead"):
        replay(session, delivery_id=dead.id, now=T0)

    assert [(r.event_id, r.status) for r in shop.requests] == [
        (dead.event_id, 422),
        (dead.event_id, 200),
    ]


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_a_failing_endpoint_is_retried_with_backoff_until_the_horizon_then_dead(
    sessions: sessionmaker[Session],
    connection_id: int,
    serve: Callable[[Shop], Shop],
    status: int,
) -> None:
    """Transient answers are tried again, later each time, and given up at the horizon."""
    deliver_to(sessions, {"default": ["shop"]})
    clock = Clock(T0)
    shop = serve(Shop([new_secret()], answer=lambda _: status))
    send = sender(sessions, shop, clock=clock, horizon=dt.timedelta(hours=1))
    mirror(sessions, connection_id, 1, "Issued", T0)

    drain(send, clock, dt.timedelta(seconds=30), until=T0 + 2 * 60 * MINUTE)

    [delivery] = deliveries(sessions)
    assert (delivery.state, delivery.last_status) == (DeliveryState.DEAD, status)
    # 5 s doubling: about 10 attempts in an hour, the last one at the horizon.
    assert 6 <= delivery.attempts <= 12
    assert len(shop.requests) == delivery.attempts


def test_a_slow_endpoint_delays_only_its_own_deliveries(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """While one endpoint holds every request, the other receives every event."""
    deliver_to(sessions, {"default": ["slow", "fast"]})
    release = threading.Event()
    slow = serve(Shop([new_secret()], hold=release))
    fast = serve(Shop([new_secret()]))
    stop = threading.Event()
    threads = start_senders(
        [
            Endpoint("slow", slow.url, tuple(slow.secrets)),
            Endpoint("fast", fast.url, tuple(fast.secrets)),
        ],
        sessions,
        make_sessions(sessions.kw["bind"], read_only=True),
        owner="test",
        stop=stop,
        horizon=dt.timedelta(days=3),
        timeout=30.0,
    )
    try:
        for n in range(1, 4):
            mirror(sessions, connection_id, n, "Issued", dt.datetime.now(dt.UTC))

        wait_until(lambda: len(fast.accepted()) == 3, 30, what="the fast endpoint's events")
        assert slow.requests == []  # still held: none answered
        release.set()
        wait_until(lambda: len(slow.accepted()) == 3, 30, what="the slow endpoint's events")
    finally:
        release.set()
        stop.set()
        for thread in threads:
            thread.join(10)
    assert {d.state for d in deliveries(sessions)} == {DeliveryState.DELIVERED}


def test_a_sale_the_venue_refuses_tells_the_shop(
    sessions: sessionmaker[Session], client: Any, venue: Any, connection_id: int
) -> None:
    """A createOrder refused for good records order.submission_failed with the refusal."""
    deliver_to(sessions, {"default": ["shop"]})
    venue.scripts = [answer(400, "Unknown item '99999'")]

    result = submit(sessions, client, connection_id, "SHOP-77")

    assert result.status is SubmitStatus.FAILED
    [event] = events(sessions)
    assert (event.type, event.order_seq, event.venue_order_id) == (
        ShopEventType.SUBMISSION_FAILED,
        1,
        None,
    )
    assert event.payload["sellToOrderReference"] == "SHOP-77"
    assert event.payload["connection"] == "default"
    assert "Unknown item" in event.payload["message"]
    assert [d.endpoint for d in deliveries(sessions)] == ["shop"]
    with sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(VenueOrder)) == 0


def test_erasing_an_orders_customers_blanks_the_names_its_events_carry(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """The privacy erasure reaches the events' copies of the order: no holder's name stays."""
    mirror(sessions, connection_id, 1, "Draft", T0)
    mirror(sessions, connection_id, 1, "Issued", T0 + MINUTE)
    with sessions() as session:
        assert "Visitor 1" in json.dumps([e.payload for e in events(sessions)])
        [pk] = session.scalars(sa.select(VenueOrder.id)).all()

    with sessions.begin() as session:
        erase_customers(session, [pk], T0 + 2 * MINUTE)

    payloads = [e.payload for e in events(sessions)]
    assert len(payloads) == 2
    assert "Visitor" not in json.dumps(payloads)
    assert payloads[1]["items"][0]["wallets"][0]["walletReferenceNumber"]
