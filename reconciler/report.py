"""The report of one reconciliation run: its data model, read in a few queries.

:func:`load_run_report` reads a run, its totals per currency and category, the exceptions
the run saw (opened, seen again or reopened by it) and those it closed, each with the
ledger line's and the venue order's references and an age (:data:`AGING_BUCKETS`).
:mod:`reconciler.report_formats` turns a :class:`RunReport` into the bytes of one format;
the ``otacm report`` command and the finance pages serve the same bytes. Customers' names
and e-mails are never read, so no report can carry them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from reconciler.categories import Category
from storage.models import LedgerLine, VenueConnection, VenueOrder
from storage.records import ExceptionAction, ExceptionEvent, ReconException, ReconRun, ReconTotal

AGING_BUCKETS = ("0-1 days", "2-7 days", "8-30 days", "over 30 days")
"""The age groups of exceptions, youngest first: whole days since first seen."""

# Keys a details dict must never carry into a report (customers' personal data).
_PERSONAL_KEYS = frozenset(
    {"name", "email", "selltoname", "selltoemail", "sell_to_name", "sell_to_email"}
)


class RunNotFound(LookupError):
    """No reconciliation run has the id asked for."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"no reconciliation run {run_id}")
        self.run_id = run_id


@dataclass(frozen=True)
class RunInfo:
    """A run as finance reads it: what was compared, when, by whom, and how it ended."""

    id: int
    connection: str
    period_from: dt.datetime
    period_to: dt.datetime
    started_at: dt.datetime
    finished_at: dt.datetime | None
    trigger: str
    actor: str | None
    state: str
    error: str | None


@dataclass(frozen=True)
class TotalRow:
    """A run's count and amounts for one currency and category."""

    currency: str
    category: Category
    count: int
    ledger_amount: Decimal
    venue_amount: Decimal


@dataclass(frozen=True)
class ExceptionRow:
    """One exception in a report, with the references finance looks it up by.

    ``difference`` is the venue's amount minus the ledger's, when both are known in one
    currency. ``age_days`` counts whole days from ``first_seen_at`` to the report's time.
    """

    id: int
    category: Category
    state: str
    subject_key: str
    shop_reference: str | None
    order_id: str | None
    buy_from_order_reference: str | None
    currency: str | None
    ledger_amount: Decimal | None
    venue_amount: Decimal | None
    difference: Decimal | None
    details: dict[str, Any]
    first_seen_at: dt.datetime
    age_days: int
    aging_bucket: str


@dataclass(frozen=True)
class RunReport:
    """Everything a report of one run shows."""

    run: RunInfo
    totals: list[TotalRow]
    exceptions: list[ExceptionRow]  # those the run saw (opened, seen or reopened by it)
    closed: list[ExceptionRow]  # those the run closed


# --- loading ---------------------------------------------------------------------------


def load_run_report(session: Session, run_id: int, *, now: dt.datetime) -> RunReport:
    """Read one run's report: the run, its totals, and the exceptions it saw and closed.

    Args:
        session: a session; only read.
        run_id: the run.
        now: the time ages are counted to (aware).

    Returns:
        The report. Totals are ordered by currency then category; exceptions by
        category, then oldest first.

    Raises:
        RunNotFound: no run has this id.
    """
    found = session.execute(
        sa.select(ReconRun, VenueConnection.name)
        .join(VenueConnection, VenueConnection.id == ReconRun.connection_id)
        .where(ReconRun.id == run_id)
    ).one_or_none()
    if found is None:
        raise RunNotFound(run_id)
    run, connection = found
    info = RunInfo(
        id=run.id,
        connection=connection,
        period_from=run.period_from,
        period_to=run.period_to,
        started_at=run.started_at,
        finished_at=run.finished_at,
        trigger=str(run.trigger),
        actor=run.actor,
        state=str(run.state),
        error=run.error,
    )
    order = {category: index for index, category in enumerate(Category)}
    totals = sorted(
        (
            TotalRow(
                currency=total.currency,
                category=Category(total.category),
                count=total.count,
                ledger_amount=total.ledger_amount,
                venue_amount=total.venue_amount,
            )
            for total in session.scalars(
                sa.select(ReconTotal).where(ReconTotal.recon_run_id == run_id)
            )
        ),
        key=lambda row: (row.currency, order[row.category]),
    )
    seen = _exceptions(
        session,
        run_id,
        (ExceptionAction.OPENED, ExceptionAction.SEEN, ExceptionAction.REOPENED),
        now=now,
    )
    closed = _exceptions(session, run_id, (ExceptionAction.CLOSED,), now=now)
    return RunReport(run=info, totals=totals, exceptions=seen, closed=closed)


def _exceptions(
    session: Session,
    run_id: int,
    actions: tuple[ExceptionAction, ...],
    *,
    now: dt.datetime,
) -> list[ExceptionRow]:
    """The exceptions with an event of ``actions`` in the run, with their references."""
    in_run = sa.select(ExceptionEvent.recon_exception_id).where(
        ExceptionEvent.recon_run_id == run_id, ExceptionEvent.action.in_(actions)
    )
    rows = session.execute(
        sa.select(
            ReconException,
            # An orphan has no ledger line: the venue order's copy of the shop's reference.
            sa.func.coalesce(LedgerLine.shop_reference, VenueOrder.sell_to_order_reference),
            VenueOrder.order_id,
            VenueOrder.buy_from_order_reference,
        )
        .outerjoin(LedgerLine, LedgerLine.id == ReconException.ledger_line_id)
        .outerjoin(VenueOrder, VenueOrder.id == ReconException.venue_order_id)
        .where(ReconException.id.in_(in_run))
    )
    order = {category: index for index, category in enumerate(Category)}
    found = [
        _exception_row(exception, shop_reference, order_id, venue_reference, now=now)
        for exception, shop_reference, order_id, venue_reference in rows
    ]
    found.sort(key=lambda row: (order[row.category], row.first_seen_at, row.id))
    return found


def _exception_row(
    exception: ReconException,
    shop_reference: str | None,
    order_id: str | None,
    venue_reference: str | None,
    *,
    now: dt.datetime,
) -> ExceptionRow:
    category = Category(exception.category)
    ledger, venue = exception.ledger_amount, exception.venue_amount
    difference = None
    # Amounts in two currencies have no difference worth printing.
    if ledger is not None and venue is not None and category is not Category.CURRENCY_MISMATCH:
        difference = venue - ledger
    age = max((now - exception.first_seen_at).days, 0)
    return ExceptionRow(
        id=exception.id,
        category=category,
        state=str(exception.state),
        subject_key=exception.subject_key,
        shop_reference=shop_reference,
        order_id=order_id,
        buy_from_order_reference=venue_reference,
        currency=exception.currency,
        ledger_amount=ledger,
        venue_amount=venue,
        difference=difference,
        details={
            key: value
            for key, value in (exception.details or {}).items()
            if key.lower() not in _PERSONAL_KEYS
        },
        first_seen_at=exception.first_seen_at,
        age_days=age,
        aging_bucket=aging_bucket(age),
    )


def aging_bucket(age_days: int) -> str:
    """The age group (one of :data:`AGING_BUCKETS`) of an exception ``age_days`` old."""
    if age_days <= 1:
        return AGING_BUCKETS[0]
    if age_days <= 7:
        return AGING_BUCKETS[1]
    if age_days <= 30:
        return AGING_BUCKETS[2]
    return AGING_BUCKETS[3]
