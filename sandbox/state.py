"""The venue's stored state: orders with their row versions, subscriptions, and the clock.

:class:`OrderStore` keeps every order as a JSON document (the order as getOrder shows it,
plus the request it was last submitted with) in SQLite — ``":memory:"`` or a file, one
code path for both, so a restarted sandbox keeps its orders, row versions and webhook
subscriptions; rows deleted outright simply vanish.

``rowVersion`` is the venue's database row version (SQL Server ``rowversion``, read by
APIRequest ``GetRecords``): one counter for the whole database, taken by every write to
any table. So a change of an order takes a version for each of its lines and wallets
and its header, after the versions taken by the rest of the venue's activity since the
last change (a random number of writes, :data:`OTHER_WRITES_MAX` at most): consecutive
orders' versions have large, irregular gaps. Each order also has a stable ``system_id``
(its SystemId, the ``id`` of list summaries).

A change can be *held* (:meth:`OrderStore.hold`): it takes its version at once but is
committed, visible to every read, only when released (:meth:`OrderStore.release_due`):
a late commit, landing below versions a reader may already have passed.
:meth:`OrderStore.renumber_row_versions` simulates a restore of the venue's database,
after which row versions go backwards (and held changes, never committed, are lost).
One connection serves every thread, guarded by a re-entrant lock: the store is the
sandbox's single point of serialisation, and :meth:`OrderStore.transaction` groups
several steps into one atomic unit.

:class:`Clock` is the sandbox's time: the real UTC time plus an offset that tests (and
``POST /_sandbox/clock``) advance to make the sweeper's hour pass at once.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sandbox.requests import VenueRequest
from venue.models import Order, OrderStatus
from venue.webhooks import Subscription

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    order_id     TEXT PRIMARY KEY,
    entry_no     INTEGER NOT NULL UNIQUE,
    system_id    TEXT UNIQUE,
    partner_id   TEXT NOT NULL,
    reference    TEXT NOT NULL,
    status       TEXT NOT NULL,
    received_at  TEXT NOT NULL,
    status_since TEXT NOT NULL,
    row_version  INTEGER NOT NULL UNIQUE,
    document     TEXT NOT NULL,
    UNIQUE (partner_id, reference)
);
CREATE INDEX IF NOT EXISTS orders_by_status ON orders (status);
CREATE TABLE IF NOT EXISTS subscriptions (
    id         TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    document   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS held (
    order_id     TEXT PRIMARY KEY,
    row_version  INTEGER NOT NULL UNIQUE,
    status       TEXT NOT NULL,
    status_since TEXT NOT NULL,
    document     TEXT NOT NULL,
    visible_at   TEXT NOT NULL
);
"""

OTHER_WRITES_MAX = 40
"""At most this many row versions taken by the rest of the venue between two changes."""

FIRST_ROW_VERSION = 1_000_000_000_000
"""Where a new database's counter starts: a venue's database has written a lot already."""


def stamp(moment: dt.datetime) -> str:
    """A UTC instant as fixed-width text that sorts as time does."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _instant(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


class Clock:
    """The real UTC time plus an adjustable offset. Thread-safe."""

    def __init__(self, offset: dt.timedelta = dt.timedelta(0)) -> None:
        self._lock = threading.Lock()
        self._offset = offset

    def now(self) -> dt.datetime:
        """The sandbox's current time, aware UTC."""
        with self._lock:
            return dt.datetime.now(dt.UTC) + self._offset

    def venue_now(self) -> dt.datetime:
        """The sandbox's time as the venue stores a DateTime: to the millisecond.

        Business Central's DateTime holds milliseconds (``CurrentDateTime()``); a
        ``receivedAt`` or ``issuedAt`` carries them.
        """
        now = self.now()
        return now.replace(microsecond=now.microsecond // 1000 * 1000)

    @property
    def offset(self) -> dt.timedelta:
        """How far the sandbox's time runs ahead of the real time."""
        with self._lock:
            return self._offset

    def advance(self, delta: dt.timedelta) -> dt.datetime:
        """Move the sandbox's time forward by ``delta``; returns the new now."""
        with self._lock:
            self._offset += delta
        return self.now()


@dataclass(frozen=True)
class OrderRecord:
    """A stored order: what getOrder shows, the request behind it, and its bookkeeping.

    Attributes:
        order: the order as the venue shows it.
        request: the createOrder/replaceOrder body it was last submitted with (the
            pipeline mints from it: names, external references, component schedules).
        entry_no: the internal row number (the receivedAt list's tie-breaker).
        row_version: the database-wide row version of the order's last change.
        status_since: when the order entered its current status (the sweeper's clock).
        system_id: the record's SystemId, a GUID (``id`` in list summaries; not the
            orderId).
    """

    order: Order
    request: VenueRequest
    entry_no: int
    row_version: int
    status_since: dt.datetime
    system_id: str

    @property
    def order_id(self) -> str:
        """The order's GUID."""
        return self.order.order_id

    @property
    def status(self) -> OrderStatus:
        """The order's current status."""
        return self.order.status


@dataclass(frozen=True)
class OrderQuery:
    """Which of one partner's orders a list returns, and in which order.

    Attributes:
        by_row_version: order by row version (replication) rather than by receivedAt.
        after_row_version: only rows changed after this row version.
        after_position: keyset cursor for the receivedAt order: (receivedAt stamp, entry_no).
    """

    partner_id: str
    statuses: tuple[OrderStatus, ...] = ()
    reference: str | None = None
    received_from: dt.datetime | None = None
    received_to: dt.datetime | None = None
    by_row_version: bool = False
    after_row_version: int | None = None
    after_position: tuple[str, int] | None = None


class OrderStore:
    """Orders, subscriptions and counters in SQLite, safe to share between threads.

    The store opens its connection and whoever creates the store closes it
    (:meth:`close`).
    """

    def __init__(self, path: str = ":memory:", *, activity: random.Random | None = None) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        # Not for secrets: how much the rest of the venue writes, repeatable when seeded.
        self._activity = activity or random.Random()  # noqa: S311
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._db.executescript(_SCHEMA)
            self._give_system_ids()
        except sqlite3.Error:
            self._db.close()
            raise

    def _give_system_ids(self) -> None:
        """A state file written before orders had a SystemId gets one for each."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(orders)")}
        if "system_id" not in columns:
            self._db.execute("ALTER TABLE orders ADD COLUMN system_id TEXT")
            self._db.execute("CREATE UNIQUE INDEX orders_system_id ON orders (system_id)")
        missing = self._db.execute("SELECT order_id FROM orders WHERE system_id IS NULL")
        for (order_id,) in missing.fetchall():
            self._db.execute(
                "UPDATE orders SET system_id = ? WHERE order_id = ?", (str(uuid.uuid4()), order_id)
            )

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit of work; nests (only the outermost commits)."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            finally:
                self._depth = 0

    # --- orders -----------------------------------------------------------------------

    def get(self, order_id: str) -> OrderRecord | None:
        """The order with ``order_id``, or ``None``."""
        return self._one("SELECT * FROM orders WHERE order_id = ?", (order_id.lower(),))

    def find(self, partner_id: str, reference: str) -> OrderRecord | None:
        """The partner's order with the (normalised) ``reference``, or ``None``."""
        return self._one(
            "SELECT * FROM orders WHERE partner_id = ? AND reference = ?", (partner_id, reference)
        )

    def with_status(self, *statuses: OrderStatus) -> list[OrderRecord]:
        """Every order in one of ``statuses``, oldest entry first."""
        marks = ",".join("?" * len(statuses))
        return self._many(
            f"SELECT * FROM orders WHERE status IN ({marks}) ORDER BY entry_no",  # noqa: S608
            tuple(str(s) for s in statuses),
        )

    def query(self, query: OrderQuery, limit: int) -> list[OrderRecord]:
        """Up to ``limit`` of one partner's orders matching ``query``."""
        where = ["partner_id = ?"]
        args: list[str | int] = [query.partner_id]
        if query.statuses:
            where.append(f"status IN ({','.join('?' * len(query.statuses))})")
            args.extend(str(s) for s in query.statuses)
        if query.reference is not None:
            where.append("reference = ?")
            args.append(query.reference)
        if query.received_from is not None:
            where.append("received_at >= ?")
            args.append(stamp(query.received_from))
        if query.received_to is not None:
            where.append("received_at <= ?")
            args.append(stamp(query.received_to))
        if query.after_row_version is not None:
            where.append("row_version > ?")
            args.append(query.after_row_version)
        if query.after_position is not None:
            where.append("(received_at, entry_no) > (?, ?)")
            args.extend(query.after_position)
        order_by = "row_version" if query.by_row_version else "received_at, entry_no"
        sql = f"SELECT * FROM orders WHERE {' AND '.join(where)} ORDER BY {order_by} LIMIT ?"  # noqa: S608
        return self._many(sql, (*args, limit))

    def save(self, order: Order, request: VenueRequest, status_since: dt.datetime) -> OrderRecord:
        """Insert or update ``order``, giving it the next row version.

        Raises:
            sqlite3.IntegrityError: another order already has its (partner, reference).
        """
        with self.transaction():
            row_version = self.take_row_version(order)
            return self._write(order, request, status_since, row_version)

    def _write(
        self, order: Order, request: VenueRequest, status_since: dt.datetime, row_version: int
    ) -> OrderRecord:
        """Insert or update the order's row at ``row_version`` (inside a transaction)."""
        document = json.dumps({"order": order.to_wire(), "request": request.to_wire()})
        existing = self._db.execute(
            "SELECT entry_no, system_id FROM orders WHERE order_id = ?", (order.order_id,)
        ).fetchone()
        if existing:
            entry_no, system_id = int(existing[0]), str(existing[1])
        else:
            entry_no, system_id = self.next_value("entry_no"), str(uuid.uuid4())
        self._db.execute(
            "INSERT INTO orders (order_id, entry_no, system_id, partner_id, reference, status,"
            " received_at, status_since, row_version, document)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (order_id) DO UPDATE SET status = excluded.status,"
            " status_since = excluded.status_since, row_version = excluded.row_version,"
            " document = excluded.document",
            (
                order.order_id,
                entry_no,
                system_id,
                order.partner_id,
                order.sell_to_order_reference,
                str(order.status),
                stamp(order.received_at or status_since),
                stamp(status_since),
                row_version,
                document,
            ),
        )
        return OrderRecord(order, request, entry_no, row_version, status_since, system_id)

    def take_row_version(self, order: Order) -> int:
        """The row version a change of ``order`` takes: the database's counter moves on.

        First by the writes of the rest of the venue since the last change, then by one
        for each of the order's lines and wallets, and one for its header, which is
        the order's version.
        """
        others = self._activity.randint(0, OTHER_WRITES_MAX)
        own = len(order.items) + sum(len(item.wallets) for item in order.items)
        with self.transaction():
            row = self._db.execute(
                "INSERT INTO counters (name, value) VALUES ('row_version', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = value + ? RETURNING value",
                (FIRST_ROW_VERSION + others + own, others + own + 1),
            ).fetchone()
        return int(row[0])

    def hold(
        self,
        order: Order,
        request: VenueRequest,
        status_since: dt.datetime,
        visible_at: dt.datetime,
    ) -> int:
        """Write a change that takes its row version now and is committed only later.

        Until :meth:`release_due` commits it (at or after ``visible_at``), every read sees
        the order as it was; changes made meanwhile take higher versions.

        Returns:
            The row version the change took.
        """
        with self.transaction():
            row_version = self.take_row_version(order)
            self._db.execute(
                "INSERT INTO held (order_id, row_version, status, status_since, document,"
                " visible_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    order.order_id,
                    row_version,
                    str(order.status),
                    stamp(status_since),
                    json.dumps({"order": order.to_wire(), "request": request.to_wire()}),
                    stamp(visible_at),
                ),
            )
        return row_version

    def release_due(self, now: dt.datetime) -> list[OrderRecord]:
        """Commit the held changes due by ``now``, each at the row version it took."""
        with self.transaction():
            due = self._db.execute(
                "SELECT order_id, row_version, status_since, document FROM held"
                " WHERE visible_at <= ? ORDER BY row_version",
                (stamp(now),),
            ).fetchall()
            records = []
            for order_id, row_version, status_since, document in due:
                content = json.loads(document)
                self._db.execute("DELETE FROM held WHERE order_id = ?", (order_id,))
                records.append(
                    self._write(
                        Order.model_validate(content["order"]),
                        VenueRequest.from_wire(content["request"]),
                        _instant(status_since),
                        int(row_version),
                    )
                )
        return records

    def held_ids(self) -> set[str]:
        """The orders whose change is held, not yet committed (their rows are locked)."""
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT order_id FROM held")}

    def remove(self, order_id: str) -> None:
        """Delete the order's row outright: it vanishes from every list and feed."""
        with self.transaction():
            self._db.execute("DELETE FROM orders WHERE order_id = ?", (order_id,))

    def renumber_row_versions(self) -> int:
        """Simulate a restore of the venue's database: row versions start again low.

        Every order's row version becomes 1..n in their current row-version order, and
        the counter is reset to n, so the next change takes a version just above n:
        lower than versions a client may already have seen (a backwards ``rowVersion``).
        Orders, statuses and documents are unchanged; held changes, never committed,
        are lost, as a restore loses open transactions.

        Returns:
            n, the number of orders (and the counter's new value).
        """
        with self.transaction():
            self._db.execute("DELETE FROM held")
            order_ids = [
                row[0]
                for row in self._db.execute("SELECT order_id FROM orders ORDER BY row_version")
            ]
            # Ascending, one row at a time: the i-th smallest version is at least i, so
            # the new value never collides with a version not yet renumbered (UNIQUE).
            for number, order_id in enumerate(order_ids, start=1):
                self._db.execute(
                    "UPDATE orders SET row_version = ? WHERE order_id = ?", (number, order_id)
                )
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES ('row_version', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (len(order_ids),),
            )
        return len(order_ids)

    def next_value(self, counter: str) -> int:
        """The next value of the named, persistent counter (first value 1)."""
        with self.transaction():
            row = self._db.execute(
                "INSERT INTO counters (name, value) VALUES (?, 1)"
                " ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
                (counter,),
            ).fetchone()
        return int(row[0])

    def _one(self, sql: str, args: tuple[str | int, ...]) -> OrderRecord | None:
        records = self._many(sql, args)
        return records[0] if records else None

    def _many(self, sql: str, args: Iterable[str | int]) -> list[OrderRecord]:
        with self._lock:
            cursor = self._db.execute(sql, tuple(args))
            names = [c[0] for c in cursor.description]
            rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        return [_record(row) for row in rows]

    # --- webhook subscriptions --------------------------------------------------------

    def add_subscription(self, subscription: Subscription, created_at: dt.datetime) -> None:
        """Store a new webhook subscription."""
        with self.transaction():
            self._db.execute(
                "INSERT INTO subscriptions (id, created_at, document) VALUES (?, ?, ?)",
                (subscription.id, stamp(created_at), json.dumps(subscription.to_wire())),
            )

    def subscriptions(self) -> list[Subscription]:
        """Every subscription, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT document FROM subscriptions ORDER BY created_at, id"
            ).fetchall()
        return [Subscription.model_validate_json(row[0]) for row in rows]

    def subscription(self, subscription_id: str) -> Subscription | None:
        """The subscription with ``subscription_id``, or ``None``."""
        with self._lock:
            row = self._db.execute(
                "SELECT document FROM subscriptions WHERE id = ?", (subscription_id.lower(),)
            ).fetchone()
        return Subscription.model_validate_json(row[0]) if row else None

    def set_subscription_state(self, subscription_id: str, state: str) -> Subscription | None:
        """Set a subscription's ``subscriptionState``; the subscription, or ``None``."""
        with self.transaction():
            row = self._db.execute(
                "SELECT document FROM subscriptions WHERE id = ?", (subscription_id.lower(),)
            ).fetchone()
            if row is None:
                return None
            document = {**json.loads(row[0]), SUBSCRIPTION_STATE: state}
            self._db.execute(
                "UPDATE subscriptions SET document = ? WHERE id = ?",
                (json.dumps(document), subscription_id.lower()),
            )
        return Subscription.model_validate(document)

    def remove_subscription(self, subscription_id: str) -> bool:
        """Delete a subscription; whether there was one."""
        with self.transaction():
            cursor = self._db.execute(
                "DELETE FROM subscriptions WHERE id = ?", (subscription_id.lower(),)
            )
        return cursor.rowcount > 0


SUBSCRIPTION_STATE = "subscriptionState"
"""The field in which a listed subscription says whether it still delivers, as Business
Central's external event subscriptions do; its values are these two."""
ACTIVE, INACTIVE = "Active", "Inactive"


def subscription_active(subscription: Subscription) -> bool:
    """Whether ``subscription`` still gets deliveries (one stored without a state does)."""
    state: object = (subscription.model_extra or {}).get(SUBSCRIPTION_STATE, ACTIVE)
    return state == ACTIVE


def _record(row: dict[str, str | int]) -> OrderRecord:
    document = json.loads(str(row["document"]))
    return OrderRecord(
        order=Order.model_validate(document["order"]),
        request=VenueRequest.from_wire(document["request"]),
        entry_no=int(row["entry_no"]),
        row_version=int(row["row_version"]),
        status_since=_instant(str(row["status_since"])),
        system_id=str(row["system_id"]),
    )
