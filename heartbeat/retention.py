"""Retention: processed notifications, sent calls, old status changes and the shop's
delivered events are pruned.

These tables grow with every order and hold nothing a later step needs once their rows
are old; :func:`prune` (the scheduled job ``prune``, and ``otacm db prune``) deletes
those past their retention (:class:`Retention`, days; 0 keeps a table whole):

- **inbox** (``OTACM_RETAIN_INBOX_DAYS``): notifications processed (``done``) that long
  ago. Nothing reads one again: the worker reads only pending rows, a replay takes only
  dead letters (which stay, whatever their age, until a person replays them), the
  delivery-lag figures read the order's ``first_notified_at``. What is lost is only the
  dedup of an exact repeat, which the venue sends within hours, not weeks; a repeat
  later still is fetched once more and changes nothing. The erasure of personal data
  (:mod:`heartbeat.privacy`) deletes them at ``OTACM_PERSONAL_DATA_DAYS`` whatever this
  says, so a longer retention never keeps a notification's body past that.
- **outbox** (``OTACM_RETAIN_OUTBOX_DAYS``): ``confirm``, ``replace`` and ``delete``
  calls sent that long ago, but for a confirm the order has not changed status since
  (it is what says the order's current Draft was confirmed: sending it again would
  confirm twice). ``create`` rows stay, one per sale submitted, like the sale itself:
  a re-submission of the sale finds its call made and changes nothing. Pending, leased,
  failed and dead rows stay: the sender, a person or the lost-submission check still
  acts on them.
- **status_change** (``OTACM_RETAIN_STATUS_CHANGES_DAYS``): an order's story keeps every
  change within the retention, the status it was in when the retention began (its
  latest change before the cutoff), and its first settlement (the delivery-health
  figures count an order's first settlement once); the steps between, older than the
  retention, go. The timeline of an order with an exception not closed is kept whole:
  finance drills down from it to the order's story (it is cut at the order's next
  change past the retention, once no exception is open on it).
- **shop_delivery** and **shop_event** (``OTACM_RETAIN_SHOP_EVENTS_DAYS``): deliveries
  delivered that long ago, and events recorded that long ago with no delivery left but
  each order's newest (the next event's number counts from it); pending, leased and
  dead deliveries and their events stay (:mod:`heartbeat.shop_retention`).

A reconciliation reads none of these tables (sales and orders only, and each order's
own status and totals), so pruning changes no run's result, of any period.

Each table is pruned in batches of :data:`BATCH` rows, each its own short transaction
(on SQLite, the write lock is then left free for as long as a waiting writer sleeps,
as the ledger import does), oldest first, read from an index by time: the inbox's
``(state, next_attempt_at)``, the outbox's calls but creates by ``(state, sent_at)``
(partial: the creates it keeps are never walked), ``status_change.observed_at``, the
shop's deliveries by ``(state, delivered_at)`` and its events by ``created_at``. The
status changes and the shop's events are walked once: :class:`~storage.records.PruneMark`
keeps how far, so a run reads what became due since the last one, not the rows it kept.
A dry run counts what would go and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from heartbeat import shop_retention
from heartbeat.metric_figures import SETTLED_STATUSES
from storage.models import (
    NOT_CREATE,
    Inbox,
    InboxState,
    Outbox,
    OutboxOperation,
    OutboxState,
    StatusChange,
    VenueOrder,
)
from storage.pacing import SQLITE_PAUSE
from storage.records import ExceptionState, PruneMark, ReconException
from storage.sqlite_writes import SQLITE_BULK_OPTION

logger = logging.getLogger(__name__)

BATCH = 200
"""Rows deleted (status changes: walked) per transaction: a few tens of milliseconds, on
SQLite far from the 200 ms a webhook may wait for the write lock (500 took up to 250 ms
on this shared 2-core machine)."""

MAX_BATCHES = 1000
"""Batches of each table one scheduled run prunes at most; the next run goes on (a first
run over a long history is spread over a few runs rather than holding the scheduler)."""

TABLES = ("inbox", "outbox", "status_change", "shop_delivery", "shop_event")
"""The tables pruned, in the order they are."""

JOB = "prune"
"""The scheduled job's name (``otacm.processes``); ``otacm db prune`` takes its lock too."""


class RetentionSettings(Protocol):
    """The settings :meth:`Retention.of` reads (``otacm.settings.Settings`` has them)."""

    @property
    def retain_inbox_days(self) -> int: ...

    @property
    def retain_outbox_days(self) -> int: ...

    @property
    def retain_status_changes_days(self) -> int: ...

    @property
    def retain_shop_events_days(self) -> int: ...


@dataclass(frozen=True)
class Retention:
    """How many days each table keeps its rows; 0 keeps them all (module docstring).

    Attributes:
        inbox_days: processed notifications.
        outbox_days: sent confirm, replace and delete calls.
        status_change_days: status changes (an order's latest before the cutoff and
            its first settlement stay).
        shop_event_days: delivered shop deliveries and the events they leave (an
            order's newest event stays).
    """

    inbox_days: int
    outbox_days: int
    status_change_days: int
    shop_event_days: int = 0

    @classmethod
    def of(cls, settings: RetentionSettings) -> Retention:
        """The retention the settings configure (``OTACM_RETAIN_*_DAYS``)."""
        return cls(
            inbox_days=settings.retain_inbox_days,
            outbox_days=settings.retain_outbox_days,
            status_change_days=settings.retain_status_changes_days,
            shop_event_days=settings.retain_shop_events_days,
        )

    def cutoff(self, table: str, now: dt.datetime) -> dt.datetime | None:
        """The time before which ``table``'s rows go, or ``None`` when it keeps them all."""
        days = {
            "inbox": self.inbox_days,
            "outbox": self.outbox_days,
            "status_change": self.status_change_days,
            "shop_delivery": self.shop_event_days,
            "shop_event": self.shop_event_days,
        }[table]
        return None if days <= 0 else now - dt.timedelta(days=days)


@dataclass
class TablePruning:
    """What pruning one table did or, in a dry run, would do.

    Attributes:
        table: the table's name.
        before: rows older than this go (``None``: the table keeps every row).
        rows: rows deleted (or that a dry run would delete).
        done: every row due went (``False`` when the run stopped at its batch limit).
    """

    table: str
    before: dt.datetime | None
    rows: int = 0
    done: bool = True

    def as_dict(self) -> dict[str, Any]:
        """For logs and ``--json``."""
        before = None if self.before is None else self.before.isoformat()
        return {"table": self.table, "before": before, "rows": self.rows, "done": self.done}


@dataclass
class PruneReport:
    """What :func:`prune` did, per table.

    Attributes:
        dry_run: nothing was deleted; ``rows`` says what would have been.
        tables: each table's pruning, in :data:`TABLES` order.
    """

    dry_run: bool
    tables: list[TablePruning] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """The rows deleted (or that would be) in all."""
        return sum(table.rows for table in self.tables)

    def as_dict(self) -> dict[str, Any]:
        """For logs, the job's report and ``--json``."""
        return {"dry_run": self.dry_run, "tables": [table.as_dict() for table in self.tables]}


def prune(
    sessions: sessionmaker[Session],
    *,
    now: dt.datetime,
    retention: Retention,
    dry_run: bool = False,
    batch_size: int = BATCH,
    max_batches: int | None = MAX_BATCHES,
) -> PruneReport:
    """Delete the rows past their retention, table by table (module docstring).

    Args:
        sessions: the session factory; each batch commits on its own.
        now: the current time (aware).
        retention: each table's days.
        dry_run: count what would go; change nothing.
        batch_size: rows deleted (status changes: walked) per transaction.
        max_batches: batches per table at most; ``None`` until every due row is gone.

    Returns:
        Per table: how many rows went (or would), and before which time.
    """
    report = PruneReport(dry_run=dry_run)
    report.tables = [TablePruning(table, retention.cutoff(table, now)) for table in TABLES]
    by_table = {pruning.table: pruning for pruning in report.tables}
    engine: sa.Engine = sessions.kw["bind"]
    sqlite = engine.dialect.name == "sqlite"
    # Each batch is bulk work: on SQLite a webhook waiting for the lock goes first.
    bulk = engine.execution_options(**{SQLITE_BULK_OPTION: True})
    for pruning in report.tables:
        table = pruning.table
        if pruning.before is None:
            continue
        if dry_run:
            if table == "shop_delivery":
                # The events that go with the deliveries are counted with them.
                with sessions() as session:
                    counts = shop_retention.count_due(session, pruning.before, batch_size)
                pruning.rows, by_table["shop_event"].rows = counts
            elif table != "shop_event":
                pruning.rows = _count(sessions, table, pruning.before, batch_size)
            continue
        for number in itertools.count():
            if max_batches is not None and number >= max_batches:
                pruning.done = False
                break
            with sessions(bind=bulk) as session, session.begin():
                deleted, more = _prune_batch(session, table, pruning.before, batch_size)
            for name, rows in deleted.items():
                by_table[name].rows += rows
            if not more:
                break
            if sqlite:
                # Let other writers in: a webhook waiting for the lock would miss a gap
                # of microseconds between two batches.
                time.sleep(SQLITE_PAUSE)
    if not dry_run and report.rows:
        logger.info("pruned past retention: %s", report.as_dict())
    return report


def _prune_batch(
    session: Session, table: str, before: dt.datetime, size: int
) -> tuple[dict[str, int], bool]:
    """One batch of ``table``'s pruning, in the caller's transaction.

    Returns:
        The rows deleted, per table (a batch of the shop's deliveries or events deletes
        from both), and whether more may be due.
    """
    if table == "status_change":
        changes, walked = _prune_changes(session, before, size)
        return {table: changes}, walked
    if table == shop_retention.DELIVERY_TABLE:
        going, more = shop_retention.prune_delivered(session, before, size)
    elif table == shop_retention.EVENT_TABLE:
        going, more = shop_retention.prune_events(session, before, size)
    else:
        deleted = _delete_queue_rows(session, table, before, size)
        return {table: deleted}, deleted == size
    counts = {
        shop_retention.DELIVERY_TABLE: len(going.deliveries),
        shop_retention.EVENT_TABLE: len(going.events),
    }
    return counts, more


# --- the queues ------------------------------------------------------------------------


def _due_queue_rows(table: str, before: dt.datetime) -> sa.Select[int]:
    """The ids of ``table``'s rows past retention, oldest first, read from an index by
    time: the inbox's (state, next_attempt_at) (a processed row's last attempt was due no
    later than it was processed), the outbox's calls but creates by state and sent_at."""
    if table == "inbox":
        return sa.select(Inbox.id).where(
            Inbox.state == InboxState.DONE,
            Inbox.next_attempt_at < before,
            sa.func.coalesce(Inbox.processed_at, Inbox.next_attempt_at) < before,
        )
    # A confirm still answering for the order's current status stays (module docstring).
    answering = sa.exists().where(
        VenueOrder.connection_id == Outbox.connection_id,
        VenueOrder.order_id == Outbox.order_id,
        VenueOrder.status_changed_at <= Outbox.sent_at,
    )
    # The partial index of the calls but creates, by state and sent_at: its condition as
    # text, which SQLite needs to use it.
    return sa.select(Outbox.id).where(
        sa.text(NOT_CREATE),
        Outbox.state == OutboxState.SENT,
        Outbox.sent_at < before,
        sa.or_(Outbox.operation != OutboxOperation.CONFIRM, ~answering),
    )


def _delete_queue_rows(session: Session, table: str, before: dt.datetime, size: int) -> int:
    model: type[Inbox] | type[Outbox] = Inbox if table == "inbox" else Outbox
    oldest_first = Inbox.next_attempt_at if table == "inbox" else Outbox.sent_at
    ids = list(session.scalars(_due_queue_rows(table, before).order_by(oldest_first).limit(size)))
    if not ids:
        return 0
    session.execute(
        sa.delete(model).where(model.id.in_(ids)).execution_options(synchronize_session=False)
    )
    return len(ids)


def _count(sessions: sessionmaker[Session], table: str, before: dt.datetime, size: int) -> int:
    """How many of ``table``'s rows a run would delete now (reads only)."""
    with sessions() as session:
        if table != "status_change":
            due = _due_queue_rows(table, before).subquery()
            return int(session.scalar(sa.select(sa.func.count()).select_from(due)) or 0)
        counted = 0
        mark = _mark(session)
        while True:
            going, mark = _walk(session, before, size, mark)
            counted += len(going)
            if mark is None:
                return counted


# --- status changes -------------------------------------------------------------------

_MARK = "status_change"

Mark = tuple[dt.datetime, int]
"""A place in the walk of the status changes: the time and id of the last one walked."""


def _mark(session: Session) -> Mark | None:
    row = session.get(PruneMark, _MARK)
    return None if row is None else (row.reached_at, row.reached_id)


def _prune_changes(session: Session, before: dt.datetime, size: int) -> tuple[int, bool]:
    """Walk the next ``size`` status changes before ``before`` from the stored mark, cut
    the timelines they end (:func:`_walk`) and move the mark on.

    Returns:
        The changes deleted, and whether any was walked (``False``: the walk is over).
    """
    going, reached = _walk(session, before, size, _mark(session))
    if reached is None:
        return 0, False
    if going:
        session.execute(
            sa.delete(StatusChange)
            .where(StatusChange.id.in_(going))
            .execution_options(synchronize_session=False)
        )
    stored = session.get(PruneMark, _MARK)
    if stored is None:
        session.add(PruneMark(name=_MARK, reached_at=reached[0], reached_id=reached[1]))
    else:
        stored.reached_at, stored.reached_id = reached
    return len(going), True


def _walk(
    session: Session, before: dt.datetime, size: int, mark: Mark | None
) -> tuple[list[int], Mark | None]:
    """The next ``size`` status changes before ``before`` past ``mark``, in time order
    (a range of the ``observed_at`` index): the changes to delete of the orders whose
    latest change before ``before`` is among them (:func:`_cut_timelines`), and the
    mark reached (``None`` when no change was left to walk). Reads only."""
    walked = sa.select(StatusChange.id, StatusChange.venue_order_id, StatusChange.observed_at)
    walked = walked.where(StatusChange.observed_at < before)
    if mark is not None:
        walked = walked.where(
            sa.or_(
                StatusChange.observed_at > mark[0],
                sa.and_(StatusChange.observed_at == mark[0], StatusChange.id > mark[1]),
            )
        )
    rows = session.execute(
        walked.order_by(StatusChange.observed_at, StatusChange.id).limit(size)
    ).all()
    if not rows:
        return [], None
    orders = {row.venue_order_id for row in rows}
    going = _cut_timelines(session, {row.id for row in rows}, orders, before)
    return going, (rows[-1].observed_at, rows[-1].id)


def _cut_timelines(
    session: Session, walked: set[int], orders: set[int], before: dt.datetime
) -> list[int]:
    """The changes to delete of ``orders`` whose latest change before ``before`` was
    walked: every change before it but that one and the order's first settlement; none of
    an order with an exception not closed."""
    protected = set(
        session.scalars(
            sa.select(ReconException.venue_order_id).where(
                ReconException.venue_order_id.in_(sorted(orders)),
                ReconException.state != ExceptionState.CLOSED,
            )
        )
    )
    chosen = sorted(orders - protected)
    if not chosen:
        return []
    changes: dict[int, list[Any]] = defaultdict(list)
    for change in session.execute(
        sa.select(StatusChange.id, StatusChange.venue_order_id, StatusChange.status)
        .where(StatusChange.venue_order_id.in_(chosen), StatusChange.observed_at < before)
        .order_by(StatusChange.id)
    ):
        changes[change.venue_order_id].append(change)
    going: list[int] = []
    for timeline in changes.values():
        latest = timeline[-1].id
        if latest not in walked:
            continue  # its latest change is walked later: cut then, once
        settled = [change.id for change in timeline if change.status in SETTLED_STATUSES]
        kept = {latest, *settled[:1]}
        going.extend(change.id for change in timeline if change.id not in kept)
    return going


def describe(report: PruneReport) -> Sequence[str]:
    """The report as lines for a person: per table, the rows and before which time."""
    verb = "would go" if report.dry_run else "pruned"
    lines = []
    for table in report.tables:
        if table.before is None:
            lines.append(f"{table.table}: kept (no retention set)")
            continue
        more = "" if table.done else " (more left for the next run)"
        lines.append(
            f"{table.table}: {table.rows} rows {verb}, older than "
            f"{table.before.isoformat(timespec='seconds')}{more}"
        )
    return lines
