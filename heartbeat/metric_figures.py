"""The figures of ``/metrics`` that cost too much to compute at each scrape.

The scheduled job ``metric_figures`` (every ``OTACM_METRIC_FIGURES_INTERVAL`` seconds)
computes them with :func:`compute_figures` and keeps them in the ``metric_figures`` table
(:func:`refresh_figures`); a scrape reads that row (:func:`read_figures`) and reports the
figures with their age, so that its cost does not grow with the history:

- delivery health, over the orders that first settled (Draft, Issued, Error or
  Cancelled) within the last :data:`DELIVERY_WINDOW` (24 h): how many, by the source of
  the status change that first showed the order settled, and the settlement lags (see
  :func:`settlement_lag`) as quantiles, count and sum, or ``untimed``;
- orders stuck in flight past ``stuck_after`` (as :func:`orders.mirror.stuck_condition`
  defines it) and orders in Error (not removed at the venue);
- open reconciliation exceptions, by category.

:mod:`receiver.database_metrics` turns them into gauges.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, aliased, sessionmaker

from orders.mirror import stuck_condition
from reconciler.categories import Category
from storage.models import (
    ChangeSource,
    OrderItem,
    StatusChange,
    VenueConnection,
    VenueOrder,
    Wallet,
)
from storage.records import ExceptionState, MetricFigures, ReconException
from venue.models import OrderStatus

FIGURES_NAME = "database"
"""The ``metric_figures`` row the job writes and the scrape reads."""

SETTLED_STATUSES = (
    OrderStatus.DRAFT,
    OrderStatus.ISSUED,
    OrderStatus.ERROR,
    OrderStatus.CANCELLED,
)
"""The statuses in which an order counts as settled for delivery health. Cancelled too:
an order first seen Cancelled settled (and was cancelled) while otacm was not looking."""

DELIVERY_WINDOW = dt.timedelta(hours=24)
"""Delivery health covers the orders that first settled within this window."""

LAG_QUANTILES = (0.5, 0.95)
"""The quantiles of the settlement lag that are reported."""

EXCEPTION_CATEGORIES = tuple(category for category in Category if category.is_exception)
"""The categories ``otacm_recon_exceptions_open`` has a series for (zero when none)."""


class ConnectionFigures(BaseModel):
    """One connection's figures. Quantiles are ``None`` when no lag was measured."""

    settled: dict[ChangeSource, int] = Field(default_factory=dict)
    lag_quantiles: dict[str, float | None] = Field(default_factory=dict)
    lag_count: int = 0
    lag_sum: float = 0.0
    untimed: int = 0
    stuck: int = 0
    in_error: int = 0
    exceptions_open: dict[str, int] = Field(default_factory=dict)

    def lag_quantile(self, q: float) -> float:
        """The ``q`` quantile of the lag, ``nan`` when there was none (JSON has no NaN)."""
        found = self.lag_quantiles.get(str(q))
        return math.nan if found is None else found


class Figures(BaseModel):
    """Every connection's figures, by connection name."""

    connections: dict[str, ConnectionFigures] = Field(default_factory=dict)


class StoredFigures(BaseModel):
    """The figures as the job last stored them, and when it computed them."""

    computed_at: dt.datetime
    figures: Figures


def first_settlements(since: dt.datetime) -> sa.Subquery:
    """Each order's first settled status change, for orders that first settled since ``since``.

    Settled means Draft, Issued, Error or Cancelled (:data:`SETTLED_STATUSES`); the
    first is the lowest id (the order in which otacm wrote them). An order re-settled
    after a replaceOrder counts once, at its first settlement: one settled before
    ``since`` is left out even when it settled again within the window.

    Every change of the window is read, through the ``observed_at`` index (a range, so
    the cost is the window's, not the history's); whether an order settled *before* is
    asked per candidate through the ``(venue_order_id, observed_at)`` index.

    Args:
        since: the window's start (aware).

    Returns:
        A subquery with ``id`` (the status change), ``venue_order_id``, ``observed_at``
        (when otacm learned of the settlement) and ``source`` (from where).
    """
    earlier = aliased(StatusChange, name="earlier")
    # The order's first settled change, asked per candidate: a correlated scalar, which
    # the planners run as an index search for each row of the window. As NOT EXISTS,
    # PostgreSQL turns it into an anti-join that reads every settled change ever written.
    first = (
        sa.select(sa.func.min(earlier.id))
        .where(
            earlier.venue_order_id == StatusChange.venue_order_id,
            earlier.status.in_(SETTLED_STATUSES),
        )
        .scalar_subquery()
    )
    # No GROUP BY: grouping would tempt SQLite to walk a whole index in group order.
    return (
        sa.select(
            StatusChange.id,
            StatusChange.venue_order_id,
            StatusChange.observed_at,
            StatusChange.source,
        )
        .where(
            StatusChange.observed_at >= since,
            StatusChange.status.in_(SETTLED_STATUSES),
            StatusChange.id == first,
        )
        .subquery("first_settlements")
    )


def settlement_lag(
    known_at: dt.datetime, notified_at: dt.datetime | None, issued_at: dt.datetime | None
) -> float | None:
    """Seconds from the venue settling an order to otacm knowing it, or ``None``.

    The venue gives no settlement time as such. Two things it does give are no earlier
    than the settlement: the ``timestamp`` of the webhook that announced it (the earliest
    the worker applied, ``VenueOrder.first_notified_at``) and the ``issuedAt`` of the
    wallets it minted. The earlier of them stands for the settlement. An order with neither
    (settled with no webhook and no wallet: an Error or Cancelled order whose webhook
    never came) has no lag. A negative difference (clocks apart, or evidence of a later
    re-settlement) counts as 0.

    Args:
        known_at: the ``observed_at`` of the order's first settled status change.
        notified_at: the earliest webhook timestamp for the order, if any.
        issued_at: the earliest ``issuedAt`` of its wallets, if any.
    """
    evidence = [moment for moment in (notified_at, issued_at) if moment is not None]
    if not evidence:
        return None
    return max((known_at - min(evidence)).total_seconds(), 0.0)


def quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolated linearly between the closest ranks.

    The same definition as PostgreSQL's ``percentile_cont``; ``nan`` for no values.
    """
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def compute_figures(session: Session, *, now: dt.datetime, stuck_after: dt.timedelta) -> Figures:
    """Every connection's figures at ``now``, read in ``session`` (a read is enough).

    Args:
        session: a session in a transaction.
        now: the current time, aware UTC: the window ends and stuck orders are aged here.
        stuck_after: how long an order may stay in flight before it counts as stuck.
    """
    connections = session.execute(sa.select(VenueConnection.id, VenueConnection.name)).all()
    figures = Figures(connections={name: ConnectionFigures() for _, name in connections})
    lags: dict[str, list[float]] = {}
    _read_settlements(session, figures, lags, since=now - DELIVERY_WINDOW)
    for name, found in figures.connections.items():
        ordered = sorted(lags.get(name, []))
        found.lag_quantiles = {
            str(q): None if math.isnan(value := quantile(ordered, q)) else value
            for q in LAG_QUANTILES
        }
        found.lag_count = len(ordered)
        found.lag_sum = math.fsum(ordered)
    _read_orders(session, figures, stuck_since=now - stuck_after)
    for connection_id, name in connections:
        figures.connections[name].exceptions_open = _read_open_exceptions(session, connection_id)
    return figures


def _read_settlements(
    session: Session, figures: Figures, lags: dict[str, list[float]], *, since: dt.datetime
) -> None:
    first = first_settlements(since)
    # The settlement's evidence, per order: its first webhook's time, kept on the order,
    # and its wallets' earliest issue (an index search of the items' and wallets' keys).
    issued = (
        sa.select(sa.func.min(Wallet.issued_at))
        .join(OrderItem, OrderItem.id == Wallet.order_item_id)
        .where(OrderItem.venue_order_id == VenueOrder.id)
        .scalar_subquery()
    )
    # One row per order of the window: the counts and the lags come from one read of it.
    settlements = (
        sa.select(
            VenueConnection.name,
            first.c.source,
            first.c.observed_at,
            VenueOrder.first_notified_at,
            issued,
        )
        .select_from(first)
        .join(VenueOrder, VenueOrder.id == first.c.venue_order_id)
        .join(VenueConnection, VenueConnection.id == VenueOrder.connection_id)
    )
    for name, source, known_at, notified_at, issued_at in session.execute(settlements):
        found = figures.connections.setdefault(name, ConnectionFigures())
        found.settled[source] = found.settled.get(source, 0) + 1
        lag = settlement_lag(known_at, notified_at, issued_at)
        if lag is None:
            found.untimed += 1
        else:
            lags.setdefault(name, []).append(lag)


def _read_orders(session: Session, figures: Figures, *, stuck_since: dt.datetime) -> None:
    # Counted per connection, so that each count is a search of the (connection_id, status,
    # removed_at) index: grouped over the whole table, the planners scan it. The Error
    # orders are counted from the index alone: they stay as the history grows (101k at
    # 10M orders, 0.5-2.7 s when each row was read for its removed_at).
    def count(condition: sa.ColumnElement[bool]) -> sa.ScalarSelect[int]:
        return (
            sa.select(sa.func.count())
            .select_from(VenueOrder)
            .where(VenueOrder.connection_id == VenueConnection.id, condition)
            .scalar_subquery()
        )

    in_error = sa.and_(VenueOrder.status == OrderStatus.ERROR, VenueOrder.removed_at.is_(None))
    orders = sa.select(VenueConnection.name, count(stuck_condition(stuck_since)), count(in_error))
    for name, stuck, error in session.execute(orders):
        found = figures.connections.setdefault(name, ConnectionFigures())
        found.stuck = stuck
        found.in_error = error


def _read_open_exceptions(session: Session, connection_id: int) -> dict[str, int]:
    """A connection's open reconciliation exceptions by category.

    Counted from the ``(connection_id, state, category)`` index alone, in category order:
    finance's backlog may be large (a million open exceptions took 1.4-2.1 s fetched and
    counted here on PostgreSQL).
    """
    query = (
        sa.select(ReconException.category, sa.func.count())
        .where(
            ReconException.connection_id == connection_id,
            ReconException.state == ExceptionState.OPEN,
        )
        .group_by(ReconException.category)
    )
    return {category: count for category, count in session.execute(query)}


def refresh_figures(
    sessions: sessionmaker[Session],
    read_sessions: sessionmaker[Session],
    *,
    now: dt.datetime,
    stuck_after: dt.timedelta,
) -> None:
    """Compute the figures at ``now`` and store them: the scheduled job ``metric_figures``.

    The reads run in ``read_sessions`` (on SQLite they hold no write lock while they
    last); the write is one short transaction of its own.
    """
    with read_sessions.begin() as session:
        if session.get_bind().dialect.name == "postgresql":
            # Index searches of a few thousand rows; PostgreSQL would JIT-compile them
            # (planned on the never-analysed venue_connection's default 430 rows), which
            # took longer than the queries: 150 ms of 300 in bench/scrape.
            session.execute(sa.text("SET LOCAL jit = off"))
        figures = compute_figures(session, now=now, stuck_after=stuck_after)
    stored: dict[str, Any] = figures.model_dump(mode="json")
    with sessions.begin() as session:
        session.merge(MetricFigures(name=FIGURES_NAME, computed_at=now, figures=stored))


def read_figures(session: Session) -> StoredFigures | None:
    """The figures as last stored, or ``None`` when the job never ran (one primary-key read)."""
    row = session.get(MetricFigures, FIGURES_NAME)
    if row is None:
        return None
    return StoredFigures(computed_at=row.computed_at, figures=Figures.model_validate(row.figures))
