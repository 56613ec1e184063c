"""The webhook view through Flask's test client, on SQLite and PostgreSQL: what is stored,
what is refused with which answer, and that a refusal changes nothing already stored."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from orders import inbox
from otacm.settings import Settings
from receiver.webhook import WEBHOOK_PATH
from storage.engine import DriverTransaction, make_engine, make_sessions
from storage.migrate import upgrade
from storage.models import Inbox, InboxSource, InboxState, VenueConnection
from storage.testing import throwaway_postgresql
from tests.receiver.conftest import settings_for
from tests.receiver.notifications import (
    ALL_STATES,
    STATE_A,
    STATE_A_NEXT,
    STATE_B,
    notification,
    order_id,
)

OTHER_EVENT = "some_other_event"


def post(client: FlaskClient, body: Any, **kwargs: Any) -> Any:
    """POST ``body`` as JSON to the webhook."""
    return client.post(WEBHOOK_PATH, json=body, **kwargs)


def stored_rows(sessions: sessionmaker[Session]) -> list[dict[str, Any]]:
    """Every inbox row, oldest first, as a dict of its columns."""
    with sessions.begin() as session:
        rows = session.execute(sa.select(Inbox.__table__).order_by(Inbox.id)).mappings().all()
        return [dict(row) for row in rows]


def connection_ids(sessions: sessionmaker[Session]) -> dict[str, int]:
    """The venue connections' row ids, by name."""
    with sessions.begin() as session:
        return dict(session.execute(sa.select(VenueConnection.name, VenueConnection.id)).all())


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """The response is the receiver's one JSON error shape with ``status`` and ``code``."""
    assert response.status_code == status
    assert response.mimetype == "application/json"
    body: dict[str, Any] = response.get_json()
    assert set(body) == {"status", "code", "message"}
    assert body["status"] == status
    assert body["code"] == code
    assert body["message"]
    return body


# --- stored ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["value", "values", "bare"])
def test_each_envelope_shape_is_stored(
    client: FlaskClient, sessions: sessionmaker[Session], shape: str
) -> None:
    """All three envelope shapes store their notification, with every column filled."""
    order = order_id().upper()
    sent = notification(order, status="Draft", timestamp="2024-01-15T10:30:00Z")
    body = {"value": {"value": [sent]}, "values": {"values": [sent]}, "bare": sent}[shape]
    before = dt.datetime.now(dt.UTC)

    response = post(client, body)

    assert response.status_code == 200
    assert response.get_json() == {"stored": 1, "duplicates": 0}
    [row] = stored_rows(sessions)
    assert row["connection_id"] == connection_ids(sessions)["venue-a"]
    assert row["source"] == InboxSource.WEBHOOK
    assert row["state"] == InboxState.PENDING
    assert row["event_name"] == "ota_cm_order_processed"
    assert row["order_id"] == order.lower()
    assert row["buy_from_order_reference"] == "CM-20240115103000-A1B2"
    assert row["notified_status"] == "Draft"
    assert row["notified_at"] == dt.datetime(2024, 1, 15, 10, 30, tzinfo=dt.UTC)
    assert before <= row["received_at"] <= dt.datetime.now(dt.UTC)
    assert row["next_attempt_at"] == row["received_at"]
    assert row["attempts"] == 0
    expected_payload = {k: v for k, v in sent.items() if k != "clientState"}
    assert row["payload"] == expected_payload


def test_a_batch_of_twenty_is_stored_in_one_insert(
    client: FlaskClient, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty notifications in one POST are stored by a single INSERT statement."""
    batch = [notification() for _ in range(20)]
    statements: list[str] = []
    send = DriverTransaction.returning

    def recording(self: DriverTransaction, statement: str, parameters: Any) -> list[Any]:
        statements.append(statement)
        return send(self, statement, parameters)

    monkeypatch.setattr(DriverTransaction, "returning", recording)
    response = post(client, {"value": batch})

    assert response.get_json() == {"stored": 20, "duplicates": 0}
    assert len(statements) == 1
    assert statements[0].startswith("INSERT INTO inbox")
    stored = [row["order_id"] for row in stored_rows(sessions)]
    assert sorted(stored) == sorted(n["payload"]["orderId"] for n in batch)


def test_a_batch_larger_than_one_statement_is_stored_whole_or_not_at_all(
    client: FlaskClient, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 notifications at 40 rows per INSERT take three, in one transaction; a failing
    third stores none of them."""
    monkeypatch.setattr(inbox, "_ROWS_PER_STATEMENT", 40)
    batch = [notification() for _ in range(100)]
    statements: list[int] = []
    send = DriverTransaction.returning

    def failing_third(self: DriverTransaction, statement: str, parameters: Any) -> list[Any]:
        statements.append(statement.count("), (") + 1)  # rows in this INSERT
        if len(statements) == 3:
            raise sa.exc.OperationalError(statement, None, Exception("database is locked"))
        return send(self, statement, parameters)

    monkeypatch.setattr(DriverTransaction, "returning", failing_third)
    refused = post(client, {"value": batch})

    assert refused.status_code == 503
    assert stored_rows(sessions) == []

    response = post(client, {"value": batch})

    assert response.get_json() == {"stored": 100, "duplicates": 0}
    assert statements == [40, 40, 20, 40, 40, 20]
    assert len(stored_rows(sessions)) == 100
    assert post(client, {"value": batch}).get_json() == {"stored": 0, "duplicates": 100}


def test_an_exact_repeat_is_not_stored_twice(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """A repeated notification counts as a duplicate, in a later POST or in the same one."""
    sent = notification()

    first = post(client, {"value": [sent]})
    again = post(client, {"value": [sent]})
    twice_in_one = post(client, {"value": [sent, sent]})
    rotated = post(client, {"value": [{**sent, "clientState": STATE_A_NEXT}]})

    assert first.get_json() == {"stored": 1, "duplicates": 0}
    assert again.get_json() == {"stored": 0, "duplicates": 1}
    assert twice_in_one.get_json() == {"stored": 0, "duplicates": 2}
    # The clientState is no part of what a notification says: a rotation repeats it.
    assert rotated.get_json() == {"stored": 0, "duplicates": 1}
    assert len(stored_rows(sessions)) == 1


def test_a_new_notification_for_the_same_order_is_stored(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """After a replace, the same order notified again (new time and status) is a new row."""
    order = order_id()
    post(client, {"value": [notification(order, status="Error")]})

    response = post(
        client,
        {"value": [notification(order, status="Issued", timestamp="2024-01-15T11:02:00Z")]},
    )

    assert response.get_json() == {"stored": 1, "duplicates": 0}
    rows = stored_rows(sessions)
    assert [(r["order_id"], r["notified_status"]) for r in rows] == [
        (order, "Error"),
        (order, "Issued"),
    ]


def test_notifications_of_other_events_are_stored(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """A notification of another event is stored and acknowledged, with no order fields."""
    other = notification(event=OTHER_EVENT)
    other["payload"] = {"somethingElse": 42}

    response = post(client, {"value": [other, notification()]})

    assert response.get_json() == {"stored": 2, "duplicates": 0}
    first = stored_rows(sessions)[0]
    assert first["event_name"] == OTHER_EVENT
    assert (first["order_id"], first["buy_from_order_reference"], first["notified_status"]) == (
        None,
        None,
        None,
    )
    assert first["payload"]["payload"] == {"somethingElse": 42}


def test_unknown_fields_are_stored_not_refused(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """Fields the spec does not name, in the notification or its payload, are kept."""
    sent = notification(companyId="c0ffee", futureField={"nested": [1, 2]})
    sent["payload"]["newField"] = "x"
    sent["payload"]["status"] = "SomeFutureStatus"

    response = post(client, {"value": [sent], "envelopeExtra": True})

    assert response.status_code == 200
    [row] = stored_rows(sessions)
    assert row["payload"]["futureField"] == {"nested": [1, 2]}
    assert row["payload"]["payload"]["newField"] == "x"
    assert row["notified_status"] == "SomeFutureStatus"


def test_notifications_are_attributed_to_the_connection_of_their_state(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """With two connections, each row belongs to the connection whose state it carries."""
    for_a, for_a_rotated, for_b = order_id(), order_id(), order_id()

    response = post(
        client,
        {
            "value": [
                notification(for_a, state=STATE_A),
                notification(for_a_rotated, state=STATE_A_NEXT),
                notification(for_b, state=STATE_B),
            ]
        },
    )

    assert response.get_json() == {"stored": 3, "duplicates": 0}
    ids = connection_ids(sessions)
    owners = {row["order_id"]: row["connection_id"] for row in stored_rows(sessions)}
    assert owners == {for_a: ids["venue-a"], for_a_rotated: ids["venue-a"], for_b: ids["venue-b"]}


# --- refused -----------------------------------------------------------------------------


@pytest.fixture
def stored_before(client: FlaskClient, sessions: sessionmaker[Session]) -> list[dict[str, Any]]:
    """One notification already stored, to prove that refusals leave it alone."""
    assert post(client, {"value": [notification()]}).status_code == 200
    return stored_rows(sessions)


def test_a_body_over_the_limit_by_content_length_is_413(
    settings: Settings,
    client: FlaskClient,
    sessions: sessionmaker[Session],
    stored_before: list[dict[str, Any]],
) -> None:
    """A Content-Length over ``webhook_max_bytes`` is refused before the body is read."""
    big = json.dumps({"value": [notification(padding="x" * settings.webhook_max_bytes)]})

    response = client.post(WEBHOOK_PATH, data=big, content_type="application/json")

    body = assert_error(response, 413, "body_too_large")
    assert str(settings.webhook_max_bytes) in body["message"]
    assert stored_rows(sessions) == stored_before


def _body_of_size(size: int) -> bytes:
    """A valid webhook body of exactly ``size`` bytes."""
    sent = notification(padding="")
    sent["padding"] = "x" * (size - len(json.dumps({"value": [sent]})))
    body = json.dumps({"value": [sent]}).encode()
    assert len(body) == size
    return body


@pytest.mark.parametrize(("extra", "status"), [(0, 200), (1, 413)], ids=["at-limit", "over"])
def test_a_chunked_body_is_measured_while_it_is_read(
    settings: Settings,
    client: FlaskClient,
    sessions: sessionmaker[Session],
    stored_before: list[dict[str, Any]],
    extra: int,
    status: int,
) -> None:
    """Without Content-Length (chunked), a body of the limit is read, one byte more is 413."""
    body = _body_of_size(settings.webhook_max_bytes + extra)

    response = client.post(
        WEBHOOK_PATH,
        input_stream=io.BytesIO(body),
        content_type="application/json",
        # No Content-Length, and a server that de-chunks the body (gunicorn, werkzeug's).
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )

    assert response.status_code == status
    if status == 413:
        assert_error(response, 413, "body_too_large")
        assert stored_rows(sessions) == stored_before
    else:
        assert len(stored_rows(sessions)) == len(stored_before) + 1


def test_a_utf8_body_may_start_with_a_byte_order_mark(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """RFC 8259 lets a parser ignore a leading BOM, and some senders write one."""
    sent = notification()
    body = b"\xef\xbb\xbf" + json.dumps({"value": [sent]}).encode()

    response = client.post(WEBHOOK_PATH, data=body, content_type="application/json")

    assert response.get_json() == {"stored": 1, "duplicates": 0}
    assert [row["order_id"] for row in stored_rows(sessions)] == [sent["payload"]["orderId"]]


def _with_raw_extra(value: str) -> str:
    """A notification's JSON with a field ``extra`` whose value is ``value`` as written."""
    return json.dumps({"value": [notification(extra="@")]}).replace('"@"', value)


@pytest.mark.parametrize(
    ("content_type", "data", "status", "code"),
    [
        ("text/plain", json.dumps(notification()), 415, "unsupported_media_type"),
        (None, json.dumps(notification()), 415, "unsupported_media_type"),
        ("application/x-www-form-urlencoded", "a=b", 415, "unsupported_media_type"),
        ("application/json", '{"value": [', 400, "invalid_json"),
        ("application/json", b"\xff\xfe\xfa{}", 400, "invalid_json"),
        ("application/json", "", 400, "invalid_json"),
        ("application/json", "[" * 100_000, 400, "invalid_json"),
        ("application/json", _with_raw_extra("NaN"), 400, "invalid_json"),
        ("application/json", _with_raw_extra("-Infinity"), 400, "invalid_json"),
        ("application/json", _with_raw_extra("1e400"), 400, "invalid_json"),
        ("application/json", _with_raw_extra("9" * 5000), 400, "invalid_json"),
        ("application/json", json.dumps(notification()).encode("utf-16"), 400, "invalid_json"),
    ],
    ids=[
        "text",
        "no-type",
        "form",
        "truncated",
        "not-utf8",
        "empty",
        "deep",
        "nan",
        "infinity",
        "float-out-of-range",
        "too-many-digits",
        "utf-16",
    ],
)
def test_a_body_that_is_not_json_is_refused(
    make_app: Callable[[Settings], Flask],
    settings: Settings,
    sessions: sessionmaker[Session],
    content_type: str | None,
    data: str | bytes,
    status: int,
    code: str,
) -> None:
    """Not declared as JSON is 415; declared but not decodable is 400; nothing stored."""
    client = make_app(settings.model_copy(update={"webhook_max_bytes": 200_000})).test_client()
    headers = {"Content-Type": content_type} if content_type else {}

    response = client.post(WEBHOOK_PATH, data=data, headers=headers)

    assert_error(response, status, code)
    assert stored_rows(sessions) == []


def _without(notification_: dict[str, Any], *path: str) -> dict[str, Any]:
    copy = json.loads(json.dumps(notification_))
    target = copy
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return copy


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"value": [_without(notification(), "clientState")]}, "value.0.clientState"),
        ({"values": [notification(), _without(notification(), "eventName")]}, "values.1.eventName"),
        (_without(notification(), "eventName"), "eventName"),
        ({"value": [_without(notification(), "payload", "orderId")]}, "value.0.payload.orderId"),
        ({"value": [notification(payload={"orderId": 7})]}, "value.0.payload.orderId"),
        ({"value": [notification(timestamp="yesterday")]}, "value.0.timestamp"),
        ({"value": [notification(payload="not an object")]}, "value.0.payload"),
        ({"value": [notification(event="e" * 101)]}, "value.0.eventName"),
        ({"value": [notification(event="ota_cm\u0000")]}, "value.0.eventName"),
        ({"value": [notification(event="ota_cm_\ud800")]}, "value.0.eventName"),
        ({"value": [notification(), notification("0rder\u0000")]}, "value.1.payload.orderId"),
        ({"value": [notification("\udfff0rder")]}, "value.0.payload.orderId"),
        ({"value": {"not": "a list"}}, "value"),
        ([notification()], "body"),
    ],
    ids=[
        "no-client-state",
        "no-event-name",
        "bare-no-event-name",
        "no-order-id",
        "order-id-not-text",
        "bad-timestamp",
        "payload-not-object",
        "event-name-too-long",
        "event-name-nul",
        "event-name-lone-surrogate",
        "order-id-nul",
        "order-id-lone-surrogate",
        "value-not-list",
        "array",
    ],
)
def test_an_invalid_envelope_is_400_naming_the_field(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    stored_before: list[dict[str, Any]],
    body: Any,
    field: str,
) -> None:
    """An envelope that is none of the shapes, or an invalid notification, names the field."""
    response = post(client, body)

    message = assert_error(response, 400, "invalid_notification")["message"]
    assert message.startswith(f"{field}: ")
    assert stored_rows(sessions) == stored_before


@pytest.mark.parametrize("text", ["Iss\u0000ued", "\ud800Issued"], ids=["nul", "lone-surrogate"])
def test_a_hint_no_column_can_take_is_left_out_and_kept_in_the_payload(
    client: FlaskClient, sessions: sessionmaker[Session], text: str
) -> None:
    """A status or reference with a NUL or an unpaired surrogate is stored without its hint
    column (the same on both databases); the payload keeps it, escaped."""
    sent = notification(status=text, reference=text)

    response = post(client, {"value": [sent]})

    assert response.get_json() == {"stored": 1, "duplicates": 0}
    (row,) = stored_rows(sessions)
    assert (row["notified_status"], row["buy_from_order_reference"]) == (None, None)
    assert row["order_id"] == sent["payload"]["orderId"]
    assert row["payload"]["payload"]["status"] == text
    assert row["payload"]["payload"]["buyFromOrderReference"] == text


def test_an_unknown_client_state_is_401_and_nothing_is_stored(
    client: FlaskClient, sessions: sessionmaker[Session], stored_before: list[dict[str, Any]]
) -> None:
    """One notification with an unknown state refuses the whole POST; nothing is stored."""
    batch = [notification(), notification(state="forged-state"), notification()]

    response = post(client, {"value": batch})

    body = assert_error(response, 401, "unknown_client_state")
    assert "value.1.clientState" in body["message"]
    assert "forged-state" not in response.get_data(as_text=True)
    assert stored_rows(sessions) == stored_before


def test_an_invalid_notification_is_400_even_beside_an_unknown_state(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """The checklist's order: an unreadable POST is a 400 before any state is judged."""
    batch = [notification(state="forged-state"), _without(notification(), "payload", "orderId")]

    response = post(client, {"value": batch})

    assert_error(response, 400, "invalid_notification")
    assert stored_rows(sessions) == []


def test_both_states_of_a_rotation_are_accepted(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """During a rotation the old and the new client state both authenticate."""
    old = post(client, {"value": [notification(state=STATE_A)]})
    new = post(client, {"value": [notification(state=STATE_A_NEXT)]})

    assert (old.status_code, new.status_code) == (200, 200)
    assert {row["connection_id"] for row in stored_rows(sessions)} == {
        connection_ids(sessions)["venue-a"]
    }


def test_no_client_state_reaches_the_logs(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Stored, duplicate, refused and invalid POSTs log no client state, even at DEBUG."""
    caplog.set_level(logging.DEBUG)
    sent = notification(state=STATE_B)

    post(client, {"value": [sent, notification(state=STATE_A_NEXT)]})
    post(client, {"value": [sent]})
    post(client, {"value": [notification(state="forged-state-1234")]})
    post(client, {"value": [notification(state=STATE_A), notification(timestamp="never")]})
    post(client, {"value": [_without(notification(state=STATE_A), "eventName")]})

    assert caplog.records
    logged = caplog.text + "".join(repr(record.args) for record in caplog.records)
    for state in (*ALL_STATES, "forged-state-1234"):
        assert state not in logged
    assert sent["payload"]["orderId"] in caplog.text


# --- database trouble --------------------------------------------------------------------


def test_a_locked_database_is_503_and_the_same_post_succeeds_later(
    migrated_engine: sa.Engine,
    make_app: Callable[[Settings], Flask],
    sessions: sessionmaker[Session],
) -> None:
    """A database that cannot take the write in time is a 503; the venue's retry is stored once."""
    client = make_app(settings_for(migrated_engine, db_lock_timeout=0.3)).test_client()
    body = {"value": [notification(), notification()]}
    assert post(client, {"value": [notification()]}).status_code == 200
    before = stored_rows(sessions)

    with database_locked(migrated_engine):
        refused = post(client, body)
    retried = post(client, body)
    retried_again = post(client, body)

    assert_error(refused, 503, "database_unavailable")
    assert retried.get_json() == {"stored": 2, "duplicates": 0}
    assert retried_again.get_json() == {"stored": 0, "duplicates": 2}
    rows = stored_rows(sessions)
    assert rows[:1] == before
    assert sorted(r["order_id"] for r in rows[1:]) == sorted(
        n["payload"]["orderId"] for n in body["value"]
    )


@contextmanager
def database_locked(engine: sa.Engine) -> Iterator[None]:
    """Another session holds a lock that keeps the receiver from writing to the inbox."""
    if engine.dialect.name == "sqlite":
        other = sqlite3.connect(engine.url.database or "", isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            yield
            other.execute("ROLLBACK")
        finally:
            other.close()
        return
    with engine.connect() as connection, connection.begin() as transaction:
        connection.exec_driver_sql("LOCK TABLE inbox IN ACCESS EXCLUSIVE MODE")
        yield
        transaction.rollback()


@pytest.mark.process
@pytest.mark.postgresql
def test_a_stopped_postgresql_is_503_and_its_restart_costs_nothing_more(
    make_app: Callable[[Settings], Flask],
) -> None:
    """While the server is down the answer is 503; once it is back the pooled connections it
    closed are replaced unseen, the retry is stored once and nothing stored before is lost."""
    with throwaway_postgresql(durable=False, prefix="otacm-pg-stopped-") as server:
        engine = make_engine(server.url)
        try:
            upgrade(engine)
            client = make_app(settings_for(engine, db_lock_timeout=2.0)).test_client()
            before = {"value": [notification() for _ in range(3)]}
            assert post(client, before).get_json() == {"stored": 3, "duplicates": 0}
            with server.stopped():  # a restart between two POSTs
                pass
            after_restart = {"value": [notification()]}
            assert post(client, after_restart).get_json() == {"stored": 1, "duplicates": 0}
            body = {"value": [notification(), notification()]}

            with server.stopped():
                refused = post(client, body)
            retried = post(client, body)

            assert_error(refused, 503, "database_unavailable")
            assert retried.get_json() == {"stored": 2, "duplicates": 0}
            stored = stored_rows(make_sessions(engine))
            sent = [
                n["payload"]["orderId"]
                for n in (*before["value"], *after_restart["value"], *body["value"])
            ]
            assert sorted(row["order_id"] for row in stored) == sorted(sent)
        finally:
            engine.dispose()


def test_an_unmigrated_database_is_503_until_it_is_upgraded(
    engine: sa.Engine, make_app: Callable[[Settings], Flask]
) -> None:
    """The app starts on an empty database, answers 503, and works once it is migrated."""
    client = make_app(settings_for(engine)).test_client()
    sent = {"value": [notification()]}

    refused = post(client, sent)
    upgrade(engine)
    accepted = post(client, sent)

    assert_error(refused, 503, "schema_not_current")
    assert accepted.get_json() == {"stored": 1, "duplicates": 0}


def test_a_fault_of_ours_is_a_logged_500_in_the_one_shape_and_stores_nothing(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected error while storing is answered as Flask answers one in a view."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr("receiver.webhook.store_notifications", broken)

    with caplog.at_level(logging.ERROR, logger="receiver.webhook"):
        response = post(client, notification(order_id()))

    assert_error(response, 500, "internal_error")
    assert "a bug" in caplog.text
    assert stored_rows(sessions) == []


# --- handshake and other requests --------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_validation_token_is_echoed_as_text(
    client: FlaskClient, sessions: sessionmaker[Session], method: str
) -> None:
    """Business Central's handshake: the validationToken comes back as text/plain, 200."""
    response = client.open(
        WEBHOOK_PATH, method=method, query_string={"validationToken": "tok en/+?&1"}
    )

    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == "tok en/+?&1"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert stored_rows(sessions) == []


def test_a_get_without_token_is_405_in_the_error_shape(client: FlaskClient) -> None:
    """Only POST stores; a plain GET is 405 with Allow: POST and the JSON error."""
    response = client.get(WEBHOOK_PATH)

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nowhere", 404, "not_found"),
        ("PUT", WEBHOOK_PATH, 405, "method_not_allowed"),
        ("POST", "/healthz", 405, "method_not_allowed"),
    ],
)
def test_routing_errors_have_the_error_shape(
    client: FlaskClient, method: str, path: str, status: int, code: str
) -> None:
    """werkzeug's own 404 and 405 answer in the receiver's JSON error shape."""
    assert_error(client.open(path, method=method), status, code)
