"""The report of one reconciliation run: its data model, read page by page or streamed.

A run's report is the run, its totals per currency and category, the exceptions the run
saw (opened, seen again or reopened by it) and those it closed, each with the ledger
line's and the venue order's references and an age (:data:`AGING_BUCKETS`).

Every read of a run's exceptions starts from ``exception_event``'s index on
``(recon_run_id, recon_exception_id, action)``, never from every event ever written, and
goes in order of the exception's id (oldest first, or newest first), which is how it
pages: :func:`exception_page` reads one page after or before an id (keyset: no offset,
so a page at the millionth row costs what the first does, and a page walks every
exception once even while their states change); :func:`count_exceptions` says how many
match (the run's totals when nothing filters, one count in SQL otherwise);
:func:`aging_counts` groups them by category and age for the chart;
:func:`iter_exceptions` streams them all in batches, each batch in a short transaction
of its own when given a session factory, so an export of a million rows holds neither
memory nor a long read; its rows are read and made as :mod:`reconciler.report_rows`
says.

:func:`open_run_report` gives a :class:`RunReport` whose exceptions stream;
:func:`load_run_report` one whose exceptions are read into lists, for small runs and
tests. :mod:`reconciler.report_formats` turns either into the bytes of a format; the
``otacm report`` command and the finance pages serve the same bytes. Customers' names
and e-mails are never read, so no report can carry them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from reconciler.categories import Category
from reconciler.report_filter import AGING_BUCKETS as AGING_BUCKETS
from reconciler.report_filter import BUCKET_ENDS, conditions
from reconciler.report_filter import ExceptionFilter as ExceptionFilter
from reconciler.report_filter import aging_bucket as aging_bucket
from reconciler.report_rows import ROW_COLUMNS, RowMaker
from reconciler.report_rows import ExceptionRow as ExceptionRow
from storage.models import LedgerLine, VenueConnection, VenueOrder
from storage.records import (
    ExceptionAction,
    ExceptionEvent,
    ReconException,
    ReconRun,
    ReconTotal,
)

PAGE_SIZES = (25, 50, 100, 200)
"""The page sizes a list of exceptions offers; anything else is the default."""
DEFAULT_PAGE_SIZE = 50
NO_FILTER = ExceptionFilter()
"""The filter that keeps every exception."""

EXPORT_BATCH = 1000
"""Rows read per query (and per transaction) when a report streams its exceptions."""


class RunNotFound(LookupError):
    """No reconciliation run has the id asked for."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"no reconciliation run {run_id}")
        self.run_id = run_id


class Listing(StrEnum):
    """Which of a run's exceptions a list shows."""

    SEEN = "seen"  # opened, seen again or reopened by the run
    CLOSED = "closed"  # closed by the run: no longer found

    @property
    def actions(self) -> tuple[ExceptionAction, ...]:
        """The events of the run that put an exception in this list."""
        if self is Listing.CLOSED:
            return (ExceptionAction.CLOSED,)
        return (ExceptionAction.OPENED, ExceptionAction.SEEN, ExceptionAction.REOPENED)


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
class ExceptionPage:
    """One page of a run's exceptions, and whether others lie on either side of it."""

    rows: list[ExceptionRow]
    more_before: bool
    more_after: bool


class ExceptionRows:
    """A report's list of exceptions: its length known up front, its rows read on demand.

    Iterating reads the rows again each time (streamed reports) or walks a list
    (:func:`load_run_report`); ``len()`` and truth never read a row.
    """

    def __init__(self, count: int, rows: Callable[[], Iterator[ExceptionRow]]) -> None:
        self._count = count
        self._rows = rows

    @classmethod
    def of(cls, rows: list[ExceptionRow]) -> ExceptionRows:
        """The rows of a list."""
        return cls(len(rows), lambda: iter(rows))

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[ExceptionRow]:
        return self._rows()


@dataclass(frozen=True)
class RunReport:
    """Everything a report of one run shows.

    ``aging`` counts the exceptions the run saw per category and age group (each
    category with every group), for the chart.
    """

    run: RunInfo
    totals: list[TotalRow]
    exceptions: ExceptionRows  # those the run saw (opened, seen or reopened by it)
    closed: ExceptionRows  # those the run closed
    aging: Mapping[Category, dict[str, int]]


class _CountedWhenRead(Mapping[Category, dict[str, int]]):
    """A streamed report's age groups, counted the first time they are read.

    Counting is a pass over the run's exceptions (3.5 s at a million on SQLite), and only
    the HTML report draws the chart: a CSV, JSON or XLSX never pays for it.
    """

    def __init__(self, count: Callable[[], dict[Category, dict[str, int]]]) -> None:
        self._count = count
        self._counts: dict[Category, dict[str, int]] | None = None

    def _read(self) -> dict[Category, dict[str, int]]:
        if self._counts is None:
            self._counts = self._count()
        return self._counts

    def __getitem__(self, category: Category) -> dict[str, int]:
        return self._read()[category]

    def __iter__(self) -> Iterator[Category]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())


# --- the run and its totals ------------------------------------------------------------


def load_run(session: Session, run_id: int) -> RunInfo:
    """The run ``run_id`` with its connection's name.

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
    return RunInfo(
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


def load_totals(session: Session, run_id: int) -> list[TotalRow]:
    """The run's totals, ordered by currency then category (in their defined order)."""
    order = {category: index for index, category in enumerate(Category)}
    return sorted(
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


# --- exceptions ------------------------------------------------------------------------


def _in_run(query: sa.Select[Any], run_id: int, listing: Listing) -> sa.Select[Any]:
    """``query`` over the run's events of ``listing``, joined to their exceptions.

    The engine writes one event per exception and run (seen, or closed), so the events
    are the run's list of exceptions, read along the index on (run, exception, action).
    """
    return (
        query.select_from(ExceptionEvent)
        .join(ReconException, ReconException.id == ExceptionEvent.recon_exception_id)
        .where(
            ExceptionEvent.recon_run_id == run_id,
            ExceptionEvent.action.in_(listing.actions),
        )
    )


def _with_references(query: sa.Select[Any]) -> sa.Select[Any]:
    return query.outerjoin(LedgerLine, LedgerLine.id == ReconException.ledger_line_id).outerjoin(
        VenueOrder, VenueOrder.id == ReconException.venue_order_id
    )


def _id_page(
    run_id: int, listing: Listing, *, after: int | None, size: int, descending: bool = False
) -> sa.Select[Any]:
    """The rows of the run's next ``size`` exceptions of ``listing`` after the id ``after``
    (before it, ``descending``), unfiltered: their ids first, from the event index alone,
    then their rows by primary key (a stream's batches of a thousand also keep
    PostgreSQL to lookups: :data:`_LOOKUPS_ONLY`)."""
    key = ExceptionEvent.recon_exception_id
    beside = [] if after is None else [key < after if descending else key > after]
    page = (
        sa.select(key.label("exception_id"))
        .where(
            ExceptionEvent.recon_run_id == run_id,
            ExceptionEvent.action.in_(listing.actions),
            *beside,
        )
        .order_by(key.desc() if descending else key.asc())
        .limit(size)
        .subquery()
    )
    ordered = page.c.exception_id
    return (
        _with_references(
            sa.select(*ROW_COLUMNS)
            .select_from(page)
            .join(ReconException, ReconException.id == page.c.exception_id)
        )
        .order_by(ordered.desc() if descending else ordered.asc())
        .limit(size)
    )


def exception_page(
    session: Session,
    run_id: int,
    *,
    now: dt.datetime,
    listing: Listing = Listing.SEEN,
    chosen: ExceptionFilter = NO_FILTER,
    after: int | None = None,
    before: int | None = None,
    newest_first: bool = False,
    size: int = DEFAULT_PAGE_SIZE,
    look_back: bool = True,
) -> ExceptionPage:
    """One page of the run's exceptions of ``listing`` that pass ``chosen``.

    Pages go in order of the exception's id: oldest first, or newest first. ``after``
    (an id) asks for the page that follows it in that order, ``before`` the one that
    precedes it; neither, the first page.

    Args:
        session: a session; only read.
        run_id: the run.
        now: the time ages are counted to (aware).
        listing: the exceptions the run saw, or those it closed.
        chosen: the filter.
        after: the page after this id.
        before: the page before this id (when ``after`` is not given).
        newest_first: the order.
        size: at most this many rows (at least one).
        look_back: find out whether rows lie before a page read forwards (one more
            query; a stream going forwards needs not).
    """
    size = max(size, 1)
    backwards = after is None and before is not None
    # Reading backwards walks the other order and turns the page round.
    descending = newest_first != backwards
    key = ExceptionEvent.recon_exception_id
    cursor = after if not backwards else before
    if chosen.active:
        # Filtered: the run's events joined to their exceptions, walked until a page
        # passes (the exception's own id bounded too, so PostgreSQL's merge join starts
        # at the cursor rather than at the first exception).
        beside: list[sa.ColumnElement[bool]] = []
        if cursor is not None:
            mine = ReconException.id
            beside += [key < cursor, mine < cursor] if descending else [key > cursor, mine > cursor]
        query = _with_references(_in_run(sa.select(*ROW_COLUMNS), run_id, listing))
        query = query.where(*conditions(chosen, now), *beside)
        query = query.order_by(key.desc() if descending else key.asc()).limit(size + 1)
    else:
        query = _id_page(run_id, listing, after=cursor, size=size + 1, descending=descending)
    found = session.connection().execute(query).all()
    beyond = len(found) > size
    rows = list(map(RowMaker(now).row, found[:size]))
    if backwards:
        rows.reverse()
        return ExceptionPage(rows, more_before=beyond, more_after=True)
    more_before = (
        look_back
        and cursor is not None
        and _any_before(session, run_id, listing, chosen, now, cursor, descending)
    )
    return ExceptionPage(rows, more_before=more_before, more_after=beyond)


def _any_before(
    session: Session,
    run_id: int,
    listing: Listing,
    chosen: ExceptionFilter,
    now: dt.datetime,
    cursor: int,
    descending: bool,
) -> bool:
    """Whether any row passing ``chosen`` comes at or before ``cursor`` in the order."""
    key = ExceptionEvent.recon_exception_id
    if chosen.active:
        query = _in_run(sa.select(key), run_id, listing).where(*conditions(chosen, now))
        if chosen.search:
            query = _with_references(query)
    else:  # the event index alone
        query = sa.select(key).where(
            ExceptionEvent.recon_run_id == run_id, ExceptionEvent.action.in_(listing.actions)
        )
    query = query.where(key >= cursor if descending else key <= cursor).limit(1)
    return session.execute(query).first() is not None


def count_exceptions(
    session: Session,
    run_id: int,
    *,
    now: dt.datetime,
    listing: Listing = Listing.SEEN,
    chosen: ExceptionFilter = NO_FILTER,
) -> int:
    """How many of the run's exceptions of ``listing`` pass ``chosen``.

    With no filter, the exceptions a run saw are the exception categories' counts of its
    totals (the engine records one exception per finding of those categories): a few
    rows, however many exceptions. Anything else is counted in SQL, from the event
    index alone when nothing filters.
    """
    if listing is Listing.SEEN and not chosen.active:
        query = sa.select(sa.func.coalesce(sa.func.sum(ReconTotal.count), 0)).where(
            ReconTotal.recon_run_id == run_id,
            ReconTotal.category.in_(EXCEPTION_CATEGORIES),
        )
        return int(session.execute(query).scalar_one())
    if not chosen.active:
        query = sa.select(sa.func.count()).where(
            ExceptionEvent.recon_run_id == run_id,
            ExceptionEvent.action.in_(listing.actions),
        )
        return int(session.execute(query).scalar_one())
    query = _in_run(sa.select(sa.func.count()), run_id, listing).where(*conditions(chosen, now))
    if chosen.search:
        query = _with_references(query)
    return int(session.execute(query).scalar_one())


EXCEPTION_CATEGORIES = tuple(category.value for category in Category if category.is_exception)
"""The categories that are exceptions (every one but matched and in flight)."""


def aging_counts(
    session: Session, run_id: int, *, now: dt.datetime
) -> dict[Category, dict[str, int]]:
    """The exceptions the run saw, counted per category and age group, in SQL.

    Only categories with exceptions are keys; each has every group of
    :data:`AGING_BUCKETS`, in order. One pass over the run's exceptions: its cost grows
    with them, which is why the finance pages draw it as an image of its own.
    """
    first_seen = ReconException.first_seen_at
    bucket = sa.case(
        *(
            (first_seen > now - dt.timedelta(days=end), index)
            for index, end in enumerate(BUCKET_ENDS)
        ),
        else_=len(BUCKET_ENDS),
    )
    query = _in_run(
        sa.select(ReconException.category, bucket, sa.func.count()), run_id, Listing.SEEN
    ).group_by(ReconException.category, bucket)
    counts: dict[Category, dict[str, int]] = {}
    for category, index, count in session.execute(query):
        per_bucket = counts.setdefault(Category(category), dict.fromkeys(AGING_BUCKETS, 0))
        per_bucket[AGING_BUCKETS[int(index)]] += int(count)
    return {category: counts[category] for category in Category if category in counts}


def iter_exceptions(
    source: Session | sessionmaker[Session],
    run_id: int,
    *,
    now: dt.datetime,
    listing: Listing = Listing.SEEN,
    batch: int = EXPORT_BATCH,
) -> Iterator[ExceptionRow]:
    """Every exception of the run's ``listing``, oldest first, read ``batch`` at a time.

    Each batch is one query: the next ``batch`` ids after the last one read, from the
    event index alone (keyset: the millionth row costs what the first does), joined to
    their rows and references by primary key.

    Args:
        source: a session (every batch in its transaction), or a session factory: each
            batch then reads in a short transaction of its own, so a long export holds
            no snapshot (SQLite's WAL can be checkpointed meanwhile). Ids never change,
            so no row is read twice or missed; a state shows as it was when its batch
            was read.
        run_id: the run.
        now: the time ages are counted to.
        listing: the exceptions the run saw, or those it closed.
        batch: rows per query (at least one).
    """
    batch = max(batch, 1)
    make = RowMaker(now)  # one for the stream: what it remembers serves every batch
    after: int | None = None
    while True:
        query = _id_page(run_id, listing, after=after, size=batch)
        if isinstance(source, Session):
            found = source.connection().execute(query).all()
        else:
            with source.begin() as session:
                connection = session.connection()
                if connection.dialect.name == "postgresql":
                    connection.exec_driver_sql(_LOOKUPS_ONLY)
                found = connection.execute(query).all()
        yield from map(make.row, found)
        if len(found) < batch:
            return
        after = found[-1][0]


# A batch is a thousand primary-key lookups, whatever the tables hold. PostgreSQL's
# planner, seeing a thousand rows against tables of a hundred thousand, hashes whole
# tables for them instead (a sequential scan of each table per batch: 28 ms for the
# batch's 1 ms of lookups), and a cached generic plan, blind to the batch's bounds, does
# too. Only for the batch's own transaction.
_LOOKUPS_ONLY = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"


# --- whole reports ---------------------------------------------------------------------


def open_run_report(
    sessions: sessionmaker[Session], run_id: int, *, now: dt.datetime, batch: int = EXPORT_BATCH
) -> RunReport:
    """A run's report whose exceptions stream: read ``batch`` at a time as they are used.

    The run, its totals and the counts are read now, in one transaction; the chart's
    figures (``aging``) when first used, in a transaction of their own; each pass over
    ``exceptions`` or ``closed`` reads them again, in short transactions
    (:func:`iter_exceptions`).

    Raises:
        RunNotFound: no run has this id.
    """
    with sessions.begin() as session:
        info = load_run(session, run_id)
        totals = load_totals(session, run_id)
        seen_count = count_exceptions(session, run_id, now=now)
        closed_count = count_exceptions(session, run_id, now=now, listing=Listing.CLOSED)

    def count_aging() -> dict[Category, dict[str, int]]:
        if not seen_count:
            return {}
        with sessions.begin() as session:
            return aging_counts(session, run_id, now=now)

    def rows(listing: Listing) -> Callable[[], Iterator[ExceptionRow]]:
        return lambda: iter_exceptions(sessions, run_id, now=now, listing=listing, batch=batch)

    return RunReport(
        run=info,
        totals=totals,
        exceptions=ExceptionRows(seen_count, rows(Listing.SEEN)),
        closed=ExceptionRows(closed_count, rows(Listing.CLOSED)),
        aging=_CountedWhenRead(count_aging),
    )


def load_run_report(session: Session, run_id: int, *, now: dt.datetime) -> RunReport:
    """Read one run's whole report, its exceptions into lists: for small runs and tests.

    Args:
        session: a session; only read.
        run_id: the run.
        now: the time ages are counted to (aware).

    Returns:
        The report. Totals are ordered by currency then category; exceptions by id
        (oldest first).

    Raises:
        RunNotFound: no run has this id.
    """
    info = load_run(session, run_id)
    seen = list(iter_exceptions(session, run_id, now=now))
    closed = list(iter_exceptions(session, run_id, now=now, listing=Listing.CLOSED))
    return RunReport(
        run=info,
        totals=load_totals(session, run_id),
        exceptions=ExceptionRows.of(seen),
        closed=ExceptionRows.of(closed),
        aging=_aging_of(seen),
    )


def _aging_of(rows: Iterable[ExceptionRow]) -> dict[Category, dict[str, int]]:
    counts: dict[Category, dict[str, int]] = {}
    for row in rows:
        counts.setdefault(row.category, dict.fromkeys(AGING_BUCKETS, 0))[row.aging_bucket] += 1
    return {category: counts[category] for category in Category if category in counts}
