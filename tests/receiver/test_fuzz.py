"""Hostile input to every HTTP entry, generated from a fixed seed, on SQLite and PostgreSQL.

The entries: the webhook, ``POST /api/orders``, the finance pages (signed in and out, their
forms with a valid CSRF token, the report downloads), ``/healthz``, ``/readyz`` and
``/metrics``. Every answer is below 500; a refusal (4xx) is the JSON error shape (the
finance pages: a page, or the JSON shape for a URL no page has) and leaves the database
exactly as it was; a signed-out request never sees a finance page. Most requests go
through Flask's test client; a part, and what only shows over a socket (a chunked body
whose chunk size is not a number), go to the app as deployed, under ``otacm web``.
"""

from __future__ import annotations

import functools
import json
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa
from flask import Flask
from pydantic import SecretStr

from otacm.settings import Settings
from receiver import create_app
from receiver.context import EXTENSION, Receiver
from receiver.finance.auth import hash_password
from receiver.testing import served as served_app
from storage.engine import make_sessions
from storage.models import Base
from storage.testing import free_port
from tests.finance.conftest import PARTNER, PASSWORD, USER, Seeded, csrf_token, seed_run
from tests.receiver.test_metrics import parse, value
from tests.support.database import dump
from tests.support.processes import OtacmProcess, otacm_environment
from tests.support.stack import wait_until
from venue.connection import VenueConnection

SEED = 20261207
"""The fuzz's seed: the same requests every time, so a failure can be replayed."""
STATE = "fuzz-client-state-0123456789"
TOKEN = "fuzz-api-token-0123456789"
MAX_BYTES = 64 * 1024
# A partner the connection does not list: an order that passes every other check is
# refused before anything is sent, so the fuzz never reaches a venue.
OTHER_PARTNER = "99999999-2222-3333-4444-555555555555"

HOSTILE_TEXTS: list[Any] = [
    "", " ", "\x00", "a\x00b", "\ud800", "\udfff", "\r\n", "x" * 101, "x" * 5000,
    "\u00df" * 60, "\ufb03" * 40, "%s%n", "'; DROP TABLE inbox; --", "\u202e", "\U0001f600",
    "<script>alert(1)</script>", "../../etc/passwd", "\\\\evil", "//evil.example",
]  # fmt: skip
HOSTILE_VALUES: list[Any] = [
    *HOSTILE_TEXTS, None, True, 0, -1, 2**63, 2**64, 10**400, 1.5, 1e308, [], {}, ["\ud800"],
    {"\ud800": 1}, "9" * 5000, "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00",
]  # fmt: skip
HOSTILE_IDS = [
    "0", "-1", "1", "2", str(2**31), str(2**63 - 1), str(2**63), str(2**64), "9" * 40,
    "%00", "1%0D%0A", "abc", "%EF%BC%91", "1.5", "%ED%A0%80",
]  # fmt: skip
FORMATS = ["csv", "xlsx", "html", "json", "exe", "%00", "csv%0D%0A"]
HOSTILE_QUERY = ["", "%00", "%0D%0ALocation:%20http://evil", "%ED%A0%80", "%FF", "x" * 3000]
HOSTILE_BODIES: list[bytes] = [
    b"", b"null", b"[]", b"{}", b"NaN", b"1e999", b"9" * 5000, b"[" * 5000 + b"]" * 5000,
    b'{"a":' * 3000 + b"1" + b"}" * 3000, b"\xff\xfe{\x00}\x00", b"\xed\xa0\x80", b'"\\ud800"',
    b'{"value": "\\ud800"}', b"{" + b" " * (MAX_BYTES + 1) + b"}", b"{'single': 'quotes'}",
    '{"é": 1}'.encode("latin-1"), b"\x00", b"{}garbage",
]  # fmt: skip


@functools.cache
def _user_entry() -> str:
    # Hashing is slow on purpose: once per session.
    return f"{USER}:{hash_password(PASSWORD)}"


def fuzz_settings(engine: sa.Engine, secrets_dir: Path) -> Settings:
    """One venue connection (never reached), an API token and a finance user."""
    return Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        connections=[
            VenueConnection(
                name="venue-a",
                api_base_url="http://127.0.0.1:9",
                tenant="00000000-0000-0000-0000-000000000001",
                company="CRONUS",
                api_key=SecretStr("fuzz-venue-key"),
                webhook_client_states=[SecretStr(STATE)],
                partner_ids=[PARTNER],
            )
        ],
        api_tokens=[SecretStr(TOKEN)],
        finance_users=[SecretStr(_user_entry())],
        secrets_dir=secrets_dir,
        webhook_max_bytes=MAX_BYTES,
        db_lock_timeout=2.0,
    )


def notification(**changes: Any) -> dict[str, Any]:
    """A valid ``ota_cm_order_processed`` notification with ``changes``."""
    return {
        "clientState": STATE,
        "eventName": "ota_cm_order_processed",
        "timestamp": "2025-06-01T10:30:00Z",
        "payload": {
            "orderId": "aaaaaaaa-bbbb-cccc-dddd-000000000001",
            "buyFromOrderReference": "CM-1",
            "status": "Issued",
        },
        **changes,
    }


def order(**changes: Any) -> dict[str, Any]:
    """An order request for a partner the connection does not list, with ``changes``."""
    return {
        "partnerId": OTHER_PARTNER,
        "sellToOrderReference": "FUZZ-1",
        "items": [{"itemNo": "ADULT", "quantity": 1, "visitDate": "2030-01-01"}],
        **changes,
    }


@dataclass
class Call:
    """One request: who sends it and what; ``finance`` and ``signed_in`` say how to judge it."""

    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    form: dict[str, str] | None = None
    csrf: bool = False
    signed_in: bool = False

    @property
    def finance(self) -> bool:
        return self.path.startswith("/finance")


class Requests:
    """The fuzz's requests, from one random generator."""

    def __init__(self, rng: random.Random, seeded: Seeded) -> None:
        self.rng = rng
        self.seeded = seeded

    def pick(self, values: list[Any]) -> Any:
        return self.rng.choice(values)

    def _json(self, value: Any) -> bytes:
        return json.dumps(value).encode("utf-8", "surrogatepass")

    def _mutated(self, base: dict[str, Any]) -> bytes:
        """``base`` with one to three fields, nested ones too, set to hostile values."""
        document = json.loads(json.dumps(base))
        for _ in range(self.rng.randint(1, 3)):
            target = document
            if self.rng.random() < 0.4:
                nested = [v for v in document.values() if isinstance(v, dict)]
                lists = [v[0] for v in document.values() if isinstance(v, list) and v]
                lists = [item for item in lists if isinstance(item, dict)]
                target = self.pick([*nested, *lists] or [document])
            key = self.pick([*target, "\ud800", "extra"])
            target[key] = self.pick(HOSTILE_VALUES)
        return self._json(document)

    def _content_type(self) -> dict[str, str]:
        kind = self.pick(["application/json"] * 6 + ["text/plain", "", "application/json; x=\x7f"])
        return {"Content-Type": kind} if kind else {}

    def webhook(self) -> Call:
        shape = self.rng.random()
        if shape < 0.3:
            body = self.pick(HOSTILE_BODIES)
        elif shape < 0.85:
            mutated = json.loads(self._mutated(notification()))
            body = self._json(self.pick([mutated, {"value": [mutated]}, {"values": [mutated]}]))
        else:
            body = self._json({"value": self.pick(HOSTILE_VALUES)})
        path = "/webhooks/ota-cm"
        if self.rng.random() < 0.1:
            path += f"?validationToken={self.pick(HOSTILE_QUERY)}"
        return Call(self.pick(["POST"] * 9 + ["PUT"]), path, body, self._content_type())

    def api(self) -> Call:
        body = self.pick(HOSTILE_BODIES) if self.rng.random() < 0.3 else self._mutated(order())
        token = self.pick([f"Bearer {TOKEN}"] * 5 + ["", "Bearer x", f"Basic {TOKEN}", "Bearer"])
        headers = {**self._content_type(), **({"Authorization": token} if token else {})}
        return Call("POST", "/api/orders", body, headers)

    def finance_page(self) -> Call:
        run, exception = self.seeded.run_id, self.seeded.amount_exception_id
        paths = [
            f"/finance/?connection={self.pick(HOSTILE_QUERY)}",
            f"/finance/runs/{self.pick(HOSTILE_IDS)}",
            f"/finance/runs/{run}?category={self.pick(HOSTILE_QUERY)}&q={self.pick(HOSTILE_QUERY)}"
            f"&currency={self.pick(HOSTILE_QUERY)}&aging={self.pick(HOSTILE_QUERY)}",
            f"/finance/runs/{self.pick(HOSTILE_IDS)}/report.{self.pick(FORMATS)}",
            f"/finance/runs/{run}/report.{self.pick(['csv', 'xlsx', 'html', 'json'])}",
            f"/finance/exceptions/{self.pick([*HOSTILE_IDS, str(exception)])}"
            f"?back={self.pick(HOSTILE_QUERY)}",
            f"/finance/sign-in?next={self.pick(HOSTILE_QUERY)}",
            f"/finance/static/{self.pick(['finance.css', '..%2F..%2Fapp.py', '%00'])}",
        ]
        return Call("GET", self.pick(paths), signed_in=self.rng.random() < 0.7)

    def review(self) -> Call:
        exception = self.pick(
            [str(self.seeded.amount_exception_id)] * 3 + [str(self.seeded.missing_exception_id)]
            + HOSTILE_IDS
        )  # fmt: skip
        form = {
            "action": self.pick(["resolve", "accept", "", "delete", "\x00"]),
            "note": self.pick([*(t for t in HOSTILE_TEXTS if isinstance(t, str)), "checked"]),
            "back": self.pick(["/finance/", "//evil.example", "/finance/\r\nX: y", ""]),
        }
        return Call(
            "POST",
            f"/finance/exceptions/{exception}/review",
            form=form,
            csrf=self.rng.random() < 0.85,
            signed_in=self.rng.random() < 0.85,
        )

    def sign_in(self) -> Call:
        form = {
            "name": self.pick([USER, *HOSTILE_TEXTS]),
            "password": self.pick([PASSWORD, *HOSTILE_TEXTS]),
            "next": self.pick(
                ["/finance/runs/1", "/finance/\r\nSet-Cookie: x=1", "/finance/\t/evil",
                 "//evil.example", "/finance/%0d%0a", "\ud800", "/finance/\x00", "https://evil"]
            ),
        }  # fmt: skip
        return Call("POST", "/finance/sign-in", form=form, csrf=self.rng.random() < 0.85)

    def operations(self) -> Call:
        path = self.pick(["/healthz", "/readyz", "/metrics"])
        headers = self.pick(
            [{}, {"Accept": "application/openmetrics-text; version=9.9"}, {"Accept": "\x7f"}]
        )
        query = f"?{self.pick(HOSTILE_QUERY)}" if self.rng.random() < 0.5 else ""
        method = self.pick(["GET", "GET", "HEAD", "POST", "OPTIONS", "DELETE"])
        return Call(method, path + query, self.pick([None, b"x" * 100]), headers)

    def every_kind(self, count: int) -> Iterator[Call]:
        makers = [self.webhook] * 4 + [self.api] * 3 + [self.finance_page] * 3 + [
            self.review, self.review, self.sign_in, self.sign_in, self.operations
        ]  # fmt: skip
        for _ in range(count):
            yield self.pick(makers)()


class Browser:
    """Flask test clients: one signed out, one signed in as the finance user."""

    def __init__(self, app: Flask, seeded: Seeded) -> None:
        # A page with a form for each: its CSRF token is the session's.
        self.form_page = f"/finance/exceptions/{seeded.amount_exception_id}"
        self.app = app
        self.signed_out = app.test_client()
        self.signed_in = app.test_client()
        page = self.signed_in.get("/finance/sign-in")
        answer = self.signed_in.post(
            "/finance/sign-in",
            data={"name": USER, "password": PASSWORD, "csrf_token": csrf_token(page.data)},
        )
        assert answer.status_code == 302

    def send(self, call: Call) -> tuple[int, dict[str, str], bytes]:
        client = self.signed_in if call.signed_in else self.signed_out
        if call.path.startswith("/finance/sign-in") and call.method == "POST":
            client = self.app.test_client()  # a sign-in that succeeds must not sign it in
        data, headers = call.body, call.headers
        if call.form is not None:
            fields = dict(call.form)
            if call.csrf:
                page = self.form_page if call.signed_in else "/finance/sign-in"
                fields["csrf_token"] = csrf_token(client.get(page).data)
            data, headers = form_body(fields), {"Content-Type": FORM}
        with client.open(call.path, method=call.method, data=data, headers=headers) as response:
            return response.status_code, dict(response.headers), response.data


FORM = "application/x-www-form-urlencoded"


def form_body(fields: dict[str, str]) -> bytes:
    """``fields`` URL-encoded as a browser would, the bytes of any text at all included."""
    return "&".join(
        f"{quote(name)}={quote(value.encode('utf-8', 'surrogatepass'))}"
        for name, value in fields.items()
    ).encode()


def _judge(call: Call, status: int, headers: dict[str, str], body: bytes) -> None:
    """No 5xx; refusals in their shape; signed-out finance requests see no page."""
    shown = f"{call!r} → {status} {body[:300]!r}"
    assert status < 500, shown
    content_type = headers.get("Content-Type", "")
    if (
        call.finance
        and not call.signed_in
        and not call.path.startswith(("/finance/sign-in", "/finance/static/"))
    ):
        assert status >= 300, shown
        if status in (301, 302, 303):
            assert headers["Location"].startswith("/finance/sign-in"), shown
    if 300 <= status < 400 and "Location" in headers:
        location = headers["Location"]
        assert location.isprintable(), shown
        assert location.startswith("/") and not location.startswith("//"), shown
    if status >= 400 and call.method != "HEAD":
        if call.finance and content_type.startswith("text/html"):
            return
        if status == 400 and content_type.startswith("text/html") and b"Invalid HTTP" in body:
            return  # gunicorn's own answer to a request it cannot parse: no app code ran
        assert content_type == "application/json", shown
        answer = json.loads(body)
        assert set(answer) == {"status", "code", "message"}, shown
        assert answer["status"] == status, shown


def _fuzz(
    engine: sa.Engine,
    send: Any,
    calls: list[Call],
) -> int:
    """Send ``calls``, judging each; the number refused. The database is unchanged by each
    refusal (a 4xx), and may change with anything else (a webhook stored, a review)."""
    before = dump(engine)
    refused = 0
    for call in calls:
        status, headers, body = send(call)
        _judge(call, status, headers, body)
        after = dump(engine)
        if status >= 400:
            refused += 1
            _assert_refusal_changed_nothing(call, status, before, after)
        before = after
    return refused


THROTTLE_TABLE = "sign_in_attempt"


def _assert_refusal_changed_nothing(
    call: Call, status: int, before: dict[str, Any], after: dict[str, Any]
) -> None:
    """A refusal changes nothing stored; only a refused sign-in is remembered, as one
    failed attempt, since that is how the sign-in throttle counts them, and a signed-in
    request keeps its sign-in alive (its ``last_seen_at``, written at most once a minute:
    a slow run of the fuzz passes that minute on a refused request too)."""
    shown = f"{call!r} was refused {status} but changed the database"
    if call.signed_in:
        before, after = _sign_in_seen(before, after, shown)
    if not (call.method == "POST" and call.path.startswith("/finance/sign-in")):
        assert after == before, shown
        return
    assert {k: v for k, v in after.items() if k != THROTTLE_TABLE} == {
        k: v for k, v in before.items() if k != THROTTLE_TABLE
    }, shown
    added = set(after[THROTTLE_TABLE]) - set(before[THROTTLE_TABLE])
    ok = list(Base.metadata.tables[THROTTLE_TABLE].columns.keys()).index("ok")
    assert len(added) <= 1 and not any(row[ok] for row in added), shown
    assert set(before[THROTTLE_TABLE]) <= set(after[THROTTLE_TABLE]), shown


SESSION_TABLE = "finance_session"


def _sign_in_seen(
    before: dict[str, Any], after: dict[str, Any], shown: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``before`` and ``after`` without the sign-ins' ``last_seen_at``, once it is checked
    to have only moved on."""
    seen = list(Base.metadata.tables[SESSION_TABLE].columns.keys()).index("last_seen_at")

    def without_seen(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return [row[:seen] + row[seen + 1 :] for row in rows]

    was = {row[0]: row[seen] for row in before[SESSION_TABLE]}
    assert all(row[seen] >= was.get(row[0], row[seen]) for row in after[SESSION_TABLE]), shown
    return (
        {**before, SESSION_TABLE: without_seen(before[SESSION_TABLE])},
        {**after, SESSION_TABLE: without_seen(after[SESSION_TABLE])},
    )


@pytest.fixture
def fuzz_app(migrated_engine: sa.Engine, tmp_path: Path) -> Iterator[Flask]:
    """The receiver app with every entry open: a client state, a token, a finance user."""
    app = create_app(fuzz_settings(migrated_engine, tmp_path / "secrets"))
    receiver: Receiver = app.extensions[EXTENSION]
    try:
        yield app
    finally:
        receiver.close()


@pytest.fixture
def seeded(migrated_engine: sa.Engine) -> Seeded:
    """A finished run with two open exceptions, on connection ``venue-a``."""
    return seed_run(make_sessions(migrated_engine))


def test_hostile_requests_to_every_entry_get_clear_answers(
    migrated_engine: sa.Engine, fuzz_app: Flask, seeded: Seeded
) -> None:
    """Seven hundred seeded requests: none is a 5xx, refusals change nothing."""
    calls = list(Requests(random.Random(SEED), seeded).every_kind(700))

    refused = _fuzz(migrated_engine, Browser(fuzz_app, seeded).send, calls)

    assert refused > len(calls) // 2  # the fuzz is mostly refusals: it reaches the checks


# The defects an operator met, and the shapes of body the API and the webhook must refuse:
# (the request, its status, its JSON code or None for a finance page).
HUGE = str(2**63)
NOT_UTF8 = b'{"value": "\xff"}'
DEEP = b"[" * 5000 + b"]" * 5000
DEFECTS_MET: list[tuple[Call, int, str | None]] = [
    (Call("POST", "/webhooks/ota-cm", json.dumps(notification(clientState="\ud800")).encode(),
          {"Content-Type": "application/json"}), 401, "unknown_client_state"),
    (Call("POST", "/webhooks/ota-cm",
          json.dumps(notification(timestamp="9999-12-31T23:59:59-01:00")).encode(),
          {"Content-Type": "application/json"}), 400, "invalid_notification"),
    (Call("GET", f"/finance/runs/{HUGE}", signed_in=True), 404, None),
    (Call("GET", f"/finance/runs/{HUGE}/report.csv", signed_in=True), 404, None),
    (Call("GET", f"/finance/exceptions/{HUGE}", signed_in=True), 404, None),
    (Call("POST", f"/finance/exceptions/{HUGE}/review", signed_in=True, csrf=True,
          form={"action": "resolve", "note": "checked"}), 404, None),
    (Call("POST", "/finance/exceptions/1/review", signed_in=True, csrf=True,
          form={"action": "resolve", "note": "checked\x00"}), 400, None),
    (Call("POST", "/webhooks/ota-cm", b" " * (MAX_BYTES + 1), {"Content-Type": "application/json"}),
     413, "body_too_large"),
    (Call("POST", "/webhooks/ota-cm", DEEP, {"Content-Type": "application/json"}), 400,
     "invalid_json"),
    (Call("POST", "/webhooks/ota-cm", NOT_UTF8, {"Content-Type": "application/json"}), 400,
     "invalid_json"),
    (Call("POST", "/api/orders", b" " * (MAX_BYTES + 1), {"Content-Type": "application/json",
          "Authorization": f"Bearer {TOKEN}"}), 413, "body_too_large"),
    (Call("POST", "/api/orders", DEEP, {"Content-Type": "application/json",
          "Authorization": f"Bearer {TOKEN}"}), 400, "invalid_json"),
    (Call("POST", "/api/orders", NOT_UTF8, {"Content-Type": "application/json",
          "Authorization": f"Bearer {TOKEN}"}), 400, "invalid_json"),
    (Call("POST", "/api/orders", json.dumps(order(sellToOrderReference="R\ud800")).encode(),
          {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}), 400,
     "invalid_order"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "status", "code"),
    DEFECTS_MET,
    ids=[f"{c.method} {c.path[:30]} {(c.body or b'')[:20]!r}" for c, _, _ in DEFECTS_MET],
)
def test_each_defect_met_gets_its_4xx_and_changes_nothing(
    migrated_engine: sa.Engine,
    fuzz_app: Flask,
    seeded: Seeded,
    call: Call,
    status: int,
    code: str | None,
) -> None:
    """Each answer is its 4xx (JSON with its code, or a finance page); nothing is stored."""
    browser = Browser(fuzz_app, seeded)
    before = dump(migrated_engine)

    answer, headers, body = browser.send(call)

    assert answer == status, body[:300]
    if code is None:
        assert headers["Content-Type"].startswith("text/html")
    else:
        assert json.loads(body) == {"status": status, "code": code, "message": ANY_TEXT}
    assert dump(migrated_engine) == before


def test_a_sign_in_next_holding_a_line_break_goes_to_the_runs(fuzz_app: Flask) -> None:
    """A `next` with CR/LF (or a tab) signs in and goes to the runs page, not a split header."""
    for target in ("/finance/runs/1\r\nSet-Cookie: x=1", "/finance/\t/evil", "/finance/\x00"):
        client = fuzz_app.test_client()
        page = client.get("/finance/sign-in")
        fields = {"name": USER, "password": PASSWORD, "next": target}
        answer = client.post(
            "/finance/sign-in",
            data=form_body({**fields, "csrf_token": csrf_token(page.data)}),
            headers={"Content-Type": FORM},
        )
        assert (answer.status_code, answer.headers["Location"]) == (302, "/finance/")


class _AnyText:
    """Equal to any non-empty text: a message is for people, its words may change."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)

    def __hash__(self) -> int:
        return 0


ANY_TEXT = _AnyText()


# --- as deployed: otacm web, over a socket ----------------------------------------------


def raw_request(port: int, request: bytes) -> bytes:
    """Send ``request`` bytes as they are, and nothing more (the sending side is closed, so
    a body promising more ends there); the answer's bytes until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request)
        connection.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        return answer


def chunked(path: str, chunks: bytes, content_type: str, **headers: str) -> bytes:
    """A chunked POST to ``path`` whose body (already chunk-encoded) is ``chunks``."""
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {content_type}",
        "Transfer-Encoding: chunked",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + chunks


BROKEN_CHUNKS = [
    b"zz\r\nabc\r\n0\r\n\r\n",  # a chunk size that is not a number
    b"ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",  # one beyond any size
    b"3\r\nabcXX0\r\n\r\n",  # a chunk without its terminator
    b"3;\x00=\x01\r\nabc\r\n0\r\n\r\n",  # a chunk extension of control characters
    b"-3\r\nabc\r\n0\r\n\r\n",  # a negative size
]


@pytest.fixture
def served(
    migrated_engine: sa.Engine, seeded: Seeded, tmp_path: Path
) -> Iterator[tuple[int, Settings]]:
    """``otacm web`` with one worker on the test database; its port and settings."""
    settings = fuzz_settings(migrated_engine, tmp_path / "secrets")
    port = free_port()
    environment = otacm_environment(
        settings,
        OTACM_FINANCE_USERS=_user_entry(),
        OTACM_SECRETS_DIR=str(settings.secrets_dir),
        OTACM_PARTNER_IDS=PARTNER,
        TMPDIR=str(tmp_path),
    )
    process = OtacmProcess(
        ["web", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
        environment,
        tmp_path / "web.log",
    )
    try:

        def ready() -> bool:
            assert process.alive(), process.output()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 60, what="otacm web to be ready")
        yield port, settings
    finally:
        process.stop()
        assert "Traceback" not in process.output(), process.output()


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1."), answer[:200]
    return int(answer.split(b" ", 2)[1])


@pytest.mark.process
def test_broken_bodies_over_a_socket_are_400(
    migrated_engine: sa.Engine, served: tuple[int, Settings]
) -> None:
    """Chunked bodies gunicorn cannot read, and ones cut short: 400, nothing stored."""
    port, _ = served
    before = dump(migrated_engine)
    targets = [
        ("/webhooks/ota-cm", "application/json", {}),
        ("/api/orders", "application/json", {"Authorization": f"Bearer {TOKEN}"}),
        ("/finance/sign-in", "application/x-www-form-urlencoded", {}),
    ]
    for path, content_type, headers in targets:
        for broken in BROKEN_CHUNKS:
            answer = raw_request(port, chunked(path, broken, content_type, **headers))
            assert 400 <= _status(answer) < 500, (path, broken, answer[:300])
            if path != "/finance/sign-in":
                body = answer.partition(b"\r\n\r\n")[2]
                assert json.loads(body)["status"] == _status(answer), answer
        # A body that ends before its Content-Length says.
        short = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            + "Content-Length: 100\r\nConnection: close\r\n\r\n{"
        ).encode()
        answer = raw_request(port, short)
        assert 400 <= _status(answer) < 500, (path, answer[:300])
    assert dump(migrated_engine) == before
    samples = parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
    rejected = value(samples, "otacm_webhook_rejections_total", code="unreadable_body")
    assert rejected == len(BROKEN_CHUNKS)  # a short body is read as it is: invalid JSON


def test_broken_bodies_to_werkzeugs_server_are_400_unreadable_body(fuzz_app: Flask) -> None:
    """werkzeug's server (the tests', the demo's) raises other errors: the same answer."""
    with served_app(fuzz_app) as url:
        port = int(url.rsplit(":", 1)[1])
        chunks = raw_request(
            port, chunked("/webhooks/ota-cm", b"zz\r\nabc\r\n", "application/json")
        )
        short = raw_request(
            port,
            b"POST /webhooks/ota-cm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\nConnection: close\r\n\r\n{",
        )
    for answer in (chunks, short):
        assert _status(answer) == 400, answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["code"] == "unreadable_body"


@pytest.mark.process
def test_hostile_requests_over_a_socket_get_clear_answers(
    migrated_engine: sa.Engine, served: tuple[int, Settings], seeded: Seeded
) -> None:
    """A part of the seeded fuzz, sent to `otacm web`: none is a 5xx, refusals change nothing."""
    port, _ = served
    calls = list(Requests(random.Random(SEED + 1), seeded).every_kind(80))
    # Finance pages need a session and a CSRF token from this server: signed out here.
    calls = [c for c in calls if not c.finance or (not c.signed_in and c.form is None)]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:

        def send(call: Call) -> tuple[int, dict[str, str], bytes]:
            path = call.path if "%" in call.path else quote(call.path, safe="/?&=%")
            response = http.request(call.method, path, content=call.body, headers=call.headers)
            headers = {name.title(): value for name, value in response.headers.items()}
            return response.status_code, headers, response.content

        refused = _fuzz(migrated_engine, send, calls)
    assert refused > len(calls) // 3
