"""The shop's read API: an order by reference or id, the change feed, the OpenAPI document
(:mod:`receiver.api_reads`, :mod:`receiver.openapi`), on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from openapi_spec_validator import validate
from pydantic import SecretStr
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy.orm import Session, sessionmaker

from orders.mirror import mark_removed, upsert_order
from otacm.settings import Settings
from sandbox import SandboxConfig, SandboxServer
from storage.engine import make_sessions
from storage.models import ChangeSource, ensure_connection
from tests.orders.test_outbox import sandbox_connection
from tests.receiver.test_api_orders import api_app
from tests.storage.test_models import ORDER_ID, T0, parse, wire_order
from venue.models import Order

TOKEN = "shop-read-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def order(status: str = "Submitted", *, n: int = 0, minted: bool = False) -> Order:
    raw = wire_order(status, minted=minted)
    raw["orderId"] = f"{n:08x}-0000-4000-8000-000000000000" if n else ORDER_ID
    raw["sellToOrderReference"] = f"SHOP-{1001 + n}"
    return parse(raw)


@pytest.fixture
def sessions(migrated_engine: sa.Engine) -> sessionmaker[Session]:
    return make_sessions(migrated_engine)


@pytest.fixture
def client(make_app: Callable[[Settings], Flask], settings: Settings) -> FlaskClient:
    app = make_app(settings.model_copy(update={"api_tokens": [SecretStr(TOKEN)]}))
    return app.test_client()


def store(
    sessions: sessionmaker[Session],
    wire: Order,
    *,
    connection: str = "venue-a",
    at: dt.datetime = T0,
) -> None:
    with sessions.begin() as session:
        connection_id = ensure_connection(session, connection)
        upsert_order(session, connection_id, wire, source=ChangeSource.WEBHOOK, observed_at=at)


def test_an_order_by_reference_and_by_id_with_its_tickets(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """Status, the venue's document number, lines, wallets with prices and assets, and the
    timeline; the same by orderId (any case); an unknown one is a 404."""
    store(sessions, order())
    store(sessions, order("Issued", minted=True), at=T0 + dt.timedelta(minutes=1))
    answer = client.get("/api/orders/shop-1001", headers=AUTH)
    assert answer.status_code == 200, answer.json
    body: dict[str, Any] = answer.json  # type: ignore[assignment]
    assert (body["orderId"], body["status"], body["connection"]) == (ORDER_ID, "Issued", "venue-a")
    assert body["buyFromOrderReference"] == "CM-20260515093000-A1B2"
    wallet = body["items"][0]["wallets"][0]
    assert wallet["walletReferenceNumber"] == "WR-0001-EXT-1"
    assert (wallet["externalReferenceNumber"], wallet["name"]) == ("EXT-1", "Visitor 1")
    assert (wallet["unitPriceInclVat"], wallet["currencyCode"]) == ("125.00", "DKK")
    assert wallet["manifestUrl"] == "https://manifest.example/w/1"
    assert [a["referenceNumber"] for a in wallet["assets"]] == ["REF101", "REF102"]
    assert [(s["status"], s["source"]) for s in body["timeline"]] == [
        ("Submitted", "webhook"),
        ("Issued", "webhook"),
    ]
    assert "sellToEmail" not in body
    by_id = client.get(f"/api/orders/by-id/{ORDER_ID.upper()}", headers=AUTH)
    assert by_id.json == body
    missing = client.get("/api/orders/SHOP-404", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json == {
        "status": 404,
        "code": "not_found",
        "message": "no order has the reference 'SHOP-404'",
    }
    assert client.get("/api/orders/by-id/not-a-guid", headers=AUTH).status_code == 404


def test_etag_answers_304_until_the_order_changes(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    store(sessions, order())
    first = client.get("/api/orders/SHOP-1001", headers=AUTH)
    tag = first.headers["ETag"]
    again = client.get("/api/orders/SHOP-1001", headers={**AUTH, "If-None-Match": tag})
    assert (again.status_code, again.data, again.headers["ETag"]) == (304, b"", tag)
    store(sessions, order("Issued", minted=True), at=T0 + dt.timedelta(minutes=1))
    changed = client.get("/api/orders/SHOP-1001", headers={**AUTH, "If-None-Match": tag})
    assert changed.status_code == 200
    assert changed.headers["ETag"] != tag


def test_a_reference_under_two_connections_must_name_one(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    store(sessions, order(), connection="venue-a")
    store(sessions, order(n=7), connection="venue-b")  # another order...
    with sessions.begin() as session:  # ...given the same shop reference at venue b
        session.execute(
            sa.text(
                "UPDATE venue_order SET sell_to_order_reference = 'SHOP-1001', "
                "reference_key = 'SHOP-1001' WHERE order_id LIKE '00000007%'"
            )
        )
    ambiguous = client.get("/api/orders/SHOP-1001", headers=AUTH)
    assert (ambiguous.status_code, ambiguous.json["code"]) == (409, "ambiguous_reference")  # type: ignore[index]
    assert "venue-a, venue-b" in ambiguous.json["message"]  # type: ignore[index]
    named = client.get("/api/orders/SHOP-1001?connection=venue-b", headers=AUTH)
    assert named.json["connection"] == "venue-b"  # type: ignore[index]
    unknown = client.get("/api/orders/SHOP-1001?connection=venue-z", headers=AUTH)
    assert (unknown.status_code, unknown.json["code"]) == (404, "unknown_connection")  # type: ignore[index]


def test_the_api_needs_a_token(client: FlaskClient, sessions: sessionmaker[Session]) -> None:
    store(sessions, order())
    for path in ("/api/orders/SHOP-1001", f"/api/orders/by-id/{ORDER_ID}", "/api/orders"):
        answer = client.get(path, headers={"Authorization": "Bearer wrong"})
        assert (answer.status_code, answer.json["code"]) == (401, "not_authorized")  # type: ignore[index]


def read_all(
    client: FlaskClient, cursor: str | None = None, **query: str
) -> tuple[list[dict[str, Any]], str]:
    """Every page from ``cursor`` on: the orders and the last cursor."""
    seen: list[dict[str, Any]] = []
    while True:
        params = {**query, **({"cursor": cursor} if cursor else {})}
        page = client.get("/api/orders", headers=AUTH, query_string=params)
        assert page.status_code == 200, page.json
        body: dict[str, Any] = page.json  # type: ignore[assignment]
        seen.extend(body["orders"])
        cursor = body["cursor"]
        if not body["more"]:
            return seen, cursor  # type: ignore[return-value]


def test_the_change_feed_pages_in_change_order_and_reads_on_from_its_cursor(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """Five orders read in pages of two; two change later: read on from the cursor, only
    those two come, in the order they changed; filters by status; bad queries are 400."""
    for n in range(1, 6):
        store(sessions, order(n=n))
    seen, cursor = read_all(client, limit="2")
    assert [o["sellToOrderReference"] for o in seen] == [f"SHOP-{1001 + n}" for n in range(1, 6)]
    assert read_all(client, cursor)[0] == []
    later = T0 + dt.timedelta(minutes=5)
    store(sessions, order("Issued", n=4, minted=True), at=later)
    with sessions.begin() as session:
        mark_removed(
            session,
            ensure_connection(session, "venue-a"),
            order(n=2).order_id,
            later,
            ChangeSource.FETCH,
        )
    changed, _ = read_all(client, cursor)
    assert [(o["sellToOrderReference"], o["status"]) for o in changed] == [
        ("SHOP-1005", "Issued"),
        ("SHOP-1003", "Submitted"),
    ]
    assert changed[1]["removedAt"] is not None
    issued, _ = read_all(client, status="Issued")
    assert [o["sellToOrderReference"] for o in issued] == ["SHOP-1005"]
    for bad in (
        {"cursor": "nonsense!"},
        {"limit": "0"},
        {"status": "Lost"},
        {"changed_since": "yesterday"},
        {"limit": "1", "cursor": "a", "extra": "x"},
    ):
        answer = client.get("/api/orders", headers=AUTH, query_string=bad)
        assert (answer.status_code, answer.json["code"]) == (400, "invalid_query"), bad  # type: ignore[index]


def test_the_change_feed_loses_and_repeats_nothing_under_concurrent_writes(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """Writers store and issue 60 orders while a reader follows the feed from its cursor:
    the reader ends with every order in its last state, and each change once."""
    total = 60
    done = threading.Event()
    failures: list[BaseException] = []

    def write(first: int) -> None:
        try:
            for n in range(first, total + 1, 2):
                store(sessions, order(n=n))
                store(sessions, order("Issued", n=n, minted=True), at=T0 + dt.timedelta(1))
        except BaseException as exc:
            failures.append(exc)

    writers = [threading.Thread(target=write, args=(first,)) for first in (1, 2)]
    for writer in writers:
        writer.start()
    threading.Thread(target=lambda: ([w.join() for w in writers], done.set())).start()
    latest: dict[str, str] = {}
    cursor: str | None = None
    reads: list[tuple[str, str]] = []
    while True:
        finished = done.is_set()
        seen, cursor = read_all(client, cursor, limit="7")
        for o in seen:
            reads.append((o["orderId"], o["status"]))
            latest[o["orderId"]] = o["status"]
        if finished:
            break
    assert failures == []
    assert len(latest) == total
    assert set(latest.values()) == {"Issued"}
    assert len(reads) == len(set(reads))  # no order twice in one state


# --- the OpenAPI document -----------------------------------------------------------------


def test_the_openapi_document_is_valid_3_1_and_names_every_read(client: FlaskClient) -> None:
    """Served without a token; a valid OpenAPI 3.1 document; the read API's paths, their
    answers' schemas from the models, the bearer scheme."""
    answer = client.get("/api/openapi.json")
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json  # type: ignore[assignment]
    validate(document)
    assert document["openapi"] == "3.1.0"
    assert {"/api/orders", "/api/orders/{reference}", "/api/orders/by-id/{order_id}"} <= set(
        document["paths"]
    )
    wallet = document["components"]["schemas"]["ShopWallet"]
    assert {"walletReferenceNumber", "manifestUrl", "assets"} <= set(wallet["properties"])
    assert document["components"]["securitySchemes"]["bearerToken"]["scheme"] == "bearer"
    assert client.get("/api/docs/swagger/").status_code == 404  # no page loading scripts


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig(pickup_interval=0)) as server:
        yield server


def test_the_api_keeps_its_contract(
    make_app: Callable[[Settings], Flask],
    settings: Settings,
    sessions: sessionmaker[Session],
    sandbox: SandboxServer,
) -> None:
    """Schemathesis generates requests from the served document, valid and not, for every
    operation — submissions sent to the sandbox — and every answer has a documented
    status and the documented shape, none a server error. (Its pytest plugin is not
    used: it reads a private attribute of pytest's that pytest 9.2 no longer has.)

    For ``POST /api/orders`` the check that a schema-valid body is accepted is left out:
    what the venue refuses beyond JSON Schema (an unknown partner or catalog item, a
    connection name not configured, text no column takes) is a 4xx by design."""
    app = api_app(
        make_app,
        settings.model_copy(
            update={
                "api_tokens": [SecretStr(TOKEN)],
                "connections": [sandbox_connection(sandbox, "venue-a")],
            }
        ),
    )
    store(sessions, order("Issued", minted=True))
    for n in range(1, 4):
        store(sessions, order(n=n))
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert sorted(f"{op.method.upper()} {op.path}" for op in operations) == [
        "GET /api/orders",
        "GET /api/orders/by-id/{order_id}",
        "GET /api/orders/{reference}",
        "POST /api/orders",
    ]
    for operation in operations:

        @given(case=operation.as_strategy())
        @examples(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        def keeps_the_contract(case: Any) -> None:
            post = case.operation.method.upper() == "POST"
            excluded = [positive_data_acceptance] if post else []
            case.call_and_validate(headers=AUTH, excluded_checks=excluded)

        keeps_the_contract()
