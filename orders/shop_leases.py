"""Who may send a shop delivery: a lease per row in the database, or a file lock per endpoint.

An endpoint's sender (:class:`orders.shop_delivery.EndpointSender`) claims due
deliveries, POSTs them, and settles each with its outcome; both steps go through one of:

- :class:`RowLeases` (PostgreSQL): a claim leases the rows in one short transaction
  (:func:`claim_deliveries`, ``FOR UPDATE SKIP LOCKED``), so senders of the same
  endpoint in every worker process share its deliveries out, and a sender that dies
  leaves its rows to be claimed again when their lease expires;
- :class:`SoleSender` (SQLite, one machine): the sender holds a file lock per endpoint
  beside the database (:func:`storage.locks.default_lock_dir`; the kernel frees it when
  the process dies), and while it holds it no other process sends to the endpoint, so
  a claim is a read and writes nothing: the lease is the lock, kept in memory. SQLite
  has one write lock, which the worker's mirror changes hold most of the time under
  load; a claim that had to take it waited there, event after event, while a read
  waits for nothing. Only the settlement writes. A sender of another process finds the
  lock taken and claims nothing; when the holder ends or dies, it takes over, and sends
  again what the holder had sent but not settled (same ``webhook-id``).

Either way, a claim passes over a delivery while an earlier event of its order is in
flight to the same endpoint, so an order's events arrive in their sequence.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from filelock import FileLock, Timeout
from sqlalchemy.orm import Session, aliased, sessionmaker

from storage.lease import NO_SYNC, LeasedQueue
from storage.locks import advisory_lock_key, default_lock_dir
from storage.models import IN_FLIGHT
from storage.records import DeliveryState, ShopDelivery, ShopEvent

logger = logging.getLogger("orders.shop_delivery")

DELIVERY_QUEUE = LeasedQueue(
    model=ShopDelivery,
    pending=DeliveryState.PENDING,
    leased=DeliveryState.LEASED,
    dead=DeliveryState.DEAD,
    holder="sender",
    gave_up="given up",
    logger=logger,
)
"""The deliveries as a leased queue. Its :meth:`~storage.lease.LeasedQueue.settle` ends
a lease; claims are :func:`claim_deliveries`'s own: they read the in-flight rows of one
endpoint by due time (one index range, however many wait in backoff behind a dead
endpoint) and pass over a delivery whose order has an earlier one in flight, where
:meth:`~storage.lease.LeasedQueue.claim` walks a connection's rows in id order."""


@dataclass(frozen=True)
class DeliveryClaim:
    """A delivery claimed by one sender: what sending it needs, not the ORM object.

    ``attempts`` counts this one.
    """

    id: int
    event_id: str
    type: str
    order_seq: int
    payload: dict[str, Any]
    created_at: dt.datetime
    retry_from: dt.datetime
    attempts: int


def _due(
    now: dt.datetime, endpoint: str, exclude: Collection[int] = ()
) -> list[sa.ColumnElement[bool] | sa.TextClause]:
    d = ShopDelivery
    earlier = aliased(ShopDelivery)
    # The literal IN_FLIGHT (unqualified ``state``) names the innermost table in the
    # subquery: the partial index by (endpoint, order, seq) answers it, one probe per
    # candidate row. OFFSET 0 keeps PostgreSQL from turning the NOT EXISTS into an anti
    # join, which on a table whose statistics lag its in-flight rows (a backlog that
    # arrived since the last ANALYZE) it planned as a loop scanning the endpoint's every
    # in-flight row for each candidate: a 64-row claim of 1,000 waiting took 1.3 s.
    blocked = (
        sa.select(sa.literal(1))
        .select_from(earlier)
        .where(
            earlier.endpoint == d.endpoint,
            earlier.venue_order_id == d.venue_order_id,
            earlier.order_seq < d.order_seq,
            IN_FLIGHT,
        )
        .offset(0)
        .exists()
    )
    return [
        d.endpoint == endpoint,
        IN_FLIGHT,
        d.next_attempt_at <= now,
        sa.or_(d.state == DeliveryState.PENDING, d.lease_expires_at < now),
        ~blocked,
        *([d.id.not_in(sorted(exclude))] if exclude else []),
    ]


def any_due(read_sessions: sessionmaker[Session], endpoint: str, now: dt.datetime) -> bool:
    """Whether a delivery to ``endpoint`` is due, read without taking a write lock."""
    with read_sessions() as session:
        found = session.scalar(sa.select(ShopDelivery.id).where(*_due(now, endpoint)).limit(1))
    return found is not None


def claim_deliveries(
    sessions: sessionmaker[Session],
    endpoint: str,
    *,
    owner: str,
    now: dt.datetime,
    limit: int,
    lease_seconds: float,
    exclude: Collection[int] = (),
) -> list[DeliveryClaim]:
    """Lease up to ``limit`` due deliveries to ``endpoint`` to ``owner``, soonest due first.

    Due: pending with ``next_attempt_at`` come, or leased with the lease expired, and no
    earlier event of the same order in flight to the same endpoint (so at most one of an
    order's events per claim). PostgreSQL selects them ``FOR UPDATE SKIP LOCKED``;
    SQLite's writers take turns. A claimed row's ``next_attempt_at`` becomes its lease's
    end, when it is due again should its sender die. Rows of ``exclude`` are passed over.
    """
    d = ShopDelivery
    query = (
        _claim_columns()
        .where(*_due(now, endpoint, exclude))
        .order_by(d.next_attempt_at, d.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=d)
    )
    expires = now + dt.timedelta(seconds=lease_seconds)
    with sessions.begin() as session:
        rows = session.execute(query).all()
        if rows:
            session.execute(
                sa.update(d)
                .where(d.id.in_([row.id for row in rows]))
                .values(
                    state=DeliveryState.LEASED,
                    lease_owner=owner,
                    lease_expires_at=expires,
                    next_attempt_at=expires,
                    attempts=d.attempts + 1,
                )
                .execution_options(**NO_SYNC)
            )
    return [_claim(row) for row in rows]


def _claim_columns() -> sa.Select[Any]:
    """What a claim reads of a delivery and its event."""
    d = ShopDelivery
    return sa.select(
        d.id,
        d.attempts,
        d.retry_from,
        d.order_seq,
        ShopEvent.event_id,
        ShopEvent.type,
        ShopEvent.payload,
        ShopEvent.created_at,
    ).join(ShopEvent, ShopEvent.id == d.shop_event_id)


def _claim(row: sa.Row[Any]) -> DeliveryClaim:
    """A claim of a row :func:`_claim_columns` read; its attempt the next one."""
    return DeliveryClaim(
        id=row.id,
        event_id=row.event_id,
        type=str(row.type),
        order_seq=row.order_seq,
        payload=row.payload,
        created_at=row.created_at,
        retry_from=row.retry_from,
        attempts=row.attempts + 1,
    )


class RowLeases:
    """Claims that lease rows in the database (:func:`claim_deliveries`), for PostgreSQL.

    Attributes:
        sessions: the session factory (claims and settlements).
        read_sessions: a read-only factory (the look before a claim).
        endpoint: the endpoint's name.
        owner: the lease owner name.
        lease_seconds: how long a claim holds its rows.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        read_sessions: sessionmaker[Session],
        endpoint: str,
        owner: str,
        lease_seconds: float,
    ) -> None:
        self.sessions = sessions
        self.read_sessions = read_sessions
        self.endpoint = endpoint
        self.owner = owner
        self.lease_seconds = lease_seconds

    def claim(
        self, now: dt.datetime, limit: int, *, exclude: Collection[int], look_first: bool
    ) -> list[DeliveryClaim]:
        """Lease up to ``limit`` due deliveries; with ``look_first`` only after a read-only
        look found one (so an idle sender does not write)."""
        if look_first and not any_due(self.read_sessions, self.endpoint, now):
            return []
        return claim_deliveries(
            self.sessions,
            self.endpoint,
            owner=self.owner,
            now=now,
            limit=limit,
            lease_seconds=self.lease_seconds,
            exclude=exclude,
        )

    def settle(
        self, session: Session, ids: Collection[int], *, counted: bool, values: dict[str, Any]
    ) -> list[int]:
        """End the leases of ``ids`` with ``values``; ``counted``: the attempt was made
        (the claim counted it; one not made is taken back). The rows settled, by id."""
        if not counted:
            values = {**values, "attempts": ShopDelivery.attempts - 1}
        return DELIVERY_QUEUE.settle(session, ids, owner=self.owner, **values)

    def close(self) -> None:
        """Nothing held beyond the rows' leases."""


@dataclass
class SoleSender:
    """Claims that are reads, by the one sender holding the endpoint's file lock (SQLite).

    Attributes:
        read_sessions: a read-only factory: claims.
        endpoint: the endpoint's name.
        lock: the endpoint's file lock (:meth:`for_endpoint`).
    """

    read_sessions: sessionmaker[Session]
    endpoint: str
    lock: FileLock
    _held: bool = field(init=False, default=False)

    @classmethod
    def for_endpoint(cls, read_sessions: sessionmaker[Session], endpoint: str) -> SoleSender:
        """The sole sender of ``endpoint`` on the database ``read_sessions`` reads."""
        engine = read_sessions.kw["bind"]
        directory = default_lock_dir(engine)
        directory.mkdir(parents=True, exist_ok=True)
        # The name's key, not the name, so any endpoint name makes a file name.
        key = advisory_lock_key(f"shop-sender:{endpoint}") & 0xFFFFFFFFFFFFFFFF
        lock = FileLock(directory / f"shop-sender-{key:016x}.lock", thread_local=False)
        return cls(read_sessions, endpoint, lock)

    def holds(self) -> bool:
        """Whether this sender holds the endpoint, taking the lock if it is free."""
        if not self._held:
            try:
                self.lock.acquire(timeout=0)
            except Timeout:
                return False
            self._held = True
            logger.info("shop event sender for %s: sending (this process)", self.endpoint)
        return True

    def claim(
        self, now: dt.datetime, limit: int, *, exclude: Collection[int], look_first: bool
    ) -> list[DeliveryClaim]:
        """Up to ``limit`` due deliveries not in ``exclude`` (sent, not yet settled), read
        in a read-only transaction; none while another process holds the endpoint."""
        if not self.holds():
            return []
        query = (
            _claim_columns()
            .where(*_due(now, self.endpoint, exclude))
            .order_by(ShopDelivery.next_attempt_at, ShopDelivery.id)
            .limit(limit)
        )
        with self.read_sessions() as session:
            rows = session.execute(query).all()
        return [_claim(row) for row in rows]

    def settle(
        self, session: Session, ids: Collection[int], *, counted: bool, values: dict[str, Any]
    ) -> list[int]:
        """Set ``values`` on the rows of ``ids`` still in flight, counting the attempt when
        it was made; the rows settled, by id."""
        d = ShopDelivery
        statement = (
            sa.update(d)
            .where(d.id.in_(sorted(ids)), IN_FLIGHT)
            .values(
                **values,
                **({"attempts": d.attempts + 1} if counted else {}),
                lease_owner=None,
                lease_expires_at=None,
            )
            .returning(d.id)
            .execution_options(**NO_SYNC)
        )
        return sorted(session.scalars(statement).all())

    def close(self) -> None:
        """Let go of the endpoint."""
        if self._held:
            self.lock.release(force=True)
            self._held = False


Leases = RowLeases | SoleSender
"""How a sender claims and settles its deliveries."""
