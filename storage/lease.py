"""Leased queues: how the inbox and the outbox hand each due row to one holder at a time.

Both queue tables, :class:`~storage.models.Inbox` (worked by :mod:`orders.worker`) and
:class:`~storage.models.Outbox` (sent by :mod:`orders.outbox`), carry the same lease
columns (``connection_id``, ``state``, ``attempts``, ``next_attempt_at``,
``lease_owner``, ``lease_expires_at``, ``last_error``) and move a row through the same
states: ``pending`` until its ``next_attempt_at``, ``leased`` to one holder until
``lease_expires_at``, then an end of the table's own (done, sent, failed) or ``dead``
once its attempts are spent. :class:`LeasedQueue` names one such table and its states,
and makes those moves:

- :meth:`LeasedQueue.claim` leases due rows in one short transaction: pending ones
  whose ``next_attempt_at`` has come, and leased ones whose lease has expired (their
  holder died or stalled), oldest id first; each claimed row's ``attempts`` goes up by
  one, and a row whose expired lease already used the last attempt goes ``dead``
  instead of being claimed again. On PostgreSQL the rows are selected ``FOR UPDATE SKIP
  LOCKED``, so concurrent claimers take disjoint rows without waiting on each other.
  SQLite has no row locks; its transactions begin ``IMMEDIATE`` (:mod:`storage.engine`),
  so a claimer holds the database's single write lock from its SELECT to its commit and
  claimers run one after the other, each seeing the rows the previous one leased.
  A claim reads only the table's in-flight rows (:data:`~storage.models.IN_FLIGHT`),
  through their partial index by connection and id, one connection at a time: what it
  costs follows what is waiting, not the history the table keeps.
- :meth:`LeasedQueue.settle` ends a lease with the row's outcome, in the caller's
  transaction, and only while the row is still leased by the one who applies it: a
  holder whose lease expired and whose row was claimed again applies nothing.
- :meth:`LeasedQueue.retry` ends a lease after a failed attempt: pending again at the
  time given, or ``dead`` once ``max_attempts`` are spent.

A holder killed at any point loses nothing: its rows stay leased until the lease
expires, then another claim takes them.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import socket
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import array as postgresql_array
from sqlalchemy.orm import QueryableAttribute, Session, sessionmaker

from storage.models import IN_FLIGHT, Base, VenueConnection

NO_SYNC = {"synchronize_session": False}
"""Execution options of a statement that changes rows by id only, with no ORM object of
them in the session to keep in step."""

S = TypeVar("S", bound=StrEnum)
"""A queue table's state enum."""

T = TypeVar("T")
"""What a claimer makes of a claimed row."""


@dataclass(frozen=True)
class LeasedQueue(Generic[S]):
    """A queue table whose rows are leased to one holder at a time.

    Attributes:
        model: the table's ORM class; it has the lease columns named above.
        pending: the state of a row waiting for its ``next_attempt_at``.
        leased: the state of a row held under a lease.
        dead: the state of a row given up.
        holder: what a lease holder is called ("worker", "sender"), for ``last_error``.
        gave_up: how the logs say a row went dead ("dead-lettered", "given up").
        logger: where the queue's owner logs; claims log there too.
    """

    model: type[Base]
    pending: S
    leased: S
    dead: S
    holder: str
    gave_up: str
    logger: logging.Logger

    def claim(
        self,
        sessions: sessionmaker[Session],
        build: Callable[[sa.Row[*tuple[Any, ...]], int, dt.datetime], T],
        *,
        columns: Sequence[QueryableAttribute[Any]],
        owner: str,
        now: dt.datetime,
        limit: int,
        lease_seconds: float,
        connection_ids: Collection[int] | None = None,
        where: Sequence[sa.ColumnElement[bool]] = (),
        max_attempts: int | None = None,
    ) -> list[T]:
        """Lease up to ``limit`` due rows to ``owner``, in one short transaction.

        Args:
            sessions: the session factory; the claim commits its own transaction.
            build: makes the caller's snapshot of a claimed row from the selected row,
                its attempts (this claim included) and when its lease expires.
            columns: the columns the snapshot needs; ``id``, ``state`` and ``attempts``
                are selected as well.
            owner: the holder's name, written as the lease owner.
            now: the current time (aware).
            limit: the most rows to claim.
            lease_seconds: how long the rows stay ``owner``'s.
            connection_ids: claim only rows of these connections; ``None`` for every
                connection otacm knows (:class:`~storage.models.VenueConnection`).
            where: further conditions a due row must meet to be claimed now.
            max_attempts: when given, an expired lease on a row already claimed this
                many times makes the row dead instead of claiming it again, so a row
                that kills or stalls every holder that takes it stops being retried.

        Returns:
            The snapshots of the claimed rows, by id.
        """
        if limit < 1 or (connection_ids is not None and not connection_ids):
            return []
        model, c = self.model, self.model.__table__.c
        lease_expires_at = now + dt.timedelta(seconds=lease_seconds)
        # The claim reads the partial index of in-flight rows (IN_FLIGHT, restated here
        # as that index's condition) in its order, one connection at a time, and stops
        # after ``limit`` due rows; both databases' planners choose that only when
        # nothing else looks as cheap, so the query leaves them nothing else:
        # - ``due`` is one CASE, not an OR of (state, time) pairs, which either database
        #   answered from the (state, next_attempt_at) index and then sorted every due row;
        # - it orders by (connection, id), the index's order. On SQLite the connection is
        #   an equality on the index's leading column (as an IN list it took the dedup
        #   key's index of every row the connection ever had, and sorted those); on
        #   PostgreSQL an equality would make the connection a constant, the primary key's
        #   order as good as the index's, and with as many rows waiting as finished (after
        #   an outage) it walked the finished ones first: it is an array there.
        due = sa.case(
            (c.state == self.pending, c.next_attempt_at <= now),
            else_=sa.and_(c.state == self.leased, c.lease_expires_at < now),
        )
        query = (
            sa.select(
                *columns,
                c.id.label("lease_id"),
                c.state.label("lease_state"),
                c.attempts.label("lease_attempts"),
            )
            .where(IN_FLIGHT, due, *where)
            .order_by(c.connection_id, c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )

        with sessions.begin() as session:
            if connection_ids is None:
                connection_ids = session.scalars(sa.select(VenueConnection.id)).all()
            postgresql = session.get_bind().dialect.name == "postgresql"
            # Each connection's first ``limit`` due rows hold the first ``limit`` of all.
            # On PostgreSQL the ones left out stay locked until this short transaction
            # ends: a concurrent claimer skips them meanwhile, and takes the next ones.
            found: list[sa.Row[Any]] = []
            for connection_id in sorted(connection_ids):
                one = (
                    c.connection_id == sa.any_(postgresql_array([connection_id]))
                    if postgresql
                    else c.connection_id == connection_id
                )
                found.extend(session.execute(query.where(one)))
            rows = sorted(found, key=lambda row: int(row.lease_id))[:limit]
            spent = [
                row.lease_id
                for row in rows
                if max_attempts is not None
                and row.lease_state == self.leased
                and row.lease_attempts >= max_attempts
            ]
            if spent:
                session.execute(
                    sa.update(model)
                    .where(c.id.in_(spent))
                    .values(
                        state=self.dead,
                        lease_owner=None,
                        lease_expires_at=None,
                        last_error=f"lease expired on attempt {max_attempts} "
                        f"(the {self.holder} died or stalled)",
                    )
                    .execution_options(**NO_SYNC)
                )
                for row_id in spent:
                    self.logger.error(
                        "%s %d %s: its lease expired too often",
                        self.model.__tablename__,
                        row_id,
                        self.gave_up,
                    )
            claimed = [row for row in rows if row.lease_id not in spent]
            if claimed:
                session.execute(
                    sa.update(model)
                    .where(c.id.in_([row.lease_id for row in claimed]))
                    .values(
                        state=self.leased,
                        lease_owner=owner,
                        lease_expires_at=lease_expires_at,
                        attempts=c.attempts + 1,
                    )
                    .execution_options(**NO_SYNC)
                )
        return [build(row, row.lease_attempts + 1, lease_expires_at) for row in claimed]

    def settle(
        self, session: Session, ids: Collection[int], *, owner: str, **values: Any
    ) -> list[int]:
        """End the lease of the rows of ``ids`` still leased by ``owner``, setting ``values``.

        Args:
            session: the caller's session; not committed.
            ids: the rows.
            owner: the lease owner the rows were claimed with.
            **values: the rows' new columns (``state`` and whatever goes with it).

        Returns:
            The rows updated, by id; a row missing was claimed again by another holder
            after ``owner``'s lease expired, and is left to that one.
        """
        # The lease check is in the UPDATE's WHERE: on PostgreSQL the row lock it takes
        # makes a concurrent re-claim wait for this transaction (and then find the row
        # settled), and a re-claim that committed first makes this match nothing.
        c = self.model.__table__.c
        statement = (
            sa.update(self.model)
            .where(
                c.id.in_(sorted(ids)),
                c.state == self.leased,
                c.lease_owner == owner,
            )
            .values(**values, lease_owner=None, lease_expires_at=None)
            .returning(c.id)
            .execution_options(**NO_SYNC)
        )
        return sorted(session.scalars(statement).all())

    def retry(
        self,
        session: Session,
        row_id: int,
        *,
        owner: str,
        attempts: int,
        max_attempts: int,
        retry_at: dt.datetime,
        reason: str,
    ) -> S | None:
        """After a failed attempt: the row pending again at ``retry_at``, or dead.

        Args:
            session: the caller's session; not committed.
            row_id: the row.
            owner: the lease owner the row was claimed with.
            attempts: the row's attempts, the failed one included.
            max_attempts: attempts after which the row is dead.
            retry_at: when the row is due again, if it is not dead.
            reason: the failure, for ``last_error``.

        Returns:
            The row's new state, or ``None`` when another holder had claimed it again.
        """
        state = self.dead if attempts >= max_attempts else self.pending
        values: dict[str, Any] = {"state": state, "last_error": reason}
        if state is self.pending:
            values["next_attempt_at"] = retry_at
        return state if self.settle(session, [row_id], owner=owner, **values) else None


# --- lease owners and backoff ----------------------------------------------------------

BACKOFF_BASE_SECONDS = 10.0
"""The delay before the second attempt of a row; each further attempt doubles it."""

BACKOFF_CAP_SECONDS = 600.0
"""The longest delay between two attempts of a row."""

LAST_ERROR_MAX_CHARS = 300
"""How much of a failure's description a queue row keeps in ``last_error``."""


def new_owner() -> str:
    """A lease owner name unique to this holder: host, process id and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def backoff(
    attempts: int,
    *,
    jitter: Callable[[], float] = random.random,
    base: float = BACKOFF_BASE_SECONDS,
    cap: float = BACKOFF_CAP_SECONDS,
) -> dt.timedelta:
    """How long a row waits after its ``attempts``-th failed attempt.

    Exponential from ``base`` (:data:`BACKOFF_BASE_SECONDS`), capped at ``cap``
    (:data:`BACKOFF_CAP_SECONDS`), with "equal jitter": between half and all of that
    delay, so rows that failed together (a venue outage) do not all come back in the
    same second, yet none comes back early.

    Args:
        attempts: attempts made so far (1 after the first failure).
        jitter: a source of numbers in ``[0, 1)``.
        base: seconds of the first delay's ceiling.
        cap: the longest delay, in seconds.

    Returns:
        The delay before the next attempt.
    """
    exponent = min(max(attempts, 1) - 1, 32)  # beyond 2**32 the cap has long applied
    ceiling = min(cap, base * 2**exponent)
    return dt.timedelta(seconds=ceiling / 2 + ceiling / 2 * jitter())
