"""The finance pages through the Flask test client, on SQLite and PostgreSQL: the guard,
sign-in, CSRF, the run and exception pages, resolving with a note, and the downloads."""

from __future__ import annotations

import io
import json
import os
import re

import pytest
from click.testing import CliRunner
from flask import Flask, request
from flask.testing import FlaskClient
from openpyxl import load_workbook
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from otacm.cli import main
from otacm.settings import Settings
from receiver.finance.auth import SIGN_IN_FAILED, authenticate
from storage.records import ExceptionAction, ExceptionState, ReconException
from tests.finance.conftest import USER, csrf_token, finance_settings, seed_run, sign_in


@pytest.fixture
def seeded(sessions: sessionmaker[Session]):
    return seed_run(sessions)


def _guarded_paths(seeded) -> list[str]:
    run, exception = seeded.run_id, seeded.amount_exception_id
    return [
        "/finance/",
        f"/finance/runs/{run}",
        f"/finance/runs/{run}?category=amount_mismatch",
        f"/finance/runs/{run}/chart.svg",
        f"/finance/exceptions/{exception}",
        *(f"/finance/runs/{run}/report.{fmt}" for fmt in ("csv", "xlsx", "html", "json")),
    ]


def test_signed_out_requests_get_the_sign_in_page_never_data(client: FlaskClient, seeded):
    """Every page and download, signed out, redirects to sign-in and shows no data."""
    for path in _guarded_paths(seeded):
        response = client.get(path)
        assert response.status_code == 302, path
        assert response.headers["Location"].startswith("/finance/sign-in?next=/finance/"), path
        assert b"SHOP-100" not in response.data and b"120" not in response.data, path
        landing = client.get(path, follow_redirects=True)
        assert b"Sign in" in landing.data and b"SHOP-100" not in landing.data, path


def test_signed_out_post_is_refused(client: FlaskClient, sessions, seeded):
    """A signed-out POST (with or without a token) changes nothing."""
    path = f"/finance/exceptions/{seeded.amount_exception_id}/review"
    response = client.post(path, data={"action": "resolve", "note": "x"})
    assert response.status_code == 400
    token = csrf_token(client.get("/finance/sign-in").data)
    response = client.post(path, data={"action": "resolve", "note": "x", "csrf_token": token})
    assert response.status_code == 302
    assert "/finance/sign-in" in response.headers["Location"]
    with sessions.begin() as session:
        assert session.get_one(ReconException, seeded.amount_exception_id).state == "open"


def test_sign_in_then_the_page_asked_for(client: FlaskClient, seeded):
    """Signing in from a redirect lands on the page first asked for."""
    wanted = f"/finance/runs/{seeded.run_id}"
    page = client.get(f"/finance/sign-in?next={wanted}")
    response = client.post(
        "/finance/sign-in",
        data={
            "name": USER,
            "password": "correct horse battery staple",
            "next": wanted,
            "csrf_token": csrf_token(page.data),
        },
    )
    assert response.status_code == 302 and response.headers["Location"] == wanted
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    assert b"SHOP-100" in client.get(wanted).data


def test_sign_in_refuses_to_go_elsewhere(client: FlaskClient):
    """A ``next`` outside the finance pages is ignored (no open redirect)."""
    page = client.get("/finance/sign-in")
    response = client.post(
        "/finance/sign-in",
        data={
            "name": USER,
            "password": "correct horse battery staple",
            "next": "//evil.example/finance/",
            "csrf_token": csrf_token(page.data),
        },
    )
    assert response.headers["Location"] == "/finance/"


@pytest.mark.parametrize("name, password", [(USER, "wrong"), ("mallory", "wrong"), ("", "")])
def test_wrong_password_or_unknown_user(client: FlaskClient, name, password):
    """Wrong password and unknown user get the same generic answer, and no session."""
    response = sign_in(client, name, password)
    assert response.status_code == 401
    assert SIGN_IN_FAILED.encode() in response.data
    assert client.get("/finance/").status_code == 302


def test_authenticate_checks_the_hash():
    """The hash check: right password in, wrong password and unknown names out."""
    from receiver.finance.auth import hash_password

    users = {"bob": SecretStr(hash_password("s3cret"))}
    assert authenticate(users, "bob", "s3cret") == "bob"
    assert authenticate(users, "bob", "S3cret") is None
    assert authenticate(users, "eve", "s3cret") is None


def test_sign_in_without_csrf_token_is_refused(client: FlaskClient):
    """A sign-in POST without the form's CSRF token is a 400, and signs nobody in."""
    response = client.post(
        "/finance/sign-in", data={"name": USER, "password": "correct horse battery staple"}
    )
    assert response.status_code == 400
    assert b"form" in response.data.lower()
    assert client.get("/finance/").status_code == 302


def test_no_finance_users_configured(make_app, migrated_engine, tmp_path):
    """With no finance user configured, the sign-in page says so, and no key file is made."""
    app = make_app(finance_settings(migrated_engine, tmp_path / "secrets"))
    page = app.test_client().get("/finance/sign-in")
    assert b"No finance users are configured" in page.data
    assert not (tmp_path / "secrets" / "session-key").exists()


def test_session_key_generated_once(settings: Settings, make_app):
    """Without OTACM_SESSION_KEY the key is generated into secrets_dir (0600) and reused."""
    first = settings.session_secret().get_secret_value()
    path = settings.secrets_dir / "session-key"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert settings.session_secret().get_secret_value() == first
    configured = settings.model_copy(update={"session_key": SecretStr("k" * 40)})
    assert configured.session_secret().get_secret_value() == "k" * 40


def test_sign_out(signed_in: FlaskClient):
    """Signing out (POST with the token) ends the session."""
    token = csrf_token(signed_in.get("/finance/").data)
    response = signed_in.post("/finance/sign-out", data={"csrf_token": token})
    assert response.status_code == 302
    assert signed_in.get("/finance/").status_code == 302


def test_runs_list(signed_in: FlaskClient, seeded):
    """The runs list shows the run, its connection, state and exception count."""
    page = signed_in.get("/finance/").get_data(as_text=True)
    assert f"#{seeded.run_id}" in page and "venue-a" in page and "finished" in page
    assert '<td class="num">2</td>' in page


def test_run_page_totals_and_filters(signed_in: FlaskClient, seeded):
    """The run page shows totals per currency and filters exceptions."""
    path = f"/finance/runs/{seeded.run_id}"
    page = signed_in.get(path).get_data(as_text=True)
    assert 'data-currency="EUR"' in page and 'data-currency="USD"' in page
    assert "Amount differs" in page and "120.00" in page and "-20.00" in page
    assert "SHOP-100" in page and "SHOP-200" in page
    # The chart of exceptions by category and age, as the HTML report draws it: an
    # image of its own, which counts every exception while the page reads one page.
    assert f'<img class="chart" src="{path}/chart.svg"' in page
    chart = signed_in.get(f"{path}/chart.svg")
    assert chart.status_code == 200 and chart.mimetype == "image/svg+xml"
    assert '<svg class="chart"' in chart.get_data(as_text=True)
    assert "Missing at the venue, over 30 days: 1" in chart.get_data(as_text=True)
    only = signed_in.get(f"{path}?category=missing_at_venue").get_data(as_text=True)
    assert "SHOP-200" in only and "SHOP-100" not in only
    aged = signed_in.get(f"{path}?aging=over+30+days").get_data(as_text=True)
    assert "SHOP-200" in aged and "SHOP-100" not in aged
    searched = signed_in.get(f"{path}?q=ven-0042").get_data(as_text=True)
    assert "SHOP-100" in searched and "SHOP-200" not in searched
    assert signed_in.get("/finance/runs/999999").status_code == 404


def test_exception_page_shows_the_order_story(signed_in: FlaskClient, seeded):
    """The drill-down: ledger line, venue order, wallet, status changes and their sources."""
    page = signed_in.get(f"/finance/exceptions/{seeded.amount_exception_id}").get_data(as_text=True)
    for expected in ("SHOP-100", "VEN-0042", "W-0001", "EXT-1", "Submitted", "webhook", "submit"):
        assert expected in page, expected
    assert "Jane Customer" not in page and "jane@example.com" not in page
    missing = signed_in.get(f"/finance/exceptions/{seeded.missing_exception_id}")
    assert b"No venue order for this exception" in missing.data
    assert signed_in.get("/finance/exceptions/999999").status_code == 404


def _review(client: FlaskClient, exception_id: int, **data: str):
    path = f"/finance/exceptions/{exception_id}"
    token = csrf_token(client.get(path).data)
    return client.post(f"{path}/review", data={**data, "csrf_token": token})


def test_resolve_needs_a_note(signed_in: FlaskClient, sessions, seeded):
    """Resolving without a note is refused and changes nothing."""
    response = _review(signed_in, seeded.amount_exception_id, action="resolve", note="   ")
    assert response.status_code == 400
    assert b"Write a note" in response.data
    with sessions.begin() as session:
        found = session.get_one(ReconException, seeded.amount_exception_id)
        assert found.state == ExceptionState.OPEN
        assert [e.action for e in found.events] == [ExceptionAction.OPENED]


def test_resolve_without_csrf_token_is_refused(signed_in: FlaskClient, sessions, seeded):
    """Signed in, a POST without the CSRF token is a 400 and changes nothing."""
    response = signed_in.post(
        f"/finance/exceptions/{seeded.amount_exception_id}/review",
        data={"action": "resolve", "note": "forged"},
    )
    assert response.status_code == 400
    with sessions.begin() as session:
        assert session.get_one(ReconException, seeded.amount_exception_id).state == "open"


@pytest.mark.parametrize(
    "action, state", [("resolve", ExceptionState.RESOLVED), ("accept", ExceptionState.ACCEPTED)]
)
def test_review_with_a_note_records_the_user(signed_in, sessions, seeded, action, state):
    """Resolving or accepting with a note records it with the signed-in user as actor."""
    note = "Refund of 20.00 booked on 2025-06-03"
    response = _review(signed_in, seeded.amount_exception_id, action=action, note=note)
    assert response.status_code == 303
    with sessions.begin() as session:
        found = session.get_one(ReconException, seeded.amount_exception_id)
        assert found.state == state
        last = found.events[-1]
        assert (last.actor, last.note) == (USER, note)
    page = signed_in.get(response.headers["Location"]).get_data(as_text=True)
    assert note in page and USER in page
    again = _review(signed_in, seeded.amount_exception_id, action="accept", note="twice")
    assert again.status_code == 409


def test_downloads(signed_in: FlaskClient, seeded):
    """Every report format downloads; the XLSX opens with openpyxl, the JSON parses."""
    base = f"/finance/runs/{seeded.run_id}/report"
    xlsx = signed_in.get(f"{base}.xlsx")
    assert xlsx.status_code == 200
    assert "attachment" in xlsx.headers["Content-Disposition"]
    book = load_workbook(io.BytesIO(xlsx.data))
    cells = [str(c.value) for sheet in book.worksheets for row in sheet for c in row]
    assert "SHOP-100" in cells and "SHOP-200" in cells
    assert json.loads(signed_in.get(f"{base}.json").data)
    assert b"SHOP-200" in signed_in.get(f"{base}.csv").data
    assert b"SHOP-100" in signed_in.get(f"{base}.html").data
    assert signed_in.get(f"{base}.pdf").status_code == 404


def test_webhook_and_api_need_no_csrf_token(client: FlaskClient):
    """CSRF protection stays off the webhook and the API: they answer on their own terms."""
    webhook = client.post("/webhooks/ota-cm", json={"value": []})
    assert webhook.status_code != 400 or b"csrf" not in webhook.data.lower()
    api = client.post("/api/orders", json={})
    assert api.status_code in (401, 403, 404, 503)


def test_hash_password_command():
    """``otacm finance hash-password`` prints a name:hash line that signs in."""
    result = CliRunner().invoke(
        main, ["finance", "hash-password", "--name", "carol"], input="pw-1234\npw-1234\n"
    )
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    name, _, password_hash = line.partition(":")
    assert name == "carol" and "pw-1234" not in line
    assert authenticate({"carol": SecretStr(password_hash)}, "carol", "pw-1234") == "carol"


def test_only_the_finance_pages_open_a_session(app: Flask) -> None:
    """The webhook and the other endpoints get Flask's null session, never the cookie's."""
    interface = app.session_interface
    for path, opened in (
        ("/finance/", True),
        ("/finance", True),
        ("/finance/runs/1", True),
        ("/webhooks/ota-cm", False),
        ("/api/orders", False),
        ("/financeX", False),
    ):
        with app.test_request_context(path, method="POST"):
            session = interface.open_session(app, request)
            assert (session is not None) == opened, path


def test_pages_have_no_inline_style_or_script(app: Flask, signed_in, seeded):
    """Every page works under a content policy without 'unsafe-inline': no style
    attribute, no style or script element, no event handler attribute."""
    pages = [app.test_client().get("/finance/sign-in?next=/finance/")]
    pages += [
        signed_in.get(path)
        for path in _guarded_paths(seeded)
        if "/report." not in path and not path.endswith(".svg")
    ]
    pages.append(signed_in.get(f"/finance/exceptions/{seeded.missing_exception_id}"))
    inline = re.compile(r"<(style|script)\b|\sstyle\s*=|\son[a-z]+\s*=", re.IGNORECASE)
    for page in pages:
        assert page.status_code == 200, page.request.path
        assert "unsafe-inline" not in page.headers["Content-Security-Policy"]
        found = inline.search(page.get_data(as_text=True))
        assert found is None, (page.request.path, found)
