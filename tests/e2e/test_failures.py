"""End to end over real HTTP: bad input refused with nothing stored, and a database that
is briefly unavailable costing nothing.

Each test runs on SQLite and on PostgreSQL (``migrated_engine``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from receiver.webhook import WEBHOOK_PATH
from sandbox.webhooks import APP_ID
from tests.e2e.conftest import API_TOKEN, CLIENT_STATE, E2E, line, metric, wait_until

JSON = {"Content-Type": "application/json"}


def notification(order_id: str, *, state: str = CLIENT_STATE, **changes: Any) -> dict[str, Any]:
    """An ``ota_cm_order_processed`` notification as the sandbox sends it."""
    return {
        "appId": APP_ID,
        "clientState": state,
        "eventName": "ota_cm_order_processed",
        "eventVersion": "1.0",
        "timestamp": "2025-06-01T10:00:00Z",
        "companyName": "CRONUS International Ltd.",
        "payload": {"orderId": order_id, "buyFromOrderReference": "CM-1", "status": "Issued"},
        **changes,
    }


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """``response`` is the receiver's one JSON error shape with ``status`` and ``code``."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"status", "code", "message"}
    assert (body["status"], body["code"]) == (status, code)
    assert body["message"]
    assert CLIENT_STATE not in body["message"]
    return dict(body)


def test_bad_webhooks_and_submissions_are_refused_with_nothing_stored(e2e: E2E) -> None:
    """Forged, oversized, non-JSON and malformed requests: each its error; no row changes."""
    paid = e2e.order_body("BAD-001", items=[line("40100", 2)])
    assert e2e.submit(paid).status_code == 201
    e2e.deliver()
    e2e.worker.drain()
    (row,) = e2e.inbox()
    order_id = row.order_id
    assert order_id is not None
    e2e.assert_mirrored([order_id])
    before = e2e.snapshot()
    new_order = "0f0f0f0f-1111-4222-8333-444455556666"
    webhook_limit = e2e.settings.webhook_max_bytes

    refusals: list[tuple[str, Callable[[], httpx.Response], int, str]] = [
        (
            "a forged clientState",
            lambda: e2e.http.post(
                WEBHOOK_PATH, json={"value": [notification(new_order, state="forged")]}
            ),
            401,
            "unknown_client_state",
        ),
        (
            "one forged notification among good ones",
            lambda: e2e.http.post(
                WEBHOOK_PATH,
                json={"value": [notification(new_order), notification(order_id, state="x")]},
            ),
            401,
            "unknown_client_state",
        ),
        (
            "a body over webhook_max_bytes",
            lambda: e2e.http.post(
                WEBHOOK_PATH,
                json={"value": [notification(new_order, padding="x" * webhook_limit)]},
            ),
            413,
            "body_too_large",
        ),
        (
            "a chunked body over webhook_max_bytes",
            lambda: e2e.http.post(
                WEBHOOK_PATH,
                content=iter([b'{"value": [', b" " * webhook_limit, b"]}"]),
                headers=JSON,
            ),
            413,
            "body_too_large",
        ),
        (
            "a body that is not declared JSON",
            lambda: e2e.http.post(
                WEBHOOK_PATH,
                content=json.dumps(notification(new_order)),
                headers={"Content-Type": "text/plain"},
            ),
            415,
            "unsupported_media_type",
        ),
        (
            "a body declared JSON that is not",
            lambda: e2e.http.post(WEBHOOK_PATH, content=b'{"value": [', headers=JSON),
            400,
            "invalid_json",
        ),
        (
            "a body that is not UTF-8",
            lambda: e2e.http.post(WEBHOOK_PATH, content=b'{"value": "\xff"}', headers=JSON),
            400,
            "invalid_json",
        ),
        (
            "no envelope",
            lambda: e2e.http.post(WEBHOOK_PATH, json={"value": "not a list"}),
            400,
            "invalid_notification",
        ),
        (
            "a notification without orderId, after a good one",
            lambda: e2e.http.post(
                WEBHOOK_PATH,
                json={"values": [notification(new_order), notification("", payload={})]},
            ),
            400,
            "invalid_notification",
        ),
        (
            "a bare notification without clientState",
            lambda: e2e.http.post(
                WEBHOOK_PATH,
                json={k: v for k, v in notification(new_order).items() if k != "clientState"},
            ),
            400,
            "invalid_notification",
        ),
        (
            "a submission without a token",
            lambda: e2e.submit(e2e.order_body("BAD-002"), token=None),
            401,
            "not_authorized",
        ),
        (
            "a submission with a wrong token",
            lambda: e2e.submit(e2e.order_body("BAD-002"), token=API_TOKEN + "x"),
            401,
            "not_authorized",
        ),
        (
            "a submission with a quantity of 0",
            lambda: e2e.submit(e2e.order_body("BAD-002", items=[line(quantity=0)])),
            400,
            "invalid_order",
        ),
        (
            "a submission that is not JSON",
            lambda: e2e.http.post(
                "/api/orders",
                content=b"reference=BAD-002",
                headers={
                    "Authorization": f"Bearer {API_TOKEN}",
                    "Content-Type": "application/x-www-form-urlencoded",
                },
            ),
            415,
            "unsupported_media_type",
        ),
    ]
    for what, send, status, code in refusals:
        body = assert_error(send(), status, code)
        assert e2e.snapshot() == before, f"{what} changed the database ({body})"

    again = e2e.submit(paid)  # the same sale again: answered, nothing doubled
    assert again.status_code == 200, again.text
    assert (again.json()["outcome"], again.json()["orderId"]) == ("duplicate", order_id)
    assert e2e.snapshot() == before
    assert e2e.calls("createOrder") == 1


def test_a_subscription_with_a_forged_state_is_refused_for_real(e2e: E2E) -> None:
    """The sandbox delivering with a state otacm does not know gets 401, and gives up."""
    e2e.venue.delete_subscription(e2e.subscription_id)
    forged = e2e.venue.create_subscription(f"{e2e.receiver_url}{WEBHOOK_PATH}", "forged-state")
    assert forged.id
    before = e2e.snapshot()

    e2e.create("FORGED-001")
    e2e.deliver()

    webhooks = e2e.stats()["webhooks"]
    assert (webhooks["sent"], webhooks["failed"], webhooks["posts"]) == (0, 1, 1)
    assert webhooks["retries"] == 0  # a 4xx is final: the venue does not retry it
    assert e2e.snapshot() == before
    metrics = e2e.http.get("/metrics").text
    assert metric(metrics, "otacm_webhook_rejections_total", code="unknown_client_state") == 1


@contextmanager
def database_locked(e2e: E2E, engine: sa.Engine) -> Iterator[None]:
    """Another session holds the lock every inbox write needs, for the ``with`` block.

    SQLite: a connection of its own holds ``BEGIN EXCLUSIVE`` on the file. PostgreSQL:
    a session holds ``LOCK TABLE inbox IN ACCESS EXCLUSIVE MODE``.
    """
    if engine.dialect.name == "sqlite":
        assert engine.url.database
        holder = sqlite3.connect(engine.url.database, isolation_level=None, timeout=10)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            yield
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        return
    with engine.connect() as connection, connection.begin() as transaction:
        connection.execute(sa.text("LOCK TABLE inbox IN ACCESS EXCLUSIVE MODE"))
        yield
        transaction.rollback()


@pytest.mark.parametrize("settings_changes", [{"db_lock_timeout": 0.3}], ids=["lock0.3s"])
def test_a_locked_database_gets_503_and_loses_nothing(e2e: E2E, migrated_engine: sa.Engine) -> None:
    """While the inbox cannot be written the receiver answers 503; the retry stores all."""
    order_ids = e2e.create_many(4, "LOCKED")

    with database_locked(e2e, migrated_engine):
        e2e.tick()
        wait_until(
            lambda: e2e.stats()["webhooks"]["retries"] >= 2,
            15,
            what="the sandbox to retry after 503s",
        )
        assert e2e.stats()["webhooks"]["sent"] == 0

    e2e.settle_webhooks()
    webhooks = e2e.stats()["webhooks"]
    assert (webhooks["sent"], webhooks["failed"], webhooks["pending"]) == (4, 0, 0)
    assert webhooks["posts"] == webhooks["retries"] + 1  # one batch, tried until stored
    metrics = e2e.http.get("/metrics").text
    refused = metric(metrics, "otacm_webhook_rejections_total", code="database_unavailable")
    assert refused == webhooks["retries"]  # every refusal was a 503 for the database
    assert metric(metrics, "otacm_webhook_notifications_total", outcome="stored") == 4
    assert sorted(e2e.notified()) == sorted(order_ids)

    e2e.worker.drain()
    e2e.assert_mirrored(order_ids)
    assert e2e.inbox_states() == {"done": 4}
    assert all(e2e.history(order_id) == [("Issued", "webhook")] for order_id in order_ids)
    assert e2e.calls("getOrder") == 4
