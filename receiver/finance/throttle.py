"""Sign-in throttling: too many wrong passwords for a user, or from an address, wait.

Every attempt is a :class:`~storage.records.SignInAttempt` row, so every gunicorn worker
and every node of a deployment counts the same attempts (a rate-limit library would
need a shared store of its own, Redis or memcached, that otacm does not otherwise run).
:func:`retry_after` says whether a new attempt may be checked now: not when the user
name had ``per_user`` failures within the window since that user's last successful
sign-in, nor when the address had ``per_address`` failures within the window (a
success does not clear an address's count: someone signing in to their own account
must not earn more guesses at others'). The wait lasts until enough of those failures
have left the window. The name counted is the one typed in, known or not, so a refusal
says nothing about which users exist; refused attempts are not recorded, so the wait
ends when announced.

Two attempts checked at the same moment by two processes can both pass the count: the
limit may be overshot by the number of attempts in flight at once, never more.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from storage.models import ACTOR
from storage.records import SignInAttempt

ADDRESS_WIDTH = 100
"""The ``address`` column's width."""


@dataclass(frozen=True)
class Limits:
    """The throttle's rule: failures allowed per user name and per address in ``window``."""

    window: dt.timedelta
    per_user: int
    per_address: int


def counted_name(name: str) -> str:
    """The user name as the attempts table keeps it (see :func:`_storable`)."""
    return _storable(name, ACTOR.length or 100)


def counted_address(address: str | None) -> str:
    """The address as the attempts table keeps it (see :func:`_storable`)."""
    return _storable(address or "", ADDRESS_WIDTH)


def _storable(text: str, width: int) -> str:
    # Cut to the column's width; PostgreSQL's text cannot hold NUL, so it is replaced
    # (not dropped: "a\0b" stays a name of its own).
    return text.replace("\x00", "\ufffd")[:width]


def retry_after(
    session: Session, *, name: str, address: str | None, now: dt.datetime, limits: Limits
) -> int | None:
    """Seconds to wait before ``name`` may try to sign in from ``address``; ``None``: now.

    Args:
        session: a (read-only) session.
        name: the user name typed in.
        address: the client's address.
        now: the attempt's time.
        limits: the settings' throttle.
    """
    since = now - limits.window
    name = counted_name(name)
    last_success = session.scalar(
        sa.select(sa.func.max(SignInAttempt.at)).where(
            SignInAttempt.user_name == name, SignInAttempt.ok, SignInAttempt.at > since
        )
    )
    user_wait = _wait(
        session,
        SignInAttempt.user_name == name,
        since=since if last_success is None else max(since, last_success),
        limit=limits.per_user,
        now=now,
        window=limits.window,
    )
    address_wait = _wait(
        session,
        SignInAttempt.address == counted_address(address),
        since=since,
        limit=limits.per_address,
        now=now,
        window=limits.window,
    )
    waits = [wait for wait in (user_wait, address_wait) if wait is not None]
    if not waits:
        return None
    # Whole seconds, rounded up, at least one: what Retry-After can say.
    return max(1, math.ceil(max(waits).total_seconds()))


def _wait(
    session: Session,
    who: sa.ColumnElement[bool],
    *,
    since: dt.datetime,
    limit: int,
    now: dt.datetime,
    window: dt.timedelta,
) -> dt.timedelta | None:
    """How long until fewer than ``limit`` failures of ``who`` lie in the window."""
    failures = session.scalars(
        sa.select(SignInAttempt.at)
        .where(who, sa.not_(SignInAttempt.ok), SignInAttempt.at > since)
        .order_by(SignInAttempt.at.desc())
        .limit(limit)
    ).all()
    if len(failures) < limit:
        return None
    # Once the limit-th newest failure leaves the window, one more attempt is allowed.
    return failures[-1] + window - now


def record(
    session: Session,
    *,
    name: str,
    address: str | None,
    ok: bool,
    now: dt.datetime,
    window: dt.timedelta,
) -> None:
    """Record an attempt that was checked, and delete those older than the window."""
    session.execute(sa.delete(SignInAttempt).where(SignInAttempt.at <= now - window))
    session.add(
        SignInAttempt(user_name=counted_name(name), address=counted_address(address), at=now, ok=ok)
    )
