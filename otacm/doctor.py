"""``otacm doctor``: checks that the configuration points at things that work.

Each check is one line for a person: what was checked and, on failure, what is wrong in
words that say what to fix. Besides the database and each venue's key, the doctor finds
out which way of writing the company in the path the venue answers, and counts each
configured partner's orders (a mistyped partner id lists nothing, silently). Nothing
here changes stored data.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from otacm.settings import (
    COMPANY_PATH_FORMS,
    Settings,
    VenueConnection,
    company_name,
    mask_database_url,
)

ORDER_COUNT_CAP = 100
"""Orders counted per partner: one page of this size, so the check is one call however
long the partner's history (a full count would page through all of it, customer names
and e-mails included); beyond it the doctor says "at least"."""

_FORM_EXAMPLES = {"percent": "%20", "double": "%2520", "plus": "+"}


@dataclass(frozen=True)
class Check:
    """The outcome of one check.

    Attributes:
        name: what was checked.
        ok: it passed.
        detail: one line for a person.
        warning: passed, but a person should look.
        facts: what was found, for ``--json`` (counts, forms), when there is more than
            the line says.
    """

    name: str
    ok: bool
    detail: str
    warning: bool = False
    facts: dict[str, Any] | None = None

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
        checks.extend(check_venue(venue, timeout=timeout, transport=transport))
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
) -> list[Check]:
    """Check one venue connection with a few cheap authenticated calls.

    First the connection as configured (one list call): does the venue answer, does it
    take the key. When it answers, or does not know the company, the company is tried in
    each form it can be written in (:func:`probe_company_forms`), and when the configured
    form works, each partner's orders are counted (:func:`count_partner_orders`). A venue
    that cannot be reached or refuses the key gets that one line only: the other calls
    would fail the same way.
    """
    from venue.errors import (
        VenueAuthError,
        VenueError,
        VenueForbidden,
        VenueNotFound,
        VenueUnavailable,
    )

    name = f"venue {venue.name}"
    try:
        _probe(venue, timeout=timeout, transport=transport)
    except (VenueAuthError, VenueForbidden) as exc:
        return [Check(name, False, f"{venue.base_url} refused the API key: {exc}")]
    except VenueNotFound as exc:
        checks = [Check(name, False, f"{venue.base_url} does not know this tenant/company: {exc}")]
        return [*checks, probe_company_forms(venue, timeout=timeout, transport=transport)]
    except VenueUnavailable as exc:
        return [Check(name, False, f"cannot reach {venue.base_url}: {exc}")]
    except VenueError as exc:
        return [Check(name, False, f"{venue.base_url} answered with an error: {exc}")]
    partners = ", ".join(venue.partner_ids) or "no partner ids configured"
    return [
        Check(name, True, f"{venue.base_url} accepted the key ({partners})"),
        probe_company_forms(venue, timeout=timeout, transport=transport),
        *count_partner_orders(venue, timeout=timeout, transport=transport),
    ]


def probe_company_forms(
    venue: VenueConnection, *, timeout: float, transport: httpx.BaseTransport | None
) -> Check:
    """Which ways of writing the company in the path the venue answers, and the advice.

    The venue's pages disagree (``%20``, ``%2520``, ``+``; ``spec/API.md``, "Addressing
    and auth") and the gateway that decides is not in the vendor's source, so each is
    tried with one cheap list call. Passes when the configured form is answered; fails
    naming the setting to use when only another one is.
    """
    from venue.errors import VenueError

    name = f"venue {venue.name} company path"
    answered = []
    refused = {}
    for form in COMPANY_PATH_FORMS:
        try:
            _probe(
                venue.model_copy(update={"company_path_form": form}),
                timeout=timeout,
                transport=transport,
            )
        except VenueError as exc:
            refused[form] = exc.status or "no answer"
            continue
        answered.append(form)
    shown = ", ".join(f"{form} ({_FORM_EXAMPLES[form]})" for form in answered)
    configured = venue.company_path_form
    advice = None if configured in answered or not answered else answered[0]
    facts = {"configured": configured, "answered": answered, "use": advice or configured}
    if configured in answered:
        return Check(
            name,
            True,
            f"the venue answers the company written as {shown}; configured: {configured}",
            facts=facts,
        )
    if advice is not None:
        return Check(
            name,
            False,
            f"the venue does not answer the company written as {configured} "
            f"({_FORM_EXAMPLES[configured]}) but answers {shown}: set company_path_form = "
            f'"{advice}" for connection {venue.name} (OTACM_COMPANY_PATH_FORM={advice})',
            facts=facts,
        )
    tried = ", ".join(f"{form}: {status}" for form, status in refused.items())
    return Check(
        name,
        False,
        f"the venue answers the company {company_name(venue.company)!r} in no form ({tried}): "
        "check the tenant, environment and company name",
        facts={**facts, "use": None},
    )


def count_partner_orders(
    venue: VenueConnection, *, timeout: float, transport: httpx.BaseTransport | None
) -> list[Check]:
    """How many orders the venue lists for each configured partner, up to a cap.

    The venue only filters by the partner id (ChannelMgrOrderAgent ListOrdersByPartner):
    a mistyped but well-formed id lists nothing, silently. So a partner with no order at
    all is a warning, to be checked against the id the venue issued.
    """
    from venue.client import RetryPolicy, open_client
    from venue.errors import VenueError

    checks = []
    once = RetryPolicy(attempts=1, deadline=timeout)
    with open_client(venue, transport=transport, timeout=timeout, retry=once) as client:
        for partner in venue.partner_ids:
            name = f"venue {venue.name} partner {partner}"
            try:
                page = client.orders_page(partner, page_size=ORDER_COUNT_CAP)
            except VenueError as exc:
                checks.append(Check(name, False, f"cannot list its orders: {exc}"))
                continue
            count = len(page.data) + len(page.unreadable)
            facts = {"partnerId": partner, "orders": count, "atLeast": page.more_pages}
            if count == 0:
                checks.append(
                    Check(
                        name,
                        True,
                        "the venue lists no order for this partner: it answers an unknown "
                        "partner id the same way, so if orders were sent, check the id with "
                        "the venue",
                        warning=True,
                        facts=facts,
                    )
                )
            elif page.more_pages:
                checks.append(
                    Check(
                        name,
                        True,
                        f"the venue lists at least {count} orders (counted up to "
                        f"{ORDER_COUNT_CAP}: one page, one call)",
                        facts=facts,
                    )
                )
            else:
                checks.append(Check(name, True, f"the venue lists {count} order(s)", facts=facts))
    return checks


def _probe(
    venue: VenueConnection, *, timeout: float, transport: httpx.BaseTransport | None
) -> None:
    """One cheap authenticated call: a one-row list of the first partner's orders, or the
    subscription list when no partner is configured.

    Raises:
        VenueError: the call failed.
    """
    from venue.client import RetryPolicy, open_client

    # One attempt: the doctor reports what is wrong now rather than waiting it out.
    once = RetryPolicy(attempts=1, deadline=timeout)
    with open_client(venue, transport=transport, timeout=timeout, retry=once) as client:
        if venue.partner_ids:
            client.orders_page(venue.partner_ids[0], page_size=1)
        else:
            client.list_subscriptions()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: drivers append SQL and links below it."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
