"""The demo's finance part: the mismatches it plants (:func:`plant_mismatches`), the
reconciliation run over its period (:func:`reconcile_demo`) printed for a terminal
(:func:`run_lines`), and access to the finance pages (:class:`FinanceAccess`,
:func:`write_finance_config`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import sqlalchemy as sa

from otacm.demo.daemon import wait_for
from otacm.demo.mirror import settled_count
from otacm.demo.shop import PER_UNIT_KINDS, sample_order, shop_export, write_ledger
from otacm.settings import Settings

if TYPE_CHECKING:
    from reconciler.ledger import ImportResult
    from reconciler.report import ExceptionRow, RunReport
    from venue.client import VenueClient


LEDGER_EXPORT = Path("var") / "demo-ledger.jsonl"
"""The shop's ledger export the demo writes and imports."""
FINANCE_CONFIG = Path("var") / "demo-finance.toml"
"""Settings that reopen the finance pages on the demo's database (owner-readable only)."""
FINANCE_USER = "demo"
REOPEN_BIND = "127.0.0.1:8000"
REPRICED_BY = Decimal("10.00")
"""How much more the ledger export says the repriced sale cost."""


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
    request, _, _ = sample_order(
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
    lost = sample_order(
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
