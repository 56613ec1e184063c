"""The inbox worker on SQLite and PostgreSQL, against a venue played by ``httpx.MockTransport``.

Inbox rows are inserted as the receiver would store them; :class:`FakeVenue` answers
getOrder from a dict of orders (404 for the rest), can be told to fail an order with a
status, and counts calls per order. Time is passed in, so backoff and lease expiry are
tested without sleeping.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from orders.inbox import replay_dead
from orders.worker import Claim, WorkerReport, claim_batch, process_claims, run_forever, run_once
from storage.engine import make_engine, make_sessions
from storage.lease import BACKOFF_BASE_SECONDS, BACKOFF_CAP_SECONDS, backoff
from storage.models import (
    Asset,
    ChangeSource,
    ForeignOrder,
    Inbox,
    InboxSource,
    InboxState,
    OrderItem,
    StatusChange,
    VenueOrder,
    Wallet,
    ensure_connection,
)
from venue.client import VenueClient, open_client
from venue.connection import VenueConnection
from venue.models import OrderStatus
from venue.retry import RetryPolicy
from venue.throttle import Throttle
from venue.values import guid_caption

API_KEY = "key-worker-5e6f7a8b"
TENANT = "01234567-89ab-cdef-0123-456789abcdef"
PARTNER = "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e"
ORDER_ID = "9c6b2f4e-2b71-4d23-9d6a-a3b4c5d6e7f8"
CUSTOMER_NAME = "Jane Doe"
CUSTOMER_EMAIL = "guest@example.com"
MANIFEST = f"https://manifests.npretail.app/wallets/manifest?mid={ORDER_ID}"
T0 = dt.datetime(2026, 5, 15, 9, 31, tzinfo=dt.UTC)
LEASE = 60.0

CONNECTION = VenueConnection(
    tenant=TENANT,
    company="CRONUS International Ltd.",
    api_key=SecretStr(API_KEY),
    api_version="2026-05-01",
    partner_ids=[PARTNER],
)
_dedup = itertools.count(1)


def venue_order(order_id: str = ORDER_ID, status: str = "Issued") -> dict[str, Any]:
    """A getOrder answer after the seed's example: an admission and a two-wallet package."""
    castle = {
        "lineNo": 100000,
        "itemNumber": "31001",
        "description": "Castle Admission",
        "isPackage": False,
        "quantity": 1,
        "visitDate": "2026-06-01",
        "visitTime": "10:30:00",
        "wallets": [
            {
                "seqNo": 1,
                "assets": [
                    {
                        "id": "2c3a84c7-059f-41d3-8033-0d94e08d4b13",
                        "type": "ticket",
                        "assetId": "3d4b95d8-16e0-42e4-9b2a-1d95f08d5c14",
                        "referenceNumber": "ATF-BIL010665L-3",
                        "itemNumber": "31001",
                        "description": "Castle Admission",
                    }
                ],
                "walletId": "5a1c2b3d-4e5f-6071-8293-a4b5c6d7e8f9",
                "walletReferenceNumber": "141234529930210327",
                "externalReferenceNumber": "JD-2026-001",
                "name": CUSTOMER_NAME,
                "issuedAt": "2026-05-15T09:30:05Z",
                "unitPriceExclVat": 80,
                "unitPriceInclVat": 100,
                "currencyCode": "DKK",
                "manifestUrl": MANIFEST,
            }
        ],
        "sellToName": CUSTOMER_NAME,
        "sellToEmail": CUSTOMER_EMAIL,
        "sellToLanguage": "ENU",
    }
    package = {
        "lineNo": 200000,
        "itemNumber": "32010",
        "description": "Castle and Garden Family Package",
        "isPackage": True,
        "quantity": 2,
        "visitDate": "2026-06-01",
        "visitTime": "11:00:00",
        "wallets": [
            {
                "seqNo": seq,
                "assets": [
                    {
                        "id": f"7e1f0a2b-0000-4000-8000-0000000000{seq}1",
                        "type": "ticket",
                        "assetId": f"8f2a1b3c-0000-4000-8000-0000000000{seq}1",
                        "referenceNumber": f"ATF-PKG0{seq}-1",
                        "itemNumber": "31002",
                        "description": "Garden Admission",
                    },
                    {
                        "id": f"7e1f0a2b-0000-4000-8000-0000000000{seq}2",
                        "type": "coupon",
                        "assetId": f"8f2a1b3c-0000-4000-8000-0000000000{seq}2",
                        "referenceNumber": f"CPN-PKG0{seq}-2",
                        "itemNumber": "CAFE",
                        "description": "Café voucher",
                    },
                ],
                "walletId": f"6b2d3c4e-5f60-4182-93a4-b5c6d7e8f90{seq}",
                "walletReferenceNumber": f"14123452993021033{seq}",
                "externalReferenceNumber": f"FAM-2026-00{seq}",
                "name": CUSTOMER_NAME,
                "issuedAt": "2026-05-15T09:30:06Z",
                "unitPriceExclVat": "196.00",
                "unitPriceInclVat": "245.00",
                "currencyCode": "DKK",
                "manifestUrl": f"{MANIFEST}&w={seq}",
            }
            for seq in (1, 2)
        ],
        "sellToName": CUSTOMER_NAME,
        "sellToEmail": CUSTOMER_EMAIL,
        "sellToLanguage": "ENU",
    }
    return {
        "orderId": order_id,
        "status": status,
        "statusMessage": "",
        "partnerId": PARTNER,
        "sellToOrderReference": "PARTNER-ORDER-2026-00042",
        "buyFromOrderReference": "CM-20260515093000-A1B2",
        "receivedAt": "2026-05-15T09:30:00Z",
        "items": [castle, package],
        "sellToEmail": CUSTOMER_EMAIL,
        "sellToName": CUSTOMER_NAME,
        "sellToLanguage": "ENU",
        "paymentReference": "PAY-987654",
        "jobId": "TM-IMPORT-000123",
        "manifestUrl": MANIFEST,
    }


class FakeVenue:
    """getOrder as the venue answers it, with scripted failures and a call count per order.

    Attributes:
        orders: the venue's orders by orderId; any other id is a 404.
        failures: per orderId, error statuses to answer the next calls with, in order.
        always_fail: orderIds answered with 503 on every call.
        not_found: orderIds answered with a 404 of this message on every call.
        calls: getOrder calls per orderId.
    """

    def __init__(self) -> None:
        self.orders: dict[str, dict[str, Any]] = {}
        self.not_found: dict[str, str] = {}
        self.failures: dict[str, list[int]] = {}
        self.always_fail: set[str] = set()
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle(self, request: httpx.Request) -> httpx.Response:
        segments = request.url.raw_path.decode().split("?")[0].split("/")
        assert request.method == "GET" and segments[-2] == "channelManager", request.url
        order_id = segments[-1]
        with self._lock:
            self.calls[order_id] += 1
            scripted = self.failures.get(order_id)
            status = scripted.pop(0) if scripted else None
        if order_id in self.always_fail:
            status = 503
        if status is not None:
            return httpx.Response(
                status, json={"code": "service_unavailable", "message": "queue timed out"}
            )
        not_found = self.not_found.get(order_id)
        if not_found is not None:
            return httpx.Response(404, json={"code": "resource_not_found", "message": not_found})
        if order_id not in self.orders:
            # ChannelMgrOrderAgent GetOrder: the id as Business Central formats a GUID.
            message = f"Order '{guid_caption(order_id)}' not found Not Found"
            return httpx.Response(404, json={"code": "resource_not_found", "message": message})
        return httpx.Response(200, content=json.dumps(self.orders[order_id]))


@pytest.fixture
def venue() -> FakeVenue:
    """A venue that knows the seed's order."""
    fake = FakeVenue()
    fake.orders[ORDER_ID] = venue_order()
    return fake


@pytest.fixture
def client(venue: FakeVenue) -> Iterator[VenueClient]:
    """A venue client over the fake; one attempt per call and no rate limit to wait on."""
    with open_client(
        CONNECTION,
        transport=httpx.MockTransport(venue.handle),
        retry=RetryPolicy(attempts=1),
        throttle=Throttle(max_in_flight=10, rate=100_000),
    ) as venue_client:
        yield venue_client


@pytest.fixture
def connection_id(sessions: sessionmaker[Session]) -> int:
    """The venue connection's row."""
    with sessions.begin() as session:
        return ensure_connection(session, CONNECTION.name)


@pytest.fixture
def clients(client: VenueClient, connection_id: int) -> dict[int, VenueClient]:
    """The worker's clients by connection id."""
    return {connection_id: client}


def add_row(
    sessions: sessionmaker[Session],
    connection_id: int,
    order_id: str | None = ORDER_ID,
    *,
    status: str | None = "Issued",
    source: InboxSource = InboxSource.WEBHOOK,
    event_name: str = "ota_cm_order_processed",
    received_at: dt.datetime = T0,
) -> int:
    """Store an inbox row as the receiver does; its id."""
    payload = {"orderId": order_id, "buyFromOrderReference": "CM-20260515093000-A1B2"}
    if status is not None:
        payload["status"] = status
    with sessions.begin() as session:
        row = Inbox(
            connection_id=connection_id,
            source=source,
            event_name=event_name,
            order_id=order_id,
            buy_from_order_reference="CM-20260515093000-A1B2",
            notified_status=status,
            notified_at=received_at,
            received_at=received_at,
            payload={"eventName": event_name, "payload": payload},
            dedup_key=f"dedup-{next(_dedup)}-{uuid.uuid4().hex}",
            next_attempt_at=received_at,
        )
        session.add(row)
        session.flush()
        return row.id


def inbox(sessions: sessionmaker[Session], inbox_id: int) -> Inbox:
    with sessions() as session:
        row = session.get(Inbox, inbox_id)
        assert row is not None
        return row


def status_changes(sessions: sessionmaker[Session]) -> list[StatusChange]:
    with sessions() as session:
        return list(session.scalars(sa.select(StatusChange).order_by(StatusChange.id)))


def mirrored(sessions: sessionmaker[Session], order_id: str = ORDER_ID) -> VenueOrder | None:
    with sessions() as session:
        return session.scalar(sa.select(VenueOrder).where(VenueOrder.order_id == order_id))


def once(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    now: dt.datetime,
    *,
    owner: str = "worker-b",
    max_attempts: int = 8,
) -> WorkerReport:
    return run_once(
        sessions,
        clients,
        owner=owner,
        now=now,
        batch_size=50,
        lease_seconds=LEASE,
        max_attempts=max_attempts,
    )


# --- the happy path --------------------------------------------------------------------


def test_a_webhook_row_mirrors_the_full_order(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """One row → one getOrder → header, items, wallets, assets, prices, manifests, history."""
    row_id = add_row(sessions, connection_id)
    now = T0 + dt.timedelta(seconds=2)

    report = once(sessions, clients, now)

    assert (report.claimed, report.fetched, report.done, report.venue_calls) == (1, 1, 1, 1)
    assert venue.calls == {ORDER_ID: 1}
    with sessions() as session:
        order = session.scalars(sa.select(VenueOrder)).one()
        assert (order.connection_id, order.order_id) == (connection_id, ORDER_ID)
        assert order.status is OrderStatus.ISSUED
        assert order.buy_from_order_reference == "CM-20260515093000-A1B2"
        assert order.payment_reference == "PAY-987654"
        assert order.manifest_url == MANIFEST
        assert order.fetched_at == now
        assert [(i.line_no, i.item_number, i.is_package) for i in order.items] == [
            (100000, "31001", False),
            (200000, "32010", True),
        ]
        castle, package = order.items
        assert castle.wallets[0].wallet_reference_number == "141234529930210327"
        assert castle.wallets[0].manifest_url == MANIFEST
        assert (castle.wallets[0].unit_price_incl_vat, castle.wallets[0].currency_code) == (
            Decimal("100"),
            "DKK",
        )
        assert [w.unit_price_excl_vat for w in package.wallets] == [Decimal("196.00")] * 2
        assert [w.manifest_url for w in package.wallets] == [f"{MANIFEST}&w=1", f"{MANIFEST}&w=2"]
        assert [a.type for a in package.wallets[1].assets] == ["ticket", "coupon"]
        assert session.scalar(sa.select(sa.func.count()).select_from(Wallet)) == 3
        assert session.scalar(sa.select(sa.func.count()).select_from(Asset)) == 5
        assert session.scalar(sa.select(sa.func.count()).select_from(OrderItem)) == 2
    [change] = status_changes(sessions)
    assert (change.status, change.source, change.observed_at, change.inbox_id) == (
        OrderStatus.ISSUED,
        ChangeSource.WEBHOOK,
        now,
        row_id,
    )
    row = inbox(sessions, row_id)
    assert (row.state, row.processed_at, row.attempts) == (InboxState.DONE, now, 1)
    assert (row.lease_owner, row.lease_expires_at, row.last_error) == (None, None, None)


def test_the_venue_status_wins_over_the_notification(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """A notification saying Issued for an order the venue has since put in Error: Error."""
    venue.orders[ORDER_ID] = {
        **venue_order(status="Error"),
        "statusMessage": "Unknown item '32010'",
    }
    add_row(sessions, connection_id, status="Issued")

    once(sessions, clients, T0)

    order = mirrored(sessions)
    assert order is not None
    assert (order.status, order.status_message) == (OrderStatus.ERROR, "Unknown item '32010'")
    assert [change.status for change in status_changes(sessions)] == [OrderStatus.ERROR]


@pytest.mark.parametrize(
    ("source", "expected"),
    [(InboxSource.POLL, ChangeSource.POLL), (InboxSource.FEED, ChangeSource.FEED)],
)
def test_rows_from_polls_record_their_source(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    source: InboxSource,
    expected: ChangeSource,
) -> None:
    """The status change says where otacm learned of the order: the row's source."""
    add_row(sessions, connection_id, source=source, status=None)

    once(sessions, clients, T0)

    assert [change.source for change in status_changes(sessions)] == [expected]


def test_rows_for_one_order_share_one_get_order(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """Two notifications and a poll finding for one order (any GUID spelling): one call."""
    first = add_row(sessions, connection_id)
    second = add_row(sessions, connection_id, received_at=T0 + dt.timedelta(seconds=1))
    third = add_row(sessions, connection_id, "{" + ORDER_ID.upper() + "}", source=InboxSource.POLL)

    report = once(sessions, clients, T0 + dt.timedelta(seconds=5))

    assert venue.calls == {ORDER_ID: 1}
    assert (report.claimed, report.done, report.venue_calls) == (3, 3, 1)
    assert {inbox(sessions, i).state for i in (first, second, third)} == {InboxState.DONE}
    [change] = status_changes(sessions)
    assert (change.inbox_id, change.source) == (first, ChangeSource.WEBHOOK)


def test_the_order_keeps_the_earliest_webhook_time_it_applied(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
) -> None:
    """first_notified_at: the earliest webhook applied, whatever order they came in; polls
    do not count (they are otacm's own time, not the venue's)."""
    add_row(sessions, connection_id, source=InboxSource.POLL, received_at=T0)
    once(sessions, clients, T0 + dt.timedelta(seconds=1))
    order = mirrored(sessions)
    assert order is not None
    assert order.first_notified_at is None

    add_row(sessions, connection_id, received_at=T0 + dt.timedelta(seconds=30))
    add_row(sessions, connection_id, received_at=T0 + dt.timedelta(seconds=20))
    once(sessions, clients, T0 + dt.timedelta(seconds=40))
    order = mirrored(sessions)
    assert order is not None
    assert order.first_notified_at == T0 + dt.timedelta(seconds=20)

    add_row(sessions, connection_id, received_at=T0 + dt.timedelta(seconds=10))
    add_row(sessions, connection_id, received_at=T0 + dt.timedelta(seconds=50))
    once(sessions, clients, T0 + dt.timedelta(seconds=60))
    order = mirrored(sessions)
    assert order is not None
    assert order.first_notified_at == T0 + dt.timedelta(seconds=10)


def test_a_row_naming_no_order_is_done_without_a_call(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """Other events carry no orderId: finished, no venue call, nothing mirrored."""
    row_id = add_row(sessions, connection_id, None, status=None, event_name="some_other_event")

    report = once(sessions, clients, T0)

    assert (report.done, report.venue_calls) == (1, 0)
    assert venue.calls == {}
    assert inbox(sessions, row_id).state is InboxState.DONE
    assert mirrored(sessions) is None


def test_each_processed_order_is_logged_without_customer_data(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The log names the order and its status, never the customer or the key."""
    add_row(sessions, connection_id)

    with caplog.at_level(logging.DEBUG):
        once(sessions, clients, T0)

    worker_lines = [r.getMessage() for r in caplog.records if r.name == "orders.worker"]
    assert any(ORDER_ID in line and "Issued" in line for line in worker_lines)
    for secret in (CUSTOMER_NAME, CUSTOMER_EMAIL, API_KEY):
        assert secret not in caplog.text


def test_an_order_newly_in_error_is_a_warning_with_the_venues_reason_once(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Error needs a person: one WARNING with the venue's reason, not one per fetch."""
    venue.orders[ORDER_ID] = {
        **venue_order(status="Error"),
        "statusMessage": "Unknown item '99999'",
    }
    add_row(sessions, connection_id, status="Error")

    with caplog.at_level(logging.INFO):
        once(sessions, clients, T0)
        add_row(sessions, connection_id, status="Error")
        once(sessions, clients, T0 + dt.timedelta(seconds=30))

    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "orders.worker" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert ORDER_ID in warnings[0] and "Unknown item '99999'" in warnings[0]


# --- the venue's failures ----------------------------------------------------------------


def test_a_404_marks_the_order_removed(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """An order deleted at the venue after it was mirrored: removed, with its history kept."""
    add_row(sessions, connection_id)
    once(sessions, clients, T0)
    del venue.orders[ORDER_ID]
    later = T0 + dt.timedelta(minutes=5)
    row_id = add_row(sessions, connection_id, status="Error", received_at=later)

    report = once(sessions, clients, later)

    assert (report.removed, report.done, report.retried) == (1, 1, 0)
    order = mirrored(sessions)
    assert order is not None and order.removed_at == later
    assert [(c.status, c.inbox_id) for c in status_changes(sessions)][-1] == (None, row_id)
    assert inbox(sessions, row_id).state is InboxState.DONE


@pytest.mark.parametrize(
    "message",
    [
        "API endpoint not found Not Found",
        f"/channelManagr/{ORDER_ID} Not Found",
        "Not Found",
        "Order '{6C2B1A0E-0000-4000-8000-000000000000}' not found Not Found",
    ],
)
def test_a_404_not_naming_the_order_is_retried_and_never_marks_it_removed(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
    message: str,
) -> None:
    """Only the venue's "Order '{GUID}' not found" for this order says it is gone.

    ChannelMgrOrderAgent GetOrder answers a missing order with its id; ChannelMgrApi Handle
    answers an unmatched route "API endpoint not found"; APIRequestProcessor
    ProcessRequest an unknown module with the path it read; a gateway may answer 404 with
    anything. Those are retried with backoff, and the mirrored order stays.
    """
    add_row(sessions, connection_id)
    once(sessions, clients, T0)
    venue.not_found[ORDER_ID] = message
    later = T0 + dt.timedelta(minutes=5)
    row_id = add_row(sessions, connection_id, status="Error", received_at=later)

    report = once(sessions, clients, later)

    assert (report.removed, report.done, report.retried) == (0, 0, 1)
    order = mirrored(sessions)
    assert order is not None and order.removed_at is None
    row = inbox(sessions, row_id)
    assert row.state is InboxState.PENDING and row.next_attempt_at > later
    assert row.last_error is not None and "HTTP 404" in row.last_error


@pytest.mark.parametrize(
    "spell",
    [guid_caption, str.upper, lambda guid: guid.replace("-", ""), lambda guid: f"({guid})"],
)
def test_a_404_naming_the_order_in_any_spelling_marks_it_removed(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
    spell: Any,
) -> None:
    """A 404 whose message names this order, in any GUID spelling, says it is gone.

    ChannelMgrOrderAgent GetOrder: "Order '%1' not found" with the GUID formatted in braces,
    upper case; a 404 naming it otherwise (a gateway, another version) is taken the same.
    """
    add_row(sessions, connection_id)
    once(sessions, clients, T0)
    venue.not_found[ORDER_ID] = f"Order {spell(ORDER_ID)} not found"
    later = T0 + dt.timedelta(minutes=5)
    add_row(sessions, connection_id, status="Error", received_at=later)

    report = once(sessions, clients, later)

    assert (report.removed, report.done, report.retried) == (1, 1, 0)
    order = mirrored(sessions)
    assert order is not None and order.removed_at == later


def test_an_older_versions_answer_without_status_message_or_vendor_reference_is_mirrored(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """The older synchronous version (ChannelMgrOrderAgent BuildOrderResponseJson at
    43834b3b8; its CMOrder has no DocumentNo) answers without ``statusMessage`` and
    ``buyFromOrderReference``: the order is mirrored, both left empty."""
    older = {
        key: value
        for key, value in venue_order(status="Error").items()
        if key not in ("statusMessage", "buyFromOrderReference")
    }
    venue.orders[ORDER_ID] = older
    row_id = add_row(sessions, connection_id, status="Error")

    report = once(sessions, clients, T0)

    assert (report.done, report.retried, report.dead) == (1, 0, 0)
    order = mirrored(sessions)
    assert order is not None and order.status is OrderStatus.ERROR
    assert (order.status_message, order.buy_from_order_reference) == (None, None)
    assert inbox(sessions, row_id).state is InboxState.DONE


def test_a_404_for_an_order_never_seen_finishes_the_row(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
) -> None:
    """Nothing to mark removed, nothing to retry: the row is done."""
    row_id = add_row(sessions, connection_id, "0f0f0f0f-0000-4000-8000-000000000000")

    report = once(sessions, clients, T0)

    assert (report.removed, report.done, report.retried) == (1, 1, 0)
    assert inbox(sessions, row_id).state is InboxState.DONE
    assert status_changes(sessions) == []


def test_a_503_is_retried_after_its_backoff_and_then_succeeds(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """Back to pending with the reason; not claimed before ``next_attempt_at``; then done."""
    venue.failures[ORDER_ID] = [503]
    row_id = add_row(sessions, connection_id)

    report = once(sessions, clients, T0)

    assert (report.retried, report.done, report.dead) == (1, 0, 0)
    row = inbox(sessions, row_id)
    assert (row.state, row.attempts, row.lease_owner) == (InboxState.PENDING, 1, None)
    assert row.last_error is not None and "HTTP 503" in row.last_error
    half, full = (dt.timedelta(seconds=BACKOFF_BASE_SECONDS * f) for f in (0.5, 1))
    assert T0 + half <= row.next_attempt_at <= T0 + full

    early = once(sessions, clients, row.next_attempt_at - dt.timedelta(milliseconds=1))
    assert (early.claimed, venue.calls[ORDER_ID]) == (0, 1)

    report = once(sessions, clients, row.next_attempt_at)

    assert (report.done, venue.calls[ORDER_ID]) == (1, 2)
    row = inbox(sessions, row_id)
    assert (row.state, row.attempts, row.last_error) == (InboxState.DONE, 2, None)
    assert [change.status for change in status_changes(sessions)] == [OrderStatus.ISSUED]


def test_a_row_that_always_fails_is_dead_lettered_after_max_attempts(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """Three attempts with growing backoff, then dead with the reason, and left alone."""
    venue.always_fail.add(ORDER_ID)
    row_id = add_row(sessions, connection_id)
    now, waits = T0, []

    for _ in range(3):
        report = once(sessions, clients, now, max_attempts=3)
        row = inbox(sessions, row_id)
        waits.append(row.next_attempt_at - now)
        now = row.next_attempt_at

    assert (report.dead, report.retried) == (1, 0)
    assert (row.state, row.attempts) == (InboxState.DEAD, 3)
    assert row.last_error == "VenueUnavailable: HTTP 503: service_unavailable: queue timed out"
    assert waits[1] > dt.timedelta(seconds=BACKOFF_BASE_SECONDS)  # the second wait doubled
    assert once(sessions, clients, now + dt.timedelta(days=1)).claimed == 0
    assert venue.calls[ORDER_ID] == 3


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        (
            "name",
            "Jane\x00Doe",
            "VenueProtocolError: HTTP 200: Order body: "
            "items.0.wallets.0.name: expected text without NUL characters or unpaired surrogates",
        ),
        (
            "currencyCode",
            "DKK" * 4,
            "the mirror cannot hold the venue's answer: "
            "wallet.currency_code: longer than 10 characters",
        ),
    ],
    ids=["nul-character", "wider-than-its-column"],
)
def test_an_answer_the_mirror_cannot_hold_is_dead_lettered_naming_why_and_changes_nothing(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
    field: str,
    value: str,
    reason: str,
) -> None:
    """One answer on both databases (PostgreSQL refuses such text, SQLite would keep it):
    retried with the reason after its backoff, not left to the lease, then dead."""
    add_row(sessions, connection_id)
    assert once(sessions, clients, T0).done == 1
    before = mirrored(sessions)
    broken = venue_order(status="Cancelled")
    broken["items"][0]["wallets"][0][field] = value
    venue.orders[ORDER_ID] = broken
    row_id = add_row(sessions, connection_id, status="Cancelled")

    first = once(sessions, clients, T0, max_attempts=2)

    row = inbox(sessions, row_id)
    assert (first.retried, first.abandoned) == (1, 0)
    assert (row.state, row.last_error) == (InboxState.PENDING, reason)
    assert row.next_attempt_at >= T0 + dt.timedelta(seconds=BACKOFF_BASE_SECONDS / 2)

    last = once(sessions, clients, row.next_attempt_at, max_attempts=2)

    row = inbox(sessions, row_id)
    assert (last.dead, row.state, row.attempts, row.last_error) == (1, InboxState.DEAD, 2, reason)
    after = mirrored(sessions)
    assert before is not None and after is not None
    assert (after.status, after.updated_at) == (OrderStatus.ISSUED, before.updated_at)
    assert [change.status for change in status_changes(sessions)] == [OrderStatus.ISSUED]


def test_replay_dead_makes_dead_letters_pending_and_they_are_processed(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """After the outage, a replay retries the dead row from scratch and it is applied."""
    venue.always_fail.add(ORDER_ID)
    row_id = add_row(sessions, connection_id)
    once(sessions, clients, T0, max_attempts=1)
    assert inbox(sessions, row_id).state is InboxState.DEAD
    venue.always_fail.clear()
    later = T0 + dt.timedelta(hours=1)

    with sessions.begin() as session:
        assert replay_dead(session, now=later, connection_id=connection_id + 1) == 0
        assert replay_dead(session, now=later, ids=[row_id + 1]) == 0
        assert replay_dead(session, now=later, connection_id=connection_id, ids=[row_id]) == 1

    row = inbox(sessions, row_id)
    assert (row.state, row.attempts, row.next_attempt_at) == (InboxState.PENDING, 0, later)
    report = once(sessions, clients, later, max_attempts=1)
    assert (report.done, inbox(sessions, row_id).state) == (1, InboxState.DONE)
    assert [change.status for change in status_changes(sessions)] == [OrderStatus.ISSUED]


# --- leases: killed workers, concurrent workers, our own database ----------------------


def test_a_killed_worker_loses_nothing_and_its_late_apply_is_refused(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """A claims and stalls; B waits out A's lease, applies once; A's late apply is refused."""
    row_id = add_row(sessions, connection_id)
    a_claims = claim_batch(sessions, owner="worker-a", now=T0, limit=10, lease_seconds=LEASE)
    assert [(c.id, c.order_id, c.attempts) for c in a_claims] == [(row_id, ORDER_ID, 1)]

    during = once(sessions, clients, T0 + dt.timedelta(seconds=LEASE - 1))
    assert (during.claimed, venue.calls[ORDER_ID]) == (0, 0)

    after = T0 + dt.timedelta(seconds=LEASE + 1)
    report = once(sessions, clients, after)
    assert (report.claimed, report.done, venue.calls[ORDER_ID]) == (1, 1, 1)

    # A wakes up believing its lease still runs, fetches, and tries to apply.
    late = process_claims(
        sessions,
        clients,
        a_claims,
        owner="worker-a",
        now=T0 + dt.timedelta(seconds=30),
        max_attempts=8,
    )

    assert (late.done, late.lease_lost) == (0, 1)
    assert len(status_changes(sessions)) == 1
    row = inbox(sessions, row_id)
    assert (row.state, row.processed_at, row.attempts) == (InboxState.DONE, after, 2)


def test_a_late_apply_while_another_worker_holds_the_row_is_refused(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """B has re-claimed A's expired row and is still fetching: A's apply must not land."""
    row_id = add_row(sessions, connection_id)
    a_claims = claim_batch(sessions, owner="worker-a", now=T0, limit=10, lease_seconds=LEASE)
    after = T0 + dt.timedelta(seconds=LEASE + 1)
    b_claims = claim_batch(sessions, owner="worker-b", now=after, limit=10, lease_seconds=LEASE)

    late = process_claims(sessions, clients, a_claims, owner="worker-a", now=after, max_attempts=8)

    assert (late.done, late.lease_lost) == (0, 1)
    assert status_changes(sessions) == []
    row = inbox(sessions, row_id)
    assert (row.state, row.lease_owner) == (InboxState.LEASED, "worker-b")
    b = process_claims(sessions, clients, b_claims, owner="worker-b", now=after, max_attempts=8)
    assert b.done == 1
    assert len(status_changes(sessions)) == 1
    assert venue.calls[ORDER_ID] == 2  # A's wasted call, then B's


def test_a_late_failure_does_not_touch_a_row_another_worker_holds(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """A's late venue failure must not put B's leased row back to pending."""
    row_id = add_row(sessions, connection_id)
    a_claims = claim_batch(sessions, owner="worker-a", now=T0, limit=10, lease_seconds=LEASE)
    after = T0 + dt.timedelta(seconds=LEASE + 1)
    claim_batch(sessions, owner="worker-b", now=after, limit=10, lease_seconds=LEASE)
    venue.always_fail.add(ORDER_ID)

    late = process_claims(sessions, clients, a_claims, owner="worker-a", now=after, max_attempts=1)

    assert (late.retried, late.dead, late.lease_lost) == (0, 0, 1)
    row = inbox(sessions, row_id)
    assert (row.state, row.lease_owner) == (InboxState.LEASED, "worker-b")


def test_a_row_whose_lease_keeps_expiring_is_dead_lettered(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """A row that kills every worker taking it stops after ``max_attempts`` claims."""
    row_id = add_row(sessions, connection_id)
    now = T0
    for owner in ("worker-a", "worker-b"):
        claims = claim_batch(
            sessions, owner=owner, now=now, limit=10, lease_seconds=LEASE, max_attempts=2
        )
        assert [c.id for c in claims] == [row_id]
        now += dt.timedelta(seconds=LEASE + 1)

    claims = claim_batch(
        sessions, owner="worker-c", now=now, limit=10, lease_seconds=LEASE, max_attempts=2
    )

    assert claims == []
    row = inbox(sessions, row_id)
    assert (row.state, row.attempts, row.lease_owner) == (InboxState.DEAD, 2, None)
    assert row.last_error is not None and "lease expired" in row.last_error


def test_our_database_refusing_the_answer_leaves_the_row_to_its_lease(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """An answer our schema refuses (a repeated line number) rolls back; the row survives."""
    broken = venue_order()
    broken["items"][1]["lineNo"] = broken["items"][0]["lineNo"]
    venue.orders[ORDER_ID] = broken
    row_id = add_row(sessions, connection_id)

    report = once(sessions, clients, T0)

    assert (report.abandoned, report.done, report.retried) == (1, 0, 0)
    row = inbox(sessions, row_id)
    assert (row.state, row.lease_owner) == (InboxState.LEASED, "worker-b")
    assert mirrored(sessions) is None
    # Once the lease expires the row is tried again; when the venue's answer is sound,
    # it is applied.
    venue.orders[ORDER_ID] = venue_order()
    again = once(sessions, clients, T0 + dt.timedelta(seconds=LEASE + 1))
    assert (again.claimed, again.done, inbox(sessions, row_id).state) == (1, 1, InboxState.DONE)


def test_concurrent_claims_take_disjoint_rows(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Two claimers at once over 50 rows: no row twice, every row once."""
    ids = {add_row(sessions, connection_id, str(uuid.uuid4())) for _ in range(50)}
    barrier = threading.Barrier(2)
    taken: dict[str, list[Claim]] = {}

    def claimer(owner: str) -> None:
        barrier.wait()
        taken[owner] = claim_batch(sessions, owner=owner, now=T0, limit=30, lease_seconds=LEASE)

    threads = [threading.Thread(target=claimer, args=(owner,)) for owner in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    a_ids, b_ids = ({c.id for c in taken[owner]} for owner in ("a", "b"))
    assert not a_ids & b_ids
    assert a_ids | b_ids == ids
    with sessions() as session:
        owners = {
            row.id: row.lease_owner
            for row in session.execute(sa.select(Inbox.id, Inbox.lease_owner))
        }
    assert all(owners[i] == "a" for i in a_ids) and all(owners[i] == "b" for i in b_ids)


def test_two_concurrent_workers_process_every_row_once(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """Two worker threads drain 50 orders: one getOrder per order, one status change each."""
    order_ids = [str(uuid.uuid4()) for _ in range(50)]
    for order_id in order_ids:
        venue.orders[order_id] = venue_order(order_id)
        add_row(sessions, connection_id, order_id)
    barrier = threading.Barrier(2)
    reports: dict[str, WorkerReport] = {}
    errors: list[BaseException] = []

    def worker(owner: str) -> None:
        total = WorkerReport()
        try:
            barrier.wait()
            while True:
                report = run_once(
                    sessions, clients, owner=owner, now=T0, batch_size=5, lease_seconds=LEASE
                )
                total.add(report)
                if not report.claimed:
                    break
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)
        reports[owner] = total

    threads = [threading.Thread(target=worker, args=(owner,)) for owner in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert venue.calls == dict.fromkeys(order_ids, 1)
    assert sum(r.done for r in reports.values()) == 50
    assert sum(r.claimed for r in reports.values()) == 50
    with sessions() as session:
        states = Counter(session.scalars(sa.select(Inbox.state)))
        per_order = session.execute(
            sa.select(StatusChange.venue_order_id, sa.func.count()).group_by(
                StatusChange.venue_order_id
            )
        ).all()
    assert states == {InboxState.DONE: 50}
    assert len(per_order) == 50 and all(count == 1 for _, count in per_order)


# --- the loop and the backoff -----------------------------------------------------------


def test_run_forever_drains_then_stops_when_told(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
) -> None:
    """A busy pass is followed at once by another; an idle one waits on ``stop``."""
    row_id = add_row(sessions, connection_id)
    stop = threading.Event()
    passes = []

    def clock() -> dt.datetime:
        passes.append(T0)
        if len(passes) == 2:
            stop.set()  # the second pass finds nothing; its wait then returns at once
        return T0

    run_forever(sessions, clients, owner="loop", stop=stop, poll_interval=60, clock=clock)

    assert len(passes) == 2
    assert inbox(sessions, row_id).state is InboxState.DONE


def test_run_forever_survives_a_failing_pass(
    tmp_path: Any, clients: dict[int, VenueClient], caplog: pytest.LogCaptureFixture
) -> None:
    """A database without the schema fails the pass; the loop logs it and goes on."""
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    stop = threading.Event()
    passes = []

    def clock() -> dt.datetime:
        passes.append(T0)
        if len(passes) == 2:
            stop.set()
        return T0

    try:
        run_forever(
            make_sessions(engine), clients, owner="loop", stop=stop, poll_interval=0, clock=clock
        )
    finally:
        engine.dispose()

    assert len(passes) == 2
    assert "inbox worker pass failed" in caplog.text


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    """Equal jitter: between half and all of base·2^(n-1), never above the cap."""
    low, high = (lambda: 0.0), (lambda: 0.999999)
    assert backoff(1, jitter=low) == dt.timedelta(seconds=BACKOFF_BASE_SECONDS / 2)
    assert backoff(1, jitter=high) < dt.timedelta(seconds=BACKOFF_BASE_SECONDS)
    assert backoff(3, jitter=low) == dt.timedelta(seconds=BACKOFF_BASE_SECONDS * 2)
    assert backoff(1000, jitter=low) == dt.timedelta(seconds=BACKOFF_CAP_SECONDS / 2)
    assert backoff(1000, jitter=high) <= dt.timedelta(seconds=BACKOFF_CAP_SECONDS)


# --- other partners' orders --------------------------------------------------------------

OTHER_PARTNER = "5b7c9d1e-2f3a-4b5c-8d6e-7f8091a2b3c4"
OTHER_ORDER_ID = "3d2c1b0a-9f8e-4d7c-8b6a-594837261504"


def test_another_partners_order_is_fetched_once_then_settled_without_a_call(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
) -> None:
    """An order of a partner not configured: one getOrder, nothing mirrored, its id noted.

    CMOrderWebhooks ``SendOrderCompletionHook`` notifies every order of the company and
    ChannelMgrOrderAgent ``GetOrder`` answers it with no partner check; the configured
    partner's order in the same batch is mirrored as usual.
    """
    venue.orders[OTHER_ORDER_ID] = {
        **venue_order(OTHER_ORDER_ID),
        "partnerId": OTHER_PARTNER.upper(),
    }
    first = [add_row(sessions, connection_id, OTHER_ORDER_ID), add_row(sessions, connection_id)]

    report = once(sessions, clients, T0)

    assert (report.done, report.foreign, report.fetched, report.venue_calls) == (2, 1, 2, 2)
    assert mirrored(sessions, OTHER_ORDER_ID) is None
    assert mirrored(sessions) is not None
    with sessions() as session:
        noted = session.execute(sa.select(ForeignOrder.order_id, ForeignOrder.partner_id)).one()
    assert tuple(noted) == (OTHER_ORDER_ID, OTHER_PARTNER)
    assert all(inbox(sessions, row_id).state is InboxState.DONE for row_id in first)

    later = add_row(sessions, connection_id, OTHER_ORDER_ID.upper(), status="Draft")
    again = once(sessions, clients, T0 + dt.timedelta(minutes=1))

    assert (again.done, again.foreign, again.venue_calls) == (1, 1, 0)
    assert venue.calls[OTHER_ORDER_ID] == 1
    assert inbox(sessions, later).state is InboxState.DONE
    assert mirrored(sessions, OTHER_ORDER_ID) is None


def test_a_connection_with_no_partner_configured_mirrors_nothing(
    sessions: sessionmaker[Session], connection_id: int, venue: FakeVenue
) -> None:
    """No partner configured: no order is the connection's to mirror (ChannelMgrOrderAgent
    ``GetOrder`` answers every partner's, so the configuration alone decides)."""
    row_id = add_row(sessions, connection_id)
    bare = CONNECTION.model_copy(update={"partner_ids": []})
    with open_client(
        bare,
        transport=httpx.MockTransport(venue.handle),
        retry=RetryPolicy(attempts=1),
        throttle=Throttle(max_in_flight=10, rate=100_000),
    ) as client:
        report = once(sessions, {connection_id: client}, T0)

    assert (report.done, report.foreign) == (1, 1)
    assert inbox(sessions, row_id).state is InboxState.DONE
    assert mirrored(sessions) is None


# --- several getOrder calls in flight ---------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_batch_keeps_several_getorders_in_flight_and_applies_each_once(
    sessions: sessionmaker[Session],
    clients: dict[int, VenueClient],
    connection_id: int,
    venue: FakeVenue,
    concurrency: int,
) -> None:
    """Up to ``fetch_concurrency`` calls at once (one at a time with 1); every row applied
    once, rows of one order still sharing its call."""
    order_ids = [str(uuid.uuid4()) for _ in range(8)]
    for order_id in order_ids:
        venue.orders[order_id] = venue_order(order_id)
        add_row(sessions, connection_id, order_id)
    add_row(sessions, connection_id, order_ids[0], status="Draft")
    gate = threading.Condition()
    in_flight = peak = 0
    answer = venue.handle

    def slow(request: httpx.Request) -> httpx.Response:
        # Each call waits until more than four are in flight or a short while passed, so
        # a worker that keeps more than four (or than one) in flight is sure to show it.
        nonlocal in_flight, peak
        with gate:
            in_flight += 1
            peak = max(peak, in_flight)
            gate.notify_all()
            gate.wait_for(lambda: in_flight > 4, 0.05)
            in_flight -= 1
        return answer(request)

    with open_client(
        CONNECTION,
        transport=httpx.MockTransport(slow),
        retry=RetryPolicy(attempts=1),
        throttle=Throttle(max_in_flight=10, rate=100_000),
    ) as slow_client:
        report = run_once(
            sessions,
            {connection_id: slow_client},
            owner="worker-c",
            now=T0,
            batch_size=50,
            lease_seconds=LEASE,
            fetch_concurrency=concurrency,
        )

    assert (report.claimed, report.done, report.fetched, report.venue_calls) == (9, 9, 8, 8)
    assert venue.calls == dict.fromkeys(order_ids, 1)
    assert all(mirrored(sessions, order_id) is not None for order_id in order_ids)
    assert len(status_changes(sessions)) == 8
    if concurrency == 1:
        assert peak == 1
    else:
        assert 1 < peak <= concurrency


def test_a_retry_after_on_getorder_puts_the_row_off_at_least_that_long(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """A 429 with Retry-After 600: the row comes back no sooner, whatever its own backoff."""
    row_id = add_row(sessions, connection_id)

    def busy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429,
            headers={"Retry-After": "600"},
            json={"code": "too_many_requests", "message": "Rate limit is exceeded."},
        )

    with open_client(
        CONNECTION,
        transport=httpx.MockTransport(busy),
        retry=RetryPolicy(attempts=1),
        throttle=Throttle(max_in_flight=10, rate=100_000),
    ) as busy_client:
        report = once(sessions, {connection_id: busy_client}, T0)

    row = inbox(sessions, row_id)
    assert report.retried == 1
    assert row.state is InboxState.PENDING
    assert backoff(1) < dt.timedelta(seconds=600)
    assert row.next_attempt_at >= T0 + dt.timedelta(seconds=600)
    assert "429" in (row.last_error or "")
