"""Finance sign-ins kept in the database, sign-in throttling and safe methods, through the
Flask test client on SQLite and PostgreSQL.

Time is moved by editing the rows' timestamps (never by sleeping): a sign-in that began,
or was last used, long enough ago must be refused like one whose cookie aged.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from otacm.cli import main
from otacm.settings import Settings
from receiver.finance import SESSION_COOKIE
from receiver.finance.auth import SESSION_SIGN_IN, SIGN_IN_FAILED, hash_password
from receiver.finance.signins import TOUCH_EVERY, Lifetimes, signed_in_user, start
from storage.records import FinanceSession, SignInAttempt
from storage.types import utcnow
from tests.finance.conftest import PASSWORD, USER, csrf_token, finance_settings, sign_in

BOB, BOB_PASSWORD = "bob", "bob's own long password"


@pytest.fixture(scope="module")
def bob_entry() -> str:
    """Bob's settings entry (hashing is slow on purpose: once)."""
    return f"{BOB}:{hash_password(BOB_PASSWORD)}"


@pytest.fixture
def settings(migrated_engine: sa.Engine, tmp_path, user_entry: str, bob_entry: str) -> Settings:
    """Settings with two finance users, ``alice`` and ``bob``."""
    return finance_settings(
        migrated_engine,
        tmp_path / "secrets",
        finance_users=[SecretStr(user_entry), SecretStr(bob_entry)],
    )


def _signed_in(client: FlaskClient) -> bool:
    return client.get("/finance/").status_code == 200


def _cookie(client: FlaskClient) -> str:
    cookie = client.get_cookie(SESSION_COOKIE, path="/finance")
    assert cookie is not None, "no session cookie"
    return cookie.value


def _with_cookie(app: Flask, value: str) -> FlaskClient:
    """Another browser, holding a copy of a cookie."""
    other = app.test_client()
    other.set_cookie(SESSION_COOKIE, value, path="/finance")
    return other


def _sign_out(client: FlaskClient) -> None:
    token = csrf_token(client.get("/finance/").data)
    assert client.post("/finance/sign-out", data={"csrf_token": token}).status_code == 302


def _rows(sessions: sessionmaker[Session], model: type[Any]) -> list[Any]:
    with sessions.begin() as session:
        return list(session.scalars(sa.select(model)).all())


def _shift(sessions: sessionmaker[Session], **deltas: dt.timedelta) -> None:
    """Move every sign-in's timestamps into the past by the given amounts."""
    with sessions.begin() as session:
        for row in session.scalars(sa.select(FinanceSession)):
            for column, delta in deltas.items():
                setattr(row, column, getattr(row, column) - delta)


# --- sign-ins --------------------------------------------------------------------------


def test_the_cookie_carries_a_token_not_the_user(app: Flask, client: FlaskClient, sessions):
    """Signed in, the cookie holds a random token (and the CSRF token), never the user's
    name; the database holds the token's hash, not the token."""
    assert sign_in(client).status_code == 302
    data = app.session_interface.get_signing_serializer(app).loads(_cookie(client))  # type: ignore[attr-defined]
    assert set(data) <= {SESSION_SIGN_IN, "csrf_token", "_permanent"}
    assert USER not in repr(data)
    [row] = _rows(sessions, FinanceSession)
    assert row.user_name == USER and row.revoked_at is None
    assert data[SESSION_SIGN_IN] != row.id and len(data[SESSION_SIGN_IN]) >= 43


def test_sign_out_ends_the_session_for_every_copy_of_the_cookie(
    app: Flask, client: FlaskClient, sessions
):
    """A cookie copied before signing out is refused afterwards: the row is revoked."""
    sign_in(client)
    copy = _with_cookie(app, _cookie(client))
    assert _signed_in(copy)
    _sign_out(client)
    assert not _signed_in(client)
    assert not _signed_in(copy)
    [row] = _rows(sessions, FinanceSession)
    assert row.revoked_at is not None


def test_a_new_sign_in_does_not_revive_an_old_cookie(app: Flask, client: FlaskClient):
    """Each sign-in gets a new token: signing in again leaves the signed-out copy dead."""
    sign_in(client)
    copy = _with_cookie(app, _cookie(client))
    _sign_out(client)
    sign_in(client)
    assert _signed_in(client) and not _signed_in(copy)


def test_an_idle_sign_in_ends(client: FlaskClient, sessions, settings: Settings):
    """A sign-in unused for the idle timeout is refused; used within it, it goes on."""
    sign_in(client)
    idle = dt.timedelta(seconds=settings.finance_session_idle_timeout)
    _shift(sessions, last_seen_at=idle - dt.timedelta(minutes=2))
    assert _signed_in(client)
    _shift(sessions, last_seen_at=idle)
    assert not _signed_in(client)


def test_a_sign_in_ends_at_its_absolute_lifetime_however_used(
    client: FlaskClient, sessions, settings: Settings
):
    """Used all along, a sign-in still ends once its lifetime since sign-in is over."""
    sign_in(client)
    lifetime = dt.timedelta(seconds=settings.finance_session_lifetime)
    _shift(sessions, created_at=lifetime, expires_at=lifetime - dt.timedelta(minutes=1))
    assert _signed_in(client)
    _shift(sessions, created_at=lifetime, expires_at=dt.timedelta(minutes=1))
    assert not _signed_in(client)


def test_last_seen_is_written_at_most_once_a_minute(client: FlaskClient, sessions):
    """Requests within a minute of the last recorded one write nothing; a later one does."""
    sign_in(client)
    [before] = _rows(sessions, FinanceSession)
    for _ in range(3):
        assert _signed_in(client)
    [after] = _rows(sessions, FinanceSession)
    assert after.last_seen_at == before.last_seen_at
    _shift(sessions, last_seen_at=TOUCH_EVERY)
    assert _signed_in(client)
    [touched] = _rows(sessions, FinanceSession)
    assert touched.last_seen_at > before.last_seen_at


def test_a_changed_password_ends_the_users_sign_ins(
    make_app: Callable[[Settings], Flask], app: Flask, client: FlaskClient, settings: Settings
):
    """After the user's hash changes in the settings, their cookie is refused, even with
    the old password still known to the browser; others' sign-ins go on."""
    sign_in(client)
    bob = app.test_client()
    sign_in(bob, BOB, BOB_PASSWORD)
    same = make_app(settings)
    assert _signed_in(_with_cookie(same, _cookie(client)))
    changed_users = [
        SecretStr(f"{USER}:{hash_password('a new password')}"),
        settings.finance_users[1],
    ]
    changed = make_app(settings.model_copy(update={"finance_users": changed_users}))
    assert not _signed_in(_with_cookie(changed, _cookie(client)))
    assert _signed_in(_with_cookie(changed, _cookie(bob)))
    removed = make_app(settings.model_copy(update={"finance_users": changed_users[1:]}))
    assert not _signed_in(_with_cookie(removed, _cookie(client)))


def test_sign_out_all_command(app: Flask, client: FlaskClient, settings: Settings):
    """`otacm finance sign-out-all --user` ends that user's sign-ins; without it, all."""
    sign_in(client)
    bob = app.test_client()
    sign_in(bob, BOB, BOB_PASSWORD)
    env = {"OTACM_DATABASE_URL": settings.database_url}
    result = CliRunner().invoke(main, ["finance", "sign-out-all", "--user", USER], env=env)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"1 finance sign-in(s) of {USER} ended"
    assert not _signed_in(client) and _signed_in(bob)
    result = CliRunner().invoke(main, ["finance", "sign-out-all"], env=env)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "1 finance sign-in(s) ended"
    assert not _signed_in(bob)


def test_ended_sign_ins_are_deleted_at_the_next_sign_in(app: Flask, client: FlaskClient, sessions):
    """Revoked and expired rows go when someone signs in; open ones stay."""
    sign_in(client)
    _sign_out(client)
    expired = app.test_client()
    sign_in(expired, BOB, BOB_PASSWORD)
    with sessions.begin() as session:
        row = session.scalars(
            sa.select(FinanceSession).where(FinanceSession.user_name == BOB)
        ).one()
        row.expires_at = utcnow() - dt.timedelta(seconds=1)
    kept = app.test_client()
    sign_in(kept)
    third = app.test_client()
    sign_in(third, BOB, BOB_PASSWORD)
    assert sorted(row.user_name for row in _rows(sessions, FinanceSession)) == [USER, BOB]


def test_signed_in_user_checks_every_end(sessions):
    """The check itself: valid until its expiry, its idle time, its revocation, or a
    change of the user's hash; it asks for a touch only once a minute has passed."""
    now = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
    lifetimes = Lifetimes(absolute=dt.timedelta(hours=12), idle=dt.timedelta(hours=1))
    users = {"carol": SecretStr("scrypt:1$salt$hash")}
    with sessions.begin() as session:
        token = start(session, "carol", users["carol"], now=now, lifetimes=lifetimes)

    def check(at: dt.datetime, known: dict[str, SecretStr] = users) -> Any:
        with sessions.begin() as session:
            return signed_in_user(session, token, known, now=at, idle=lifetimes.idle)

    assert check(now).user == "carol" and not check(now).touch
    assert check(now + dt.timedelta(seconds=59)).touch is False
    assert check(now + dt.timedelta(minutes=1)).touch is True
    assert check(now + dt.timedelta(minutes=59)) is not None
    assert check(now + dt.timedelta(hours=1)) is None
    assert check(now, {"carol": SecretStr("scrypt:1$salt$other")}) is None
    assert check(now, {}) is None
    with sessions.begin() as session:
        assert signed_in_user(session, "forged", users, now=now, idle=lifetimes.idle) is None


# --- throttling ------------------------------------------------------------------------


def _age_attempts(sessions: sessionmaker[Session], delta: dt.timedelta) -> None:
    """Move every recorded sign-in attempt into the past by ``delta``."""
    with sessions.begin() as session:
        for row in session.scalars(sa.select(SignInAttempt)):
            row.at -= delta


def _attempt(client: FlaskClient, name: str, password: str, **kwargs: Any) -> Any:
    page = client.get("/finance/sign-in", **kwargs)
    return client.post(
        "/finance/sign-in",
        data={"name": name, "password": password, "csrf_token": csrf_token(page.data)},
        **kwargs,
    )


@pytest.mark.parametrize("name", [USER, "mallory"], ids=["known", "unknown"])
def test_five_failures_for_a_name_refuse_the_sixth_with_429(app: Flask, sessions, name: str):
    """After 5 wrong passwords for a name (a user's or not: the answer is the same), the
    next attempt is a 429 with Retry-After, even with the right password, is not
    checked, and is not counted."""
    client = app.test_client()
    for _ in range(5):
        assert _attempt(client, name, "wrong").status_code == 401
    refused = _attempt(client, name, PASSWORD)
    assert refused.status_code == 429
    assert 0 < int(refused.headers["Retry-After"]) <= 900
    assert b"Too many failed sign-ins" in refused.data
    assert SIGN_IN_FAILED.encode() not in refused.data
    assert not _signed_in(client)
    assert len(_rows(sessions, SignInAttempt)) == 5
    assert _attempt(client, BOB, BOB_PASSWORD).status_code == 302, "another user is not held"


def test_the_wait_ends_when_the_failures_leave_the_window(app: Flask, sessions):
    """Retry-After counts down to the oldest failure leaving the 15 minutes; then the
    right password signs in again."""
    client = app.test_client()
    for _ in range(5):
        _attempt(client, USER, "wrong")
    _age_attempts(sessions, dt.timedelta(minutes=10))
    refused = _attempt(client, USER, PASSWORD)
    assert refused.status_code == 429
    assert 0 < int(refused.headers["Retry-After"]) <= 300
    _age_attempts(sessions, dt.timedelta(minutes=5))
    assert _attempt(client, USER, PASSWORD).status_code == 302


def test_a_success_clears_the_users_count(app: Flask):
    """Failures before the user's own successful sign-in no longer count against them."""
    client = app.test_client()
    for _ in range(4):
        _attempt(client, USER, "wrong")
    assert _attempt(client, USER, PASSWORD).status_code == 302
    other = app.test_client()
    for _ in range(4):
        assert _attempt(other, USER, "wrong").status_code == 401
    assert _attempt(other, USER, PASSWORD).status_code == 302


def test_twenty_failures_from_an_address_hold_it_whatever_the_name(app: Flask):
    """20 failures from one address (over many names) hold that address, even for a user
    who then signs in with the right password; another address is not held; a success
    from the address does not clear its count."""
    here = {"environ_base": {"REMOTE_ADDR": "198.51.100.7"}}
    client = app.test_client()
    for number in range(19):
        assert _attempt(client, f"guess-{number}", "wrong", **here).status_code == 401
    assert _attempt(client, BOB, BOB_PASSWORD, **here).status_code == 302
    assert _attempt(app.test_client(), "guess-19", "wrong", **here).status_code == 401
    refused = _attempt(app.test_client(), USER, PASSWORD, **here)
    assert refused.status_code == 429 and "Retry-After" in refused.headers
    elsewhere = {"environ_base": {"REMOTE_ADDR": "198.51.100.8"}}
    assert _attempt(app.test_client(), USER, PASSWORD, **elsewhere).status_code == 302


def test_the_count_is_shared_by_every_process(
    make_app: Callable[[Settings], Flask], app: Flask, settings: Settings
):
    """Two apps with engines of their own (two workers, or two nodes) count together."""
    other_node = make_app(settings)
    for node in (app, other_node, app, other_node, app):
        assert _attempt(node.test_client(), USER, "wrong").status_code == 401
    assert _attempt(other_node.test_client(), USER, PASSWORD).status_code == 429


def test_an_over_long_or_nul_name_is_counted_not_a_server_error(app: Flask, sessions):
    """A 10,000-character name or one holding NUL is a plain 401 and counted."""
    client = app.test_client()
    for name in ("x" * 10_000, "al\x00ice"):
        assert _attempt(client, name, "wrong").status_code == 401
    assert len(_rows(sessions, SignInAttempt)) == 2


def test_behind_a_trusted_proxy_the_forwarded_address_counts(
    make_app: Callable[[Settings], Flask], settings: Settings, sessions
):
    """With trusted_proxies=1 the address is X-Forwarded-For's last hop; with 0 (the
    default) the header is ignored, as a client could forge it."""
    forwarded = {"headers": {"X-Forwarded-For": "203.0.113.9"}}
    _attempt(make_app(settings).test_client(), USER, "wrong", **forwarded)
    proxied = make_app(settings.model_copy(update={"trusted_proxies": 1}))
    _attempt(proxied.test_client(), USER, "wrong", **forwarded)
    assert [row.address for row in _rows(sessions, SignInAttempt)] == ["127.0.0.1", "203.0.113.9"]


# --- methods that must not sign in ------------------------------------------------------


@pytest.mark.parametrize("method", ["HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_no_method_but_post_signs_in(client: FlaskClient, sessions, method: str):
    """A sign-in form body sent with any other method (HEAD included, which Flask routes
    to the form's view) signs nobody in and records nothing."""
    token = csrf_token(client.get("/finance/sign-in").data)
    response = client.open(
        "/finance/sign-in",
        method=method,
        data={"name": USER, "password": PASSWORD, "csrf_token": token},
    )
    assert response.status_code in (200, 400, 405), response.status_code
    assert not _signed_in(client)
    assert _rows(sessions, FinanceSession) == []
    assert _rows(sessions, SignInAttempt) == []


def test_a_user_name_longer_than_its_columns_is_refused_by_the_settings(
    migrated_engine: sa.Engine, tmp_path, user_entry: str
):
    """A finance user name over 100 characters (the width of the columns that record
    who did what) is a settings error naming the entry, never a failed sign-in later."""
    long_entry = "x" * 101 + ":" + user_entry.partition(":")[2]
    with pytest.raises(ValueError, match="finance user 1's name is longer than 100"):
        finance_settings(migrated_engine, tmp_path, finance_users=[SecretStr(long_entry)])


def test_sign_out_all_on_an_unmigrated_database_is_one_line(tmp_path):
    """Against a database without the schema, the command says so in one line, exit 1."""
    env = {"OTACM_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.sqlite3'}"}
    result = CliRunner().invoke(main, ["finance", "sign-out-all"], env=env)
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot end the finance sign-ins:")
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
