"""The submission path on SQLite and PostgreSQL: record first, send, handle every answer, retry.

Unit tests play the venue with :class:`FakeVenue` over ``httpx.MockTransport``: createOrder
answers are scripted one per call (201 Submitted, a settled synchronous answer, an error
status, or a lost answer: the order is stored and the call then times out), and the
venue keeps its orders, so duplicate references, the look-up by reference and getOrder
behave as the venue's do. Integration tests run the same path over real HTTP against
the sandbox. Time is passed in, so backoff is tested without sleeping.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr, ValidationError
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.actions import error_orders
from orders.actions import act_now
from orders.attempt import FOUND_IN_ERROR, NO_LONGER_KNOWN, SendOutcome
from orders.mirror import upsert_order
from orders.outbox import DEFAULT_LEASE_SECONDS, claim_outbox, record_action, record_submission
from orders.sender import OutboxReport, run_outbox_once, send_outbox_row
from orders.submission import (
    NO_CURRENCY,
    SubmissionError,
    check_connection,
    choose_connection,
    parse_submission,
    read_submissions,
)
from orders.submit import SubmitStatus, submit_file, submit_now
from orders.worker import run_once
from otacm.processes import OUTBOX_RETRY_SECONDS
from otacm.settings import Settings
from reconciler.engine import reconcile_connections
from sandbox import SandboxConfig, SandboxServer
from sandbox.config import DEFAULT_PARTNERS
from storage.models import (
    ChangeSource,
    Inbox,
    InboxSource,
    InboxState,
    LedgerLine,
    LedgerSource,
    LedgerState,
    Outbox,
    OutboxOperation,
    OutboxState,
    StatusChange,
    VenueOrder,
    Wallet,
    ensure_connection,
)
from storage.records import ReconException, ReconTrigger
from storage.types import MONEY_MAX, utcnow
from tests.support.stack import wait_until
from venue.client import VenueClient, open_client
from venue.connection import VenueConnection
from venue.models import Order, OrderRequest, OrderStatus
from venue.retry import RetryPolicy
from venue.throttle import Throttle
from venue.values import guid_caption, normalize_reference

PARTNER = DEFAULT_PARTNERS[0].id
INACTIVE_PARTNER = DEFAULT_PARTNERS[2].id
T0 = dt.datetime(2026, 5, 15, 9, 30, tzinfo=dt.UTC)
ONCE = RetryPolicy(attempts=1)
DUPLICATE_MESSAGE = (
    "Order with sellToOrderReference '{reference}' already exists for partner '{partner}'"
)

CONNECTION = VenueConnection(
    name="default",
    api_base_url="http://venue.invalid",
    tenant="01234567-89ab-cdef-0123-456789abcdef",
    company="CRONUS International Ltd.",
    api_key=SecretStr("key-outbox-1a2b3c"),
    partner_ids=[PARTNER],
)


def future(days: int = 30) -> str:
    """A visit date ``days`` from today, as YYYY-MM-DD."""
    return (utcnow() + dt.timedelta(days=days)).date().isoformat()


def order_body(reference: str = "SHOP-1001", **changes: Any) -> dict[str, Any]:
    """A createOrder body the venue accepts: two lines, three tickets."""
    body: dict[str, Any] = {
        "partnerId": PARTNER,
        "sellToOrderReference": reference,
        "sellToEmail": "guest@example.com",
        "sellToName": "Jane Doe",
        "sellToLanguage": "ENU",
        "paymentReference": "PAY-1",
        "items": [
            {
                "itemNumber": "31001",
                "visitDate": future(),
                "visitTime": "10:30:00",
                "quantity": 2,
                "wallet": {"externalReferenceNumbers": ["EXT-1", "EXT-2"]},
            },
            {"itemNumber": "31002", "visitDate": future(), "visitTime": "10:30:00", "quantity": 1},
        ],
    }
    return {**body, **changes}


def order_request(reference: str = "SHOP-1001", **changes: Any) -> OrderRequest:
    """:func:`order_body` as the wire model."""
    return OrderRequest.model_validate(order_body(reference, **changes))


# --- the venue, played by a MockTransport ------------------------------------------------

Script = Callable[["FakeVenue", dict[str, Any]], httpx.Response]


class FakeVenue:
    """The venue's createOrder, getOrder and listOrdersByPartner, with scripted creates.

    Each createOrder takes the next entry of ``scripts`` (or :meth:`accept` when none is
    left); the venue refuses a reference it already has, as the real one does.

    Attributes:
        orders: the venue's orders (wire JSON) by orderId.
        scripts: how to answer the next createOrder calls, in order.
        answers: how to answer the next confirmOrder, replaceOrder or deleteOrder calls.
        get_answers: how to answer the next getOrder calls (before the stored orders).
        calls: calls by name (``create``, ``get``, ``list``, ``confirm``, ``replace``,
            ``delete``).
    """

    def __init__(self) -> None:
        self.orders: dict[str, dict[str, Any]] = {}
        self.scripts: list[Script] = []
        self.answers: list[httpx.Response] = []
        self.get_answers: list[httpx.Response] = []
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle(self, request: httpx.Request) -> httpx.Response:
        """The MockTransport handler."""
        path = request.url.path
        with self._lock:
            if request.method in ("PUT", "DELETE") or path.endswith("/confirm"):
                name = {"PUT": "replace", "DELETE": "delete"}.get(request.method, "confirm")
                self.calls[name] += 1
                return self.answers.pop(0)
            if request.method == "POST" and path.endswith("/channelManager"):
                self.calls["create"] += 1
                body = json.loads(request.content)
                script = self.scripts.pop(0) if self.scripts else FakeVenue.accept
                return script(self, body)
            if request.method == "GET" and "/channelManager/orders/" in path:
                self.calls["list"] += 1
                wanted = normalize_reference(request.url.params["sellToOrderReference"])
                data = [
                    {k: v for k, v in order.items() if k != "items"}
                    for order in self.orders.values()
                    if normalize_reference(order["sellToOrderReference"]) == wanted
                ]
                return httpx.Response(200, json={"morePages": False, "data": data})
            if request.method == "GET" and "/channelManager/" in path:
                self.calls["get"] += 1
                if self.get_answers:
                    return self.get_answers.pop(0)
                order_id = path.rsplit("/", 1)[-1]
                order = self.orders.get(order_id)
                if order is None:
                    # ChannelMgrOrderAgent GetOrder: the id formatted as Business Central
                    # writes a GUID into text.
                    message = f"Order '{guid_caption(order_id)}' not found Not Found"
                    return error(404, message, code="resource_not_found")
                return httpx.Response(200, json=order)
        raise AssertionError(f"unexpected call {request.method} {path}")

    def store(
        self, body: dict[str, Any], status: str = "Submitted", **extra: Any
    ) -> dict[str, Any]:
        """Keep an order made from ``body``; the order JSON."""
        order_id = str(uuid.uuid4())
        order = {
            "orderId": order_id,
            "status": status,
            "statusMessage": "",
            "partnerId": body["partnerId"],
            "sellToOrderReference": normalize_reference(body["sellToOrderReference"]),
            "buyFromOrderReference": f"CM-20260515093000-{order_id[:4].upper()}",
            "receivedAt": "2026-05-15T09:30:00Z",
            "paymentReference": body.get("paymentReference"),
            "items": [],
            **extra,
        }
        self.orders[order_id] = order
        return order

    def has(self, body: dict[str, Any]) -> bool:
        """Whether an order of ``body``'s reference exists."""
        wanted = normalize_reference(body["sellToOrderReference"])
        return any(
            normalize_reference(o["sellToOrderReference"]) == wanted for o in self.orders.values()
        )

    def accept(self, body: dict[str, Any]) -> httpx.Response:
        """201 Submitted, or the venue's duplicate refusal."""
        if self.has(body):
            message = DUPLICATE_MESSAGE.format(
                reference=normalize_reference(body["sellToOrderReference"]),
                partner=body["partnerId"],
            )
            return error(400, message)
        return httpx.Response(201, json=self.store(body))

    def issue_synchronously(self, body: dict[str, Any]) -> httpx.Response:
        """The older synchronous API: 201 Issued with wallets, no buyFromOrderReference."""
        order = self.store(body, status="Issued", items=[issued_line()])
        del order["buyFromOrderReference"]
        return httpx.Response(201, json=order)

    def lose_answer(self, body: dict[str, Any]) -> httpx.Response:
        """Store the order, then lose the answer: the call times out."""
        self.store(body)
        raise httpx.ReadTimeout("the answer was lost")


def error(status: int, message: str, code: str = "generic_error") -> httpx.Response:
    """The venue's error body."""
    return httpx.Response(status, json={"code": code, "message": message})


def answer(status: int, message: str) -> Script:
    """A script that answers one createOrder with an error."""
    return lambda venue, body: error(status, message)


def issued_line() -> dict[str, Any]:
    """An order line with one minted wallet, as the synchronous API returns it."""
    return {
        "lineNo": 10000,
        "itemNumber": "31001",
        "description": "Castle Admission",
        "quantity": 1,
        "visitDate": future(),
        "visitTime": "10:30:00",
        "wallets": [
            {
                "seqNo": 1,
                "walletId": "5a1c2b3d-4e5f-6071-8293-a4b5c6d7e8f9",
                "walletReferenceNumber": "141234529930210327",
                "externalReferenceNumber": "EXT-1",
                "issuedAt": "2026-05-15T09:30:05Z",
                "unitPriceExclVat": "80.00",
                "unitPriceInclVat": "100.00",
                "currencyCode": "DKK",
                "assets": [{"type": "ticket", "referenceNumber": "ATF-1"}],
            }
        ],
    }


@pytest.fixture
def venue() -> FakeVenue:
    """An empty venue."""
    return FakeVenue()


@pytest.fixture
def client(venue: FakeVenue) -> Iterator[VenueClient]:
    """A venue client over ``venue``, trying each call once."""
    with open_client(
        CONNECTION,
        transport=httpx.MockTransport(venue.handle),
        retry=ONCE,
        throttle=Throttle(),
    ) as venue_client:
        yield venue_client


@pytest.fixture
def connection_id(sessions: sessionmaker[Session]) -> int:
    """The row id of the test connection."""
    with sessions.begin() as session:
        return ensure_connection(session, CONNECTION.name)


def submit(
    sessions: sessionmaker[Session],
    client: VenueClient,
    connection_id: int,
    reference: str = "SHOP-1001",
    *,
    now: dt.datetime = T0,
    **changes: Any,
) -> Any:
    """``submit_now`` of :func:`order_body`, charged 300.00 DKK."""
    return submit_now(
        sessions,
        client,
        connection_id,
        order_request(reference, **changes),
        now=now,
        amount=Decimal("300.00"),
        currency="DKK",
        owner="tester",
    )


def rows(sessions: sessionmaker[Session], model: type[Any]) -> list[Any]:
    """Every row of ``model``, by id."""
    with sessions.begin() as session:
        return list(session.scalars(sa.select(model).order_by(model.id)).all())


def mirrored(sessions: sessionmaker[Session]) -> list[tuple[str, OrderStatus, list[ChangeSource]]]:
    """The mirror: each order's id, status and the sources of its status changes."""
    with sessions.begin() as session:
        return [
            (order.order_id, order.status, [change.source for change in order.status_changes])
            for order in session.scalars(sa.select(VenueOrder).order_by(VenueOrder.id))
        ]


# --- parsing ------------------------------------------------------------------------------


def test_a_submission_is_the_order_request_plus_the_sale() -> None:
    """The sale's fields are split off; the rest is the venue's request, unchanged."""
    raw = order_body(amount=Decimal("300.50"), currency="dkk", amountIncludesVat=False)
    raw["connection"] = "default"

    submission = parse_submission(raw)

    assert submission.amount == Decimal("300.50")
    assert submission.currency == "DKK"
    assert submission.amount_includes_vat is False
    assert submission.connection == "default"
    assert "amount" not in submission.request.to_wire()
    assert submission.request.to_wire()["items"][0]["quantity"] == 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"items": []}, "items"),
        ({"sellToOrderReference": None}, "sellToOrderReference"),
        ({"sellToOrderReference": "X" * 51}, "sellToOrderReference"),
        ({"amount": "12.50"}, "currency"),
        ({"currency": "DKK"}, "amount"),
        ({"amount": "-1", "currency": "DKK"}, "amount"),
        ({"currency": "kroner", "amount": "1"}, "currency"),
        ({"amount": "1e400", "currency": "DKK"}, "amount"),
        ({"amount": "9223372036854.775808", "currency": "DKK"}, "amount"),
        ({"sellToName": "Jane\u0000Doe"}, "sellToName"),
        ({"sellToEmail": "\ud800@example.com"}, "sellToEmail"),
        ({"items": [{"itemNumber": "31001\u0000", "quantity": 1}]}, "items[0].itemNumber"),
        ({"notes": {"gift\u0000": "yes"}}, "notes.gift\u0000"),
    ],
)
def test_an_invalid_submission_names_its_field(change: dict[str, Any], field: str) -> None:
    """Each invalid submission is refused with the field that is wrong."""
    with pytest.raises(SubmissionError) as caught:
        parse_submission(order_body(**change))

    assert caught.value.field == field


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"partnerId": "partner-1"}, "partnerId", "is not a valid GUID"),
        ({"partnerId": " "}, "partnerId", "is not a valid GUID"),
        ({"sellToEmail": "e" * 101}, "sellToEmail", "at most 100 characters"),
        ({"sellToName": "n" * 101}, "sellToName", "at most 100 characters"),
        ({"sellToLanguage": "l" * 11}, "sellToLanguage", "at most 10 characters"),
        ({"sellToOrderReference": "R" * 51}, "sellToOrderReference", "at most 50 characters"),
        ({"paymentReference": "P" * 51}, "paymentReference", "at most 50 characters"),
    ],
)
def test_a_submission_the_venue_would_cut_or_refuse_names_its_field(
    change: dict[str, Any], field: str, problem: str
) -> None:
    """ChannelMgrOrderAgent TryParseHeader: a partnerId that is not a GUID is refused ("partnerId
    is not a valid GUID"), and text longer than CMOrder's fields is cut (CopyStr): both are
    refused before anything is recorded, naming the field and why."""
    with pytest.raises(SubmissionError) as caught:
        parse_submission(order_body(**change))

    assert (caught.value.field, caught.value.code) == (field, "invalid_order")
    assert problem in caught.value.problem


def test_a_stored_request_keeps_a_lines_explicit_null_customer_fields() -> None:
    """ChannelMgrOrderAgent TryParseItem: a line's sellToEmail given as null means this
    line's tickets go to no address; the request otacm stores and sends keeps the null."""
    body = order_body()
    body["items"][1] = {**body["items"][1], "sellToEmail": None}

    wire = parse_submission(body).request.to_wire()

    assert wire["items"][1]["sellToEmail"] is None
    assert "sellToEmail" not in wire["items"][0]
    assert parse_submission(json.loads(json.dumps(wire))).request.to_wire() == wire


def test_the_largest_amount_money_holds_is_accepted() -> None:
    """One micro-unit below the refused amount above: what a BIGINT of micro-units holds."""
    raw = {**order_body(), "amount": "9223372036854.775807", "currency": "DKK"}

    assert parse_submission(raw).amount == MONEY_MAX


def test_an_invalid_line_names_the_line_and_field() -> None:
    """A bad quantity is named down to the item: ``items[1].quantity``."""
    body = order_body()
    body["items"][1]["quantity"] = 0

    with pytest.raises(SubmissionError, match=r"^items\[1\]\.quantity: "):
        parse_submission(body)


def test_the_only_connection_is_the_default_and_several_need_a_name() -> None:
    """No name picks the only connection; with two, the name is required and checked."""
    other = CONNECTION.model_copy(update={"name": "other"})
    one = [CONNECTION]
    two = [CONNECTION, other]

    assert choose_connection(one, None).name == "default"
    assert choose_connection(two, "other").name == "other"
    with pytest.raises(SubmissionError, match="required when several") as several:
        choose_connection(two, None)
    with pytest.raises(SubmissionError, match="no venue connection named 'nope'") as unknown:
        choose_connection(two, "nope")
    assert several.value.code == unknown.value.code == "unknown_connection"


def test_a_file_may_be_an_object_an_array_or_json_lines() -> None:
    """The three file shapes give the same submissions; amounts stay exact Decimals."""
    first = {**order_body("A-1"), "amount": 0.1, "currency": "DKK"}
    second = order_body("A-2")
    shapes = [
        json.dumps(first),
        json.dumps([first, second]),
        json.dumps(first) + "\n\n" + json.dumps(second) + "\n",
    ]

    parsed = [read_submissions(text) for text in shapes]

    assert [s.reference for s in parsed[0]] == ["A-1"]
    assert [s.reference for s in parsed[1]] == [s.reference for s in parsed[2]] == ["A-1", "A-2"]
    assert parsed[2][0].amount == Decimal("0.1")


def test_an_invalid_entry_in_a_file_names_the_entry() -> None:
    """An error in an array names the index; in JSON lines, the line."""
    bad = order_body("B-2", items=[])
    as_array = json.dumps([order_body("B-1"), bad])
    as_lines = json.dumps(order_body("B-1")) + "\n" + json.dumps(bad)

    with pytest.raises(SubmissionError, match=r"^\[1\]\.items: "):
        read_submissions(as_array)
    with pytest.raises(SubmissionError, match=r"^line 2: items: "):
        read_submissions(as_lines)
    with pytest.raises(SubmissionError, match="not valid JSON"):
        read_submissions("{nope")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("NaN", "NaN is not a JSON value"),
        ("Infinity", "Infinity is not a JSON value"),
        ("9" * 5000, "a number has more than 4300 digits"),
        ("[" * 100_000, "it is nested too deeply"),
    ],
    ids=["nan", "infinity", "too-many-digits", "too-deep"],
)
def test_a_file_with_what_json_does_not_have_is_refused(value: str, problem: str) -> None:
    """Python's json reads NaN and Infinity; a file with them, or with a number or nesting
    it cannot read, is refused whole, in any of the shapes."""
    entry = json.dumps({**order_body("N-1"), "amount": "@", "currency": "DKK"})
    with_value = entry.replace('"@"', value)

    with pytest.raises(SubmissionError, match=f"not valid JSON: {re.escape(problem)}"):
        read_submissions(with_value)
    with pytest.raises(SubmissionError, match=rf"^line 2: not valid JSON: {re.escape(problem)}"):
        read_submissions(json.dumps(order_body("N-0")) + "\n" + with_value)


# --- recording ----------------------------------------------------------------------------


def test_recording_writes_the_ledger_line_and_a_pending_outbox_row(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """One transaction stores the sale (source submit, active) and its pending createOrder."""
    request = order_request(" shop-1001 ")
    with sessions.begin() as session:
        recorded = record_submission(
            session, connection_id, request, now=T0, amount=Decimal("300.00"), currency="dkk"
        )

    assert recorded.already_recorded is False
    [line] = rows(sessions, LedgerLine)
    assert (line.source, line.state, line.partner_id) == (
        LedgerSource.SUBMIT,
        LedgerState.ACTIVE,
        PARTNER,
    )
    assert (line.shop_reference, line.reference_key) == ("shop-1001", "SHOP-1001")
    assert (line.quantity, line.amount, line.currency) == (3, Decimal("300.00"), "DKK")
    assert line.sold_at == T0
    assert line.payment_reference == "PAY-1"
    assert line.external_reference_numbers == ["EXT-1", "EXT-2"]
    assert line.request == request.to_wire()
    [outbox] = rows(sessions, Outbox)
    assert (outbox.operation, outbox.state, outbox.attempts) == (
        OutboxOperation.CREATE,
        OutboxState.PENDING,
        0,
    )
    assert (outbox.ledger_line_id, outbox.next_attempt_at) == (line.id, T0)
    assert outbox.request == request.to_wire()


def test_a_sale_without_an_amount_is_recorded_in_no_currency(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Without an amount the line says so: 0 in ISO 4217's "no currency"."""
    with sessions.begin() as session:
        record_submission(session, connection_id, order_request(), now=T0)

    [line] = rows(sessions, LedgerLine)
    assert (line.amount, line.currency) == (Decimal(0), NO_CURRENCY)


def test_recording_the_same_sale_again_doubles_nothing(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """The same (partner, reference), in any case, returns the stored line and row."""
    with sessions.begin() as session:
        first = record_submission(session, connection_id, order_request("SHOP-7"), now=T0)
        first_ids = (first.line.id, first.outbox.id)
    with sessions.begin() as session:
        again = record_submission(
            session, connection_id, order_request(" shop-7"), now=T0 + dt.timedelta(hours=1)
        )
        again_ids = (again.line.id, again.outbox.id)

    assert again.already_recorded is True
    assert again_ids == first_ids
    assert len(rows(sessions, LedgerLine)) == len(rows(sessions, Outbox)) == 1


# --- sending: each answer -------------------------------------------------------------------


def test_a_201_submitted_marks_the_row_sent_and_mirrors_the_order(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """The venue's Submitted answer: row sent with its order id, order mirrored from submit."""
    outcome = submit(sessions, client, connection_id)

    [order_id] = venue.orders
    assert outcome.status is SubmitStatus.SENT
    assert (outcome.order_id, outcome.order_status) == (order_id, OrderStatus.SUBMITTED)
    assert outcome.buy_from_order_reference == venue.orders[order_id]["buyFromOrderReference"]
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.order_id, outbox.sent_at, outbox.attempts) == (
        OutboxState.SENT,
        order_id,
        T0,
        1,
    )
    assert outbox.lease_owner is None
    assert mirrored(sessions) == [(order_id, OrderStatus.SUBMITTED, [ChangeSource.SUBMIT])]


def test_a_synchronous_issued_answer_is_stored_as_settled(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """The older API's Issued answer, wallets and no buyFromOrderReference, is a settled order."""
    venue.scripts = [FakeVenue.issue_synchronously]

    outcome = submit(sessions, client, connection_id)

    assert outcome.status is SubmitStatus.SENT
    assert outcome.order_status is OrderStatus.ISSUED
    assert outcome.buy_from_order_reference is None
    assert mirrored(sessions) == [(outcome.order_id, OrderStatus.ISSUED, [ChangeSource.SUBMIT])]
    [wallet] = rows(sessions, Wallet)
    assert wallet.wallet_reference_number == "141234529930210327"


def test_an_answer_the_mirror_cannot_hold_is_sent_and_left_to_the_worker(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """The order exists at the venue: the row is sent, not sent again, and the worker's
    getOrder of the order dead-letters it naming the column."""
    venue.scripts = [lambda venue, body: httpx.Response(201, json=venue.store(body, **WIDE))]

    outcome = submit(sessions, client, connection_id)

    [order_id] = venue.orders
    assert (outcome.status, outcome.order_id) == (SubmitStatus.SENT, order_id)
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.order_id) == (OutboxState.SENT, order_id)
    assert mirrored(sessions) == []
    [lookup] = rows(sessions, Inbox)
    assert (lookup.order_id, lookup.source, lookup.state) == (
        order_id,
        InboxSource.POLL,
        InboxState.PENDING,
    )

    report = run_once(sessions, {connection_id: client}, owner="w", now=T0, max_attempts=1)

    [lookup] = rows(sessions, Inbox)
    assert (report.dead, lookup.state) == (1, InboxState.DEAD)
    assert lookup.last_error == (
        "the mirror cannot hold the venue's answer: "
        "venue_order.sell_to_language: longer than 16 characters"
    )
    assert (venue.calls["create"], mirrored(sessions)) == (1, [])


WIDE = {"sellToLanguage": "E" * 17}
"""A field wider than its column in the mirror (a language code is at most 16)."""


def test_a_duplicate_reference_is_resolved_by_reference(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """The venue already has the reference: the order is found, fetched and mirrored."""
    existing = venue.store(order_body(), status="Issued")

    outcome = submit(sessions, client, connection_id)

    assert outcome.status is SubmitStatus.SENT
    assert outcome.order_id == existing["orderId"]
    assert outcome.order_status is OrderStatus.ISSUED
    assert venue.calls == Counter(create=1, list=1, get=1)
    assert len(venue.orders) == 1
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.order_id) == (OutboxState.SENT, existing["orderId"])
    assert mirrored(sessions) == [(existing["orderId"], OrderStatus.ISSUED, [ChangeSource.SUBMIT])]


def test_a_transient_503_is_retried_after_its_backoff(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """A 503 leaves the sale recorded and pending; the next pass after the backoff sends it."""
    venue.scripts = [answer(503, "The request timed out in the queue; retry later")]

    outcome = submit(sessions, client, connection_id)

    assert outcome.status is SubmitStatus.RECORDED
    assert "will retry" in (outcome.message or "")
    [outbox] = rows(sessions, Outbox)
    assert outbox.state is OutboxState.PENDING
    assert outbox.next_attempt_at > T0
    assert outbox.last_error is not None and "HTTP 503" in outbox.last_error
    assert outcome.next_attempt_at == outbox.next_attempt_at
    assert venue.orders == {}

    early = run_outbox_once(
        sessions,
        {connection_id: client},
        owner="worker",
        now=outbox.next_attempt_at - dt.timedelta(seconds=1),
    )
    later = run_outbox_once(
        sessions, {connection_id: client}, owner="worker", now=outbox.next_attempt_at
    )

    assert early == OutboxReport()
    assert (later.claimed, later.sent) == (1, 1)
    [outbox] = rows(sessions, Outbox)
    [order_id] = venue.orders
    assert (outbox.state, outbox.order_id, outbox.attempts, outbox.last_error) == (
        OutboxState.SENT,
        order_id,
        2,
        None,
    )


def test_a_duplicate_that_cannot_be_found_yet_is_retried(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """ "Already exists" with nothing under the reference (yet) is retried, never failed."""
    message = DUPLICATE_MESSAGE.format(reference="SHOP-1001", partner=PARTNER)
    venue.scripts = [answer(400, message)]

    outcome = submit(sessions, client, connection_id)

    assert outcome.status is SubmitStatus.RECORDED
    assert venue.calls == Counter(create=1, list=1)
    [outbox] = rows(sessions, Outbox)
    assert outbox.state is OutboxState.PENDING
    assert "already exists" in (outbox.last_error or "")


def test_a_mid_flight_400_is_retried_not_failed(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """A 400 the venue's rules call transient sends the row back to pending."""
    venue.scripts = [
        answer(400, "Order is mid-flight (status Processing); retry once it has settled")
    ]

    outcome = submit(sessions, client, connection_id)

    assert outcome.status is SubmitStatus.RECORDED
    [outbox] = rows(sessions, Outbox)
    assert outbox.state is OutboxState.PENDING


def test_a_definitive_400_fails_with_the_venues_message(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """A validation refusal: the row fails with the message; the ledger line stays."""
    venue.scripts = [answer(400, "Unknown item '99999'")]

    outcome = submit(sessions, client, connection_id)

    assert outcome.status is SubmitStatus.FAILED
    assert (outcome.code, outcome.message) == ("generic_error", "Unknown item '99999'")
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.last_error, outbox.order_id) == (
        OutboxState.FAILED,
        "Unknown item '99999'",
        None,
    )
    [line] = rows(sessions, LedgerLine)
    assert line.state is LedgerState.ACTIVE
    assert mirrored(sessions) == []
    assert (
        run_outbox_once(
            sessions, {connection_id: client}, owner="w", now=T0 + dt.timedelta(days=1)
        ).claimed
        == 0
    )


def test_a_refusal_that_left_an_order_behind_is_that_order(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """The older API refuses a failed issuance but keeps the order in Error: it is mirrored."""

    def fail_issuing(fake: FakeVenue, body: dict[str, Any]) -> httpx.Response:
        fake.store(body, status="Error", statusMessage="Ticket could not be issued")
        return error(400, "Ticket could not be issued")

    venue.scripts = [fail_issuing]

    outcome = submit(sessions, client, connection_id)

    assert outcome.status is SubmitStatus.SENT
    assert (outcome.order_status, outcome.status_message) == (
        OrderStatus.ERROR,
        "Ticket could not be issued",
    )
    [outbox] = rows(sessions, Outbox)
    assert outbox.state is OutboxState.SENT


def test_a_lost_answer_resolves_to_exactly_one_order(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """The order landed but its answer was lost: the next claim looks the sale up, finds
    that order and does not send the create again."""
    venue.scripts = [FakeVenue.lose_answer]

    first = submit(sessions, client, connection_id)
    [outbox] = rows(sessions, Outbox)
    report = run_outbox_once(
        sessions, {connection_id: client}, owner="worker", now=outbox.next_attempt_at
    )

    assert first.status is SubmitStatus.RECORDED
    assert "ReadTimeout" in (first.message or "")
    assert (report.sent, report.resolved) == (1, 1)
    [order_id] = venue.orders
    assert (venue.calls["create"], venue.calls["list"], venue.calls["get"]) == (1, 1, 1)
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.order_id) == (OutboxState.SENT, order_id)
    assert len(rows(sessions, LedgerLine)) == 1
    assert mirrored(sessions) == [(order_id, OrderStatus.SUBMITTED, [ChangeSource.SUBMIT])]


def test_a_lost_answer_is_not_resent_by_the_clients_own_retry(
    sessions: sessionmaker[Session], venue: FakeVenue, connection_id: int
) -> None:
    """With client retries, a create whose answer was lost is not sent again in the same
    send (its order may be in Error by then): recorded, one create, and the next claim
    finds the order by reference."""
    venue.scripts = [FakeVenue.lose_answer]
    retries = RetryPolicy(attempts=3, wait_initial=0, wait_max=0, wait_jitter=0)
    with open_client(
        CONNECTION, transport=httpx.MockTransport(venue.handle), retry=retries, throttle=Throttle()
    ) as retrying:
        outcome = submit(sessions, retrying, connection_id)
        assert (outcome.status, venue.calls["create"]) == (SubmitStatus.RECORDED, 1)
        [outbox] = rows(sessions, Outbox)
        report = run_outbox_once(
            sessions, {connection_id: retrying}, owner="later", now=outbox.next_attempt_at
        )

    assert (report.sent, report.resolved, venue.calls["create"]) == (1, 1, 1)
    [order_id] = venue.orders
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.order_id) == (OutboxState.SENT, order_id)


def test_resubmitting_a_sent_sale_answers_with_the_existing_order(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """The same sale again: ``duplicate`` with the order, no call, nothing doubled."""
    first = submit(sessions, client, connection_id)

    again = submit(sessions, client, connection_id, now=T0 + dt.timedelta(minutes=5))

    assert again.status is SubmitStatus.DUPLICATE
    assert (again.order_id, again.order_status, again.buy_from_order_reference) == (
        first.order_id,
        OrderStatus.SUBMITTED,
        first.buy_from_order_reference,
    )
    assert venue.calls["create"] == 1
    assert len(rows(sessions, LedgerLine)) == len(rows(sessions, Outbox)) == 1


def test_resubmitting_a_refused_sale_sends_the_new_request(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """A refused sale submitted again, corrected, is queued and sent on the same line."""
    venue.scripts = [answer(400, "Unknown item '99999'")]
    refused = submit(sessions, client, connection_id)

    fixed = submit(sessions, client, connection_id, now=T0 + dt.timedelta(minutes=5))

    assert (refused.status, fixed.status) == (SubmitStatus.FAILED, SubmitStatus.SENT)
    assert fixed.outbox_id == refused.outbox_id
    assert len(rows(sessions, LedgerLine)) == len(rows(sessions, Outbox)) == 1


def test_a_row_is_given_up_after_its_last_attempt(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """A transient failure on the last allowed attempt makes the row dead, not pending."""
    venue.scripts = [answer(503, "busy"), answer(503, "still busy")]
    submit(sessions, client, connection_id)
    [outbox] = rows(sessions, Outbox)

    report = run_outbox_once(
        sessions, {connection_id: client}, owner="w", now=outbox.next_attempt_at, max_attempts=2
    )

    assert report.dead == 1
    [outbox] = rows(sessions, Outbox)
    assert outbox.state is OutboxState.DEAD
    assert "still busy" in (outbox.last_error or "")


def test_an_expired_lease_is_claimed_again_and_a_row_is_never_sent_twice_at_once(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """A sender that died leaves its row leased; after the lease it is sent by another."""
    with sessions.begin() as session:
        outbox_id = record_submission(session, connection_id, order_request(), now=T0).outbox.id
    [claim] = claim_outbox(sessions, owner="died", now=T0, limit=10, lease_seconds=60)

    busy = send_outbox_row(
        sessions, client, outbox_id, owner="other", now=T0 + dt.timedelta(seconds=30)
    )
    report = run_outbox_once(
        sessions, {connection_id: client}, owner="other", now=T0 + dt.timedelta(seconds=61)
    )

    assert claim.id == outbox_id
    assert (busy.outcome, busy.state) == (SendOutcome.NOT_CLAIMED, OutboxState.LEASED)
    assert (report.claimed, report.sent) == (1, 1)
    assert venue.calls["create"] == 1
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.attempts) == (OutboxState.SENT, 2)


# --- a create claimed again: look the sale up before sending it again ----------------------


def test_a_lost_create_found_in_error_is_settled_and_never_sent_again(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """The venue took the order, the answer was lost, and the order went into Error
    meanwhile: the next claim settles the row with that order and sends no create (which
    would make the venue delete it and issue a new one); ``orders errors`` lists it."""
    venue.scripts = [FakeVenue.lose_answer]
    first = submit(sessions, client, connection_id)
    [lost] = venue.orders.values()
    lost.update(status="Error", statusMessage="[-1004] - The capacity has been exceeded.")
    [outbox] = rows(sessions, Outbox)

    report = run_outbox_once(
        sessions, {connection_id: client}, owner="worker", now=outbox.next_attempt_at
    )

    assert first.status is SubmitStatus.RECORDED
    assert (report.sent, report.resolved, report.in_error) == (1, 1, 1)
    assert venue.calls == Counter(create=1, list=1, get=1)
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.order_id) == (OutboxState.SENT, lost["orderId"])
    assert outbox.last_error == FOUND_IN_ERROR
    assert mirrored(sessions) == [(lost["orderId"], OrderStatus.ERROR, [ChangeSource.SUBMIT])]
    with sessions.begin() as session:
        assert [e.order_id for e in error_orders(session)] == [lost["orderId"]]

    again = submit(sessions, client, connection_id, now=outbox.next_attempt_at)
    assert (again.status, again.order_status, again.message) == (
        SubmitStatus.DUPLICATE,
        OrderStatus.ERROR,
        FOUND_IN_ERROR,
    )
    assert venue.calls["create"] == 1


def test_a_create_claimed_again_settles_with_the_order_the_mirror_already_has(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """A webhook brought the order (Issued) before the row was claimed again: the row
    is settled with it without a single venue call."""
    venue.scripts = [FakeVenue.lose_answer]
    submit(sessions, client, connection_id)
    [lost] = venue.orders.values()
    lost.update(status="Issued")
    with sessions.begin() as session:
        upsert_order(
            session,
            connection_id,
            Order.model_validate(lost),
            source=ChangeSource.WEBHOOK,
            observed_at=T0,
        )
    [outbox] = rows(sessions, Outbox)
    calls_before = Counter(venue.calls)

    result = send_outbox_row(sessions, client, outbox.id, owner="w", now=outbox.next_attempt_at)

    assert (result.outcome, result.resolved, result.found_in_error) == (
        SendOutcome.SENT,
        True,
        False,
    )
    assert venue.calls == calls_before
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.order_id) == (OutboxState.SENT, lost["orderId"])


def test_an_error_order_in_the_mirror_is_checked_at_the_venue(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """The mirror's Error order is an earlier submission's, which this row's lost create
    made the venue replace: the venue's look-up names the new order, the row settles
    with it, and the old one is marked removed."""
    venue.scripts = [answer(503, "busy")]
    submit(sessions, client, connection_id)  # the first attempt fails before the venue
    old_order = venue.store(order_body(), status="Error")
    with sessions.begin() as session:
        upsert_order(
            session,
            connection_id,
            Order.model_validate(old_order),
            source=ChangeSource.FEED,
            observed_at=T0,
        )
    del venue.orders[old_order["orderId"]]
    new_order = venue.store(order_body())  # as the venue accepted a lost create
    [outbox] = rows(sessions, Outbox)

    result = send_outbox_row(sessions, client, outbox.id, owner="w", now=outbox.next_attempt_at)

    assert (result.outcome, result.order_id, result.found_in_error) == (
        SendOutcome.SENT,
        new_order["orderId"],
        False,
    )
    assert (venue.calls["create"], venue.calls["list"]) == (1, 1)
    with sessions.begin() as session:
        live = session.scalars(
            sa.select(VenueOrder.order_id).where(VenueOrder.removed_at.is_(None))
        ).all()
    assert live == [new_order["orderId"]]


def test_a_create_cut_off_before_its_call_is_sent_exactly_once_after_its_lease(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """A sender died holding the row before its call: after the lease the look-up finds
    nothing and the create is sent, once — within one retry interval of the lease's end
    at the default lease, well short of five minutes."""
    lease = Settings().outbox_lease_seconds
    with sessions.begin() as session:
        record_submission(session, connection_id, order_request(), now=T0)
    claim_outbox(sessions, owner="died", now=T0, limit=1, lease_seconds=lease)
    ends = T0 + dt.timedelta(seconds=lease)

    during = run_outbox_once(
        sessions,
        {connection_id: client},
        owner="w",
        now=ends - dt.timedelta(seconds=1),
        lease_seconds=lease,
    )
    after = run_outbox_once(
        sessions,
        {connection_id: client},
        owner="w",
        now=ends + dt.timedelta(seconds=OUTBOX_RETRY_SECONDS),
        lease_seconds=lease,
    )

    assert lease < 300
    assert (during.claimed, after.sent, after.resolved) == (0, 1, 0)
    assert venue.calls == Counter(list=1, create=1)
    [order_id] = venue.orders
    assert mirrored(sessions) == [(order_id, OrderStatus.SUBMITTED, [ChangeSource.SUBMIT])]


def test_a_create_is_not_sent_again_while_the_look_up_fails(
    sessions: sessionmaker[Session], venue: FakeVenue, connection_id: int
) -> None:
    """Not knowing whether the venue has the order, the row waits: no create is sent."""

    def unavailable_lists(request: httpx.Request) -> httpx.Response:
        if "/channelManager/orders/" in request.url.path:
            return error(503, "The request timed out in the queue; retry later")
        return venue.handle(request)

    with open_client(
        CONNECTION,
        transport=httpx.MockTransport(unavailable_lists),
        retry=ONCE,
        throttle=Throttle(),
    ) as flaky:
        with sessions.begin() as session:
            record_submission(session, connection_id, order_request(), now=T0)
        claim_outbox(sessions, owner="died", now=T0, limit=1, lease_seconds=60)
        report = run_outbox_once(
            sessions, {connection_id: flaky}, owner="w", now=T0 + dt.timedelta(seconds=61)
        )

    assert (report.claimed, report.retried) == (1, 1)
    assert venue.calls["create"] == 0
    [outbox] = rows(sessions, Outbox)
    assert outbox.state is OutboxState.PENDING
    assert "HTTP 503" in (outbox.last_error or "")


def test_a_new_order_for_a_sale_retires_its_order_in_error(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """A createOrder answered with a new orderId while the mirror holds the sale's order
    in Error: the venue deleted that one to accept the new one, so the mirror marks it
    removed and keeps one live order for the sale."""
    old_order = venue.store(order_body(), status="Error")
    with sessions.begin() as session:
        upsert_order(
            session,
            connection_id,
            Order.model_validate(old_order),
            source=ChangeSource.WEBHOOK,
            observed_at=T0,
        )
    del venue.orders[old_order["orderId"]]  # deleted by the venue for the new order

    outcome = submit(sessions, client, connection_id, now=T0 + dt.timedelta(minutes=1))

    assert outcome.status is SubmitStatus.SENT and outcome.order_id != old_order["orderId"]
    with sessions.begin() as session:
        live = session.scalars(
            sa.select(VenueOrder.order_id).where(VenueOrder.removed_at.is_(None))
        ).all()
        assert live == [outcome.order_id]
    assert mirrored(sessions)[0] == (
        old_order["orderId"],
        OrderStatus.ERROR,
        [ChangeSource.WEBHOOK, ChangeSource.SUBMIT],
    )
    later = T0 + dt.timedelta(days=1)
    reconcile_connections(
        sessions,
        [connection_id],
        period_from=T0 - dt.timedelta(days=1),
        period_to=later,
        now=later,
        trigger=ReconTrigger.MANUAL,
        actor="tester",
        grace=dt.timedelta(hours=1),
        tolerance=Decimal("0.01"),
    )
    with sessions.begin() as session:
        categories = session.scalars(sa.select(ReconException.category)).all()
    assert "multiple_orders" not in categories


def test_a_live_sender_renews_its_lease_and_is_not_overtaken(
    sessions: sessionmaker[Session], venue: FakeVenue, connection_id: int
) -> None:
    """A sender whose look-up took longer than the lease renews it before its create, so
    a claimer arriving after the first lease's end finds nothing to take."""
    moment = [T0]
    competitor: list[Any] = []

    def slow_venue(request: httpx.Request) -> httpx.Response:
        if "/channelManager/orders/" in request.url.path:
            moment[0] += dt.timedelta(seconds=90)  # a slow look-up
        elif request.method == "POST":
            competitor.extend(
                claim_outbox(
                    sessions,
                    owner="other",
                    now=moment[0] + dt.timedelta(seconds=30),
                    limit=1,
                    lease_seconds=60,
                )
            )
        return venue.handle(request)

    earlier = T0 - dt.timedelta(seconds=120)
    with sessions.begin() as session:
        record_submission(session, connection_id, order_request(), now=earlier)
    assert claim_outbox(sessions, owner="died", now=earlier, limit=1, lease_seconds=60)
    with open_client(
        CONNECTION, transport=httpx.MockTransport(slow_venue), retry=ONCE, throttle=Throttle()
    ) as slow:
        report = run_outbox_once(
            sessions,
            {connection_id: slow},
            owner="live",
            now=T0,
            lease_seconds=60,
            clock=lambda: moment[0],
        )

    assert competitor == []
    assert (report.sent, venue.calls["list"], venue.calls["create"]) == (1, 1, 1)


def test_a_sender_renews_its_lease_while_a_call_is_in_flight(
    sessions: sessionmaker[Session], venue: FakeVenue, connection_id: int
) -> None:
    """While its createOrder is in flight the sender renews the row's lease on a timer:
    the venue answers only once the lease moved past the claim's, and a claimer at the
    claim's lease end then finds nothing to take. After the answer, no more renewals."""
    lease = 0.3
    claimed_until: list[dt.datetime] = []
    competitor: list[Any] = []

    def expiry() -> dt.datetime | None:
        with sessions.begin() as session:
            return session.scalar(sa.select(Outbox.lease_expires_at))

    def renewed() -> bool:
        current = expiry()
        return current is not None and current > claimed_until[0]

    def slow_venue(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            claimed = expiry()
            assert claimed is not None
            claimed_until.append(claimed)
            wait_until(renewed, 10, what="the lease to be renewed")
            competitor.extend(
                claim_outbox(
                    sessions, owner="other", now=claimed_until[0], limit=1, lease_seconds=60
                )
            )
        return venue.handle(request)

    with sessions.begin() as session:
        record_submission(session, connection_id, order_request(), now=utcnow())
    with open_client(
        CONNECTION, transport=httpx.MockTransport(slow_venue), retry=ONCE, throttle=Throttle()
    ) as slow:
        report = run_outbox_once(
            sessions, {connection_id: slow}, owner="live", now=utcnow(), lease_seconds=lease
        )

    assert competitor == []
    assert (report.sent, venue.calls["create"]) == (1, 1)
    with sessions.begin() as session:
        row = session.scalars(sa.select(Outbox)).one()
        assert (row.state, row.lease_owner, row.lease_expires_at) == (OutboxState.SENT, None, None)


class ApplyFails:
    """Sessions whose ``fail_on``-th transaction fails to begin, as a database gone away would."""

    def __init__(self, sessions: sessionmaker[Session], fail_on: int) -> None:
        self.sessions = sessions
        self.fail_on = fail_on
        self.begun = 0

    def begin(self) -> Any:
        """The next transaction, or ``OperationalError`` for the ``fail_on``-th."""
        self.begun += 1
        if self.begun == self.fail_on:
            raise sa.exc.OperationalError("UPDATE outbox", {}, Exception("server closed"))
        return self.sessions.begin()


def test_our_database_failing_after_the_call_leaves_the_row_to_its_lease(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """The venue took the order but we could not write it: the row stays leased, then
    is sent again after its lease, and the duplicate resolves to that one order."""
    with sessions.begin() as session:
        outbox_id = record_submission(session, connection_id, order_request(), now=T0).outbox.id
    flaky: Any = ApplyFails(sessions, fail_on=2)  # 1: the claim, 2: applying the answer

    result = send_outbox_row(flaky, client, outbox_id, owner="first", now=T0, lease_seconds=60)

    assert (result.outcome, result.state) == (SendOutcome.ABANDONED, OutboxState.LEASED)
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.lease_owner) == (OutboxState.LEASED, "first")
    assert mirrored(sessions) == []

    report = run_outbox_once(
        sessions, {connection_id: client}, owner="second", now=T0 + dt.timedelta(seconds=61)
    )

    assert (report.sent, report.resolved) == (1, 1)
    [order_id] = venue.orders
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.order_id) == (OutboxState.SENT, order_id)


def test_concurrent_submissions_of_one_sale_make_one_line_and_one_order(
    sessions: sessionmaker[Session], venue: FakeVenue, connection_id: int
) -> None:
    """Four threads submit the same sale at once: one ledger line, one row, one order."""
    barrier = threading.Barrier(4)
    outcomes: list[Any] = []
    failures: list[BaseException] = []

    def one() -> None:
        try:
            with open_client(
                CONNECTION,
                transport=httpx.MockTransport(venue.handle),
                retry=ONCE,
                throttle=Throttle(),
            ) as own:
                barrier.wait(timeout=10)
                outcomes.append(submit(sessions, own, connection_id))
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert failures == []
    assert len(outcomes) == 4
    assert len(venue.orders) == 1
    assert venue.calls["create"] == 1
    assert len(rows(sessions, LedgerLine)) == len(rows(sessions, Outbox)) == 1
    assert {o.status for o in outcomes} <= {
        SubmitStatus.SENT,
        SubmitStatus.DUPLICATE,
        SubmitStatus.RECORDED,
    }
    # Which thread reports "sent" depends on who claims the row first (the recorder or a
    # repeat); what matters is that every answer names the one order the venue made.
    assert SubmitStatus.SENT in {o.status for o in outcomes}
    (order_id,) = venue.orders
    assert {o.order_id for o in outcomes if o.status is not SubmitStatus.RECORDED} == {order_id}


def test_a_pass_claims_only_rows_of_connections_it_has_a_client_for(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """Rows of another connection stay pending for the sender that can reach it."""
    with sessions.begin() as session:
        other_id = ensure_connection(session, "other")
        record_submission(session, other_id, order_request("OTHER-1"), now=T0)
        record_submission(session, connection_id, order_request("MINE-1"), now=T0)

    report = run_outbox_once(sessions, {connection_id: client}, owner="w", now=T0)

    assert (report.claimed, report.sent) == (1, 1)
    assert [o.state for o in rows(sessions, Outbox)] == [OutboxState.PENDING, OutboxState.SENT]


def test_an_outcome_prints_and_serializes_without_customer_data(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """``describe()`` and ``to_json()`` name the order, never the customer."""
    outcome = submit(sessions, client, connection_id)

    text = outcome.describe() + json.dumps(outcome.to_json())

    assert outcome.to_json()["outcome"] == "sent"
    assert outcome.to_json()["status"] == "Submitted"
    assert outcome.order_id is not None and outcome.order_id in text
    assert "Jane Doe" not in text and "guest@example.com" not in text


def test_the_lease_setting_defaults_to_the_outboxs_lease_and_refuses_too_short() -> None:
    """``OTACM_OUTBOX_LEASE_SECONDS`` defaults to the outbox's own default, no longer than
    a poll interval (a live sender renews it, so it need not outlast a slow call), and
    refuses less than 5 s."""
    assert Settings().outbox_lease_seconds == DEFAULT_LEASE_SECONDS == 15
    assert Settings().poll_interval >= DEFAULT_LEASE_SECONDS
    with pytest.raises(ValidationError, match="outbox_lease_seconds"):
        Settings(outbox_lease_seconds=1)


def test_otacm_submit_holds_its_row_for_the_configured_lease(
    sessions: sessionmaker[Session],
    client: VenueClient,
    venue: FakeVenue,
    connection_id: int,
    tmp_path: Path,
) -> None:
    """``OTACM_OUTBOX_LEASE_SECONDS`` is the lease ``otacm submit`` holds its row for."""
    leases: list[dt.datetime | None] = []

    def watch(venue: FakeVenue, body: dict[str, Any]) -> httpx.Response:
        with sessions.begin() as session:
            leases.append(session.scalar(sa.select(Outbox.lease_expires_at)))
        return venue.accept(body)

    venue.scripts = [watch]
    path = tmp_path / "order.json"
    path.write_text(json.dumps(order_body("F-1")), encoding="utf-8")
    [outcome] = submit_file(
        [CONNECTION], path, sessions=sessions, clients={"default": client}, now=T0, lease_seconds=7
    )

    assert outcome.status is SubmitStatus.SENT
    assert leases == [T0 + dt.timedelta(seconds=7)]


def test_submit_file_records_and_sends_every_order(
    sessions: sessionmaker[Session],
    client: VenueClient,
    venue: FakeVenue,
    connection_id: int,
    tmp_path: Path,
) -> None:
    """``otacm submit FILE`` with JSON lines: one outcome per order, in the file's order."""
    path = tmp_path / "orders.jsonl"
    entries = [
        {**order_body("F-1"), "amount": "300.00", "currency": "DKK"},
        order_body("F-2"),
        order_body("F-1"),
    ]
    path.write_text("\n".join(json.dumps(entry) for entry in entries), encoding="utf-8")

    outcomes = submit_file(
        [CONNECTION], path, sessions=sessions, clients={"default": client}, now=T0
    )

    assert [(o.reference, o.status) for o in outcomes] == [
        ("F-1", SubmitStatus.SENT),
        ("F-2", SubmitStatus.SENT),
        ("F-1", SubmitStatus.DUPLICATE),
    ]
    assert outcomes[2].order_id == outcomes[0].order_id
    assert {o.connection for o in outcomes} == {"default"}
    assert len(rows(sessions, LedgerLine)) == 2


def test_a_bad_file_records_nothing(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, tmp_path: Path
) -> None:
    """One invalid entry stops the whole file before anything is recorded or sent."""
    path = tmp_path / "orders.json"
    path.write_text(json.dumps([order_body("G-1"), order_body("G-2", items=[])]), encoding="utf-8")

    with pytest.raises(SubmissionError, match=r"^\[1\]\.items: "):
        submit_file([CONNECTION], path, sessions=sessions, clients={"default": client}, now=T0)

    assert rows(sessions, LedgerLine) == []
    assert venue.calls == Counter()


def test_a_file_with_a_partner_not_configured_records_nothing(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, tmp_path: Path
) -> None:
    """A sale for a partner the connection does not configure is refused, naming partnerId.

    The venue would take any partner of the company (ChannelMgrOrderAgent ``CreateOrder``),
    but otacm follows only the configured partners' orders.
    """
    path = tmp_path / "orders.jsonl"
    entries = [order_body("P-1"), order_body("P-2", partnerId=INACTIVE_PARTNER)]
    path.write_text("\n".join(json.dumps(entry) for entry in entries), encoding="utf-8")

    with pytest.raises(SubmissionError, match=r"^\[1\]\.partnerId: .*not configured"):
        submit_file(
            [CONNECTION],
            path,
            sessions=sessions,
            clients={"default": client},
            now=T0,
        )

    assert rows(sessions, LedgerLine) == []
    assert venue.calls == Counter()


# --- actions on an order ------------------------------------------------------------------

ORDER_ID = "0b7d6c5e-4f3a-4b2c-9d1e-8f7a6b5c4d3e"
MID_FLIGHT = "Order is mid-flight (status Processing...); retry once it has settled."
# The older synchronous version's refusal (ChannelMgrOrderAgent DeleteOrder at 43834b3b8).
BEING_PROCESSED = "Order is currently being processed; retry once it has settled."
# ChannelMgrOrderAgent GetOrder and the others; "{order}" is the order's id as the test
# case spells it.
NOT_FOUND = "Order '{order}' not found Not Found"


def action_request(operation: OutboxOperation) -> dict[str, Any] | None:
    """A valid stored body for ``operation``."""
    if operation is OutboxOperation.CONFIRM:
        return {"paymentReference": "PAY-1"}
    if operation is OutboxOperation.REPLACE:
        return order_body()
    return None


def test_an_action_is_recorded_for_an_order_and_never_as_a_create(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """A confirm names its order, due now; a create or a body that does not fit is refused."""
    with sessions.begin() as session:
        row = record_action(
            session,
            connection_id,
            OutboxOperation.CONFIRM,
            "{" + ORDER_ID.upper() + "}",
            now=T0,
            request={"paymentReference": "PAY-1"},
        )
        with pytest.raises(ValueError, match="record_submission"):
            record_action(session, connection_id, OutboxOperation.CREATE, ORDER_ID, now=T0)
        with pytest.raises(ValueError, match="delete takes no request"):
            record_action(
                session, connection_id, OutboxOperation.DELETE, ORDER_ID, now=T0, request={}
            )

    assert (row.order_id, row.state, row.next_attempt_at) == (ORDER_ID, OutboxState.PENDING, T0)
    assert row.ledger_line_id is None


# (operation, the venue's answer: status and message, what the send comes to)
ACTION_FAILURES = [
    (OutboxOperation.CONFIRM, 400, MID_FLIGHT, SendOutcome.RETRYING),
    (OutboxOperation.REPLACE, 400, MID_FLIGHT, SendOutcome.RETRYING),
    (OutboxOperation.DELETE, 400, MID_FLIGHT, SendOutcome.FAILED),
    (OutboxOperation.DELETE, 400, "Unexpected error; try again", SendOutcome.RETRYING),
    (OutboxOperation.CONFIRM, 503, "busy", SendOutcome.RETRYING),
    (OutboxOperation.DELETE, 401, "Missing or invalid API key", SendOutcome.RETRYING),
    (OutboxOperation.CONFIRM, 400, "Order cannot be confirmed in status Error", SendOutcome.FAILED),
    (OutboxOperation.DELETE, 400, BEING_PROCESSED, SendOutcome.FAILED),
    (OutboxOperation.CONFIRM, 400, BEING_PROCESSED, SendOutcome.RETRYING),
    (OutboxOperation.REPLACE, 404, NOT_FOUND, SendOutcome.FAILED),
    (OutboxOperation.CONFIRM, 404, NOT_FOUND, SendOutcome.FAILED),
    (OutboxOperation.DELETE, 404, NOT_FOUND, SendOutcome.SENT),
    # A 404 that names the order in another spelling or wording still says it is gone.
    (OutboxOperation.DELETE, 404, "{order_lower} not found", SendOutcome.SENT),
    # 404s that do not name the order are not a verdict on it: an unmatched route
    # (ChannelMgrApi Handle), an unknown module echoing the path (APIRequestProcessor
    # ProcessRequest), the gateway's own.
    (OutboxOperation.DELETE, 404, "API endpoint not found Not Found", SendOutcome.RETRYING),
    (OutboxOperation.CONFIRM, 404, "API endpoint not found Not Found", SendOutcome.RETRYING),
    (OutboxOperation.REPLACE, 404, "/channelManagr/{order_lower} Not Found", SendOutcome.RETRYING),
    (OutboxOperation.DELETE, 404, "Resource not found", SendOutcome.RETRYING),
]


def test_an_actions_failure_is_retried_refused_or_the_order_gone(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """Transient failures wait their backoff, except a delete of an order in flight (a
    person's cancel is refused, not carried out later), in the current and the older
    wording; a refusal fails the row and queues a fresh getOrder; a 404 naming the order
    fails a confirm or replace and is a delete's goal reached; any other 404 is retried.

    ChannelMgrOrderAgent DeleteOrder (current and at 43834b3b8), GetOrder, ConfirmOrder,
    ReplaceOrder; ChannelMgrApi Handle; APIRequestProcessor ProcessRequest.
    """
    for operation, status, template, outcome in ACTION_FAILURES:
        order_id = str(uuid.uuid4())
        message = template.format(order=guid_caption(order_id), order_lower=order_id)
        case = f"{operation} answered {status} {message!r}"
        code = "resource_not_found" if status == 404 else "generic_error"
        venue.answers = [error(status, message, code=code)]

        result = act_now(
            sessions,
            client,
            connection_id,
            operation,
            order_id,
            now=T0,
            request=action_request(operation),
            owner="tester",
        )

        assert result.outcome is outcome, case
        assert venue.answers == [], case
        with sessions.begin() as session:
            row = session.scalars(sa.select(Outbox).where(Outbox.order_id == order_id)).one()
            lookups = session.scalars(sa.select(Inbox.id).where(Inbox.order_id == order_id)).all()
        expected = {
            SendOutcome.RETRYING: OutboxState.PENDING,
            SendOutcome.FAILED: OutboxState.FAILED,
            SendOutcome.SENT: OutboxState.SENT,
        }[outcome]
        assert (row.operation, row.state) == (operation, expected), case
        if outcome is SendOutcome.RETRYING:
            assert row.next_attempt_at > T0, case
        refused = outcome is SendOutcome.FAILED and status == 400
        assert len(lookups) == (1 if refused else 0), case
        gone = status == 404 and outcome is not SendOutcome.RETRYING
        assert result.removed is gone, case
        if gone:
            assert row.last_error == (None if outcome is SendOutcome.SENT else NO_LONGER_KNOWN)


def test_a_pass_sends_every_operation(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """One pass claims creates and actions alike, oldest first, and sends each; a row
    waiting behind an earlier row of its order is claimed once that one is sent."""
    confirmed = {**venue.store(order_body("OTHER-1"), status="Issued"), "orderId": ORDER_ID}
    venue.answers = [httpx.Response(200, json=confirmed), httpx.Response(200, content=b"")]
    with sessions.begin() as session:
        record_submission(session, connection_id, order_request(), now=T0)
        for operation in (OutboxOperation.CONFIRM, OutboxOperation.DELETE):
            record_action(
                session,
                connection_id,
                operation,
                ORDER_ID,
                now=T0,
                request=action_request(operation),
            )

    first = run_outbox_once(sessions, {connection_id: client}, owner="w", now=T0)
    second = run_outbox_once(sessions, {connection_id: client}, owner="w", now=T0)

    # The delete waits for the confirm of the same order; rows are claimed one at a
    # time, so it follows in the same pass and the next pass finds nothing.
    assert (first.claimed, first.sent, first.removed, second.claimed) == (3, 3, 1, 0)
    assert [(r.operation, r.state) for r in rows(sessions, Outbox)] == [
        (OutboxOperation.CREATE, OutboxState.SENT),
        (OutboxOperation.CONFIRM, OutboxState.SENT),
        (OutboxOperation.DELETE, OutboxState.SENT),
    ]
    sources = {order_id: changes for order_id, _, changes in mirrored(sessions)}
    assert sources[ORDER_ID] == [ChangeSource.CONFIRM, ChangeSource.DELETE]


# --- deleteOrder: "Cancelled" whether kept or removed -------------------------------------


def mirror_venue_order(
    sessions: sessionmaker[Session], venue: FakeVenue, connection_id: int, status: str
) -> str:
    """An order the venue has in ``status``, mirrored as such; its orderId."""
    order = venue.store(order_body(unique_reference()), status=status)
    with sessions.begin() as session:
        upsert_order(
            session,
            connection_id,
            Order.model_validate(order),
            source=ChangeSource.FETCH,
            observed_at=T0,
        )
    return str(order["orderId"])


def cancelled_answer(venue: FakeVenue, order_id: str) -> httpx.Response:
    """deleteOrder's 200: the order marked Cancelled, no items, no status message or job."""
    marked = {**venue.orders[order_id], "status": "Cancelled", "items": [], "jobId": ""}
    return httpx.Response(200, json=marked)


def delete_now(
    sessions: sessionmaker[Session], client: VenueClient, connection_id: int, order_id: str
) -> Any:
    """``act_now`` of a deleteOrder at T0."""
    return act_now(
        sessions, client, connection_id, OutboxOperation.DELETE, order_id, now=T0, owner="t"
    )


def mirrored_order(sessions: sessionmaker[Session], order_id: str) -> VenueOrder:
    """The mirror's row of ``order_id``."""
    with sessions.begin() as session:
        row = session.scalars(sa.select(VenueOrder).where(VenueOrder.order_id == order_id)).one()
        session.expunge(row)
        return row


@pytest.mark.parametrize("status", ["Draft", "Error"])
def test_deleting_a_draft_or_error_order_answered_cancelled_records_it_removed(
    sessions: sessionmaker[Session],
    client: VenueClient,
    venue: FakeVenue,
    connection_id: int,
    status: str,
) -> None:
    """The answer says Cancelled, yet the order is gone: getOrder's 404 decides "removed".

    CMOrderIssuer ``DeleteOrder`` marks a Draft or Error order Cancelled
    (``DestroyOrderAssets``) and then deletes it; ChannelMgrOrderAgent ``DeleteOrder``
    answers the record as marked; ``GetOrder`` then answers 404.
    """
    order_id = mirror_venue_order(sessions, venue, connection_id, status)
    venue.answers = [cancelled_answer(venue, order_id)]
    del venue.orders[order_id]

    result = delete_now(sessions, client, connection_id, order_id)

    assert (result.outcome, result.removed) == (SendOutcome.SENT, True)
    assert (venue.calls["delete"], venue.calls["get"]) == (1, 1)
    row = mirrored_order(sessions, order_id)
    assert row.removed_at == T0
    assert row.status is OrderStatus(status)  # never Cancelled: it was not kept


def test_deleting_an_issued_order_keeps_it_cancelled_as_getorder_shows(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """An Issued order is kept as Cancelled: the getOrder after the delete is mirrored.

    CMOrderIssuer ``DeleteOrder`` keeps Issued and Cancelled orders (header not deleted),
    their assets and lines destroyed by ``DestroyOrderAssets``.
    """
    order_id = mirror_venue_order(sessions, venue, connection_id, "Issued")
    venue.answers = [cancelled_answer(venue, order_id)]
    venue.orders[order_id] = {**venue.orders[order_id], "status": "Cancelled", "items": []}

    result = delete_now(sessions, client, connection_id, order_id)

    assert (result.outcome, result.removed) == (SendOutcome.SENT, False)
    assert result.order is not None and result.order.status is OrderStatus.CANCELLED
    row = mirrored_order(sessions, order_id)
    assert (row.status, row.removed_at) == (OrderStatus.CANCELLED, None)


@pytest.mark.parametrize(
    "message",
    ["API endpoint not found Not Found", "/channelManagr/{order} Not Found", "Not Found"],
)
def test_a_404_not_naming_the_order_does_not_confirm_a_delete(
    sessions: sessionmaker[Session],
    client: VenueClient,
    venue: FakeVenue,
    connection_id: int,
    message: str,
) -> None:
    """The delete landed, but its getOrder met a 404 that names no order: not "removed".

    ChannelMgrOrderAgent GetOrder answers a missing order "Order '{GUID}' not found";
    ChannelMgrApi Handle answers an unmatched route "API endpoint not found" and
    APIRequestProcessor ProcessRequest an unknown module with the path. Neither says the
    order is gone: the mirror is left to the worker's getOrder, a lookup is queued.
    """
    order_id = mirror_venue_order(sessions, venue, connection_id, "Draft")
    venue.answers = [cancelled_answer(venue, order_id)]
    venue.get_answers = [error(404, message.format(order=order_id), code="resource_not_found")]

    result = delete_now(sessions, client, connection_id, order_id)

    assert result.outcome is SendOutcome.SENT
    row = mirrored_order(sessions, order_id)
    assert (row.status, row.removed_at) == (OrderStatus.DRAFT, None)
    with sessions.begin() as session:
        lookups = session.scalars(sa.select(Inbox.event_name).where(Inbox.order_id == order_id))
        assert len(list(lookups)) == 1


def test_a_delete_whose_answer_was_lost_is_found_removed_by_its_retry(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """The venue deleted the Draft but the answer was lost; the retry's 404 records removed.

    ChannelMgrOrderAgent ``DeleteOrder``: an order no longer there is "not found" (404).
    """
    order_id = mirror_venue_order(sessions, venue, connection_id, "Draft")

    def lost(request: httpx.Request) -> httpx.Response:
        venue.orders.pop(order_id, None)
        raise httpx.ReadTimeout("the answer was lost")

    with open_client(
        CONNECTION, transport=httpx.MockTransport(lost), retry=ONCE, throttle=Throttle()
    ) as losing:
        first = delete_now(sessions, losing, connection_id, order_id)
    assert first.outcome is SendOutcome.RETRYING
    assert mirrored_order(sessions, order_id).removed_at is None

    venue.answers = [error(404, f"Order '{order_id}' not found", code="resource_not_found")]
    later = first.next_attempt_at
    assert later is not None
    retried = run_outbox_once(sessions, {connection_id: client}, owner="w", now=later)

    assert (retried.sent, retried.removed) == (1, 1)
    assert mirrored_order(sessions, order_id).removed_at == later


def test_a_delete_whose_confirmation_fails_leaves_the_mirror_to_the_worker(
    sessions: sessionmaker[Session], venue: FakeVenue, connection_id: int
) -> None:
    """getOrder failing after the delete: the state before says "removed"; nothing mirrored.

    CMOrderIssuer ``DeleteOrder`` (a Draft is deleted): the answer's Cancelled is not
    mirrored; a lookup is queued so that the worker's getOrder settles the mirror.
    """
    order_id = mirror_venue_order(sessions, venue, connection_id, "Draft")
    venue.answers = [cancelled_answer(venue, order_id)]

    def busy_get(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return error(503, "busy")
        return venue.handle(request)

    with open_client(
        CONNECTION, transport=httpx.MockTransport(busy_get), retry=ONCE, throttle=Throttle()
    ) as flaky:
        result = delete_now(sessions, flaky, connection_id, order_id)

    assert (result.outcome, result.removed) == (SendOutcome.SENT, True)
    row = mirrored_order(sessions, order_id)
    assert (row.status, row.removed_at) == (OrderStatus.DRAFT, None)
    with sessions.begin() as session:
        queued = session.scalars(sa.select(Inbox).where(Inbox.order_id == order_id)).one()
    assert queued.state is InboxState.PENDING


# --- against the sandbox, over HTTP ---------------------------------------------------------


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    """The sandbox on a free port, picking up only when told (``tick``)."""
    with SandboxServer(SandboxConfig(pickup_interval=0)) as server:
        yield server


def sandbox_connection(server: SandboxServer, name: str = "sandbox") -> VenueConnection:
    """A venue connection to ``server``, as its ``/_sandbox/config`` describes it."""
    config = server.config
    return VenueConnection(
        name=name,
        api_base_url=server.url,
        tenant=config.tenant,
        environment=config.environment,
        company=config.company,
        api_key=config.api_key,
        partner_ids=[partner.id for partner in config.partners if partner.active],
    )


@pytest.fixture
def sandbox_client(sandbox: SandboxServer) -> Iterator[VenueClient]:
    """A venue client of the sandbox, trying each call once."""
    with open_client(sandbox_connection(sandbox), retry=ONCE, throttle=Throttle()) as venue_client:
        yield venue_client


def unique_reference() -> str:
    """A reference no other test uses."""
    return f"SHOP-{uuid.uuid4().hex[:10].upper()}"


def test_submitting_to_the_sandbox_mirrors_the_submitted_order(
    sessions: sessionmaker[Session],
    sandbox: SandboxServer,
    sandbox_client: VenueClient,
    connection_id: int,
) -> None:
    """Over HTTP: Submitted, mirrored from submit; the venue's pickup does not touch the mirror."""
    reference = unique_reference()

    outcome = submit(sessions, sandbox_client, connection_id, reference, now=utcnow())
    sandbox.tick()

    assert outcome.status is SubmitStatus.SENT
    assert outcome.order_status is OrderStatus.SUBMITTED
    assert (outcome.buy_from_order_reference or "").startswith("CM-")
    assert mirrored(sessions) == [(outcome.order_id, OrderStatus.SUBMITTED, [ChangeSource.SUBMIT])]
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.order_id) == (OutboxState.SENT, outcome.order_id)
    # The venue issued it; learning that is the worker's job (webhook, poll), not this path's.
    assert sandbox_client.get_order(outcome.order_id).status is OrderStatus.ISSUED


def test_a_reference_the_sandbox_already_has_resolves_to_its_order(
    sessions: sessionmaker[Session],
    sandbox_client: VenueClient,
    connection_id: int,
) -> None:
    """Over HTTP: an order created earlier (answer lost) is found by reference, not doubled."""
    reference = unique_reference()
    earlier = sandbox_client.create_order(order_request(reference))

    outcome = submit(sessions, sandbox_client, connection_id, reference, now=utcnow())

    assert outcome.status is SubmitStatus.SENT
    assert outcome.order_id == earlier.order_id
    assert outcome.message == "found at the venue by its reference"
    assert len(sandbox_client.find_by_reference(PARTNER, reference)) == 1
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.order_id) == (OutboxState.SENT, earlier.order_id)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {
                "items": [
                    {
                        "itemNumber": "99999",
                        "visitDate": future(),
                        "visitTime": "10:30:00",
                        "quantity": 1,
                    }
                ]
            },
            "Unknown item '99999'",
        ),
        (
            {
                "items": [
                    {
                        "itemNumber": "31001",
                        "visitDate": "2020-01-01",
                        "visitTime": "10:30:00",
                        "quantity": 1,
                    }
                ]
            },
            "items[0] visitDate must not be in the past (received 2020-01-01, local today ",
        ),
        (
            {"partnerId": INACTIVE_PARTNER},
            f"Partner '{DEFAULT_PARTNERS[2].name}' is not active",
        ),
    ],
)
def test_the_sandboxs_validation_message_fails_the_row(
    sessions: sessionmaker[Session],
    sandbox_client: VenueClient,
    connection_id: int,
    changes: dict[str, Any],
    message: str,
) -> None:
    """Over HTTP: the venue's own refusal is kept on the failed row; the sale stays."""
    outcome = submit(
        sessions, sandbox_client, connection_id, unique_reference(), now=utcnow(), **changes
    )

    assert outcome.status is SubmitStatus.FAILED
    assert outcome.code == "generic_error"
    assert outcome.message is not None and outcome.message.startswith(message)
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.last_error) == (OutboxState.FAILED, outcome.message)
    assert len(rows(sessions, LedgerLine)) == 1
    assert mirrored(sessions) == []


def test_the_sandboxs_synchronous_mode_is_stored_as_settled(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Over HTTP, the older synchronous API: Issued at once, stored as settled."""
    with (
        SandboxServer(SandboxConfig(pickup_interval=0, legacy_sync=True)) as legacy,
        open_client(sandbox_connection(legacy), retry=ONCE, throttle=Throttle()) as legacy_client,
    ):
        outcome = submit(sessions, legacy_client, connection_id, unique_reference(), now=utcnow())

    assert outcome.status is SubmitStatus.SENT
    assert outcome.order_status is OrderStatus.ISSUED
    assert outcome.buy_from_order_reference is None
    [(_, status, sources)] = mirrored(sessions)
    assert (status, sources) == (OrderStatus.ISSUED, [ChangeSource.SUBMIT])
    assert len(rows(sessions, Wallet)) == 3
    with sessions.begin() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(StatusChange)) == 1


def test_the_sandboxs_404s_say_gone_only_when_they_name_the_order(
    sessions: sessionmaker[Session], sandbox: SandboxServer, connection_id: int
) -> None:
    """Over HTTP: an unknown order's 404 completes a delete; a wrong address's 404 does not.

    ChannelMgrOrderAgent DeleteOrder answers a missing order "Order '{GUID}' not found";
    a 404 for an address the venue does not serve (here an unknown company) names no order,
    so the delete waits and tries again and nothing is marked removed.
    """
    gone_id, other_id = str(uuid.uuid4()), str(uuid.uuid4())
    wrong = sandbox_connection(sandbox).model_copy(update={"company": "No Such Company"})
    with (
        open_client(sandbox_connection(sandbox), retry=ONCE, throttle=Throttle()) as right,
        open_client(wrong, retry=ONCE, throttle=Throttle()) as misaddressed,
    ):
        gone = delete_now(sessions, right, connection_id, gone_id)
        unserved = delete_now(sessions, misaddressed, connection_id, other_id)

    assert (gone.outcome, gone.removed) == (SendOutcome.SENT, True)
    assert (unserved.outcome, unserved.removed) == (SendOutcome.RETRYING, False)
    with sessions.begin() as session:
        row = session.scalars(sa.select(Outbox).where(Outbox.order_id == other_id)).one()
    assert row.state is OutboxState.PENDING
    assert row.last_error is not None and "HTTP 404" in row.last_error


def test_a_confirm_whose_payment_reference_the_venue_would_cut_is_not_sent(
    sessions: sessionmaker[Session], client: VenueClient, venue: FakeVenue, connection_id: int
) -> None:
    """ChannelMgrOrderAgent ConfirmOrder copies paymentReference into CMOrder's Code[50]
    with CopyStr: a longer one would be cut. The stored confirm is refused with the reason
    and nothing is sent (the same body would fail every attempt)."""
    result = act_now(
        sessions,
        client,
        connection_id,
        OutboxOperation.CONFIRM,
        ORDER_ID,
        now=T0,
        request={"paymentReference": "P" * 51},
        owner="tester",
    )

    assert result.outcome is SendOutcome.FAILED
    assert venue.calls["confirm"] == 0
    with sessions.begin() as session:
        row = session.scalars(sa.select(Outbox).where(Outbox.order_id == ORDER_ID)).one()
    assert row.last_error is not None and "at most 50 characters" in row.last_error


@pytest.mark.parametrize("spelling", ["braced-upper", "digits-only"])
def test_a_partner_id_in_another_guid_spelling_is_the_configured_partner(spelling: str) -> None:
    """ChannelMgrOrderAgent TryParseHeader reads partnerId with Evaluate into a Guid, so
    ``{21E8…}`` and the 32 digits name the same partner: otacm takes them as the
    configured partner and keeps it as the venue writes it."""
    written = (
        "{" + PARTNER.upper() + "}" if spelling == "braced-upper" else PARTNER.replace("-", "")
    )
    sale = parse_submission(order_body(partnerId=written))
    check_connection(CONNECTION, sale.request)


def test_at_a_venue_on_the_older_version_a_payment_reference_over_twenty_is_not_sent(
    sessions: sessionmaker[Session], venue: FakeVenue, connection_id: int
) -> None:
    """The older synchronous version's CMOrder.PaymentReference is a Code[20] (43834b3b8,
    ChannelMgrOrderAgent TryParseHeader / ConfirmOrder cut it): with the connection's
    payment_reference_max_chars at 20, a sale or a confirm with 21 characters is refused
    naming paymentReference, and 20 pass."""
    older = CONNECTION.model_copy(update={"payment_reference_max_chars": 20})
    sale = parse_submission(order_body(paymentReference="P" * 21))
    with pytest.raises(SubmissionError) as refused:
        check_connection(older, sale.request)
    assert refused.value.field == "paymentReference"
    assert "at most 20 characters" in refused.value.problem
    fits = parse_submission(order_body(paymentReference="P" * 20))
    check_connection(older, fits.request)

    with open_client(
        older, transport=httpx.MockTransport(venue.handle), retry=ONCE, throttle=Throttle()
    ) as client:
        result = act_now(
            sessions,
            client,
            connection_id,
            OutboxOperation.CONFIRM,
            ORDER_ID,
            now=T0,
            request={"paymentReference": "P" * 21},
            owner="tester",
        )

    assert result.outcome is SendOutcome.FAILED
    assert venue.calls["confirm"] == 0
