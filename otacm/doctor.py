"""``otacm doctor``: checks that the configuration points at things that work.

Each check is one line for a person: what was checked and, on failure, what is wrong in
words that say what to fix. Besides the database and each venue's key, the doctor finds
out which way of writing the company in the path the venue answers, and counts each
configured partner's orders (a mistyped partner id lists nothing, silently). It also looks
for what breaks production without an error anywhere: a connection with no webhook client
state (every webhook refused), a subscription missing or inactive at the venue, jobs
that have not succeeded for :data:`STALE_INTERVALS` of their intervals, dead letters
waiting in the inbox or the outbox; and warns when no finance user or no API token is
configured (the finance pages or ``/api/`` are closed).

The doctor has no side effects: it creates no database (a SQLite file that does not
exist is reported, not made), no directory and no secrets file, and its one write, which
proves the database takes writes, is rolled back.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from otacm.settings import Settings, mask_database_url
from venue.connection import COMPANY_PATH_FORMS, SettingsError, VenueConnection, company_name

if TYPE_CHECKING:
    from sqlalchemy import Engine

ORDER_COUNT_CAP = 100
"""Orders counted per partner: one page of this size, so the check is one call however
long the partner's history (a full count would page through all of it, customer names
and e-mails included); beyond it the doctor says "at least"."""

STALE_INTERVALS = 3
"""A job whose last success is older than this many of its intervals fails the doctor."""

LATE_JOBS_NAMED = 5
"""Late jobs named in the doctor's line; the facts list every one."""

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
    settings: Settings,
    *,
    timeout: float,
    transport: httpx.BaseTransport | None = None,
    now: dt.datetime | None = None,
) -> list[Check]:
    """Check the database, what it holds, the configuration and every venue connection.

    Args:
        settings: the effective settings.
        timeout: seconds allowed for each venue call.
        transport: an httpx transport for the venue calls (tests); the default is the network.
        now: the current time, for the jobs' check (default: the clock).
    """
    from storage.engine import DATABASE_UNAVAILABLE, database_error_reason
    from storage.types import utcnow

    engine, database = open_database(settings.database_url)
    checks = [database]
    if engine is not None:
        try:
            checks += [
                check_jobs(engine, settings, now=now or utcnow()),
                check_dead_letters(engine),
                check_shop_deliveries(engine),
            ]
        except DATABASE_UNAVAILABLE as exc:  # gone since the database check
            reason = database_error_reason(exc)
            checks.append(Check("database", False, f"cannot read it any more: {reason}"))
        finally:
            engine.dispose()
    checks += check_access(settings)
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
        checks.append(check_client_states(venue, settings))
        venue_checks = check_venue(venue, timeout=timeout, transport=transport)
        checks.extend(venue_checks)
        if venue_checks[0].ok:
            checks.append(check_subscription(venue, settings, timeout=timeout, transport=transport))
    return checks


def open_database(url: str) -> tuple[Engine | None, Check]:
    """Open the database without creating it, prove it takes a write (rolled back), and
    compare its schema with the latest.

    Returns:
        An engine on it when it is usable and at the latest schema (the caller disposes of
        it), else ``None``; and the check's line.
    """
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from storage.engine import DatabaseUnusable, database_error_reason, make_engine
    from storage.migrate import current_revision, head_revision

    shown = mask_database_url(url)
    try:
        missing = _missing_sqlite_file(make_url(url))
    except ArgumentError as exc:
        return None, Check("database", False, f"cannot use {shown}: {first_line(exc)}")
    if missing:
        return None, Check("database", False, f"cannot use {shown}: {missing}")
    try:
        engine = make_engine(url)
    except DatabaseUnusable as exc:
        return None, Check("database", False, f"cannot use {shown}: {exc}")
    except (SQLAlchemyError, ValueError) as exc:
        return None, Check("database", False, f"cannot use {shown}: {first_line(exc)}")
    try:
        with engine.connect() as connection, connection.begin() as transaction:
            # A throwaway write inside a transaction that is rolled back: proves the file
            # (or server) accepts writes without leaving anything behind.
            probe = f"otacm_doctor_probe_{secrets.token_hex(4)}"
            connection.execute(text(f"CREATE TABLE {probe} (x INTEGER)"))
            transaction.rollback()
        current, head = current_revision(engine), head_revision()
    except SQLAlchemyError as exc:
        engine.dispose()
        reason = database_error_reason(exc)
        return None, Check("database", False, f"cannot write to {shown}: {reason}")
    if current != head:
        engine.dispose()
        return None, Check(
            "database",
            False,
            f"{shown} is at schema {current or '(empty)'}, latest is {head}: "
            "run `otacm db upgrade`",
        )
    return engine, Check("database", True, f"{shown} is writable and at the latest schema ({head})")


def _missing_sqlite_file(url: Any) -> str | None:
    """Why a SQLite database file is not there to open, or ``None`` (not SQLite, in
    memory, or there): opening it would create it."""
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or database in ("", ":memory:") or url.query:
        return None
    path = Path(database).expanduser()
    if path.is_file():
        return None
    if path.exists():
        return f"{path} is not a file"
    if path.parent.exists() and not path.parent.is_dir():
        return f"{path.parent} is not a directory"
    return f"{path} does not exist: run `otacm db upgrade` to create it"


def check_jobs(engine: Engine, settings: Settings, *, now: dt.datetime) -> Check:
    """Whether every scheduled job the settings enable succeeded within
    :data:`STALE_INTERVALS` of its intervals (the ``job_run`` records)."""
    import sqlalchemy as sa

    from heartbeat.split_jobs import SplitJob
    from otacm.processes import Runtime, scheduled_jobs
    from storage.engine import make_sessions
    from storage.records import JobRun

    sessions = make_sessions(engine, read_only=True)
    # Only the names and intervals are read: no job runs, no venue client is needed, and
    # the connections' ids are not (a split job names its units by connection name).
    connections = dict(enumerate(settings.connections))
    runtime = Runtime(engine=engine, sessions=sessions, clients={}, connections=connections)
    intervals = {
        name: job.interval
        for job in scheduled_jobs(settings, runtime)
        # A job split into units (the change feed, per partner) is checked unit by unit.
        for name in ([u.name for u in job.units] if isinstance(job, SplitJob) else [job.name])
    }
    with sessions.begin() as session:
        records = {record.name: record for record in session.scalars(sa.select(JobRun))}
    if not records:
        return Check(
            "jobs",
            True,
            "no scheduled job has run on this database yet: start `otacm scheduler` "
            "(or `otacm serve`)",
            warning=True,
        )
    late: dict[str, dict[str, Any]] = {}
    parts = []
    for name, interval in intervals.items():
        record = records.get(name)
        last = record.last_success_at if record else None
        if last is not None and now - last <= dt.timedelta(seconds=interval * STALE_INTERVALS):
            continue
        error = record.last_error if record and record.failures else None
        late[name] = {
            "lastSuccess": last.isoformat() if last else None,
            "intervalSeconds": interval,
            "lastError": error,
        }
        since = f"last succeeded {_duration(now - last)} ago" if last else "never succeeded"
        every = _duration(dt.timedelta(seconds=interval))
        parts.append(f"{name} (every {every}) {since}" + (f": {error[:120]}" if error else ""))
    if not late:
        return Check("jobs", True, f"every job succeeded within {STALE_INTERVALS} of its intervals")
    if len(parts) > LATE_JOBS_NAMED:
        # Hundreds of partners' feeds late together (the venue away): the facts list them.
        parts = [*parts[:LATE_JOBS_NAMED], f"and {len(parts) - LATE_JOBS_NAMED} more"]
    return Check(
        "jobs",
        False,
        f"not succeeding: {'; '.join(parts)}; is a scheduler running? `otacm poll` runs "
        "them once and says why",
        facts={"late": late},
    )


def _duration(delta: dt.timedelta) -> str:
    """A duration for a person: ``45 s``, ``12 min``, ``3 h``, ``2 d``."""
    seconds = delta.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def check_dead_letters(engine: Engine) -> Check:
    """Whether inbox or outbox rows were given up: orders notified but never fetched,
    sales or actions never sent. Each needs a person."""
    import sqlalchemy as sa

    from storage.engine import make_sessions
    from storage.models import Inbox, InboxState, Outbox, OutboxState

    with make_sessions(engine, read_only=True).begin() as session:
        inbox = session.scalar(
            sa.select(sa.func.count()).select_from(Inbox).where(Inbox.state == InboxState.DEAD)
        )
        outbox = session.scalar(
            sa.select(sa.func.count()).select_from(Outbox).where(Outbox.state == OutboxState.DEAD)
        )
    facts = {"inbox": int(inbox or 0), "outbox": int(outbox or 0)}
    if not any(facts.values()):
        return Check("dead letters", True, "none in the inbox or the outbox", facts=facts)
    parts = []
    if facts["inbox"]:
        parts.append(
            f"{facts['inbox']} inbox row(s) dead-lettered (orders notified, never fetched: "
            "fix the cause, then `otacm inbox replay`)"
        )
    if facts["outbox"]:
        parts.append(
            f"{facts['outbox']} outbox row(s) given up (sales or actions never sent to the "
            "venue: their last_error says why)"
        )
    return Check("dead letters", False, "; ".join(parts), facts=facts)


def check_shop_deliveries(engine: Engine) -> Check:
    """Whether events to the shop were given up: the shop never got them."""
    import sqlalchemy as sa

    from storage.engine import make_sessions
    from storage.records import DeliveryState, ShopDelivery

    with make_sessions(engine, read_only=True).begin() as session:
        rows = session.execute(
            sa.select(ShopDelivery.endpoint, sa.func.count())
            .where(ShopDelivery.state == DeliveryState.DEAD)
            .group_by(ShopDelivery.endpoint)
            .order_by(ShopDelivery.endpoint)
        ).all()
    facts = {endpoint: int(count) for endpoint, count in rows}
    if not facts:
        return Check("shop events", True, "no delivery given up", facts=facts)
    counts = ", ".join(f"{count} to {endpoint}" for endpoint, count in facts.items())
    return Check(
        "shop events",
        False,
        f"deliveries given up: {counts} (the shop never got them: "
        "`otacm deliveries list --state dead`, then `otacm deliveries replay --dead`)",
        facts=facts,
    )


def check_access(settings: Settings) -> list[Check]:
    """Warnings for the doors that stay closed: the finance pages without a user, the
    shop's API without a token."""
    checks = []
    if settings.finance_users:
        count = len(settings.finance_users)
        checks.append(Check("finance users", True, f"{count} configured"))
    else:
        checks.append(
            Check(
                "finance users",
                True,
                "none configured (OTACM_FINANCE_USERS): the finance pages are closed",
                warning=True,
            )
        )
    if settings.api_tokens:
        checks.append(Check("api tokens", True, f"{len(settings.api_tokens)} configured"))
    else:
        checks.append(
            Check(
                "api tokens",
                True,
                "none configured (OTACM_API_TOKENS): /api/ is closed, the shop cannot "
                "submit sales through it",
                warning=True,
            )
        )
    return checks


def check_client_states(venue: VenueConnection, settings: Settings) -> Check:
    """Whether the receiver accepts any webhook of ``venue``: without a client state,
    configured or generated into the states file, it refuses every one. Reads the file;
    creates nothing."""
    name = f"venue {venue.name} webhook client states"
    try:
        states = venue.client_states(settings.secrets_dir)
    except SettingsError as exc:
        return Check(name, False, str(exc))
    if not states:
        return Check(
            name,
            False,
            "none configured nor generated: every webhook is refused; run `otacm subscribe "
            "--url URL` (it generates one) or set OTACM_WEBHOOK_CLIENT_STATES",
        )
    return Check(name, True, f"{len(states)} accepted (never shown)")


def check_subscription(
    venue: VenueConnection,
    settings: Settings,
    *,
    timeout: float,
    transport: httpx.BaseTransport | None,
) -> Check:
    """Whether the venue lists a usable subscription of ours: active, to our event, with a
    client state the receiver accepts, and to ``OTACM_WEBHOOK_URL`` when it is set
    (:func:`heartbeat.subscriptions.find_subscriptions`). Without it, no webhook arrives
    and nothing says so but the change feed's lag."""
    from heartbeat.subscriptions import find_subscriptions
    from venue.client import open_client
    from venue.errors import VenueError
    from venue.retry import RetryPolicy

    name = f"venue {venue.name} subscription"
    try:
        states = venue.client_states(settings.secrets_dir)
    except SettingsError:
        states = list(venue.webhook_client_states)
    once = RetryPolicy(attempts=1, deadline=timeout)
    try:
        with open_client(venue, transport=transport, timeout=timeout, retry=once) as client:
            listed = client.list_subscriptions()
    except VenueError as exc:
        return Check(name, False, f"cannot list the subscriptions: {exc}")
    url = settings.webhook_url
    ours, usable = find_subscriptions(listed, url, states)
    facts = {"url": url, "listed": len(listed), "ours": len(ours), "usable": len(usable)}
    subscribe = f"run `otacm subscribe --url {url or 'URL'}`"
    if url is None:
        if not usable:
            return Check(
                name,
                False,
                "no active subscription to ota_cm_order_processed with a client state this "
                f"receiver accepts: no webhook arrives; {subscribe} and set OTACM_WEBHOOK_URL",
                facts=facts,
            )
        targets = ", ".join(sorted({s.notification_url or "" for s in usable}))
        return Check(
            name,
            True,
            f"active subscription(s) to {targets}; OTACM_WEBHOOK_URL is not set, so which is "
            "this receiver's is not known and the scheduler does not keep it alive",
            warning=True,
            facts=facts,
        )
    if usable:
        return Check(name, True, f"{usable[0].id} sends ota_cm_order_processed to {url}")
    if ours:
        return Check(
            name,
            False,
            f"the subscription(s) to {url} are inactive or carry a client state this "
            f"receiver refuses: no webhook arrives; {subscribe}",
            facts=facts,
        )
    return Check(
        name,
        False,
        f"no subscription sends ota_cm_order_processed to {url}: no webhook arrives; {subscribe}",
        facts=facts,
    )


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
    from venue.client import open_client
    from venue.errors import VenueError
    from venue.retry import RetryPolicy

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
    from venue.client import open_client
    from venue.retry import RetryPolicy

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
