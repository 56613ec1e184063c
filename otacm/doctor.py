"""``otacm doctor``: checks that the configuration points at things that work.

Each check is one line for a person: what was checked and, on failure, what is wrong in
words that say what to fix. Nothing here changes stored data.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from otacm.settings import Settings, VenueConnection, mask_database_url


@dataclass(frozen=True)
class Check:
    """The outcome of one check."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """The check as a JSON-ready dict."""
        return asdict(self)


def run_checks(
    settings: Settings, *, timeout: float, transport: httpx.BaseTransport | None = None
) -> list[Check]:
    """Check the database and every venue connection.

    Args:
        settings: the effective settings.
        timeout: seconds allowed for each venue call.
        transport: an httpx transport for the venue calls (tests); the default is the network.
    """
    checks = [check_database(settings.database_url)]
    if not settings.connections:
        checks.append(
            Check(
                "venues",
                False,
                "no venue connection configured: set OTACM_TENANT, OTACM_COMPANY and "
                "OTACM_API_KEY, or list [[connections]] in the OTACM_CONFIG_FILE file",
            )
        )
    for venue in settings.connections:
        checks.append(check_venue(venue, timeout=timeout, transport=transport))
    return checks


def check_database(url: str) -> Check:
    """Open the database, prove it takes a write, and compare its schema with the latest."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from storage.engine import make_engine
    from storage.migrate import current_revision, head_revision

    shown = mask_database_url(url)
    try:
        engine = make_engine(url)
    except OSError as exc:
        return Check(
            "database", False, f"cannot use {shown}: {exc.strerror or exc} ({exc.filename})"
        )
    except (SQLAlchemyError, ValueError) as exc:
        return Check("database", False, f"cannot use {shown}: {first_line(exc)}")
    try:
        with engine.begin() as connection:
            # A throwaway write inside a transaction that is rolled back: proves the file
            # (or server) accepts writes without leaving anything behind.
            probe = f"otacm_doctor_probe_{secrets.token_hex(4)}"
            connection.execute(text(f"CREATE TABLE {probe} (x INTEGER)"))
            connection.execute(text(f"DROP TABLE {probe}"))
        current, head = current_revision(engine), head_revision()
    except SQLAlchemyError as exc:
        return Check(
            "database",
            False,
            f"cannot write to {shown}: {first_line(getattr(exc, 'orig', None) or exc)}",
        )
    finally:
        engine.dispose()
    if current != head:
        return Check(
            "database",
            False,
            f"{shown} is at schema {current or '(empty)'}, latest is {head}: "
            "run `otacm db upgrade`",
        )
    return Check("database", True, f"{shown} is writable and at the latest schema ({head})")


def check_venue(
    venue: VenueConnection, *, timeout: float, transport: httpx.BaseTransport | None
) -> Check:
    """Make one cheap authenticated call to the venue and explain what came back."""
    from venue.client import RetryPolicy, open_client
    from venue.errors import (
        VenueAuthError,
        VenueError,
        VenueForbidden,
        VenueNotFound,
        VenueUnavailable,
    )

    name = f"venue {venue.name}"
    # One attempt: the doctor reports what is wrong now rather than waiting it out.
    once = RetryPolicy(attempts=1, deadline=timeout)
    try:
        with open_client(venue, transport=transport, timeout=timeout, retry=once) as client:
            if venue.partner_ids:
                next(iter(client.list_orders(venue.partner_ids[0], page_size=1)), None)
            else:
                client.list_subscriptions()
    except (VenueAuthError, VenueForbidden) as exc:
        return Check(name, False, f"{venue.base_url} refused the API key: {exc}")
    except VenueNotFound as exc:
        return Check(name, False, f"{venue.base_url} does not know this tenant/company: {exc}")
    except VenueUnavailable as exc:
        return Check(name, False, f"cannot reach {venue.base_url}: {exc}")
    except VenueError as exc:
        return Check(name, False, f"{venue.base_url} answered with an error: {exc}")
    partners = ", ".join(venue.partner_ids) or "no partner ids configured"
    return Check(name, True, f"{venue.base_url} accepted the key ({partners})")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: drivers append SQL and links below it."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
