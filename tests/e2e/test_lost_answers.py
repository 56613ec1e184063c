"""End to end over real HTTP: a createOrder the venue took whose answer never came.

The sandbox's ``answerLost`` fault cuts the connection after the venue committed the
order, as a gateway timing out or resetting would; the sender that made the call then
died (a real ``otacm submit`` SIGKILLed mid-call) or gave up, leaving its outbox row
leased. Once the lease ends, the next claim must look the sale up and settle the row
with what the venue has — never a second createOrder, above all not over an order the
venue put in Error meanwhile (it would delete that order and issue the new one).

Each test runs on SQLite and on PostgreSQL (``migrated_engine``).
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from orders.attempt import FOUND_IN_ERROR
from orders.outbox import claim_outbox, record_submission
from orders.sender import run_outbox_once
from orders.submit import submit_now
from otacm.processes import OUTBOX_RETRY_SECONDS
from otacm.settings import Settings
from reconciler.engine import reconcile_connections
from storage.models import Outbox, OutboxState, VenueOrder, ensure_connection
from storage.records import ReconException, ReconTrigger
from storage.types import utcnow
from tests.e2e.conftest import E2E, OtacmProcess, line, otacm_environment, run_otacm, wait_until
from tests.support.stack import error_line
from venue.client import VenueClient, open_client
from venue.errors import VenueUnavailable
from venue.models import OrderStatus
from venue.retry import RetryPolicy

LEASE_SECONDS = 5.0
"""A short outbox lease, so a dead sender's row comes back within the test."""


@pytest.fixture
def sender(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[Sender]:
    """The scheduler's outbox sender, in this process, with a venue client of its own."""
    (connection,) = settings.connections
    with sessions.begin() as session:
        connection_id = ensure_connection(session, connection.name)
    with open_client(connection) as client:
        yield Sender(sessions, connection_id, client)


class Sender:
    """``run_outbox_once`` as the scheduler's ``retry_outbox`` job calls it."""

    def __init__(
        self, sessions: sessionmaker[Session], connection_id: int, client: VenueClient
    ) -> None:
        self.sessions = sessions
        self.connection_id = connection_id
        self.client = client

    def run(self, now: dt.datetime, lease_seconds: float = LEASE_SECONDS) -> dict[str, int]:
        """One pass at ``now``; what it did."""
        report = run_outbox_once(
            self.sessions,
            {self.connection_id: self.client},
            owner="scheduler",
            now=now,
            lease_seconds=lease_seconds,
        )
        return report.as_dict()

    def row(self) -> Outbox:
        """The one outbox row."""
        with self.sessions.begin() as session:
            (row,) = session.scalars(sa.select(Outbox)).all()
            return row

    def live_orders(self) -> list[tuple[str, OrderStatus]]:
        """The mirror's orders not removed at the venue."""
        with self.sessions.begin() as session:
            query = sa.select(VenueOrder.order_id, VenueOrder.status).where(
                VenueOrder.removed_at.is_(None)
            )
            return [(row.order_id, row.status) for row in session.execute(query)]


def lost_create(e2e: E2E, sender: Sender, reference: str, *, items: list[dict]) -> dt.datetime:
    """A sale recorded and claimed by a sender that called createOrder and died without
    its answer (the venue has the order); when the dead sender's lease ends."""
    request = e2e.order_request(reference, items=items)
    started = utcnow()
    with sender.sessions.begin() as session:
        record_submission(session, sender.connection_id, request, now=started)
    claim_outbox(sender.sessions, owner="died", now=started, limit=1, lease_seconds=LEASE_SECONDS)
    e2e.faults(answerLostCount=1)
    once = RetryPolicy(attempts=1)
    with (
        open_client(e2e.settings.connections[0], retry=once) as dying,
        pytest.raises(VenueUnavailable),
    ):
        dying.create_order(request)
    assert e2e.sandbox.runtime.store.find(e2e.partner_id, reference) is not None
    return started + dt.timedelta(seconds=LEASE_SECONDS)


@pytest.mark.parametrize("settings_changes", [{"outbox_lease_seconds": LEASE_SECONDS}])
def test_a_lost_create_found_in_error_is_never_sent_again(
    e2e: E2E,
    sender: Sender,
    otacm: Callable[..., OtacmProcess],
    settings: Settings,
    tmp_path: Path,
) -> None:
    """``otacm submit`` killed while the venue holds its create's answer; the order goes
    into Error; after the lease the scheduler's pass finds it by reference and settles
    the row with it: one createOrder in all, one live order, listed by ``orders errors``."""
    e2e.faults(answerLostCount=1, answerLostAfterSeconds=10.0)
    body = e2e.order_body("LOST-ERR-1", items=[error_line()])
    sale = tmp_path / "sale.json"
    sale.write_text(json.dumps(body), encoding="utf-8")
    environment = otacm_environment(settings)

    submit = otacm("submit", str(sale), environment=environment)
    wait_until(
        lambda: e2e.sandbox.runtime.store.find(e2e.partner_id, "LOST-ERR-1"),
        30,
        what="the venue to take the order",
    )
    assert submit.kill() == -signal.SIGKILL
    row = sender.row()
    assert (row.state, row.attempts) == (OutboxState.LEASED, 1)
    assert row.lease_expires_at is not None
    e2e.deliver()  # processed: the sold-out item fails, the order is in Error
    (venue_order,) = e2e.sandbox.runtime.store.with_status(OrderStatus.ERROR)
    order_id = venue_order.order.order_id

    during = sender.run(row.lease_expires_at - dt.timedelta(seconds=1))
    after = sender.run(row.lease_expires_at + dt.timedelta(seconds=OUTBOX_RETRY_SECONDS))

    assert during["claimed"] == 0
    assert (after["sent"], after["resolved"], after["in_error"]) == (1, 1, 1)
    assert e2e.calls("createOrder") == 1
    row = sender.row()
    assert (row.state, row.order_id, row.last_error) == (
        OutboxState.SENT,
        order_id,
        FOUND_IN_ERROR,
    )
    e2e.worker.drain()  # the webhook of the Error changes nothing more
    assert sender.live_orders() == [(order_id, OrderStatus.ERROR)]
    e2e.assert_mirrored([order_id])
    listed = json.loads(run_otacm("orders", "errors", "--json", environment=environment))
    assert [entry["orderId"] for entry in listed] == [order_id]


def test_a_lost_create_found_issued_is_settled_without_a_second_create(
    e2e: E2E, sender: Sender
) -> None:
    """The lost order was issued meanwhile: the claim after the lease settles the row
    with it, mirrored as the venue has it; no second createOrder."""
    ends = lost_create(e2e, sender, "LOST-OK-1", items=[line()])
    e2e.deliver()

    report = sender.run(ends + dt.timedelta(seconds=1))

    assert (report["sent"], report["resolved"], report["in_error"]) == (1, 1, 0)
    assert e2e.calls("createOrder") == 1
    row = sender.row()
    (venue_order,) = e2e.sandbox.runtime.store.with_status(OrderStatus.ISSUED)
    assert (row.state, row.order_id, row.last_error) == (
        OutboxState.SENT,
        venue_order.order.order_id,
        None,
    )
    e2e.assert_mirrored([venue_order.order.order_id])
    assert sender.live_orders() == [(venue_order.order.order_id, OrderStatus.ISSUED)]


def test_a_create_cut_off_before_the_venue_saw_it_is_sent_exactly_once(
    e2e: E2E, sender: Sender
) -> None:
    """A sender that died before its call: after the lease the look-up finds nothing and
    the create is sent once, within one pass of the lease's end."""
    started = utcnow()
    with sender.sessions.begin() as session:
        record_submission(session, sender.connection_id, e2e.order_request("CUT-1"), now=started)
    claim_outbox(sender.sessions, owner="died", now=started, limit=1, lease_seconds=LEASE_SECONDS)
    ends = started + dt.timedelta(seconds=LEASE_SECONDS)

    during = sender.run(ends - dt.timedelta(seconds=1))
    after = sender.run(ends + dt.timedelta(seconds=OUTBOX_RETRY_SECONDS))

    assert (during["claimed"], after["sent"], after["resolved"]) == (0, 1, 0)
    assert (e2e.calls("listOrdersByPartner"), e2e.calls("createOrder")) == (1, 1)
    row = sender.row()
    assert row.state is OutboxState.SENT
    e2e.worker.drain()
    assert sender.live_orders() == [(row.order_id, OrderStatus.SUBMITTED)]


@pytest.mark.parametrize("settings_changes", [{"outbox_lease_seconds": LEASE_SECONDS}])
def test_the_scheduler_settles_a_killed_submission_one_pass_after_its_lease(
    e2e: E2E,
    sender: Sender,
    otacm: Callable[..., OtacmProcess],
    settings: Settings,
    tmp_path: Path,
) -> None:
    """``otacm submit`` killed mid-call (the venue took the order, the answer was held
    back); ``otacm scheduler`` settles the row with that order at its first outbox pass
    after the lease: one createOrder, and not minutes later."""
    e2e.faults(answerLostCount=1, answerLostAfterSeconds=10.0)
    sale = tmp_path / "sale.json"
    sale.write_text(json.dumps(e2e.order_body("LOST-SCHED-1")), encoding="utf-8")
    environment = otacm_environment(settings)
    submit = otacm("submit", str(sale), environment=environment)
    wait_until(
        lambda: e2e.sandbox.runtime.store.find(e2e.partner_id, "LOST-SCHED-1"),
        30,
        what="the venue to take the order",
    )
    assert submit.kill() == -signal.SIGKILL
    killed = utcnow()
    e2e.deliver()
    (venue_order,) = e2e.sandbox.runtime.store.with_status(OrderStatus.ISSUED)
    expires = sender.row().lease_expires_at
    assert expires is not None
    # The call outlasted the lease, and the live sender kept renewing it until it died.
    assert killed < expires <= killed + dt.timedelta(seconds=LEASE_SECONDS + 1)

    scheduler = otacm("scheduler", environment=environment)
    try:
        wait_until(
            lambda: sender.row().state is OutboxState.SENT or not scheduler.alive(),
            60,
            what="the scheduler to settle the row",
        )
    finally:
        scheduler.stop()

    row = sender.row()
    assert (row.state, row.order_id) == (OutboxState.SENT, venue_order.order.order_id)
    assert row.sent_at is not None
    # The pass that settled it came at the first outbox interval after the lease (with
    # room for a loaded machine): within a lease and one pass of the kill.
    after_lease = row.sent_at - expires
    assert (
        dt.timedelta(seconds=-1) <= after_lease <= dt.timedelta(seconds=OUTBOX_RETRY_SECONDS + 10)
    )
    assert row.sent_at - killed <= dt.timedelta(seconds=LEASE_SECONDS + OUTBOX_RETRY_SECONDS + 10)
    assert e2e.calls("createOrder") == 1


@pytest.mark.parametrize("settings_changes", [{"outbox_lease_seconds": LEASE_SECONDS}])
def test_a_killed_submission_not_yet_at_the_venue_is_sent_within_a_lease_and_a_pass(
    e2e: E2E,
    sender: Sender,
    otacm: Callable[..., OtacmProcess],
    settings: Settings,
    tmp_path: Path,
) -> None:
    """``otacm submit`` killed while its create waits at a slow gateway that has not
    passed it on yet (every call there answers 503 after the wait): the scheduler sends
    the sale within one lease and one outbox pass of the kill, exactly once."""
    e2e.faults(latencyMs=3000, rate503=1.0)
    sale = tmp_path / "sale.json"
    sale.write_text(json.dumps(e2e.order_body("KILLED-EARLY-1")), encoding="utf-8")
    environment = otacm_environment(settings)
    submit = otacm("submit", str(sale), environment=environment)
    wait_until(lambda: _leased(sender), 30, what="the submission to claim its row")
    assert submit.kill() == -signal.SIGKILL
    killed = utcnow()
    e2e.faults(latencyMs=0, rate503=0.0)
    assert e2e.sandbox.runtime.store.find(e2e.partner_id, "KILLED-EARLY-1") is None

    scheduler = otacm("scheduler", environment=environment)
    try:
        wait_until(
            lambda: sender.row().state is OutboxState.SENT or not scheduler.alive(),
            60,
            what="the scheduler to send the sale",
        )
    finally:
        scheduler.stop()

    row = sender.row()
    assert row.state is OutboxState.SENT and row.sent_at is not None
    assert row.sent_at - killed <= dt.timedelta(seconds=LEASE_SECONDS + OUTBOX_RETRY_SECONDS + 10)
    assert e2e.stats()["calls"]["createOrder"].get("201") == 1
    assert e2e.sandbox.runtime.store.find(e2e.partner_id, "KILLED-EARLY-1") is not None


def _leased(sender: Sender) -> bool:
    """Whether the one outbox row exists and is leased by a sender."""
    with sender.sessions.begin() as session:
        state = session.scalar(sa.select(Outbox.state))
    return state is OutboxState.LEASED


@pytest.mark.parametrize("settings_changes", [{"outbox_lease_seconds": LEASE_SECONDS}])
def test_a_live_sender_slower_than_several_leases_is_not_overtaken(
    e2e: E2E, sender: Sender, settings: Settings
) -> None:
    """A createOrder that takes four leases at a slow gateway: the sender renews its row's
    lease while it waits, so another sender passing over and over meanwhile never takes
    the row — one createOrder, settled by the sender that made it."""
    lease = 1.0
    e2e.faults(latencyMs=4000)
    outcomes: list[Any] = []
    (connection,) = settings.connections

    def submit() -> None:
        with open_client(connection, retry=RetryPolicy(attempts=1)) as client:
            outcomes.append(
                submit_now(
                    sender.sessions,
                    client,
                    sender.connection_id,
                    e2e.order_request("SLOW-1"),
                    now=utcnow(),
                    owner="live",
                    lease_seconds=lease,
                )
            )

    live = threading.Thread(target=submit)
    live.start()
    wait_until(lambda: _leased(sender), 10, what="the live sender to claim its row")
    passes = []
    while live.is_alive():
        passes.append(sender.run(utcnow(), lease_seconds=lease))
        time.sleep(lease / 4)
    live.join()

    assert len(passes) >= 8  # the other sender looked at every moment of the call
    assert all(report["claimed"] == 0 for report in passes)
    [outcome] = outcomes
    assert outcome.order_id is not None
    row = sender.row()
    assert (row.state, row.order_id, row.attempts) == (OutboxState.SENT, outcome.order_id, 1)
    assert e2e.calls("createOrder") == 1


@pytest.mark.parametrize("sandbox_changes", [{"pickup_interval": 0.2}])
def test_a_lost_create_answer_is_not_retried_by_the_client_over_its_order_in_error(
    e2e: E2E, sender: Sender, settings: Settings
) -> None:
    """A createOrder answer lost while the venue picks orders up every 0.2 s: by the time
    a client retry would go out the order is in Error, and the venue would delete it and
    issue the retry. The client does not retry it; the outbox's look-up settles the row
    with the Error order: one createOrder, nothing re-processed."""
    e2e.faults(answerLostCount=1)
    retrying = RetryPolicy(attempts=3, wait_initial=1.0, wait_max=1.0, wait_jitter=0)
    with open_client(settings.connections[0], retry=retrying) as client:
        outcome = submit_now(
            sender.sessions,
            client,
            sender.connection_id,
            e2e.order_request("LOST-RETRY-1", items=[error_line()]),
            now=utcnow(),
        )
    assert outcome.order_id is None
    (venue_order,) = wait_until(
        lambda: e2e.sandbox.runtime.store.with_status(OrderStatus.ERROR), 10, what="the Error"
    )
    after = sender.run(utcnow() + dt.timedelta(minutes=5))

    assert (after["sent"], after["in_error"]) == (1, 1)
    assert e2e.stats()["calls"]["createOrder"] == {"201": 1}
    assert sender.row().order_id == venue_order.order.order_id


def test_many_sales_through_lost_answers_errors_and_outages_are_each_created_once(
    e2e: E2E, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    """Forty sales submitted while the gateway loses a third of the answers, answers one
    call in ten 503 and a third of the processing runs end in Error; the outbox, passes
    apart, settles every row: each sale created at the venue exactly once (no resend
    over an order in Error), one live mirrored order per sale, as the venue has it, and
    reconciliation sees no sale with several orders."""
    e2e.faults(answerLostRate=0.3, rate503=0.1, errorRate=0.3)
    (connection,) = settings.connections
    with sessions.begin() as session:
        connection_id = ensure_connection(session, connection.name)
    references = [f"MANY-{n:03d}" for n in range(40)]
    now = utcnow()
    with open_client(connection, retry=RetryPolicy(attempts=1)) as client:
        for reference in references:
            submit_now(sessions, client, connection_id, e2e.order_request(reference), now=now)
        for _ in range(20):
            e2e.tick()
            now += dt.timedelta(minutes=30)  # past any backoff or lease
            run_outbox_once(sessions, {connection_id: client}, owner="sender", now=now)
            with sessions.begin() as session:
                open_rows = session.scalar(
                    sa.select(sa.func.count())
                    .select_from(Outbox)
                    .where(Outbox.state.in_([OutboxState.PENDING, OutboxState.LEASED]))
                )
            if not open_rows:
                break
    e2e.faults(answerLostRate=0, rate503=0, errorRate=0)
    e2e.settle_webhooks()
    e2e.worker.drain()

    assert e2e.stats()["calls"]["createOrder"].get("201") == len(references)
    with sessions.begin() as session:
        states = session.scalars(sa.select(Outbox.state)).all()
        live = session.execute(
            sa.select(VenueOrder.reference_key, VenueOrder.order_id).where(
                VenueOrder.removed_at.is_(None)
            )
        ).all()
    assert set(states) == {OutboxState.SENT}
    assert sorted(reference for reference, _ in live) == references
    e2e.assert_mirrored([order_id for _, order_id in live])
    reconcile_connections(
        sessions,
        [connection_id],
        period_from=now - dt.timedelta(days=1),
        period_to=now,
        now=now,
        trigger=ReconTrigger.MANUAL,
        actor="tester",
        grace=dt.timedelta(hours=1),
        tolerance=Decimal("0.01"),
    )
    with sessions.begin() as session:
        categories = session.scalars(sa.select(ReconException.category)).all()
    assert "multiple_orders" not in categories
