"""The watchdog: mirrored orders to look up directly because nothing has told us of them.

:func:`check_orders` makes no venue call itself: it queues lookups
(:func:`orders.inbox.queue_lookups`) for the inbox worker, which calls getOrder and
mirrors the answer, or marks the order removed on a 404 naming it. It picks, oldest
first and at most ``limit`` a run (the API quota):

- orders in flight that nothing has been heard of for ``in_flight_after`` — neither a
  status change (webhook, feed, submission) nor a fetch — reason ``in_flight``. Both
  times count: a fetch that finds the order still in the same step leaves
  ``status_changed_at`` alone but sets ``fetched_at``, so an order stuck for an hour is
  looked up once per ``in_flight_after``, not on every run;
- Draft and Error orders not re-read for a while (their ``fetched_at``), reason
  ``recheck``: deleting one removes it at the venue without a trace in the change feed,
  and so does the venue when a new order takes an Error order's reference (the old
  orderId vanishes). A 404 naming the order on the re-read marks it removed;
  any other 404 is retried (:func:`venue.errors.order_gone`). How long a while
  depends on the order's age in its status (:func:`recheck_due`): every
  ``open_recheck`` during its first day, twice as long each time its age doubles, and
  never once it is older than ``recheck_horizon``: an order left open for weeks is
  seldom deleted, and thousands of them re-read every 15 minutes would take the API
  key's whole rate. An Error order is still re-read, whatever its age, once a newer
  order of its reference is mirrored (the venue deleted it to take that one); whatever
  else happens to an old open order (confirmed, replaced) is a change the feed brings.

Orders that already wait in the inbox (a webhook's row or an earlier lookup, pending or
leased) are left out: the coming fetch answers for them too.

:func:`orders.mirror.stuck_condition` is the one definition of a *stuck* order — in flight, not
removed, in its status since before a cutoff — which the metrics and the reconciliation
share. The watchdog counts the orders stuck past ``stuck_after`` and logs them as a
warning on every run.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased, sessionmaker

from orders.inbox import Lookup, queue_lookups
from orders.mirror import stuck_condition
from storage.models import Inbox, InboxState, VenueOrder
from venue.models import IN_FLIGHT_STATUSES, OrderStatus

logger = logging.getLogger(__name__)

IN_FLIGHT_REASON = "in_flight"
"""The ``reason`` of lookups of orders in flight for too long."""

RECHECK_REASON = "recheck"
"""The ``reason`` of re-reads of Draft and Error orders."""

OPEN_STATUSES = (OrderStatus.DRAFT, OrderStatus.ERROR)
"""Settled, but the partner may still replace or delete the order (it may vanish)."""

_Candidate = sa.Row[int, str, OrderStatus, str | None]
"""A candidate for a lookup: connection id, orderId, status, buyFromOrderReference."""

RECHECK_YOUNG = dt.timedelta(days=1)
"""How long a Draft or Error order is re-read every ``open_recheck``; then less often."""

STUCK_IDS_LOGGED = 10
"""How many stuck orderIds a warning names; the count is always complete."""


@dataclass
class WatchdogReport:
    """What a watchdog run did, in counts.

    Attributes:
        in_flight: in-flight orders queued for a direct look-up.
        rechecked: Draft and Error orders queued for a re-read (they may be gone).
        stuck: orders in flight past ``stuck_after`` (logged as a warning).
    """

    in_flight: int = 0
    rechecked: int = 0
    stuck: int = 0

    def add(self, other: WatchdogReport) -> None:
        """Add ``other``'s counts to this report's."""
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_dict(self) -> dict[str, int]:
        """The counts by name, for logs and ``otacm poll --json``."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


def check_orders(
    sessions: sessionmaker[Session],
    *,
    now: dt.datetime,
    in_flight_after: dt.timedelta,
    open_recheck: dt.timedelta,
    recheck_horizon: dt.timedelta,
    stuck_after: dt.timedelta,
    connection_ids: Collection[int] | None = None,
    limit: int = 500,
) -> WatchdogReport:
    """Queue look-ups of quiet in-flight orders and re-reads of Draft/Error orders.

    See the module docstring. In-flight orders come first; re-reads take what is left of
    ``limit``. One transaction; no venue call.

    Args:
        sessions: the session factory; the run commits its own transaction.
        now: the current time (aware).
        in_flight_after: how long an in-flight order may go unheard of (setting
            ``in_flight_check_after``).
        open_recheck: how often a Draft or Error order is re-read while young (setting
            ``open_order_recheck``); see :func:`recheck_due`.
        recheck_horizon: the age in its status past which a Draft or Error order is no
            longer re-read (setting ``recheck_horizon_days``).
        stuck_after: how long in flight makes an order stuck (setting ``stuck_after``).
        connection_ids: only orders of these connections; every connection when omitted.
        limit: the most lookups queued by one run.

    Returns:
        What the run queued and how many orders are stuck.
    """
    report = WatchdogReport()
    scope: list[sa.ColumnElement[bool]] = []
    if connection_ids is not None:
        scope.append(VenueOrder.connection_id.in_(sorted(connection_ids)))
    # Orders with a row still waiting in the inbox: read once from the in-flight rows
    # (found by state; the inbox has no index by order), not searched per order.
    waiting = sa.tuple_(VenueOrder.connection_id, VenueOrder.order_id).in_(
        sa.select(Inbox.connection_id, Inbox.order_id).where(
            Inbox.state.in_([InboxState.PENDING, InboxState.LEASED]),
            Inbox.order_id.is_not(None),  # NOT IN a set holding NULL would match nothing
        )
    )
    columns = (
        VenueOrder.connection_id,
        VenueOrder.order_id,
        VenueOrder.status,
        VenueOrder.buy_from_order_reference,
    )
    quiet_since = now - in_flight_after
    # The later of the last status change and the last fetch: when we last heard of it.
    last_heard = sa.case(
        (
            sa.and_(
                VenueOrder.fetched_at.is_not(None),
                VenueOrder.fetched_at > VenueOrder.status_changed_at,
            ),
            VenueOrder.fetched_at,
        ),
        else_=VenueOrder.status_changed_at,
    )
    with sessions.begin() as session:
        quiet = session.execute(
            sa.select(*columns)
            .where(
                *scope,
                VenueOrder.status.in_(sorted(IN_FLIGHT_STATUSES)),
                VenueOrder.removed_at.is_(None),
                VenueOrder.status_changed_at < quiet_since,
                sa.or_(VenueOrder.fetched_at.is_(None), VenueOrder.fetched_at < quiet_since),
                ~waiting,
            )
            .order_by(last_heard, VenueOrder.id)
            .limit(limit)
        ).all()
        open_orders: Sequence[_Candidate] = ()
        if len(quiet) < limit:
            open_orders = session.execute(
                sa.select(*columns)
                .where(
                    *scope,
                    VenueOrder.status.in_(OPEN_STATUSES),
                    VenueOrder.removed_at.is_(None),
                    recheck_due(now, open_recheck, recheck_horizon),
                    ~waiting,
                )
                .order_by(_last_read())
                .order_by(VenueOrder.id)
                .limit(limit - len(quiet))
            ).all()
        report.in_flight = _queue(session, quiet, IN_FLIGHT_REASON, now)
        report.rechecked = _queue(session, open_orders, RECHECK_REASON, now)

        stuck_where = [*scope, stuck_condition(now - stuck_after)]
        report.stuck = session.scalar(sa.select(sa.func.count()).where(*stuck_where)) or 0
        stuck_ids: list[str] = []
        if report.stuck:
            stuck_ids = list(
                session.scalars(
                    sa.select(VenueOrder.order_id)
                    .where(*stuck_where)
                    .order_by(VenueOrder.status_changed_at, VenueOrder.id)
                    .limit(STUCK_IDS_LOGGED)
                )
            )
    if report.stuck:
        logger.warning(
            "%d orders in flight for over %s (stuck; oldest first: %s)",
            report.stuck,
            stuck_after,
            ", ".join(stuck_ids),
        )
    if report.in_flight or report.rechecked:
        logger.info(
            "watchdog queued %d in-flight look-ups and %d re-reads",
            report.in_flight,
            report.rechecked,
        )
    return report


def recheck_due(
    now: dt.datetime, open_recheck: dt.timedelta, horizon: dt.timedelta
) -> sa.ColumnElement[bool]:
    """Which Draft and Error orders are due for a re-read, by their age in their status.

    An order whose status changed less than :data:`RECHECK_YOUNG` ago is due
    ``open_recheck`` after it was last read; one less than twice that old, after twice
    ``open_recheck``; and so on, doubling (with the defaults: every 15 minutes on the
    first day, 30 on the second, hourly until the fourth, 2 h until the eighth, 4 h
    until the 16th, 8 h until the 30th). One older than ``horizon`` is not due, unless
    it is an Error order that a newer order of its reference has taken the place of since
    it was last read: the venue deletes such an order, and the feed does not show it.

    Args:
        now: the current time (aware).
        open_recheck: the interval while young (setting ``open_order_recheck``).
        horizon: the age past which the order is left to the change feed (setting
            ``recheck_horizon_days``).

    Returns:
        The condition on :class:`~storage.models.VenueOrder` rows.
    """
    # One term per age band, each with its own interval. An order meets the age term of
    # its own band and of every older one; the OR lets the shortest of those intervals,
    # its own band's, decide. Times are computed here: the SQL compares columns with
    # constants, alike on both databases.
    changed = VenueOrder.status_changed_at
    bands: list[sa.ColumnElement[bool]] = []
    age, interval = RECHECK_YOUNG, open_recheck
    while True:
        bands.append(sa.and_(changed > now - age, _last_read() < now - interval))
        if age >= horizon:
            break
        age, interval = age * 2, interval * 2
    # Whatever its age, an Error order is re-read once a newer order of its reference is
    # mirrored: the venue deleted it when it took the new one, which no feed shows.
    newer = aliased(VenueOrder)
    superseded = sa.and_(
        VenueOrder.status == OrderStatus.ERROR,
        sa.exists().where(
            newer.connection_id == VenueOrder.connection_id,
            newer.partner_id == VenueOrder.partner_id,
            newer.reference_key == VenueOrder.reference_key,
            newer.id != VenueOrder.id,
            newer.first_seen_at > _last_read(),
        ),
    )
    return sa.or_(sa.and_(changed > now - horizon, sa.or_(*bands)), superseded)


def _last_read() -> sa.ColumnElement[dt.datetime]:
    """When an order was last read: its last fetch, or else when its status was seen."""
    return sa.func.coalesce(VenueOrder.fetched_at, VenueOrder.status_changed_at)


def _queue(
    session: Session,
    rows: Sequence[_Candidate],
    reason: str,
    now: dt.datetime,
) -> int:
    """Queue a lookup per row, grouped by connection; how many were stored."""
    by_connection: dict[int, list[Lookup]] = {}
    for connection_id, order_id, status, buy_from in rows:
        by_connection.setdefault(connection_id, []).append(
            Lookup(order_id, reason, status=str(status), buy_from_order_reference=buy_from)
        )
    stored = 0
    for connection_id, lookups in sorted(by_connection.items()):
        stored += queue_lookups(session.connection(), connection_id, lookups, now=now).stored
    return stored
