"""Finance sign-ins kept in the database, so that ending one ends it everywhere.

A sign-in is a :class:`~storage.records.FinanceSession` row. The browser's (signed)
session cookie carries a random token (:func:`start` makes it); the row's id is the
token's SHA-256, so neither the table nor a backup of it can be turned into cookies.
:func:`signed_in_user` checks the row at every request: a sign-in ends at its absolute
lifetime, after an idle time without requests, when revoked (:func:`revoke` at sign-out,
:func:`revoke_all` for ``otacm finance sign-out-all``), and when the user's password
hash in the settings is no longer the one it began with (the row keeps a fingerprint of
the hash, :func:`password_fingerprint`) or the user is gone from the settings.

Reads are cheap and writes rare: the check reads one row by primary key, and records the
request's time (``last_seen_at``) at most once a minute (:data:`TOUCH_EVERY`). Ended rows
are deleted when someone signs in (:func:`prune`). The functions take a session and never
commit: the caller owns the transaction.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.orm import Session

from storage.records import FinanceSession

TOKEN_BYTES = 32
"""The cookie's token: 256 random bits."""
TOUCH_EVERY = dt.timedelta(minutes=1)
"""How stale ``last_seen_at`` may be before a request writes it again."""


@dataclass(frozen=True)
class Lifetimes:
    """How long a sign-in lasts: at most ``absolute`` in all, and ``idle`` between requests."""

    absolute: dt.timedelta
    idle: dt.timedelta


@dataclass(frozen=True)
class SignedIn:
    """A valid sign-in: whose it is, and whether this request should record its time."""

    user: str
    touch: bool


def token_id(token: str) -> str:
    """The row id of the sign-in whose cookie carries ``token``."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def password_fingerprint(password_hash: SecretStr) -> str:
    """A fingerprint of a user's password hash: it changes when the password does.

    The hash is salted, so its digest says nothing a password could be guessed from.
    """
    return hashlib.sha256(password_hash.get_secret_value().encode()).hexdigest()


def start(
    session: Session,
    user: str,
    password_hash: SecretStr,
    *,
    now: dt.datetime,
    lifetimes: Lifetimes,
) -> str:
    """Record a new sign-in of ``user``, deleting ended ones; the token for the cookie.

    Args:
        session: the caller's session; the row is added to it.
        user: the user who signed in.
        password_hash: their password hash in the settings.
        now: the time of the sign-in.
        lifetimes: the settings' lifetimes, for the row's expiry and for pruning.
    """
    prune(session, now=now, idle=lifetimes.idle)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    session.add(
        FinanceSession(
            id=token_id(token),
            user_name=user,
            password_fingerprint=password_fingerprint(password_hash),
            created_at=now,
            last_seen_at=now,
            expires_at=now + lifetimes.absolute,
        )
    )
    return token


def signed_in_user(
    session: Session,
    token: str,
    users: dict[str, SecretStr],
    *,
    now: dt.datetime,
    idle: dt.timedelta,
) -> SignedIn | None:
    """Whose sign-in ``token`` is, if it has not ended; ``None`` otherwise.

    Args:
        session: a (read-only) session.
        token: the token from the cookie.
        users: the configured users' password hashes, by name.
        now: the request's time.
        idle: the settings' idle timeout.
    """
    row = session.get(FinanceSession, token_id(token))
    if row is None or row.revoked_at is not None or now >= row.expires_at:
        return None
    if now - row.last_seen_at >= idle:
        return None
    password_hash = users.get(row.user_name)
    if password_hash is None or not secrets.compare_digest(
        password_fingerprint(password_hash), row.password_fingerprint
    ):
        return None
    return SignedIn(row.user_name, touch=now - row.last_seen_at >= TOUCH_EVERY)


def touch(session: Session, token: str, *, now: dt.datetime) -> None:
    """Record a request of the sign-in ``token`` (see :data:`TOUCH_EVERY`)."""
    session.execute(
        sa.update(FinanceSession)
        .where(FinanceSession.id == token_id(token), FinanceSession.last_seen_at < now)
        .values(last_seen_at=now)
    )


def revoke(session: Session, token: str, *, now: dt.datetime) -> None:
    """End the sign-in ``token`` (signing out): its cookie, and every copy, is refused."""
    session.execute(
        sa.update(FinanceSession)
        .where(FinanceSession.id == token_id(token), FinanceSession.revoked_at.is_(None))
        .values(revoked_at=now)
    )


def revoke_all(
    session: Session, *, now: dt.datetime, idle: dt.timedelta, user: str | None = None
) -> int:
    """End every open sign-in, or only ``user``'s; how many were open.

    Sign-ins that had already ended are deleted first (:func:`prune`), so the count is of
    those a cookie could still use.
    """
    prune(session, now=now, idle=idle)
    update = sa.update(FinanceSession).where(FinanceSession.revoked_at.is_(None))
    if user is not None:
        update = update.where(FinanceSession.user_name == user)
    return _rowcount(session.execute(update.values(revoked_at=now)))


def prune(session: Session, *, now: dt.datetime, idle: dt.timedelta) -> int:
    """Delete the sign-ins that have ended by time or were revoked; how many."""
    ended = sa.or_(
        FinanceSession.revoked_at.is_not(None),
        FinanceSession.expires_at <= now,
        FinanceSession.last_seen_at <= now - idle,
    )
    return _rowcount(session.execute(sa.delete(FinanceSession).where(ended)))


def _rowcount(result: sa.Result[Any]) -> int:
    # DML results are CursorResults, which count the rows they matched.
    return int(getattr(result, "rowcount", 0))
