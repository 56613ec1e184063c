"""The shop's senders: an endpoint's ``Retry-After`` honoured, and a clean stop.

Over real HTTP, with the receiving shop of :mod:`tests.orders.test_shop_events` verifying
every signature with the ``standardwebhooks`` library; the senders' clock is virtual
where the test is about time.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import threading
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from orders.shop_delivery import (
    POOL_SIZE,
    RETRY_CAP_SECONDS,
    Endpoint,
    EndpointSender,
    parse_retry_after,
    start_senders,
)
from orders.shop_events import deliver_to
from orders.shop_leases import claim_deliveries
from storage.engine import make_sessions
from storage.records import DeliveryState
from tests.orders.test_shop_events import (
    MINUTE,
    Clock,
    Shop,
    deliveries,
    mirror,
    new_secret,
    sender,
    serve,
)
from tests.storage.test_models import T0, connection_id
from tests.support.stack import wait_until

__all__ = ["connection_id", "serve"]  # fixtures, used by name

NOW = dt.datetime(2026, 12, 7, 10, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("Mon, 07 Dec 2026 10:05:00 GMT", 300.0),
        ("Mon, 07 Dec 2026 09:00:00 GMT", 0.0),  # a date past: no wait
        ("Monday, 07-Dec-26 10:01:00 GMT", 60.0),  # RFC 850, which HTTP still accepts
        ("86400", RETRY_CAP_SECONDS),
        ("9" * 5000, RETRY_CAP_SECONDS),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_reads_seconds_or_a_date_and_is_capped(
    header: str | None, seconds: float | None
) -> None:
    """Delay-seconds or an HTTP-date, at most the backoff's cap; anything else is None."""
    wait = parse_retry_after(header, NOW)
    assert (None if wait is None else wait.total_seconds()) == seconds


def test_a_429_with_retry_after_holds_the_whole_endpoint_until_then(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """429 and Retry-After: 120: no delivery of the endpoint is POSTed before two minutes
    have passed (by this sender, by another one claiming the endpoint's deliveries, or by
    one started after the answer; one recorded during the hold waits too), then every one
    is delivered."""
    deliver_to(sessions, {"default": ["shop"]})
    clock = Clock(T0)
    until = T0 + 2 * MINUTE
    shop = serve(
        Shop(
            [new_secret()],
            answer=lambda _: 429 if clock.now < until else 200,
            retry_after=lambda _: "120" if clock.now < until else None,
        )
    )
    send = sender(sessions, shop, clock=clock)
    other = sender(sessions, shop, clock=clock)  # as another worker process's would be
    for n in (1, 2, 3):
        mirror(sessions, connection_id, n, "Issued", T0)

    first = send.run_once()

    refused = len(shop.requests)
    assert 1 <= refused == first.retrying <= 3
    assert first.retrying + first.released == 3
    assert send.held_until() == until
    rows = deliveries(sessions)
    assert {(d.state, d.next_attempt_at) for d in rows} == {(DeliveryState.PENDING, until)}
    assert sorted(d.attempts for d in rows) == sorted([1] * refused + [0] * (3 - refused))
    assert {d.last_status for d in rows if d.attempts} == {429}

    for seconds in (1, 30, 90):
        clock.now = T0 + dt.timedelta(seconds=seconds)
        assert send.run_once().claimed == 0
        assert other.run_once().claimed == 0
    # An event recorded during the hold, and the worker restarted (its sender knows of
    # no hold): the stored hold still keeps every sender from the endpoint.
    clock.now = T0 + dt.timedelta(seconds=119)
    mirror(sessions, connection_id, 4, "Issued", clock.now)
    send.close()
    restarted = sender(sessions, shop, clock=clock)
    assert restarted.run_once().claimed == 0
    assert other.run_once().claimed == 0
    assert len(shop.requests) == refused

    clock.now = until
    assert restarted.run_once().delivered == 4
    assert [r.status for r in shop.requests[refused:]] == [200] * 4
    assert {d.state for d in deliveries(sessions)} == {DeliveryState.DELIVERED}
    assert shop.unverified == 0


def test_a_retry_after_date_sets_the_next_attempt(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """A 503 with an HTTP-date five minutes ahead (of the real time): the next attempt is
    five minutes on, the seconds the date cannot say aside."""
    deliver_to(sessions, {"default": ["shop"]})
    clock = Clock(T0)

    def five_minutes_on(_: str) -> str:
        return email.utils.format_datetime(dt.datetime.now(dt.UTC) + 5 * MINUTE, usegmt=True)

    shop = serve(Shop([new_secret()], answer=lambda _: 503, retry_after=five_minutes_on))
    mirror(sessions, connection_id, 1, "Issued", T0)

    sender(sessions, shop, clock=clock).run_once()

    [delivery] = deliveries(sessions)
    assert (delivery.state, delivery.last_status) == (DeliveryState.PENDING, 503)
    wait = delivery.next_attempt_at - T0
    assert 4 * MINUTE + dt.timedelta(seconds=58) <= wait <= 5 * MINUTE


@pytest.mark.parametrize("header", ["soon", "1.5", "Thu, 99 Foo 2026"])
def test_a_malformed_retry_after_falls_back_to_the_backoff(
    sessions: sessionmaker[Session],
    connection_id: int,
    serve: Callable[[Shop], Shop],
    header: str,
) -> None:
    """A Retry-After that does not read: the first backoff (at most 5 s), no hold."""
    deliver_to(sessions, {"default": ["shop"]})
    shop = serve(Shop([new_secret()], answer=lambda _: 429, retry_after=lambda _: header))
    mirror(sessions, connection_id, 1, "Issued", T0)
    send = sender(sessions, shop)

    send.run_once()

    [delivery] = deliveries(sessions)
    assert delivery.state is DeliveryState.PENDING
    assert T0 < delivery.next_attempt_at <= T0 + dt.timedelta(seconds=5)
    assert delivery.last_error == "HTTP 429, Retry-After not understood"
    assert send.held_until() is None


def test_a_retry_after_past_the_horizon_is_dead_and_a_long_one_is_capped(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """Retry-After: 86400 is taken as the cap, an hour: within a day's horizon the
    delivery waits that hour; with a 30-minute horizon it is dead at once."""
    deliver_to(sessions, {"default": ["day", "half-hour"]})
    answers = {"answer": lambda _: 429, "retry_after": lambda _: "86400"}
    day = serve(Shop([new_secret()], **answers))  # type: ignore[arg-type]
    half_hour = serve(Shop([new_secret()], **answers))  # type: ignore[arg-type]
    mirror(sessions, connection_id, 1, "Issued", T0)

    sender(sessions, day, name="day", horizon=dt.timedelta(days=1)).run_once()
    sender(sessions, half_hour, name="half-hour", horizon=30 * MINUTE).run_once()

    rows = {d.endpoint: d for d in deliveries(sessions)}
    assert (rows["day"].state, rows["day"].next_attempt_at) == (
        DeliveryState.PENDING,
        T0 + dt.timedelta(seconds=RETRY_CAP_SECONDS),
    )
    assert rows["half-hour"].state is DeliveryState.DEAD
    assert rows["half-hour"].last_error == ("HTTP 429; its Retry-After ends past the retry horizon")


def test_a_hold_stops_the_rest_of_the_pass_and_spares_other_endpoints(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """Forty deliveries in one pass to an endpoint answering 429, Retry-After: 60: once
    the first answer is in, no further POST starts (at most the pool's first round went
    out); the ones not sent are pending, no attempt counted. Another endpoint's
    deliveries go out meanwhile."""
    deliver_to(sessions, {"default": ["busy", "calm"]})
    busy = serve(Shop([new_secret()], answer=lambda _: 429, retry_after=lambda _: "60"))
    calm = serve(Shop([new_secret()]))
    for n in range(1, 41):
        mirror(sessions, connection_id, n, "Issued", T0)

    report = sender(sessions, busy, name="busy").run_once()
    calm_report = sender(sessions, calm, name="calm").run_once()

    assert report.claimed == 40
    assert 1 <= len(busy.requests) <= POOL_SIZE
    assert report.retrying == len(busy.requests)
    assert report.released == 40 - len(busy.requests)
    rows = [d for d in deliveries(sessions) if d.endpoint == "busy"]
    assert {d.next_attempt_at for d in rows} == {T0 + MINUTE}
    assert sum(d.attempts for d in rows) == len(busy.requests)
    calm_errors = [
        d.last_error for d in deliveries(sessions) if d.endpoint == "calm" and d.last_error
    ]
    assert calm_report.delivered == 40, calm_errors
    assert len(calm.accepted()) == 40


# --- a clean stop ---------------------------------------------------------------------


def run_in_thread(send: EndpointSender, stop: threading.Event) -> threading.Thread:
    """``send.run_forever`` on a thread of its own, as the worker runs it."""
    thread = threading.Thread(target=send.run_forever, args=(stop,), daemon=True)
    thread.start()
    return thread


def test_a_stop_mid_post_lets_the_answer_come_and_records_it(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """Stopped while the shop holds its POST: the sender waits for the answer, records
    the delivery delivered, and ends; a sender started afterwards sends nothing again."""
    deliver_to(sessions, {"default": ["shop"]})
    release = threading.Event()
    shop = serve(Shop([new_secret()], hold=release))
    mirror(sessions, connection_id, 1, "Issued", dt.datetime.now(dt.UTC))
    stop = threading.Event()
    send = sender(sessions, shop, clock=Clock(dt.datetime.now(dt.UTC) + MINUTE))
    thread = run_in_thread(send, stop)

    assert shop.arrived.wait(30), "the POST never reached the shop"
    stop.set()
    thread.join(0.5)
    assert thread.is_alive(), "the sender ended without the POST's answer"
    release.set()
    thread.join(30)

    assert not thread.is_alive()
    [delivery] = deliveries(sessions)
    assert (delivery.state, delivery.attempts) == (DeliveryState.DELIVERED, 1)
    later = sender(sessions, shop, clock=Clock(dt.datetime.now(dt.UTC) + 60 * MINUTE))
    assert later.run_once().claimed == 0
    assert [r.status for r in shop.requests] == [200]


def test_a_post_unanswered_past_the_stop_grace_is_put_back_to_pending(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """The shop holds the POST longer than the stop grace: the sender puts the delivery
    back to pending, due at once, and ends; the next sender sends it again, same id."""
    deliver_to(sessions, {"default": ["shop"]})
    release = threading.Event()
    shop = serve(Shop([new_secret()], hold=release))
    mirror(sessions, connection_id, 1, "Issued", dt.datetime.now(dt.UTC))
    stop = threading.Event()
    engine = sessions.kw["bind"]
    send = EndpointSender(
        Endpoint("shop", shop.url, tuple(shop.secrets)),
        sessions,
        make_sessions(engine, read_only=True),
        owner="stopping",
        horizon=dt.timedelta(days=3),
        timeout=60.0,
        stop_grace=0.5,
    )
    thread = run_in_thread(send, stop)
    try:
        assert shop.arrived.wait(30), "the POST never reached the shop"
        stop.set()
        thread.join(30)
        assert not thread.is_alive()
        [delivery] = deliveries(sessions)
        assert (delivery.state, delivery.attempts, delivery.lease_owner) == (
            DeliveryState.PENDING,
            1,
            None,
        )
        assert delivery.last_error == "the sender stopped after 0.5 s without an answer"
    finally:
        release.set()

    wait_until(lambda: len(shop.requests) == 1, 30, what="the held POST's answer")
    again = sender(sessions, shop, clock=Clock(dt.datetime.now(dt.UTC) + MINUTE))
    assert again.run_once().delivered == 1
    assert len({r.event_id for r in shop.requests}) == 1
    assert len(shop.requests) == 2


def test_start_senders_threads_end_when_stopped_and_joined(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """join_senders returns once every stopped sender has ended: none left over."""
    from orders.shop_delivery import join_senders

    deliver_to(sessions, {"default": ["a", "b"]})
    a, b = serve(Shop([new_secret()])), serve(Shop([new_secret()]))
    stop = threading.Event()
    threads = start_senders(
        [Endpoint("a", a.url, tuple(a.secrets)), Endpoint("b", b.url, tuple(b.secrets))],
        sessions,
        make_sessions(sessions.kw["bind"], read_only=True),
        owner="test",
        stop=stop,
        horizon=dt.timedelta(days=3),
        timeout=5.0,
    )
    mirror(sessions, connection_id, 1, "Issued", dt.datetime.now(dt.UTC))
    wait_until(lambda: len(a.accepted()) == len(b.accepted()) == 1, 30, what="both events")

    stop.set()
    assert join_senders(threads, timeout=5.0) == []
    assert not any(thread.is_alive() for thread in threads)


# --- who sends: row leases (PostgreSQL), one sender per endpoint (SQLite) ---------------


def test_two_senders_of_one_endpoint_send_each_event_once(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """Two senders of the same endpoint running at once (two worker processes): each
    event is POSTed once, by one of them; on PostgreSQL their row leases share the
    deliveries out, on SQLite the one holding the endpoint's file lock sends them all."""
    deliver_to(sessions, {"default": ["shop"]})
    shop = serve(Shop([new_secret()]))
    stop = threading.Event()
    senders = [sender(sessions, shop, clock=lambda: dt.datetime.now(dt.UTC)) for _ in "ab"]
    threads = [run_in_thread(send, stop) for send in senders]
    try:
        for n in range(1, 31):
            mirror(sessions, connection_id, n, "Issued", dt.datetime.now(dt.UTC))
        wait_until(
            lambda: {d.state for d in deliveries(sessions)} == {DeliveryState.DELIVERED},
            60,
            what="every delivery delivered",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    assert len(shop.requests) == 30
    assert len({r.event_id for r in shop.requests}) == 30
    assert {d.attempts for d in deliveries(sessions)} == {1}


def test_on_sqlite_the_endpoint_passes_to_the_next_sender_when_its_holder_ends(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """While one sender holds the endpoint another claims nothing; once the holder is
    closed (its process ended), the other sends."""
    if sessions.kw["bind"].dialect.name != "sqlite":
        pytest.skip("PostgreSQL's senders share an endpoint by row leases")
    deliver_to(sessions, {"default": ["shop"]})
    shop = serve(Shop([new_secret()]))
    holder, waiting = sender(sessions, shop), sender(sessions, shop)
    mirror(sessions, connection_id, 1, "Issued", T0)
    assert holder.run_once(look_first=False).delivered == 1
    mirror(sessions, connection_id, 2, "Issued", T0)

    assert waiting.run_once().claimed == 0
    holder.close()
    assert waiting.run_once().delivered == 1
    assert [r.body["data"]["sellToOrderReference"] for r in shop.requests] == [
        "SHOP-1",
        "SHOP-2",
    ]


def test_on_sqlite_events_go_out_while_another_holds_the_write_lock(
    sessions: sessionmaker[Session], connection_id: int, serve: Callable[[Shop], Shop]
) -> None:
    """SQLite's write lock held by another connection (the worker's mirror, under load):
    the sender still claims and POSTs every due event; their settlement waits for the
    lock, and meanwhile the sender's passes do not send them again."""
    engine = sessions.kw["bind"]
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL has no database-wide write lock")
    deliver_to(sessions, {"default": ["shop"]})
    shop = serve(Shop([new_secret()]))
    for n in (1, 2, 3):
        mirror(sessions, connection_id, n, "Issued", T0)
    stop = threading.Event()
    send = sender(sessions, shop, clock=Clock(T0 + MINUTE))
    with engine.connect() as writer:  # BEGIN IMMEDIATE: the write lock, until the block ends
        writer.exec_driver_sql("SELECT 1")
        thread = run_in_thread(send, stop)
        try:
            wait_until(lambda: len(shop.accepted()) == 3, 30, what="the three events")
            # Passes go on every 0.1 s while the settlement waits: none sends again.
            stop.wait(0.5)
            reads = make_sessions(engine, read_only=True)  # a read waits for no lock
            assert {d.state for d in deliveries(reads)} == {DeliveryState.PENDING}
        finally:
            writer.rollback()
        wait_until(
            lambda: {d.state for d in deliveries(sessions)} == {DeliveryState.DELIVERED},
            30,
            what="the settlement, once the lock is free",
        )
    stop.set()
    thread.join(30)
    assert len(shop.requests) == 3


def test_on_postgresql_a_claim_probes_each_candidates_order_through_the_index(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """PostgreSQL's plan of a claim, on a table whose statistics lag a backlog (never
    analyzed): whether an earlier event of the candidate's order is in flight is one
    probe of the (endpoint, order, sequence) index, not a scan of the endpoint's every
    in-flight row per candidate (the anti join it planned, a second per claim of 1,000)."""
    engine = sessions.kw["bind"]
    if engine.dialect.name != "postgresql":
        pytest.skip("the plan in question is PostgreSQL's")
    deliver_to(sessions, {"default": ["shop"]})
    for n in range(1, 101):
        mirror(sessions, connection_id, n, "Issued", T0)
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if "SKIP LOCKED" in statement:
            statements.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        claimed = claim_deliveries(
            sessions, "shop", owner="plan", now=T0 + MINUTE, limit=10, lease_seconds=60
        )
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    assert len(claimed) == 10
    [(statement, parameters)] = statements
    with engine.connect() as connection:
        plan = [row[0] for row in connection.exec_driver_sql("EXPLAIN " + statement, parameters)]

    probes = [line for line in plan if "Index Cond" in line and "venue_order_id" in line]
    assert probes, "\n".join(plan)
    assert not [line for line in plan if "Join Filter" in line], "\n".join(plan)
