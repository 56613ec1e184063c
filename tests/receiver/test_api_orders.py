"""``POST /api/orders`` through the receiver app, against the sandbox over real HTTP.

The app comes from ``receiver.create_app(settings)`` with one connection to a running
sandbox (``pickup_interval=0``); the :data:`receiver.api.api` blueprint is registered here
if the factory does not register it yet, and its venue clients try each call once, so a
sandbox answering 503 makes a quick 202. Every answer is checked against what is stored.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from decimal import Decimal
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from orders.sender import run_outbox_once
from otacm.settings import Settings
from receiver.api import CLIENT_FACTORY
from sandbox import SandboxConfig, SandboxServer
from sandbox.config import DEFAULT_PARTNERS
from storage.models import (
    ChangeSource,
    LedgerLine,
    Outbox,
    OutboxState,
    VenueOrder,
    ensure_connection,
)
from tests.orders.test_outbox import (
    INACTIVE_PARTNER,
    ONCE,
    future,
    mirrored,
    order_body,
    rows,
    sandbox_connection,
    unique_reference,
)
from tests.receiver.conftest import settings_for
from venue.client import VenueClient, open_client
from venue.connection import VenueConnection
from venue.endpoints import CallObserver
from venue.models import OrderStatus
from venue.throttle import Throttle

ORDERS = "/api/orders"
API_TOKEN = "shop-api-token-1"


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    """The sandbox on a free port, picking up only when told."""
    with SandboxServer(SandboxConfig(pickup_interval=0)) as server:
        yield server


@pytest.fixture
def admin(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    """An HTTP client of the sandbox's ``/_sandbox`` admin endpoints."""
    with httpx.Client(base_url=f"{sandbox.url}/_sandbox", timeout=10) as client:
        yield client


def api_app(make_app: Callable[[Settings], Flask], settings: Settings) -> Flask:
    """A receiver app serving ``POST /api/orders``, its venue clients trying once."""
    app = make_app(settings)

    def venue_client(
        connection: VenueConnection, observer: CallObserver
    ) -> AbstractContextManager[VenueClient]:
        return open_client(connection, retry=ONCE, throttle=Throttle(), observer=observer)

    app.extensions[CLIENT_FACTORY] = venue_client
    return app


@pytest.fixture
def http(
    migrated_engine: sa.Engine, make_app: Callable[[Settings], Flask], sandbox: SandboxServer
) -> FlaskClient:
    """A test client of the app, with one venue connection: the sandbox."""
    settings = settings_for(migrated_engine, connections=[sandbox_connection(sandbox)])
    return api_client(make_app, settings)


def api_client(make_app: Callable[[Settings], Flask], settings: Settings) -> FlaskClient:
    """A test client of the API app that sends one of its two configured tokens."""
    tokens = [SecretStr("old-token"), SecretStr(API_TOKEN)]
    client = api_app(make_app, settings.model_copy(update={"api_tokens": tokens})).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {API_TOKEN}"
    return client


def post(http: FlaskClient, body: Any) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON; the status and the decoded answer."""
    response = http.post(ORDERS, json=body)
    return response.status_code, dict(response.get_json())


def test_a_valid_order_is_sent_and_answered_201(
    http: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """201 with the venue's order; the sale, the sent row and the mirror are stored."""
    reference = unique_reference()

    status, body = post(http, {**order_body(reference), "amount": 300.10, "currency": "DKK"})

    assert status == 201, body
    assert body["outcome"] == "sent"
    assert body["status"] == "Submitted"
    assert body["buyFromOrderReference"].startswith("CM-")
    assert (body["reference"], body["connection"]) == (reference, "sandbox")
    [line] = rows(sessions, LedgerLine)
    # Exact, never through float: 300.10 is not a binary fraction.
    assert (line.amount, line.currency, line.quantity) == (Decimal("300.10"), "DKK", 3)
    [outbox] = rows(sessions, Outbox)
    assert (outbox.state, outbox.order_id) == (OutboxState.SENT, body["orderId"])
    assert mirrored(sessions) == [(body["orderId"], OrderStatus.SUBMITTED, [ChangeSource.SUBMIT])]


def test_the_same_order_again_is_answered_200_with_the_existing_order(
    http: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """Idempotent: a repeat is 200 ``duplicate`` with the same order; nothing doubled."""
    body = order_body(unique_reference())
    first_status, first = post(http, body)

    status, again = post(http, body)

    assert (first_status, status) == (201, 200)
    assert again["outcome"] == "duplicate"
    assert (again["orderId"], again["buyFromOrderReference"]) == (
        first["orderId"],
        first["buyFromOrderReference"],
    )
    assert len(rows(sessions, LedgerLine)) == len(rows(sessions, Outbox)) == 1


def test_an_unavailable_venue_is_answered_202_and_the_outbox_sends_later(
    http: FlaskClient,
    sessions: sessionmaker[Session],
    sandbox: SandboxServer,
    admin: httpx.Client,
) -> None:
    """503 from the venue: 202 "recorded, will retry"; once it is back, a pass sends it."""
    admin.post("/faults", json={"rate503": 1.0}).raise_for_status()

    status, body = post(http, order_body(unique_reference()))

    assert status == 202, body
    assert body["outcome"] == "recorded"
    assert body["orderId"] is None
    assert "will retry" in body["message"]
    [outbox] = rows(sessions, Outbox)
    assert outbox.state is OutboxState.PENDING
    assert dt.datetime.fromisoformat(body["nextAttemptAt"]) == outbox.next_attempt_at

    admin.post("/faults", json={"rate503": 0.0}).raise_for_status()
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "sandbox")
    with open_client(sandbox_connection(sandbox), retry=ONCE, throttle=Throttle()) as client:
        report = run_outbox_once(
            sessions, {connection_id: client}, owner="worker", now=outbox.next_attempt_at
        )
    assert report.sent == 1
    [outbox] = rows(sessions, Outbox)
    assert outbox.state is OutboxState.SENT


def test_a_refused_order_is_answered_422_with_the_venues_message(
    http: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """422 with the venue's code and message; the sale stays recorded, its row failed."""
    items = [{"itemNumber": "99999", "visitDate": future(), "visitTime": "10:30:00", "quantity": 1}]

    status, body = post(http, order_body(unique_reference(), items=items))

    assert status == 422
    assert body == {"status": 422, "code": "generic_error", "message": "Unknown item '99999'"}
    [outbox] = rows(sessions, Outbox)
    assert outbox.state is OutboxState.FAILED
    assert len(rows(sessions, LedgerLine)) == 1


def test_an_inactive_partner_is_answered_422(
    migrated_engine: sa.Engine, make_app: Callable[[Settings], Flask], sandbox: SandboxServer
) -> None:
    """The sandbox's refusal of an inactive partner (configured all the same) reaches the
    caller as it is (ChannelMgrOrderAgent ``TryGetPartnerSetup``)."""
    connection = sandbox_connection(sandbox)
    connection = connection.model_copy(
        update={"partner_ids": [*connection.partner_ids, INACTIVE_PARTNER]}
    )
    http = api_client(make_app, settings_for(migrated_engine, connections=[connection]))
    status, body = post(http, order_body(unique_reference(), partnerId=INACTIVE_PARTNER))

    assert status == 422
    assert body["message"] == f"Partner '{DEFAULT_PARTNERS[2].name}' is not active"


def test_a_partner_not_configured_is_answered_400_and_nothing_sent(
    http: FlaskClient, sessions: sessionmaker[Session], admin: httpx.Client
) -> None:
    """A sale for a partner the connection does not configure is refused before the venue.

    The venue would take it (ChannelMgrOrderAgent ``CreateOrder`` checks only the
    partner's setup), but otacm follows only the configured partners' orders: this one
    would be sent and never mirrored nor reconciled.
    """
    status, body = post(http, order_body(unique_reference(), partnerId=INACTIVE_PARTNER))

    assert status == 400
    assert body["code"] == "invalid_order"
    assert body["message"].startswith("partnerId: ")
    assert "not configured for venue connection 'sandbox'" in body["message"]
    assert rows(sessions, LedgerLine) == []
    assert "createOrder" not in admin.get("/stats").json()["calls"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"items": []}, "items"),
        ({"sellToOrderReference": None}, "sellToOrderReference"),
        ({"amount": "12.50"}, "currency"),
        (
            {
                "items": [
                    {
                        "itemNumber": "31001",
                        "visitDate": "tomorrow",
                        "visitTime": "10:30:00",
                        "quantity": 1,
                    }
                ]
            },
            "items[0].visitDate",
        ),
        ({"sellToName": "Jane\u0000Doe"}, "sellToName"),
        ({"partnerId": "f" * 65}, "partnerId"),
        ({"partnerId": "not-a-guid"}, "partnerId"),
        ({"sellToEmail": "e" * 101}, "sellToEmail"),
        ({"sellToLanguage": "ENGLISH-GB1"}, "sellToLanguage"),
        (
            {
                "items": [
                    {
                        "itemNumber": "31001",
                        "visitDate": "2099-06-01",
                        "visitTime": "10:30:00",
                        "sellToEmail": "e" * 101,
                    }
                ]
            },
            "items[0].sellToEmail",
        ),
        (
            {
                "items": [
                    {
                        "itemNumber": "31001",
                        "visitDate": "2099-06-01",
                        "visitTime": "10:30:00",
                        "wallet": {
                            "componentSchedule": [
                                {"itemNumber": "31002", "visitDate": "2099-06-01"}
                            ]
                        },
                    }
                ]
            },
            "items[0].wallet.componentSchedule[0].visitTime",
        ),
        (
            {
                "items": [
                    {
                        "itemNumber": "31001",
                        "visitDate": "2099-06-01",
                        "visitTime": "10:30:00",
                        "quantity": 2**30,
                    },
                    {
                        "itemNumber": "31001",
                        "visitDate": "2099-06-01",
                        "visitTime": "10:30:00",
                        "quantity": 2**30,
                    },
                ]
            },
            "items",
        ),
    ],
)
def test_an_invalid_order_is_answered_400_naming_the_field(
    http: FlaskClient,
    sessions: sessionmaker[Session],
    admin: httpx.Client,
    change: dict[str, Any],
    field: str,
) -> None:
    """400 ``invalid_order`` whose message starts with the field; nothing stored or sent."""
    status, body = post(http, order_body(unique_reference(), **change))

    assert status == 400
    assert body["code"] == "invalid_order"
    assert body["message"].startswith(f"{field}: ")
    assert rows(sessions, LedgerLine) == []
    assert "createOrder" not in admin.get("/stats").json()["calls"]


def _line(**changes: Any) -> dict[str, Any]:
    base = {"itemNumber": "31001", "visitDate": "2099-06-01", "visitTime": "10:30:00"}
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


VENUE_REFUSALS = {
    "visitTime missing": ({"items": [_line(visitTime=None)]}, "items[0].visitTime"),
    "visitTime HH:MM": ({"items": [_line(visitTime="10:30")]}, "items[0].visitTime"),
    "visitTime fraction": (
        {"items": [_line(), _line(visitTime="10:30:00.250")]},
        "items[1].visitTime",
    ),
    "visitDate not YYYY-MM-DD": ({"items": [_line(visitDate="2099-6-1")]}, "items[0].visitDate"),
    "quantity zero": ({"items": [_line(quantity=0)]}, "items[0].quantity"),
    "names empty": ({"items": [_line(wallet={"names": []})]}, "items[0].wallet.names"),
    "references empty": (
        {"items": [_line(wallet={"externalReferenceNumbers": []})]},
        "items[0].wallet.externalReferenceNumbers",
    ),
    "names of another count": (
        {"items": [_line(quantity=3, wallet={"names": ["A", "B"]})]},
        "items[0].wallet",
    ),
}


@pytest.mark.parametrize(("change", "field"), VENUE_REFUSALS.values(), ids=list(VENUE_REFUSALS))
def test_what_the_venue_would_refuse_is_refused_first_naming_the_field(
    http: FlaskClient,
    sessions: sessionmaker[Session],
    admin: httpx.Client,
    change: dict[str, Any],
    field: str,
) -> None:
    """ChannelMgrOrderAgent TryParseItem / GetRequiredTimeField / GetRequiredDateField /
    TryParseWalletBlock: POST /api/orders answers 400 ``{status, code, message}`` with the
    message starting with the field; nothing is recorded and the venue is not called."""
    status, body = post(http, order_body(unique_reference(), **change))

    assert status == 400
    assert (body["status"], body["code"]) == (400, "invalid_order")
    assert body["message"].startswith(f"{field}: ")
    assert rows(sessions, LedgerLine) == []
    assert "createOrder" not in admin.get("/stats").json()["calls"]


def test_a_body_that_is_not_json_is_answered_400(
    http: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """400 ``invalid_json``; a body not declared as JSON is 415."""
    broken = http.post(ORDERS, data="{nope", content_type="application/json")
    text = http.post(ORDERS, data="hello", content_type="text/plain")
    nan = json.dumps({**order_body(unique_reference()), "amount": "@", "currency": "DKK"})
    not_a_number = http.post(
        ORDERS, data=nan.replace('"@"', "NaN"), content_type="application/json"
    )

    assert (broken.status_code, broken.get_json()["code"]) == (400, "invalid_json")
    assert not_a_number.status_code == 400
    assert not_a_number.get_json()["code"] == "invalid_json"
    assert "NaN is not a JSON value" in not_a_number.get_json()["message"]
    assert (text.status_code, text.get_json()["code"]) == (415, "unsupported_media_type")
    assert rows(sessions, LedgerLine) == []


def test_an_unknown_or_missing_connection_is_answered_400(
    migrated_engine: sa.Engine,
    make_app: Callable[[Settings], Flask],
    sandbox: SandboxServer,
    sessions: sessionmaker[Session],
) -> None:
    """With two connections a submission must name one, and one that exists."""
    settings = settings_for(
        migrated_engine,
        connections=[sandbox_connection(sandbox), sandbox_connection(sandbox, "second")],
    )
    http = api_client(make_app, settings)
    body = order_body(unique_reference())

    unnamed_status, unnamed = post(http, body)
    unknown_status, unknown = post(http, {**body, "connection": "nope"})
    named_status, named = post(http, {**body, "connection": "second"})

    assert (unnamed_status, unnamed["code"]) == (400, "unknown_connection")
    assert unnamed["message"].startswith("connection: required when several")
    assert (unknown_status, unknown["code"]) == (400, "unknown_connection")
    assert "'nope'" in unknown["message"]
    assert (named_status, named["connection"]) == (201, "second")
    with sessions.begin() as session:
        [order] = session.scalars(sa.select(VenueOrder)).all()
        assert order.connection_id == ensure_connection(session, "second")


def test_the_answer_never_carries_customer_data(http: FlaskClient) -> None:
    """The 201 body names the order, not the customer it was sold to."""
    response = http.post(ORDERS, json=order_body(unique_reference()))

    assert response.status_code == 201
    text = response.get_data(as_text=True)
    assert "Jane Doe" not in text and "guest@example.com" not in text
    assert json.loads(text)["orderId"]


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", f"Basic {API_TOKEN}", "Bearer "],
)
def test_orders_without_a_valid_token_are_refused_401(
    http: FlaskClient, sessions: sessionmaker[Session], authorization: str | None
) -> None:
    """No token, a wrong one or another scheme: 401 not_authorized, nothing recorded."""
    headers = {} if authorization is None else {"Authorization": authorization}
    if authorization is None:
        del http.environ_base["HTTP_AUTHORIZATION"]
    response = http.post(ORDERS, json=order_body(unique_reference()), headers=headers)
    assert response.status_code == 401
    assert response.get_json()["code"] == "not_authorized"
    assert rows(sessions, LedgerLine) == []


def test_the_api_is_closed_while_no_token_is_configured(
    migrated_engine: sa.Engine, make_app: Callable[[Settings], Flask], sandbox: SandboxServer
) -> None:
    """With no OTACM_API_TOKENS, every API request is refused, saying how to open it."""
    settings = settings_for(migrated_engine, connections=[sandbox_connection(sandbox)])
    response = (
        api_app(make_app, settings)
        .test_client()
        .post(ORDERS, json=order_body(unique_reference()), headers={"Authorization": "Bearer x"})
    )
    assert response.status_code == 401
    assert "OTACM_API_TOKENS" in response.get_json()["message"]


def test_the_apis_venue_calls_are_in_metrics(http: FlaskClient) -> None:
    """After a submission, /metrics counts the createOrder call by endpoint and status."""
    status, _ = post(http, order_body(unique_reference()))
    assert status == 201
    metrics = http.get("/metrics").get_data(as_text=True)
    assert 'otacm_venue_calls_total{endpoint="createOrder",status="201"} 1.0' in metrics
    assert 'otacm_venue_call_seconds_count{endpoint="createOrder"} 1.0' in metrics
