"""``otacm demo``: the daemon against the built-in sandbox, for a newcomer to watch.

It starts the sandbox (the simulated venue) on loopback, then ``otacm serve`` — web,
worker and scheduler — as a child process on a demo database, subscribes the receiver to
the venue's ``ota_cm_order_processed`` webhook, and sends a stream of sample orders
through otacm's own API (``POST /api/orders``: the sale is recorded, then createOrder is
called). The venue settles them on its cadence and notifies the receiver; the worker
fetches each order in full. The demo watches the local mirror fill, then prints what it
holds: orders by status, wallets, issued value per currency, the reason of every Error,
and how many venue API calls each order cost.

Then it closes the loop with finance. It plants a few mismatches, each through the
product's own paths (:func:`plant_mismatches`): an order placed at the venue directly,
which the receiver mirrors like any other (→ ``orphan``), and the shop's ledger export
written to ``var/demo-ledger.jsonl`` and imported as ``otacm ledger import`` does, with
a sale the venue never got (→ ``missing_at_venue``), an Issued sale repriced
(→ ``amount_mismatch``) and one refunded (→ ``cancelled_in_ledger``). A reconciliation
run over the demo's period follows, and its report's totals and exceptions are printed
(:func:`run_lines`), with the address of the finance pages and a demo user's password,
made up for this run and printed once, never written anywhere. With ``stay`` the demo
keeps the daemon up until Ctrl-C so the pages can be opened; either way it prints how to
reopen them later on the same database (``var/demo-finance.toml``: the database URL, the
user's password *hash* and a session key, owner-readable only; no venue key).

Sample orders come from the sandbox's catalog with a seeded random generator, so a run
can be repeated exactly: most are paid (→ Issued), some are not (→ Draft, awaiting
payment), and the last is an item the venue has sold out (→ Error: its ticket import
fails at processing).
A few roles are fixed so that every run shows every case (see :func:`sample_orders`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import httpx
import sqlalchemy as sa
import stamina
from pydantic import SecretStr

from otacm.settings import Settings
from venue.connection import VenueConnection
from venue.models import OrderRequest, OrderRequestItem, OrderStatus, WalletRequest

if TYPE_CHECKING:
    from reconciler.ledger import ImportResult
    from reconciler.report import ExceptionRow, RunReport
    from venue.client import VenueClient

GUESTS = ("Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov")
DEMO_DATABASE = Path("var") / "demo.sqlite3"
LEDGER_EXPORT = Path("var") / "demo-ledger.jsonl"
"""The shop's ledger export the demo writes and imports."""
FINANCE_CONFIG = Path("var") / "demo-finance.toml"
"""Settings that reopen the finance pages on the demo's database (owner-readable only)."""
FINANCE_USER = "demo"
REOPEN_BIND = "127.0.0.1:8000"
PLANTED_SALES = 2
"""The first sample orders: paid tickets, on which the ledger mismatches are planted."""
REPRICED_BY = Decimal("10.00")
"""How much more the ledger export says the repriced sale cost."""
PER_UNIT_KINDS = ("ticket", "coupon")
"""Catalog kinds with one wallet per unit of quantity."""
SUBMIT_DEADLINE = 60.0
"""Seconds a sample order is retried while otacm answers "retry later"."""


@dataclass
class DemoReport:
    """What the local mirror holds at the end of the demo."""

    submitted: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    wallets: int = 0
    amounts: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    errors: list[tuple[str, str]] = field(default_factory=list)
    venue_calls: dict[str, int] = field(default_factory=dict)
    webhooks_sent: int = 0
    database_url: str = ""
    example_reference: str = ""
    # Issued orders with a wallet per unit of quantity, by reference: those whose ledger
    # lines match the venue exactly, so a mismatch planted on one is the only one.
    plantable: list[str] = field(default_factory=list)

    def lines(self) -> Iterator[str]:
        """The summary as lines for a terminal."""
        yield f"orders submitted through otacm: {self.submitted}; in the local mirror:"
        for status, count in sorted(self.by_status.items()):
            yield f"  {status:<10} {count}"
        yield f"wallets mirrored: {self.wallets}"
        for currency, amount in sorted(self.amounts.items()):
            yield f"  issued value {currency}: {amount:.2f} incl. VAT"
        for reference, reason in self.errors:
            yield f"  {reference} ended in Error: {reason}"
        calls = ", ".join(f"{name} {count}" for name, count in sorted(self.venue_calls.items()))
        yield f"venue API calls: {calls}; webhooks delivered: {self.webhooks_sent}"
        if self.submitted:
            fetched = self.venue_calls.get("getOrder", 0)
            yield f"getOrder calls per order: {fetched / self.submitted:.2f}"
        yield f"database: {self.database_url}"
        if self.example_reference:
            yield (
                f"look closer: OTACM_DATABASE_URL={shlex.quote(self.database_url)} "
                f"{otacm_command_line()} orders show {self.example_reference}"
            )


@dataclass(frozen=True)
class Planted:
    """A mismatch the demo planted: the exception a reconciliation should find.

    Attributes:
        category: the exception's category (a :class:`reconciler.categories.Category`).
        reference: the shop's reference of the sale, or the venue order's.
        how: what was done, in a few words.
    """

    category: str
    reference: str
    how: str


@dataclass(frozen=True)
class FinanceAccess:
    """The demo's finance user and session key, made up for one run.

    The password exists only in this process and on the terminal; the daemon and the
    reopen file get its scrypt hash.
    """

    password: str
    users_entry: str  # "demo:<hash>", the OTACM_FINANCE_USERS entry
    session_key: str

    @classmethod
    def generate(cls) -> FinanceAccess:
        """A random password and session key; the password hashed as the settings want it."""
        from receiver.finance.auth import hash_password

        password = secrets.token_urlsafe(12)
        return cls(
            password=password,
            users_entry=f"{FINANCE_USER}:{hash_password(password)}",
            session_key=secrets.token_urlsafe(48),
        )


def otacm_command_line() -> str:
    """How the person who started the demo runs otacm: the same way (``.venv/bin/otacm``
    from ``./scripts/run``), or ``python -m otacm``."""
    if Path(sys.argv[0]).name == "otacm":
        return shlex.quote(sys.argv[0])
    return f"{shlex.quote(sys.executable)} -m otacm"


def connection_from_sandbox(sandbox_url: str, http: httpx.Client) -> VenueConnection:
    """A venue connection for the sandbox at ``sandbox_url``, from its ``/_sandbox/config``."""
    config = http.get(f"{sandbox_url}/_sandbox/config").raise_for_status().json()
    return VenueConnection(
        name="sandbox",
        api_base_url=sandbox_url,
        tenant=config["tenant"],
        environment=config["environment"],
        company=config["company"],
        api_key=SecretStr(config["apiKey"]),
        partner_ids=[p["id"] for p in config["partners"] if p["active"]],
        webhook_client_states=[SecretStr(secrets.token_urlsafe(24))],
    )


def sample_orders(
    catalog: Sequence[dict[str, Any]],
    currency: str,
    partner_id: str,
    count: int,
    *,
    rng: random.Random,
    today: dt.date,
    run_tag: str,
) -> list[tuple[OrderRequest, Decimal, str]]:
    """``count`` orders over the catalog, each with what the shop charged and its currency
    (``currency``: the venue's own, in which it prices every wallet).

    A few roles are fixed, so that every run shows every case: the last order is an
    item the catalog marks ``soldOut`` (→ Error: the venue accepts it and its ticket
    import fails); no other order is drawn from those; the first :data:`PLANTED_SALES` are
    paid tickets with a wallet per unit (→ Issued, and their ledger lines match the venue
    exactly: the demo plants its ledger mismatches on them); the one before last is
    unpaid (→ Draft). The others are drawn at random, three in four paid.
    """
    visit = today + dt.timedelta(days=7)
    sold_out = [entry for entry in catalog if entry.get("soldOut")]
    on_sale = [entry for entry in catalog if not entry.get("soldOut")] or list(catalog)
    per_unit = [entry for entry in on_sale if entry["kind"] in PER_UNIT_KINDS] or on_sale
    orders = []
    for number in range(1, count + 1):
        last = number == count
        planted = number <= PLANTED_SALES and not last
        unpaid = number == count - 1 and number > PLANTED_SALES
        if last and sold_out:
            entry = rng.choice(sold_out)
        elif planted:
            entry = rng.choice(per_unit)
        else:
            entry = rng.choice(on_sale)
        paid = planted or (not unpaid and rng.random() < 0.75)
        orders.append(
            _order(
                entry,
                currency,
                partner_id,
                f"DEMO-{run_tag}-{number:04d}",
                rng=rng,
                visit=visit,
                payment_reference=f"PAY-{run_tag}-{number:04d}" if paid else None,
            )
        )
    return orders


def _order(
    entry: dict[str, Any],
    currency: str,
    partner_id: str,
    reference: str,
    *,
    rng: random.Random,
    visit: dt.date,
    payment_reference: str | None,
) -> tuple[OrderRequest, Decimal, str]:
    """One order of ``entry``: the request, what the shop charged, and its currency."""
    quantity = 1 if entry["kind"] == "package" else rng.randint(1, 3)
    wallets = 1 if entry["kind"] == "group" else quantity
    wallet = WalletRequest(
        names=[rng.choice(GUESTS) for _ in range(wallets)],
        external_reference_numbers=[f"{reference}-{n}" for n in range(1, wallets + 1)],
        component_schedule=_schedule(entry, visit),
    )
    request = OrderRequest(
        partner_id=partner_id,
        sell_to_order_reference=reference,
        sell_to_email="guest@example.com",
        sell_to_name=wallet.names[0] if wallet.names else None,
        sell_to_language="ENU",
        payment_reference=payment_reference,
        items=[
            OrderRequestItem(
                item_number=entry["itemNumber"],
                visit_date=visit,
                visit_time=dt.time(10, 30),
                quantity=quantity,
                wallet=wallet,
            )
        ],
    )
    charged = Decimal(str(entry["unitPriceInclVat"])) * quantity
    return request, charged, currency


def _schedule(entry: dict[str, Any], visit: dt.date) -> Any:
    if entry["kind"] != "package":
        return None
    tickets = [c["itemNumber"] for c in entry.get("components", []) if c["type"] == "ticket"]
    return [
        {"itemNumber": t, "visitDate": visit.isoformat(), "visitTime": "11:00:00"} for t in tickets
    ]


def free_port() -> int:
    """A loopback port that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def daemon_environment(
    connection: VenueConnection,
    database_url: str,
    api_token: str,
    finance: FinanceAccess | None = None,
) -> dict[str, str]:
    """The child's environment: this one without any OTACM_*, plus the demo's venue and,
    with ``finance``, its finance user (hashed) and session key."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTACM_")}
    environment.update(
        {
            "OTACM_DATABASE_URL": database_url,
            "OTACM_CONNECTION_NAME": connection.name,
            "OTACM_API_BASE_URL": connection.api_base_url,
            "OTACM_TENANT": connection.tenant,
            "OTACM_ENVIRONMENT": connection.environment,
            "OTACM_COMPANY": connection.company,
            "OTACM_API_KEY": connection.api_key.get_secret_value(),
            "OTACM_PARTNER_IDS": ",".join(connection.partner_ids),
            "OTACM_WEBHOOK_CLIENT_STATES": ",".join(
                s.get_secret_value() for s in connection.webhook_client_states
            ),
            "OTACM_API_TOKENS": api_token,
        }
    )
    if finance is not None:
        environment["OTACM_FINANCE_USERS"] = finance.users_entry
        environment["OTACM_SESSION_KEY"] = finance.session_key
    return environment


@contextmanager
def running_daemon(environment: dict[str, str], bind: str, log: Path) -> Iterator[str]:
    """``otacm serve`` as a child process until the block ends; yields its base URL.

    Raises:
        click.ClickException: the daemon did not become ready.
    """
    url = f"http://{bind}"
    command = [sys.executable, "-m", "otacm", "serve", "--bind", bind, "--workers", "2"]
    with log.open("w") as output:
        child = subprocess.Popen(command, env=environment, stdout=output, stderr=output)
        try:
            wait_for(lambda: _ready(url), timeout=60, what=f"otacm serve (log: {log})")
            if child.poll() is not None:
                raise click.ClickException(f"otacm serve exited; see {log}")
            yield url
        finally:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Return once ``predicate()`` holds; poll twice a second.

    Raises:
        click.ClickException: it did not hold within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise click.ClickException(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.5)


class _Busy(Exception):
    """otacm answered "retry later" (429, 503): its database was busy."""


def submit_order(
    http: httpx.Client, daemon: str, api_token: str, body: dict[str, Any], *, log: Path
) -> None:
    """``POST /api/orders`` as a shop does: "retry later" (429, 503) is retried with backoff
    for up to :data:`SUBMIT_DEADLINE` seconds, as the API asks; anything else but success
    ends the demo.

    Raises:
        click.ClickException: otacm refused the order, or stayed busy past the deadline.
    """
    answer = None
    try:
        for attempt in stamina.retry_context(on=_Busy, attempts=None, timeout=SUBMIT_DEADLINE):
            with attempt:
                answer = http.post(
                    f"{daemon}/api/orders",
                    json=body,
                    headers={"Authorization": f"Bearer {api_token}"},
                )
                if answer.status_code in (429, 503):
                    raise _Busy
    except _Busy:
        pass
    if answer is None or answer.status_code not in (200, 201, 202):
        text = answer.text if answer is not None else "no answer"
        raise click.ClickException(f"POST /api/orders: {text} (the daemon's log: {log})")


def settled_count(engine: sa.Engine, references: set[str]) -> int:
    """How many of ``references`` the local mirror holds in a settled status."""
    from storage.models import VenueOrder

    in_flight = [status for status in OrderStatus if status.in_flight]
    query = sa.select(sa.func.count()).where(
        VenueOrder.reference_key.in_(references), VenueOrder.status.not_in(in_flight)
    )
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def mirror_report(engine: sa.Engine, references: set[str], report: DemoReport) -> None:
    """Fill ``report`` from the local mirror's orders of ``references``."""
    from sqlalchemy.orm import selectinload

    from storage.engine import make_sessions
    from storage.models import OrderItem, VenueOrder

    query = (
        sa.select(VenueOrder)
        .where(VenueOrder.reference_key.in_(references))
        .options(selectinload(VenueOrder.items).selectinload(OrderItem.wallets))
        .order_by(VenueOrder.reference_key)
    )
    with make_sessions(engine, read_only=True)() as session:
        for order in session.scalars(query):
            report.by_status[order.status.value] += 1
            if order.status is OrderStatus.ERROR:
                report.errors.append((order.sell_to_order_reference, order.status_message or ""))
            elif order.status is OrderStatus.ISSUED and not report.example_reference:
                report.example_reference = order.sell_to_order_reference
            if order.status is OrderStatus.ISSUED and all(
                len(item.wallets) == item.quantity for item in order.items
            ):
                report.plantable.append(order.sell_to_order_reference)
            for item in order.items:
                report.wallets += len(item.wallets)
                if order.status is not OrderStatus.ISSUED:
                    continue
                # Each wallet carries the price of what it holds (a group ticket's one
                # wallet the whole group's), so the issued value is their sum.
                for wallet in item.wallets:
                    if wallet.unit_price_incl_vat is not None:
                        report.amounts[wallet.currency_code or "?"] += wallet.unit_price_incl_vat


# --- the mismatches, the reconciliation and the finance pages -----------------------------


def shop_export(
    engine: sa.Engine, connection_id: int, references: set[str]
) -> list[dict[str, Any]]:
    """The shop's export of its sales of ``references``, in the ledger file's columns.

    The demo has no shop of its own, so the export is what otacm recorded of the sales it
    submitted: imported unchanged, each row changes nothing.
    """
    from storage.engine import make_sessions
    from storage.models import LedgerLine

    query = (
        sa.select(LedgerLine)
        .where(LedgerLine.connection_id == connection_id, LedgerLine.reference_key.in_(references))
        .order_by(LedgerLine.reference_key)
    )
    with make_sessions(engine, read_only=True)() as session:
        return [
            {
                "partner_id": line.partner_id,
                "reference": line.shop_reference,
                "sold_at": line.sold_at.isoformat(),
                "quantity": line.quantity,
                "amount": str(line.amount),
                "currency": line.currency,
                "amount_includes_vat": line.amount_includes_vat,
                "payment_reference": line.payment_reference,
                "venue_reference": line.venue_reference,
                "external_reference_numbers": line.external_reference_numbers,
                "state": line.state.value,
            }
            for line in session.scalars(query)
        ]


def write_ledger(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` as a JSON lines ledger file (``docs/ledger-format.md``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            present = {key: value for key, value in row.items() if value is not None}
            out.write(json.dumps(present, ensure_ascii=False) + "\n")


def plant_mismatches(
    *,
    client: VenueClient,
    engine: sa.Engine,
    connection_id: int,
    references: set[str],
    plantable: Sequence[str],
    catalog: Sequence[dict[str, Any]],
    currency: str,
    partner_id: str,
    run_tag: str,
    rng: random.Random,
    timeout: float,
) -> tuple[list[Planted], ImportResult]:
    """Plant the demo's mismatches through the product's own paths, never by writing tables.

    An order is placed at the venue directly with ``client`` (not through otacm) and
    waited for in the local mirror, where the webhook and the worker put it. Then the
    shop's ledger export is written to :data:`LEDGER_EXPORT` — the demo's sales as
    recorded, plus a sale the venue never got, with one Issued sale repriced and one
    refunded — and imported with :func:`reconciler.ledger.import_ledger`.

    Args:
        client: a venue client of the demo's connection (the demo closes it).
        engine: the demo database's engine.
        connection_id: the connection's row id.
        references: the reference keys of the demo's sample orders.
        plantable: Issued sample orders whose ledger lines match the venue exactly.
        catalog: the sandbox's catalog.
        currency: the venue's currency, the shop's too.
        partner_id: the partner the orders are for.
        run_tag: the run's tag in references.
        rng: the run's random generator.
        timeout: seconds to wait for the direct order in the mirror.

    Returns:
        What was planted, and the import's :class:`~reconciler.ledger.ImportResult`.

    Raises:
        click.ClickException: the direct order did not reach the mirror in time, or the
            export was refused.
    """
    from reconciler.categories import Category
    from reconciler.ledger import import_ledger
    from storage.engine import make_sessions
    from storage.types import utcnow

    planted = []
    per_unit = [entry for entry in catalog if entry["kind"] in PER_UNIT_KINDS] or list(catalog)
    visit = utcnow().date() + dt.timedelta(days=7)

    direct_reference = f"DEMO-{run_tag}-DIRECT"
    request, _, _ = _order(
        rng.choice(per_unit),
        currency,
        partner_id,
        direct_reference,
        rng=rng,
        visit=visit,
        payment_reference=f"PAY-{run_tag}-DIRECT",
    )
    client.create_order(request)
    wait_for(
        lambda: settled_count(engine, {direct_reference}) == 1,
        timeout=timeout,
        what="the order placed at the venue directly to reach the local mirror",
    )
    planted.append(Planted(Category.ORPHAN, direct_reference, "placed at the venue directly"))

    rows = shop_export(engine, connection_id, references)
    by_reference = {row["reference"].upper(): row for row in rows}
    targets = [by_reference[ref.upper()] for ref in plantable if ref.upper() in by_reference]
    if targets:
        repriced = targets[0]
        old = Decimal(repriced["amount"])
        repriced["amount"] = str(old + REPRICED_BY)
        planted.append(
            Planted(
                Category.AMOUNT_MISMATCH,
                repriced["reference"],
                f"repriced in the export: {repriced['currency']} {old:.2f} -> "
                f"{old + REPRICED_BY:.2f}",
            )
        )
    if len(targets) > 1:
        targets[1]["state"] = "refunded"
        planted.append(
            Planted(Category.CANCELLED_IN_LEDGER, targets[1]["reference"], "refunded in the export")
        )
    lost = _order(
        rng.choice(per_unit),
        currency,
        partner_id,
        f"DEMO-{run_tag}-LOST",
        rng=rng,
        visit=visit,
        payment_reference=f"PAY-{run_tag}-LOST",
    )
    lost_request, lost_amount, lost_currency = lost
    rows.append(
        {
            "partner_id": partner_id,
            "reference": lost_request.sell_to_order_reference,
            "sold_at": utcnow().isoformat(),
            "quantity": lost_request.items[0].quantity,
            "amount": str(lost_amount),
            "currency": lost_currency,
            "payment_reference": lost_request.payment_reference,
        }
    )
    planted.append(
        Planted(
            Category.MISSING_AT_VENUE,
            lost_request.sell_to_order_reference,
            "sold by the shop, never sent to the venue",
        )
    )
    write_ledger(LEDGER_EXPORT, rows)
    result = import_ledger(
        make_sessions(engine), LEDGER_EXPORT, connection_id=connection_id, now=utcnow()
    )
    if not result.written:
        bad = "; ".join(row.describe() for row in result.bad_rows[:3])
        raise click.ClickException(f"the demo's ledger export was refused: {bad}")
    return sorted(planted, key=lambda p: p.category), result


def reconcile_demo(
    engine: sa.Engine, connection_id: int, *, started: dt.datetime
) -> tuple[int, RunReport]:
    """A manual reconciliation run by ``demo`` over the demo's period, and its report.

    The period runs from the minute the demo started (the venue's times are whole
    seconds) to now; grace and tolerance are the daemon's, the settings' defaults (the
    daemon gets no ``OTACM_*`` of the caller's).

    Raises:
        click.ClickException: the run failed (it is recorded as failed, with the error).
    """
    from reconciler.engine import ReconRunFailed, reconcile
    from reconciler.report import load_run_report
    from storage.engine import make_sessions
    from storage.records import ReconTrigger
    from storage.types import utcnow

    defaults = Settings.model_construct()
    sessions = make_sessions(engine)
    now = utcnow()
    try:
        run_id = reconcile(
            sessions,
            connection_id=connection_id,
            period_from=started.replace(second=0, microsecond=0),
            period_to=now,
            now=now,
            trigger=ReconTrigger.MANUAL,
            actor=FINANCE_USER,
            grace=dt.timedelta(seconds=defaults.recon_grace),
            tolerance=defaults.recon_amount_tolerance,
        )
    except ReconRunFailed as exc:
        raise click.ClickException(str(exc)) from exc
    with make_sessions(engine, read_only=True).begin() as session:
        return run_id, load_run_report(session, run_id, now=utcnow())


def run_lines(report: RunReport) -> Iterator[str]:
    """A run's summary for a terminal: totals per category, then one line per exception."""
    from reconciler.categories import Category
    from reconciler.report_formats import money_text

    run = report.run
    period = f"{_minute(run.period_from)} to {_minute(run.period_to)} UTC"
    yield f"reconciliation run {run.id} ({run.trigger}, by {run.actor}) over {period}: {run.state}"
    if run.error:
        yield f"  error: {run.error}"
    yield f"  {'category':<28}{'count':>5}  ledger / venue amount per currency"
    for category in Category:
        rows = [row for row in report.totals if row.category is category]
        if not rows:
            continue
        amounts = ", ".join(
            f"{row.currency} {money_text(row.ledger_amount, row.currency)} / "
            f"{money_text(row.venue_amount, row.currency)}"
            for row in rows
        )
        yield f"  {category:<28}{sum(row.count for row in rows):>5}  {amounts}"
    yield f"exceptions ({len(report.exceptions)}):"
    for row in report.exceptions:
        yield f"  {row.category:<22} {row.shop_reference or row.subject_key:<18} {_detail(row)}"
    if report.closed:
        # An earlier run (the daemon's scheduled one) saw these; this one no longer does.
        yield f"closed by this run, no longer found ({len(report.closed)}):"
    for row in report.closed:
        yield f"  {row.category:<22} {row.shop_reference or row.subject_key}"


def _minute(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M")


def _detail(row: ExceptionRow) -> str:
    """One line: the category as finance reads it, the ledger's side and the venue's."""
    from reconciler.report_formats import money_text

    currency = row.currency or ""
    if row.ledger_amount is not None:
        state = row.details.get("ledger_state") or "active"
        ledger = f"ledger {state} {currency} {money_text(row.ledger_amount, currency)}"
    else:
        ledger = "not in the ledger"
    status = row.details.get("status")
    if status:
        venue = f"venue {status}"
        if row.venue_amount is not None:
            venue += f" {currency} {money_text(row.venue_amount, currency)}"
    else:
        venue = "no venue order"
    return f"{row.category.label}: {ledger}; {venue}"


def write_finance_config(path: Path, database_url: str, finance: FinanceAccess) -> None:
    """The settings ``otacm web`` needs to serve the finance pages on the demo's database.

    Owner-readable only (0600): it holds the database URL (maybe with a password), the
    password's hash and the session key. Never the password, never a venue key: the
    finance pages need no venue.
    """

    def toml_string(value: str) -> str:
        # A JSON string is a TOML basic string for everything json.dumps writes.
        return json.dumps(value)

    text = (
        "# Written by `otacm demo`: the finance pages on the demo's database.\n"
        f"# Reopen them with: otacm --config {path} web --bind {REOPEN_BIND}\n"
        f"database_url = {toml_string(database_url)}\n"
        f"finance_users = [{toml_string(finance.users_entry)}]\n"
        f"session_key = {toml_string(finance.session_key)}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        # O_CREAT's mode applies to a new file only; an earlier run's file is narrowed too.
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def stay_until_interrupted() -> None:
    """Block until Ctrl-C (SIGINT) or SIGTERM, either of which then ends the demo normally.

    The handlers are set here rather than inherited: a shell that starts the demo in the
    background leaves SIGINT ignored, and Python keeps it so; the demo must stop anyway.
    """
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    click.echo("\nstopping the daemon and the sandbox")


def run_demo(
    *,
    orders: int,
    pickup_interval: float,
    seed: int | None,
    timeout: float,
    database_url: str,
    stay: bool = False,
) -> DemoReport:
    """Run sandbox and daemon, send ``orders`` sample orders, report the local mirror, plant
    mismatches, reconcile, and print the run and where its finance pages are.

    With ``stay``, the daemon and the sandbox keep running after the report until Ctrl-C.

    Raises:
        click.ClickException: the daemon did not start, or orders did not settle in time.
    """
    from sandbox import SandboxConfig, SandboxServer
    from storage.engine import make_engine, make_sessions
    from storage.models import ensure_connection
    from storage.types import utcnow
    from venue.client import open_client

    started = utcnow()
    rng = random.Random(seed)  # noqa: S311 - sample orders, not secrets
    run_tag = f"{rng.randrange(16**4):04X}"
    report = DemoReport(database_url=database_url)
    api_token = secrets.token_urlsafe(24)
    finance = FinanceAccess.generate()
    with ExitStack() as stack:
        sandbox = stack.enter_context(SandboxServer(SandboxConfig(pickup_interval=pickup_interval)))
        click.echo(f"sandbox (the simulated venue) on {sandbox.url}")
        http = stack.enter_context(httpx.Client(timeout=30))
        connection = connection_from_sandbox(sandbox.url, http)
        venue_config = http.get(f"{sandbox.url}/_sandbox/config").json()
        catalog = venue_config["catalog"]["items"]

        bind = f"127.0.0.1:{free_port()}"
        log = Path("var") / "demo-serve.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        environment = daemon_environment(connection, database_url, api_token, finance)
        daemon = stack.enter_context(running_daemon(environment, bind, log))
        click.echo(f"otacm serve (web, worker, scheduler) on {daemon}; its log: {log}")

        client = stack.enter_context(open_client(connection))
        state = connection.webhook_client_states[0]
        client.create_subscription(f"{daemon}/webhooks/ota-cm", state)
        click.echo("subscribed the receiver to ota_cm_order_processed")

        samples = sample_orders(
            catalog,
            venue_config["currencyCode"],
            connection.partner_ids[0],
            orders,
            rng=rng,
            today=started.date(),
            run_tag=run_tag,
        )
        with click.progressbar(samples, label="submitting orders to otacm ") as bar:
            for request, charged, currency in bar:
                body = {**request.to_wire(), "amount": str(charged), "currency": currency}
                submit_order(http, daemon, api_token, body, log=log)
        report.submitted = len(samples)
        references = {request.sell_to_order_reference.upper() for request, _, _ in samples}

        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        with click.progressbar(
            length=len(references), label="settled in the local mirror"
        ) as settling:
            seen = 0

            def all_settled() -> bool:
                nonlocal seen
                now = settled_count(engine, references)
                settling.update(now - seen)
                seen = now
                return now == len(references)

            wait_for(all_settled, timeout=timeout, what="the orders to settle locally")
        mirror_report(engine, references, report)
        # The calls of otacm's own orders, before the demo places one behind its back.
        stats = http.get(f"{sandbox.url}/_sandbox/stats").json()
        report.venue_calls = {
            name: sum(by_status.values()) for name, by_status in stats["calls"].items()
        }
        report.webhooks_sent = int(stats["webhooks"]["sent"])
        for line in report.lines():
            click.echo(line)

        with make_sessions(engine).begin() as session:
            connection_id = ensure_connection(session, connection.name)
        planted, imported = plant_mismatches(
            client=client,
            engine=engine,
            connection_id=connection_id,
            references=references,
            plantable=report.plantable,
            catalog=catalog,
            currency=venue_config["currencyCode"],
            partner_id=connection.partner_ids[0],
            run_tag=run_tag,
            rng=rng,
            timeout=timeout,
        )
        click.echo("planted for the reconciliation:")
        for plant in planted:
            click.echo(f"  {plant.category:<22} {plant.reference:<18} {plant.how}")
        click.echo(
            f"imported the shop's ledger export {LEDGER_EXPORT}: {imported.inserted} inserted, "
            f"{imported.updated} updated, {imported.unchanged} unchanged, {imported.bad} bad"
        )

        run_id, run_report = reconcile_demo(engine, connection_id, started=started)
        for line in run_lines(run_report):
            click.echo(line)

        write_finance_config(FINANCE_CONFIG, database_url, finance)
        click.echo(
            f"finance pages: {daemon}/finance/  (user {FINANCE_USER}, password {finance.password})"
        )
        click.echo(f"this run's page: {daemon}/finance/runs/{run_id}")
        reopen = f"{otacm_command_line()} --config {FINANCE_CONFIG} web --bind {REOPEN_BIND}"
        if stay:
            click.echo(
                "the daemon and the sandbox keep running for the pages; Ctrl-C ends the demo"
            )
            click.echo(f"later, reopen them on this database (same user and password): {reopen}")
            stay_until_interrupted()
        else:
            click.echo("the pages close with the demo (--stay keeps them open until Ctrl-C);")
            click.echo(f"reopen them on this database (same user and password): {reopen}")
    return report


def fresh_demo_database() -> str:
    """The demo's own SQLite file under ./var/, emptied so each run starts clean."""
    DEMO_DATABASE.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{DEMO_DATABASE}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{DEMO_DATABASE.resolve()}"
