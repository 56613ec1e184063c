"""The change feed: each partner's listOrdersByPartner with ``sync=true&lastRowVersion``.

Each partner's feed is a unit of work of its own (:func:`feed_job`, the scheduled job
``change_feed``: a unit ``change_feed:<connection>:<partner>`` per configured partner,
each with its own lock and run record, :class:`heartbeat.split_jobs.SplitJob`), so
schedulers on several nodes share the partners, several partners are followed at once,
and a partner whose calls fail or crawl delays only itself; its failure is its unit's
run record's. :func:`follow_feed` follows one partner; :func:`run_feed` every partner
in turn, in the caller's thread.

A pass reads from the high-water mark as it stood a configured time ago (the overlap,
setting ``feed_overlap_minutes``) to the end, page by page, and compares each
summary with the mirror (:class:`~storage.models.VenueOrder`):

- an order in flight (Submitted, Scheduled, Processing) never costs a getOrder: an
  unknown one gets a header-only mirror row from its summary, a known one whose status
  moved gets its header status updated, with a :class:`~storage.models.StatusChange`
  (source ``poll``); items, wallets and assets are left alone;
- a settled order (Draft, Issued, Error, Cancelled) that differs from the mirror — unknown,
  marked removed, another status or status message, or a higher ``rowVersion`` than the
  one the mirror was adopted at — is queued for the worker
  (:func:`orders.inbox.queue_lookups`, reason ``feed``), which fetches it as it does
  for a webhook;
- a settled order equal to the mirror costs nothing: its ``rowVersion`` is recorded on
  the mirror (*adopted*), so that the order fetched for a webhook is not fetched again.

``VenueOrder.row_version`` is the highest ``rowVersion`` at which the mirror is known to
hold the order. When the feed sees an order go back into flight (a replaceOrder), it
clears the field: the content it holds belongs to no version any more, and the fetch
that follows the order's settling — for a webhook or for the feed — is adopted when the
feed next sees the settled summary. Keeping the in-flight summary's version instead
would make every order whose webhook arrived look changed (its settled version is
higher than its in-flight one) and cost a second getOrder.

A summary that does not read (an unknown status, a malformed field) never fails its
page: it is logged with its ids only, and queued for the worker when its orderId reads
(the worker's getOrder then mirrors the order, or dead-letters it naming the field);
one without a readable orderId is counted (``unreadable_unqueued``). Its rowVersion,
when it reads, counts towards the cursor like any other.

Each page is applied in one transaction that also moves the cursor up to the highest
``rowVersion`` read so far (never down), so a pass killed between pages loses nothing:
the next one starts from the last committed page. Re-reads are idempotent.

Why the overlap is a time: ``rowVersion`` is the venue's database row version
(APIRequest ``GetRecords``: ``sync`` orders by the SystemRowVersion key,
``lastRowVersion`` filters strictly above), one counter for the whole database bumped by
every write to any table. A transaction takes a version when it writes a row and makes
it visible when it commits, so a long one can commit below a mark a reader has already
passed; how far below depends on how much the whole database wrote meanwhile, not on
this partner's orders. So every value the cursor reaches is recorded with its time
(:class:`~storage.records.FeedMark`), and a pass re-reads from the mark as it stood the
overlap ago: any change committed since then is above that mark. While the recorded
history is younger than the overlap (a new cursor, or one just lowered by a restore),
the mark as it stood then is "nothing", and the pass reads the feed in full.

The venue restored from a backup makes ``rowVersion`` go backwards. A pass notices when
not even the row at the high-water mark comes back (at least that row is always re-read)
and confirms with a full listing: when its highest version is below the cursor too, the
listing is applied like any pass and the cursor set to that version — the one place it
goes down — with a warning. (The newest rows all deleted outright looks the same, and
lowering the cursor is then just as right.) A restore followed by more changes than the
high-water mark before the next pass is not noticed; those changes below the mark are
missed until the order changes again, and the watchdog's re-reads cover Draft and Error
orders meanwhile.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from heartbeat.coordination import JobFailed, ScheduledJob, describe_error
from heartbeat.split_jobs import SplitJob, unit_name
from orders.inbox import Lookup, queue_lookups
from orders.mirror import add_headers, locked_orders, record_row_version, update_header
from storage.flush import ColumnOverflow
from storage.models import VenueOrder
from storage.records import FeedCursor, FeedMark
from venue.client import VenueClient
from venue.connection import VenueConnection
from venue.errors import VenueError
from venue.models import OrderSummary, UnreadableRow

logger = logging.getLogger(__name__)

FEED_REASON = "feed"
"""The ``reason`` of the lookups the feed queues."""

FEED_JOB = "change_feed"
"""The scheduled job's name, and the prefix of its units' (one per partner)."""


@dataclass
class FeedReport:
    """What a feed pass did, in counts.

    Attributes:
        partners: partner feeds read.
        listed: summaries read.
        queued: lookups stored in the inbox (getOrder to come).
        updated: mirror headers written from in-flight summaries (no getOrder).
        adopted: summaries equal to the mirror whose ``rowVersion`` was recorded.
        restarted: feeds re-read in full because the ``rowVersion`` went backwards.
        venue_calls: list pages requested, failed requests included.
        errors: partner feeds cut short by a venue error.
        unreadable: summaries that did not read (each logged; queued when its orderId
            reads).
        unreadable_unqueued: of those, the ones without a readable orderId: logged and
            counted only, nothing can fetch them.
    """

    partners: int = 0
    listed: int = 0
    queued: int = 0
    updated: int = 0
    adopted: int = 0
    restarted: int = 0
    venue_calls: int = 0
    errors: int = 0
    unreadable: int = 0
    unreadable_unqueued: int = 0

    def add(self, other: FeedReport) -> None:
        """Add ``other``'s counts to this report's."""
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_dict(self) -> dict[str, int]:
        """The counts by name, for logs and ``otacm poll --json``."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def changed(self) -> bool:
        """Whether the pass wrote or queued anything, or failed: worth a log line (every
        pass re-reads rows, so ``listed`` alone is not)."""
        return any(
            (self.queued, self.updated, self.adopted, self.restarted, self.errors, self.unreadable)
        )


def feed_job(
    sessions: sessionmaker[Session],
    clients: Mapping[int, VenueClient],
    connections: Mapping[int, VenueConnection],
    *,
    interval: float,
    overlap: dt.timedelta,
    workers: int,
    page_size: int | None = None,
) -> SplitJob:
    """The change feed as a scheduled job of one unit per configured partner.

    Unit ``change_feed:<connection name>:<partner id>`` follows that partner's feed
    (:func:`follow_feed`) every ``interval`` seconds. A venue error fails the unit
    (:class:`~heartbeat.coordination.JobFailed`, with the pass's counts), so its run
    record shows the partner failing; the other units are not affected.

    Args:
        sessions: the session factory.
        clients: the venue client of each connection id; the caller owns them.
        connections: the configured connections by id: their names and partners.
        interval: seconds between passes of each partner (``poll_interval``).
        overlap: as :func:`follow_feed`'s.
        workers: partners one scheduler process follows at once (``feed_workers``).
        page_size: summaries per page; the venue's default when omitted.

    Returns:
        The job; its pool starts with the scheduler's first tick.
    """
    units = [
        ScheduledJob(
            unit_name(FEED_JOB, f"{connection.name}:{partner_id}"),
            interval,
            partial(
                _follow_unit,
                sessions=sessions,
                clients=clients,
                connection_id=connection_id,
                partner_id=partner_id,
                overlap=overlap,
                page_size=page_size,
            ),
        )
        for connection_id, connection in connections.items()
        for partner_id in connection.partner_ids
    ]
    return SplitJob(FEED_JOB, interval, units, workers=workers)


def _follow_unit(
    now: dt.datetime,
    *,
    sessions: sessionmaker[Session],
    clients: Mapping[int, VenueClient],
    connection_id: int,
    partner_id: str,
    overlap: dt.timedelta,
    page_size: int | None,
) -> FeedReport:
    """One partner's unit of :func:`feed_job`: its pass, failing on a venue error."""
    client = clients.get(connection_id)
    if client is None:
        raise JobFailed(f"no venue client for connection {connection_id}")
    report = FeedReport(partners=1)
    try:
        _follow(sessions, client, connection_id, partner_id, now, overlap, page_size, report)
    except VenueError as exc:
        _count_failure(report, exc, connection_id, partner_id)
        raise JobFailed(
            f"change feed of partner {partner_id} failed: {describe_error(exc)}", report=report
        ) from exc
    return report


def run_feed(
    sessions: sessionmaker[Session],
    clients: Mapping[int, VenueClient],
    partners: Mapping[int, Sequence[str]],
    *,
    now: dt.datetime,
    overlap: dt.timedelta,
    page_size: int | None = None,
) -> FeedReport:
    """Follow the change feed of every partner of every connection, once.

    A venue error ends one partner's pass (its cursor stays at its last committed page)
    and the next partner is read; errors are counted, not raised.

    Args:
        sessions: the session factory; each page commits its own transaction.
        clients: the venue client of each connection id; the caller owns them.
        partners: the partner ids to follow, by connection id.
        now: when the pass runs (aware): the time of status changes and lookups.
        overlap: how long ago the mark stood that each pass re-reads from (setting
            ``feed_overlap_minutes``).
        page_size: summaries per page; the venue's default (20000) when omitted.

    Returns:
        The counts of every partner's pass added up.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: our database failed; pages committed so far stay.
    """
    total = FeedReport()
    for connection_id, partner_ids in partners.items():
        client = clients.get(connection_id)
        if client is None:
            logger.warning("change feed: no venue client for connection %d", connection_id)
            total.errors += len(partner_ids)
            continue
        for partner_id in partner_ids:
            total.add(
                follow_feed(
                    sessions,
                    client,
                    connection_id=connection_id,
                    partner_id=partner_id,
                    now=now,
                    overlap=overlap,
                    page_size=page_size,
                )
            )
    return total


def follow_feed(
    sessions: sessionmaker[Session],
    client: VenueClient,
    *,
    connection_id: int,
    partner_id: str,
    now: dt.datetime,
    overlap: dt.timedelta,
    page_size: int | None = None,
) -> FeedReport:
    """Read one partner's change feed to its end and bring the mirror up to it.

    See the module docstring for the decisions. A venue error is logged and counted in
    ``errors``; the pages applied before it stay, with the cursor.

    Args:
        sessions: the session factory; each page commits its own transaction.
        client: the connection's venue client; the caller owns it.
        connection_id: the venue connection.
        partner_id: the partner whose feed to read.
        now: when the pass runs (aware).
        overlap: the pass re-reads from the high-water mark as it stood this long
            before ``now``; at least the row at the mark itself is always re-read (that
            is how a restore is noticed).
        page_size: summaries per page; the venue's default when omitted.

    Returns:
        What the pass did.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: our database failed; pages committed so far stay.
    """
    report = FeedReport(partners=1)
    try:
        _follow(sessions, client, connection_id, partner_id, now, overlap, page_size, report)
    except VenueError as exc:
        _count_failure(report, exc, connection_id, partner_id)
    return report


def _follow(
    sessions: sessionmaker[Session],
    client: VenueClient,
    connection_id: int,
    partner_id: str,
    now: dt.datetime,
    overlap: dt.timedelta,
    page_size: int | None,
    report: FeedReport,
) -> None:
    """:func:`follow_feed`'s pass, counted in ``report``; a venue error is raised."""
    feed = _Feed(sessions, client, connection_id, partner_id, now, page_size, report)
    cursor, mark_then = feed.marks(now - overlap)
    if cursor is None:
        feed.read(None)
    else:
        start = None if mark_then is None else max(min(mark_then, cursor - 1), 0)
        highest = feed.read(start)
        if cursor > 0 and (highest is None or highest < cursor):
            feed.verify(cursor)


def _count_failure(
    report: FeedReport, error: VenueError, connection_id: int, partner_id: str
) -> None:
    """Count and log a pass cut short by a venue error."""
    # The request that failed was a call too.
    report.venue_calls += 1
    report.errors += 1
    logger.warning(
        "change feed of partner %s (connection %d) failed: %s; "
        "the cursor stays at the last page applied",
        partner_id,
        connection_id,
        error,
    )


class _Feed:
    """One pass over one partner's feed: the reading, and the writing of each page."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        client: VenueClient,
        connection_id: int,
        partner_id: str,
        now: dt.datetime,
        page_size: int | None,
        report: FeedReport,
    ) -> None:
        self.sessions = sessions
        self.client = client
        self.connection_id = connection_id
        self.partner_id = partner_id
        self.now = now
        self.page_size = page_size
        self.report = report

    def marks(self, then: dt.datetime) -> tuple[int | None, int | None]:
        """The high-water mark now, and as it stood at ``then``; prunes older history.

        Returns:
            The stored high-water mark (``None`` before the first row was read), and the
            highest mark recorded at or before ``then`` (``None`` when the history
            recorded is all younger).
        """
        mine = (FeedMark.connection_id == self.connection_id) & (
            FeedMark.partner_id == self.partner_id
        )
        with self.sessions.begin() as session:
            cursor = session.scalar(
                sa.select(FeedCursor.last_row_version).where(
                    FeedCursor.connection_id == self.connection_id,
                    FeedCursor.partner_id == self.partner_id,
                )
            )
            anchor = session.execute(
                sa.select(FeedMark.row_version, FeedMark.recorded_at)
                .where(mine, FeedMark.recorded_at <= then)
                .order_by(FeedMark.row_version.desc())
                .limit(1)
            ).first()
            if anchor is None:
                return cursor, None
            # Marks recorded before the one standing at ``then`` will never be asked for.
            session.execute(
                sa.delete(FeedMark)
                .where(mine, FeedMark.row_version < anchor.row_version)
                .execution_options(synchronize_session=False)
            )
            return cursor, anchor.row_version

    def read(self, after: int | None, *, listing: bool = False) -> int | None:
        """Apply the feed after row version ``after`` (``None``: all), page by page.

        Args:
            after: the ``lastRowVersion`` to ask for.
            listing: this is a full listing confirming a restore: summaries older than
                the mirror's version are taken as the truth, not as stale.

        Returns:
            The highest row version read, or ``None`` when the feed was empty.
        """
        highest: int | None = None
        for page in self.client.change_feed_pages(self.partner_id, after, self.page_size):
            self.report.venue_calls += 1
            self.report.listed += len(page.data) + len(page.unreadable)
            # An unreadable row's version counts too: its order is queued for getOrder.
            versions = [s.row_version for s in page.data if s.row_version is not None]
            versions += [r.row_version for r in page.unreadable if r.row_version is not None]
            if versions:
                highest = max(versions if highest is None else [highest, *versions])
            if not page.data and not page.unreadable:
                continue
            with self.sessions.begin() as session:
                self.apply(session, page.data, listing=listing)
                self.queue_unreadable(session, page.unreadable, listing=listing)
                if highest is not None:
                    self.advance(session, highest)
        return highest

    def queue_unreadable(
        self, session: Session, rows: Sequence[UnreadableRow], *, listing: bool
    ) -> None:
        """Leave the orders of rows that did not read to the worker's getOrder.

        The client has logged each row (ids and the fields at fault). A row without a
        readable orderId cannot be fetched: it is logged here with the feed it came
        from, and counted.
        """
        lookups = []
        for row in rows:
            self.report.unreadable += 1
            if row.order_id is None:
                self.report.unreadable_unqueued += 1
                logger.warning(
                    "change feed of partner %s (connection %d): a summary without a readable "
                    "orderId (id %s, rowVersion %s) is skipped: %s",
                    self.partner_id,
                    self.connection_id,
                    row.record_id or "-",
                    "-" if row.row_version is None else row.row_version,
                    row.problem,
                )
                continue
            lookups.append(
                Lookup(
                    row.order_id,
                    FEED_REASON,
                    row_version=None if listing else row.row_version,
                )
            )
        if lookups:
            result = queue_lookups(session.connection(), self.connection_id, lookups, now=self.now)
            self.report.queued += result.stored

    def verify(self, cursor: int) -> None:
        """Confirm with a full listing that the venue went back below ``cursor``; if so, restart.

        The listing is applied like any pass; then, if nothing in it reaches the cursor,
        the cursor is set to the listing's highest version (0 when it is empty).
        """
        highest = self.read(None, listing=True)
        if highest is not None and highest >= cursor:
            return  # a row at or above the mark came back after all: nothing went backwards
        restart_at = highest or 0
        with self.sessions.begin() as session:
            # Only from the mark this pass started at: a concurrent pass may have moved it.
            moved = session.execute(
                sa.update(FeedCursor)
                .where(
                    FeedCursor.connection_id == self.connection_id,
                    FeedCursor.partner_id == self.partner_id,
                    FeedCursor.last_row_version == cursor,
                )
                .values(last_row_version=restart_at, updated_at=self.now)
                .execution_options(synchronize_session=False)
            )
            if moved.rowcount:  # type: ignore[attr-defined]
                # The history counted versions as they were before the restore: none of it
                # says where the renumbered feed stood, so it starts again from here.
                session.execute(
                    sa.delete(FeedMark)
                    .where(
                        FeedMark.connection_id == self.connection_id,
                        FeedMark.partner_id == self.partner_id,
                    )
                    .execution_options(synchronize_session=False)
                )
                self.record_mark(session, restart_at)
        if moved.rowcount:  # type: ignore[attr-defined]
            self.report.restarted += 1
            logger.warning(
                "change feed of partner %s (connection %d) went backwards: nothing at or "
                "above rowVersion %d any more (a venue restore, or the newest orders "
                "deleted); re-read in full, the cursor is now %d",
                self.partner_id,
                self.connection_id,
                cursor,
                restart_at,
            )

    def record_mark(self, session: Session, version: int) -> None:
        """Record that the cursor reached ``version`` now (kept if it was reached before)."""
        values = {
            "connection_id": self.connection_id,
            "partner_id": self.partner_id,
            "row_version": version,
            "recorded_at": self.now,
        }
        session.execute(_insert(session, FeedMark, values).on_conflict_do_nothing())

    def advance(self, session: Session, version: int) -> None:
        """Raise the cursor to ``version``, creating it; never lower it; record the mark."""
        values = {
            "connection_id": self.connection_id,
            "partner_id": self.partner_id,
            "last_row_version": version,
            "updated_at": self.now,
        }
        insert = _insert(session, FeedCursor, values)
        moved = session.execute(
            insert.on_conflict_do_update(
                index_elements=["connection_id", "partner_id"],
                set_={
                    "last_row_version": insert.excluded.last_row_version,
                    "updated_at": insert.excluded.updated_at,
                },
                where=FeedCursor.last_row_version < insert.excluded.last_row_version,
            )
        )
        if moved.rowcount:  # type: ignore[attr-defined]
            self.record_mark(session, version)

    def apply(self, session: Session, summaries: Sequence[OrderSummary], *, listing: bool) -> None:
        """Compare one page's summaries with the mirror and write what differs.

        A summary the mirror cannot hold (a value wider than its column) must not stop
        the feed at its page: the page is then taken an order at a time, and such an order
        is queued for the worker instead, whose getOrder dead-letters it naming the column
        when the full order cannot be held either.
        """
        counts = replace(self.report)
        try:
            with session.begin_nested():
                lookups = self.compare(session, summaries, listing=listing)
        except ColumnOverflow:
            self._restore_counts(counts)
            lookups = []
            for summary in summaries:
                counts = replace(self.report)
                try:
                    with session.begin_nested():
                        lookups += self.compare(session, [summary], listing=listing)
                except ColumnOverflow as exc:
                    self._restore_counts(counts)
                    order_id = summary.order_id
                    logger.warning(
                        "change feed: the mirror cannot hold order %s as listed (%s); "
                        "left to the worker",
                        order_id,
                        exc,
                    )
                    lookups.append(_lookup(order_id, summary, listing=listing))
        if lookups:
            result = queue_lookups(session.connection(), self.connection_id, lookups, now=self.now)
            self.report.queued += result.stored

    def _restore_counts(self, counts: FeedReport) -> None:
        # The report is the caller's too: its fields go back, the object stays.
        for field in fields(counts):
            setattr(self.report, field.name, getattr(counts, field.name))

    def compare(
        self, session: Session, summaries: Sequence[OrderSummary], *, listing: bool
    ) -> list[Lookup]:
        """Write what differs between ``summaries`` and the mirror; the lookups to queue."""
        latest: dict[str, OrderSummary] = {}
        for summary in summaries:
            # In row-version order: a later summary of the same order is the newer one.
            latest[summary.order_id] = summary
        mirrored = {row.order_id: row for row in locked_orders(session, self.connection_id, latest)}
        lookups: list[Lookup] = []
        new_orders: list[OrderSummary] = []
        for order_id, summary in latest.items():
            row = mirrored.get(order_id)
            if row is None:
                if summary.status.in_flight:
                    new_orders.append(summary)
                else:
                    lookups.append(_lookup(order_id, summary, listing=listing))
                continue
            lookup = self.decide(session, row, summary, listing=listing)
            if lookup is not None:
                lookups.append(lookup)
        if new_orders:
            self.report.updated += add_headers(session, self.connection_id, new_orders, self.now)
        return lookups

    def decide(
        self, session: Session, row: VenueOrder, summary: OrderSummary, *, listing: bool
    ) -> Lookup | None:
        """Apply one summary to its mirror row; the lookup to queue, if it needs one."""
        version = summary.row_version
        known = row.row_version
        if not listing and version is not None and known is not None and version < known:
            return None  # an older state than the mirror holds (a late re-read)
        message = summary.status_message
        same = row.removed_at is None and (row.status, row.status_message) == (
            summary.status,
            message,
        )
        if not same and row.fetched_at is not None and row.fetched_at > self.now:
            # Fetched after this pass began: the mirror is newer than the summary (a
            # webhook's fetch raced this page); the next pass compares again.
            return None
        if summary.status.in_flight:
            if not same:
                update_header(session, row, summary, self.now)
                self.report.updated += 1
            return None
        if same:
            if version is None or known == version:
                return None
            # Unknown: the mirror came from a fetch made after the order settled (for a
            # webhook, or for an earlier pass), so it holds this version. Higher: only in
            # a listing after a restore, whose versions are the truth now.
            if known is None or known > version:
                record_row_version(row, version)
                self.report.adopted += 1
                return None
        # Another status, removed, or a newer version of the same status (a new processing
        # run the feed saw nothing of): fetch it. The fetch will be at least this version.
        if version is not None:
            record_row_version(row, version)
        return _lookup(row.order_id, summary, listing=listing)


def _lookup(order_id: str, summary: OrderSummary, *, listing: bool) -> Lookup:
    # After a restore, row versions are reused: a lookup keyed by one could collide with
    # an older one of the same order and be dropped as a repeat, so none is given.
    return Lookup(
        order_id,
        FEED_REASON,
        status=str(summary.status),
        row_version=None if listing else summary.row_version,
        buy_from_order_reference=summary.buy_from_order_reference,
    )


def _insert(
    session: Session, table: type[FeedCursor] | type[FeedMark], values: dict[str, Any]
) -> postgresql.Insert | sqlite.Insert:
    """An INSERT of ``values`` in the session's dialect, which has ``ON CONFLICT``."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table).values(values)
    return sqlite.insert(table).values(values)
