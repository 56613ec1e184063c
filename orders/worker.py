"""The inbox worker: turns stored notifications into getOrder calls and a mirrored order.

This module owns the life of an :class:`~storage.models.Inbox` row after the receiver stored
it: :func:`claim_batch` leases due rows to one worker, :func:`process_claims` calls getOrder
once per order (rows of one batch for the same order share the call, outside any database
transaction, several in flight at once: :mod:`orders.fetching`) and applies the venue's
answer with :func:`~orders.mirror.upsert_order` — the venue's status is the truth, the
notification's only a hint — or
:func:`~orders.mirror.mark_removed` on a 404 naming the order
(:func:`~venue.errors.order_gone`; any other failure is retried). The venue notifies and
answers getOrder company-wide, so an answer may be an order of a partner not configured for
the connection: nothing of it is mirrored, its id alone is noted
(:func:`~orders.mirror.note_foreign_order`), and later rows for it are finished with no
call. Venue failures, and answers the mirror cannot hold (a malformed body, text a column
refuses or too wide for it, a number out of range:
:class:`~venue.errors.VenueProtocolError`, :class:`~storage.flush.ColumnOverflow`), send a
row back to pending with exponential backoff (:func:`storage.lease.backoff`) until
``max_attempts``, then to the dead letters, which :func:`orders.inbox.replay_dead` (``otacm
inbox replay``) makes pending again. :func:`run_once` is one claim-and-process pass and
:func:`run_forever` the loop a worker process runs. Leases are taken and ended by
:class:`storage.lease.LeasedQueue`, as the outbox's are. Claims on PostgreSQL use ``FOR
UPDATE SKIP LOCKED``; on SQLite every transaction begins ``IMMEDIATE``
(:mod:`storage.engine`), so claimers take the single write lock one at a time and a claimer
never sees a row another has just leased. A worker killed at any point loses nothing: its
rows stay leased until the lease expires, then another claim takes them; an apply only lands
while the row is still leased by its owner, so a late worker cannot apply twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypedDict

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from orders.fetching import DEFAULT_FETCH_CONCURRENCY, Fetched, fetch_orders
from orders.mirror import foreign_order_ids, mark_removed, note_foreign_order, upsert_order
from storage.engine import WaitStopped, retry_while_unavailable
from storage.flush import ColumnOverflow
from storage.lease import LAST_ERROR_MAX_CHARS, LeasedQueue, backoff
from storage.models import ChangeSource, Inbox, InboxSource, InboxState, VenueOrder
from storage.types import utcnow
from venue.client import VenueClient
from venue.errors import VenueUnavailable, describe_venue_error
from venue.models import Order, OrderStatus
from venue.throttle import ThrottleClosed
from venue.values import canonical_guid

logger = logging.getLogger(__name__)

_CHANGE_SOURCES = {
    InboxSource.WEBHOOK: ChangeSource.WEBHOOK,
    InboxSource.POLL: ChangeSource.POLL,
    InboxSource.FEED: ChangeSource.FEED,
}

_QUEUE = LeasedQueue(
    Inbox,
    pending=InboxState.PENDING,
    leased=InboxState.LEASED,
    dead=InboxState.DEAD,
    holder="worker",
    gave_up="dead-lettered",
    logger=logger,
)


class _Settling(TypedDict):
    """What every settling step of one pass is told."""

    owner: str
    now: dt.datetime
    max_attempts: int
    report: WorkerReport


@dataclass(frozen=True)
class Claim:
    """An inbox row leased to this worker: what processing it needs, not the ORM object.

    Attributes:
        id: the inbox row.
        connection_id: the venue connection the row belongs to.
        order_id: the venue's orderId, or ``None`` for events that name no order.
        source: what put the row in the inbox.
        attempts: how many times the row has been claimed, this claim included.
        notified_status: the status the notification announced (a hint, maybe stale).
        lease_expires_at: until when the row is this worker's.
        notified_at: the notification's own ``timestamp``, when it had one.
    """

    id: int
    connection_id: int
    order_id: str | None
    source: InboxSource
    attempts: int
    notified_status: str | None
    lease_expires_at: dt.datetime
    notified_at: dt.datetime | None = None


@dataclass
class WorkerReport:
    """What one pass did, counted in rows unless the name says otherwise.

    Attributes:
        claimed: rows leased by the pass.
        fetched: orders getOrder returned.
        done: rows finished (applied, found removed, or naming no order).
        retried: rows sent back to pending after a failure, to try again later.
        dead: rows dead-lettered (attempts spent, or leases expired too often).
        removed: orders the venue no longer knows (404), marked removed.
        foreign: orders of partners not configured for the connection, left unmirrored:
            fetched once and noted by id, or already noted (no call).
        venue_calls: getOrder calls made (the client's own retries not counted).
        lease_lost: rows another worker had re-claimed by the time this one applied.
        abandoned: rows left leased after our own database failed; their lease expires.
    """

    claimed: int = 0
    fetched: int = 0
    done: int = 0
    retried: int = 0
    dead: int = 0
    removed: int = 0
    foreign: int = 0
    venue_calls: int = 0
    lease_lost: int = 0
    abandoned: int = 0

    def add(self, other: WorkerReport) -> None:
        """Add ``other``'s counts to this report's."""
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def claim_batch(
    sessions: sessionmaker[Session],
    *,
    owner: str,
    now: dt.datetime,
    limit: int,
    lease_seconds: float,
    connection_ids: Collection[int] | None = None,
    max_attempts: int | None = None,
) -> list[Claim]:
    """Lease up to ``limit`` due inbox rows to ``owner``, in one short transaction.

    Due rows are pending ones whose ``next_attempt_at`` has come, and leased ones whose
    lease has expired (their worker died or stalled), oldest id first. On PostgreSQL the
    rows are selected ``FOR UPDATE SKIP LOCKED``, so concurrent claimers take disjoint
    rows without waiting on each other. SQLite has no row locks; its transactions begin
    ``IMMEDIATE``, so a claimer holds the database's single write lock from its SELECT to
    its commit and claimers run one after the other, each seeing the rows the previous
    one leased. Each claimed row's ``attempts`` goes up by one.

    Args:
        sessions: the session factory; the claim commits its own transaction.
        owner: the worker's name (:func:`storage.lease.new_owner`), written as the lease owner.
        now: the current time (aware).
        limit: the most rows to claim.
        lease_seconds: how long the rows stay this worker's.
        connection_ids: claim only rows of these connections (those this worker has a
            venue client for); ``None`` for all.
        max_attempts: when given, an expired lease on a row already claimed this many
            times dead-letters the row instead of claiming it again, so a row that kills
            or stalls every worker that takes it stops being retried.

    Returns:
        The claimed rows, by id.
    """
    return _QUEUE.claim(
        sessions,
        _claim,
        columns=(
            Inbox.id,
            Inbox.connection_id,
            Inbox.order_id,
            Inbox.source,
            Inbox.notified_status,
            Inbox.notified_at,
        ),
        owner=owner,
        now=now,
        limit=limit,
        lease_seconds=lease_seconds,
        connection_ids=connection_ids,
        max_attempts=max_attempts,
    )


def _claim(row: sa.Row[*tuple[Any, ...]], attempts: int, lease_expires_at: dt.datetime) -> Claim:
    return Claim(
        id=row.id,
        connection_id=row.connection_id,
        order_id=row.order_id,
        source=row.source,
        attempts=attempts,
        notified_status=row.notified_status,
        lease_expires_at=lease_expires_at,
        notified_at=row.notified_at,
    )


def process_claims(
    sessions: sessionmaker[Session],
    clients: Mapping[int, VenueClient],
    claims: Sequence[Claim],
    *,
    owner: str,
    now: dt.datetime,
    max_attempts: int,
    fetch_concurrency: int = DEFAULT_FETCH_CONCURRENCY,
) -> WorkerReport:
    """Fetch and apply the orders of claimed rows: one getOrder per order, then one write.

    Rows naming the same order on the same connection share one getOrder call. The calls
    are made with no database transaction open, up to ``fetch_concurrency`` at once; each
    answer is applied on this thread, in a transaction of its own, and only to the rows
    still leased by ``owner`` — a row whose lease expired and was re-claimed by another
    worker is left to that worker. A failure of our own
    database leaves the rows leased: the lease expires and another pass takes them.

    Args:
        sessions: the session factory; each order's writes commit on their own.
        clients: the venue client of each connection id.
        claims: rows claimed by ``owner`` (:func:`claim_batch`).
        owner: the lease owner the claims were made with.
        now: the time to record as observed and processed (aware).
        max_attempts: attempts after which a failing row is dead-lettered.
        fetch_concurrency: getOrder calls in flight at once (:mod:`orders.fetching`).

    Returns:
        The counts of this pass; ``claimed`` is left at zero.
    """
    report = WorkerReport()
    if not claims:
        return report
    settling: _Settling = {
        "owner": owner,
        "now": now,
        "max_attempts": max_attempts,
        "report": report,
    }
    no_order = [claim for claim in claims if not claim.order_id]
    if no_order:
        # Events naming no order need no call: they are simply finished.
        try:
            with sessions.begin() as session:
                finished = _finish(session, no_order, owner=owner, now=now)
        except SQLAlchemyError as exc:
            _abandon(no_order, None, exc, report)
        else:
            report.done += len(finished)
            report.lease_lost += len(no_order) - len(finished)

    groups: dict[tuple[int, str], list[Claim]] = {}
    for claim in claims:
        if claim.order_id:
            # Rows naming one order in other spellings share its call.
            key = (claim.connection_id, canonical_guid(claim.order_id))
            groups.setdefault(key, []).append(claim)
    try:
        known_foreign = _known_foreign(sessions, clients, groups.keys())
    except SQLAlchemyError as exc:
        for (_, order_id), group in groups.items():
            _abandon(group, order_id, exc, report)
        return report
    wanted: list[tuple[tuple[int, str], VenueClient, str]] = []
    for key, group in groups.items():
        connection_id, order_id = key
        client = clients.get(connection_id)
        try:
            if key in known_foreign:
                _set_aside(sessions, group, order_id, None, owner=owner, now=now, report=report)
            elif client is None:
                reason = f"no venue client for connection {connection_id}"
                _retry(sessions, group, reason, **settling)
            else:
                wanted.append((key, client, order_id))
        except SQLAlchemyError as exc:
            _abandon(group, order_id, exc, report)
    # The calls run with no transaction open, several at once; each answer is applied
    # here, on this thread, as it comes.
    report.venue_calls += len(wanted)
    for key, fetched in fetch_orders(wanted, concurrency=fetch_concurrency):
        group, order_id = groups[key], key[1]
        try:
            _settle(sessions, clients[key[0]], group, order_id, fetched, settling)
        except SQLAlchemyError as exc:
            _abandon(group, order_id, exc, report)
    return report


def run_once(
    sessions: sessionmaker[Session],
    clients: Mapping[int, VenueClient],
    *,
    owner: str,
    now: dt.datetime,
    batch_size: int = 50,
    lease_seconds: float = 60.0,
    max_attempts: int = 8,
    fetch_concurrency: int = DEFAULT_FETCH_CONCURRENCY,
) -> WorkerReport:
    """One pass of the worker: claim a batch of due rows and process them.

    Only rows of connections in ``clients`` are claimed. The defaults match the settings
    ``worker_batch_size``, ``inbox_lease_seconds`` and ``inbox_max_attempts``.

    Args:
        sessions: the session factory.
        clients: the venue client of each connection id; the caller creates and closes
            them (:func:`venue.client.open_client`).
        owner: this worker's lease owner name (:func:`storage.lease.new_owner`).
        now: the current time (aware).
        batch_size: the most rows to claim.
        lease_seconds: how long claimed rows stay this worker's. Make it comfortably
            longer than a batch takes; a batch that outlives it loses no row, but other
            workers may fetch its orders again.
        max_attempts: attempts after which a row is dead-lettered.
        fetch_concurrency: getOrder calls in flight at once (``worker_fetch_concurrency``).

    Returns:
        What the pass did.
    """
    claims = claim_batch(
        sessions,
        owner=owner,
        now=now,
        limit=batch_size,
        lease_seconds=lease_seconds,
        connection_ids=clients.keys(),
        max_attempts=max_attempts,
    )
    report = process_claims(
        sessions,
        clients,
        claims,
        owner=owner,
        now=now,
        max_attempts=max_attempts,
        fetch_concurrency=fetch_concurrency,
    )
    report.claimed = len(claims)
    return report


def run_forever(
    sessions: sessionmaker[Session],
    clients: Mapping[int, VenueClient],
    *,
    owner: str,
    stop: threading.Event,
    poll_interval: float = 1.0,
    batch_size: int = 50,
    lease_seconds: float = 60.0,
    max_attempts: int = 8,
    fetch_concurrency: int = DEFAULT_FETCH_CONCURRENCY,
    clock: Callable[[], dt.datetime] = utcnow,
    on_pass: Callable[[], None] = lambda: None,
) -> None:
    """Run :func:`run_once` until ``stop`` is set, waiting ``poll_interval`` when idle.

    A pass that claimed rows is followed at once by another (a backlog drains at full
    speed); a pass that found nothing, or failed, waits on ``stop``, so setting it ends
    the loop within one pass. A failing pass is logged and does not end the loop: a
    database that is away is tried again with backoff, one log line per attempt
    (:func:`storage.engine.retry_while_unavailable`), and any other failure is logged
    with its traceback and tried again after ``poll_interval``.

    Args:
        sessions: the session factory.
        clients: the venue client of each connection id; the caller owns them.
        owner: this worker's lease owner name (:func:`storage.lease.new_owner`).
        stop: set it to end the loop.
        poll_interval: seconds to wait when there is nothing to do.
        batch_size: as for :func:`run_once`.
        lease_seconds: as for :func:`run_once`.
        max_attempts: as for :func:`run_once`.
        fetch_concurrency: as for :func:`run_once`.
        clock: the current time, asked once per pass.
        on_pass: called as each pass starts (the role's liveness file, otacm.liveness).
    """
    logger.info("inbox worker %s started", owner)

    def one_pass() -> WorkerReport:
        return run_once(
            sessions,
            clients,
            owner=owner,
            now=clock(),
            batch_size=batch_size,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            fetch_concurrency=fetch_concurrency,
        )

    while not stop.is_set():
        on_pass()
        try:
            # A database that is away is waited for, with backoff and one line per attempt.
            report = retry_while_unavailable(one_pass, stop=stop, what="inbox worker")
        except WaitStopped:
            break
        except Exception:
            # Whatever failed (the database at claim time, a bug), the claimed rows are
            # safe under their leases; keep the worker alive and try again shortly.
            logger.exception("inbox worker pass failed")
            stop.wait(poll_interval)
            continue
        if report.claimed:
            logger.info(
                "inbox pass: %d claimed, %d done, %d retried, %d dead, %d venue calls",
                report.claimed,
                report.done,
                report.retried,
                report.dead,
                report.venue_calls,
            )
        else:
            stop.wait(poll_interval)
    logger.info("inbox worker %s stopped", owner)


# --- one order ------------------------------------------------------------------------


def _settle(
    sessions: sessionmaker[Session],
    client: VenueClient,
    group: list[Claim],
    order_id: str,
    fetched: Fetched,
    settling: _Settling,
) -> None:
    """Apply what getOrder said of one order to the rows of ``group``, or retry them.

    Raises:
        SQLAlchemyError: our database failed; the rows are as they were, still leased.
    """
    if fetched.failure is not None:
        exc = fetched.failure
        if isinstance(exc.__cause__, ThrottleClosed):
            # Never sent, the worker is stopping: due again now, this attempt not counted.
            logger.info("order %s: getOrder not sent, stopping (inbox %s)", order_id, _ids(group))
            with sessions.begin() as session:
                back = {"state": InboxState.PENDING, "attempts": Inbox.attempts - 1}
                _QUEUE.settle(session, _ids(group), owner=settling["owner"], **back)
            return
        logger.warning("order %s: getOrder failed: %s (inbox %s)", order_id, exc, _ids(group))
        # A Retry-After is the earliest the venue wants to see the order asked for again.
        asked = exc.retry_after if isinstance(exc, VenueUnavailable) else None
        _retry(sessions, group, describe_venue_error(exc), **settling, not_before=asked)
        return
    order, report = fetched.order, settling["report"]
    owner, now = settling["owner"], settling["now"]
    if order is not None:
        report.fetched += 1
        if not client.serves(order.partner_id):
            _set_aside(sessions, group, order_id, order, owner=owner, now=now, report=report)
            return

    try:
        _apply(sessions, group, order_id, order, owner=owner, now=now, report=report)
    except ColumnOverflow as exc:
        # A value of the answer the mirror cannot hold: the same answer would fail again,
        # so the rows are retried with backoff and dead-lettered with the reason, not
        # left to their lease like a failure of the database itself.
        logger.warning("order %s: the mirror cannot hold the venue's answer: %s", order_id, exc)
        _retry(sessions, group, f"the mirror cannot hold the venue's answer: {exc}", **settling)
    except SQLAlchemyError:
        raise  # the transaction rolled back; process_claims leaves the rows to their lease
    except Exception as exc:
        # A fault of ours with this answer (not the database's, not the venue's): log it,
        # and retry the rows like a venue failure, so they end dead-lettered, not lost.
        logger.exception("order %s: could not apply the venue's answer", order_id)
        reason = f"internal error applying the order: {type(exc).__name__}"
        _retry(sessions, group, reason, **settling)


def _apply(
    sessions: sessionmaker[Session],
    group: list[Claim],
    order_id: str,
    order: Order | None,
    *,
    owner: str,
    now: dt.datetime,
    report: WorkerReport,
) -> None:
    """In one transaction: finish the rows still ours, then mirror ``order`` (None: 404)."""
    newly_in_error: str | None = None
    with sessions.begin() as session:
        finished = _finish(session, group, owner=owner, now=now)
        if finished:
            first = min(finished)
            source = _CHANGE_SOURCES[next(c.source for c in group if c.id == first)]
            connection_id = group[0].connection_id
            row: VenueOrder | None
            if order is None:
                row = mark_removed(session, connection_id, order_id, now, source, inbox_id=first)
            else:
                row = upsert_order(
                    session, connection_id, order, source=source, observed_at=now, inbox_id=first
                )
                if row.status is OrderStatus.ERROR and row.status_changed_at == now:
                    newly_in_error = row.status_message or "no reason given"
            if row is not None:
                row.note_webhooks(
                    claim.notified_at
                    for claim in group
                    if claim.id in finished and claim.source is InboxSource.WEBHOOK
                )
        # else: every row was re-claimed by another worker after our lease expired; that
        # worker applies its own answer, and applying ours too would double the history.

    report.done += len(finished)
    report.lease_lost += len(group) - len(finished)
    if not finished:
        logger.warning("order %s: lease lost on inbox %s; not applied", order_id, _ids(group))
    elif order is None:
        report.removed += 1
        logger.info("order %s: removed at the venue (inbox %s)", order_id, finished)
    elif newly_in_error is not None:
        # A person must fix and replace (or cancel) it: `otacm orders errors` lists them.
        logger.warning(
            "order %s (%s): Error at the venue: %s",
            order_id,
            order.sell_to_order_reference,
            newly_in_error,
        )
    else:
        notified = sorted({c.notified_status for c in group if c.notified_status})
        logger.info(
            "order %s: %s (notified %s; inbox %s)",
            order_id,
            order.status,
            "/".join(notified) or "-",
            finished,
        )


def _known_foreign(
    sessions: sessionmaker[Session],
    clients: Mapping[int, VenueClient],
    keys: Collection[tuple[int, str]],
) -> set[tuple[int, str]]:
    """Of the (connection, order) pairs, those noted as another partner's: no call needed."""
    by_connection: dict[int, list[str]] = {}
    for connection_id, order_id in keys:
        by_connection.setdefault(connection_id, []).append(order_id)
    found: set[tuple[int, str]] = set()
    with sessions.begin() as session:
        for connection_id, order_ids in by_connection.items():
            client = clients.get(connection_id)
            if client is None:
                continue
            noted = foreign_order_ids(session, connection_id, order_ids, client.partner_ids)
            found.update((connection_id, order_id) for order_id in noted)
    return found


def _set_aside(
    sessions: sessionmaker[Session],
    group: list[Claim],
    order_id: str,
    order: Order | None,
    *,
    owner: str,
    now: dt.datetime,
    report: WorkerReport,
) -> None:
    """Finish the rows of another partner's order without mirroring anything of it.

    The venue notifies and answers getOrder company-wide (CMOrderWebhooks;
    ChannelMgrOrderAgent ``GetOrder``), so an order of a partner not configured for the
    connection can arrive. ``order`` is the one getOrder just returned (its id and
    partner are noted, :func:`~orders.mirror.note_foreign_order`), or ``None`` when it
    was noted before: then no call was made.
    """
    with sessions.begin() as session:
        finished = _finish(session, group, owner=owner, now=now)
        if finished and order is not None:
            note_foreign_order(session, group[0].connection_id, order_id, order.partner_id, now)
    report.done += len(finished)
    report.lease_lost += len(group) - len(finished)
    if finished:
        report.foreign += 1
        # The order's partner is named, its customer and references never.
        logger.info(
            "order %s: partner %s not configured for the connection; not mirrored (inbox %s%s)",
            order_id,
            "(noted before)" if order is None else order.partner_id,
            finished,
            "" if order is not None else "; no venue call",
        )


def _abandon(
    group: list[Claim], order_id: str | None, exc: SQLAlchemyError, report: WorkerReport
) -> None:
    """Leave rows to their lease after our own database failed while processing them."""
    # Nothing of the failed transaction was written; the rows stay leased, and the
    # first claim after their lease expires takes them again.
    logger.warning(
        "order %s: database error %s; inbox %s left to its lease",
        order_id or "-",
        type(exc).__name__,
        _ids(group),
    )
    report.abandoned += len(group)


def _finish(session: Session, group: list[Claim], *, owner: str, now: dt.datetime) -> list[int]:
    """Mark the rows of ``group`` still leased by ``owner`` done; their ids."""
    return _QUEUE.settle(
        session,
        _ids(group),
        owner=owner,
        state=InboxState.DONE,
        processed_at=now,
        last_error=None,
    )


def _retry(
    sessions: sessionmaker[Session],
    group: list[Claim],
    reason: str,
    *,
    owner: str,
    now: dt.datetime,
    max_attempts: int,
    report: WorkerReport,
    not_before: float | None = None,
) -> None:
    """Send the rows still ours back to pending after their backoff (and no sooner than
    ``not_before`` seconds: the venue's ``Retry-After``), or dead-letter them."""
    reason = reason[:LAST_ERROR_MAX_CHARS]
    wait = dt.timedelta(seconds=not_before or 0)
    with sessions.begin() as session:
        outcomes = [
            (
                claim,
                _QUEUE.retry(
                    session,
                    claim.id,
                    owner=owner,
                    attempts=claim.attempts,
                    max_attempts=max_attempts,
                    retry_at=now + max(backoff(claim.attempts), wait),
                    reason=reason,
                ),
            )
            for claim in group
        ]
    for claim, outcome in outcomes:
        if outcome is None:
            # Another worker re-claimed the row after our lease expired.
            report.lease_lost += 1
        elif outcome is InboxState.DEAD:
            logger.error(
                "inbox %d (order %s) dead-lettered after %d attempts: %s",
                claim.id,
                claim.order_id or "-",
                claim.attempts,
                reason,
            )
            report.dead += 1
        else:
            report.retried += 1


def _ids(group: Sequence[Claim]) -> list[int]:
    return [claim.id for claim in group]
