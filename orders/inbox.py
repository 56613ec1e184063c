"""The inbox: where every notification is stored, durably and once, before it is acted on.

:func:`store_notifications` writes a batch of new rows to the ``inbox`` table
(:class:`storage.models.Inbox`) in one statement, ``INSERT ... VALUES (...), (...) ON
CONFLICT (connection_id, dedup_key) DO NOTHING RETURNING id``, so a batch of twenty is
one round trip and an exact repeat (same connection, same
:func:`~storage.models.inbox_dedup_key`) is skipped by the database itself, race-free
across processes. The rows the database returns are the ones stored; the rest were
duplicates. Rows start ``pending``, due at once (``next_attempt_at = received_at``), for
the worker to claim.

This is the webhook's hot path, so it does as little as it can per row: the payload is
serialized once (:func:`~storage.models.canonical_payload`), for its column and its
dedup key alike; each distinct time is converted once by the column type's own bind
processor; and the statement is SQL text cached per row count rather than compiled from
a construct per call, with the database's native placeholders. Given the engine (the
webhook), it sends it on a driver connection (:func:`storage.engine.driver_transaction`),
alone in autocommit mode when the rows fit one statement; code holding a SQLAlchemy
``Connection`` sends it on the driver connection under it, in its transaction
(:func:`storage.engine.driver_statements`). (On PostgreSQL,
``INSERT ... SELECT FROM unnest(...)`` with one array per column was measured too: the
server's share shrinks for twenty rows, but psycopg turns Python lists into arrays
slowly, about 2.8 ms of client CPU per batch of twenty, far more than the VALUES list
costs both sides.)

It takes an engine or the caller's ``Connection``, not a ``Session``: a session's
bookkeeping costs more than the insert itself on SQLite, and the webhook view has
nothing else for one to do. Code that holds a session passes ``session.connection()``,
and commits itself.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, TypedDict, cast

import sqlalchemy as sa
from sqlalchemy import Connection, Dialect, Engine
from sqlalchemy.orm import Session

from storage.engine import (
    DriverTransaction,
    driver_statements,
    driver_transaction,
    native_placeholders,
)
from storage.lease import NO_SYNC
from storage.models import Inbox, InboxSource, InboxState, canonical_payload, inbox_dedup_key
from venue.text import storable_text

logger = logging.getLogger(__name__)

_INBOX: sa.Table = Inbox.__table__  # type: ignore[assignment]


class NewInboxRow(TypedDict):
    """The columns a producer fills for one inbox row; the rest are :func:`store_notifications`'.

    ``payload`` is the notification as received; its ``clientState`` (a secret) is left
    out of what is stored (:func:`~storage.models.canonical_payload`).
    """

    connection_id: int
    source: InboxSource
    event_name: str
    order_id: str | None
    buy_from_order_reference: str | None
    notified_status: str | None
    notified_at: dt.datetime | None
    received_at: dt.datetime
    payload: dict[str, Any]


def _width(column: str) -> int:
    """The width of one of the inbox's text columns, as the model declares it."""
    width = cast(sa.String, _INBOX.c[column].type).length
    assert width is not None, f"inbox.{column} has no width"
    return width


EVENT_NAME_MAX = _width("event_name")
"""The width of :attr:`Inbox.event_name`."""
REFERENCE_HINT_MAX = _width("buy_from_order_reference")
"""The width of :attr:`Inbox.buy_from_order_reference`."""
STATUS_HINT_MAX = _width("notified_status")
"""The width of :attr:`Inbox.notified_status`."""


def hint(value: Any, width: int) -> str | None:
    """A hint (a reference, a status) as its inbox column keeps it, or ``None``.

    Hints are not the truth (the worker's getOrder is) and the payload keeps them whole,
    so one that is blank, not text, wider than its column or not storable text leaves its
    column empty rather than refusing what carries it.
    """
    if isinstance(value, str) and value.strip() and len(value) <= width and storable_text(value):
        return value
    return None


@dataclass(frozen=True, slots=True)
class StoreResult:
    """What became of a batch: rows stored (with their ids) and exact repeats skipped."""

    stored: int
    duplicates: int
    ids: tuple[int, ...]


def store_notifications(target: Engine | Connection, rows: Sequence[NewInboxRow]) -> StoreResult:
    """Store ``rows`` in the inbox, skipping exact repeats, in one statement.

    A repeat is a row whose connection and dedup key are already stored, or appear
    earlier in ``rows``; it is counted in ``duplicates``, not stored.

    Args:
        target: an engine (the webhook's), and the rows are committed here, all or none;
            or the caller's connection, in its transaction, not committed.
        rows: the new rows, as producers fill them.

    Returns:
        How many rows were stored and how many were duplicates.

    Raises:
        sqlalchemy.exc.OperationalError: the database cannot take the write (locked,
            unreachable, timed out); nothing of the batch is stored once the caller's
            transaction rolls back.
    """
    to_database = _time_binder(target.dialect)
    times: dict[dt.datetime | None, Any] = {None: None}

    def database_time(value: dt.datetime | None) -> Any:
        # A batch shares its received_at (and so next_attempt_at): converted once.
        if value not in times:
            times[value] = to_database(value)
        return times[value]

    unique: dict[tuple[int, str], tuple[Any, ...]] = {}
    for row in rows:
        payload = canonical_payload(row["payload"])
        dedup_key = inbox_dedup_key(payload, row["payload"].get("timestamp"))
        received_at = database_time(row["received_at"])
        # Repeats inside one batch are dropped here: one statement cannot insert a row
        # and conflict with it, and the count of duplicates stays exact.
        unique.setdefault(
            (row["connection_id"], dedup_key),
            (
                row["connection_id"],
                row["source"].value,
                row["event_name"],
                row["order_id"],
                row["buy_from_order_reference"],
                row["notified_status"],
                database_time(row["notified_at"]),
                received_at,
                payload,
                dedup_key,
                InboxState.PENDING.value,
                0,
                received_at,  # next_attempt_at: due at once
            ),
        )
    values = list(unique.values())
    if isinstance(target, Engine):
        # Most POSTs fit one statement, which then needs no BEGIN and COMMIT of its own.
        one_statement = len(values) <= _ROWS_PER_STATEMENT
        with driver_transaction(target, one_statement=one_statement) as transaction:
            ids = _insert(transaction, values)
    else:
        with driver_statements(target) as transaction:
            ids = _insert(transaction, values)
    return StoreResult(stored=len(ids), duplicates=len(rows) - len(ids), ids=tuple(ids))


def _insert(transaction: DriverTransaction, values: list[tuple[Any, ...]]) -> list[int]:
    """Insert rows of :data:`_COLUMNS` values; the ids of those not already stored."""
    ids: list[int] = []
    for start in range(0, len(values), _ROWS_PER_STATEMENT):
        chunk = values[start : start + _ROWS_PER_STATEMENT]
        statement = _insert_statement(transaction.dialect, len(chunk))
        parameters = tuple(itertools.chain.from_iterable(chunk))
        ids.extend(transaction.returning(statement, parameters))
    return ids


# The columns store_notifications fills, in the order of its value tuples.
_COLUMNS = (
    "connection_id",
    "source",
    "event_name",
    "order_id",
    "buy_from_order_reference",
    "notified_status",
    "notified_at",
    "received_at",
    "payload",
    "dedup_key",
    "state",
    "attempts",
    "next_attempt_at",
)
# Rows per INSERT: 13,000 parameters, within SQLite's 32,766 and PostgreSQL's 65,535.
_ROWS_PER_STATEMENT = 1000


@lru_cache(maxsize=64)
def _insert_statement(dialect: Dialect, row_count: int) -> str:
    """``INSERT ... VALUES`` ``row_count`` rows ``ON CONFLICT DO NOTHING RETURNING id``, as text.

    Text for the driver rather than a SQLAlchemy construct: compiling and binding the
    construct costs more CPU than the database's own work for a webhook POST.
    """
    width = len(_COLUMNS)
    placeholders = native_placeholders(dialect, width * row_count)
    rows = (
        "(" + ", ".join(placeholders[start : start + width]) + ")"
        for start in range(0, len(placeholders), width)
    )
    # Only fixed names and placeholders go into the text; the values are parameters.
    return (
        f"INSERT INTO {_INBOX.name} ({', '.join(_COLUMNS)}) "  # noqa: S608
        f"VALUES {', '.join(rows)}"
        " ON CONFLICT (connection_id, dedup_key) DO NOTHING RETURNING id"
    )


@cache
def _time_binder(dialect: Dialect) -> Callable[[dt.datetime | None], Any]:
    """How the inbox's :class:`~storage.types.UTCDateTime` columns bind on ``dialect``."""
    process = _INBOX.c.received_at.type.dialect_impl(dialect).bind_processor(dialect)
    return process if process is not None else (lambda value: value)


POLL_EVENT = "otacm_lookup"
"""The ``event_name`` of inbox rows otacm writes itself: "fetch this order"."""


@dataclass(frozen=True, slots=True)
class Lookup:
    """An order a scheduled job wants fetched by the worker (getOrder, then the mirror).

    Attributes:
        order_id: the venue's orderId.
        reason: why (``feed``, ``in_flight``, ``recheck``, ``submission``...), for the
            row's payload and the logs.
        status: the status the job saw, when it saw one (a hint, like a webhook's).
        row_version: the change feed's ``rowVersion`` of what the job saw. Two lookups
            of one order at one row version are the same lookup, stored once; lookups
            without one are told apart by when they were asked for.
        buy_from_order_reference: the venue's reference, when the job saw it.
    """

    order_id: str
    reason: str
    status: str | None = None
    row_version: int | None = None
    buy_from_order_reference: str | None = None


def queue_lookups(
    connection: Connection, connection_id: int, lookups: Sequence[Lookup], *, now: dt.datetime
) -> StoreResult:
    """Queue getOrder calls for the worker, as inbox rows with source ``poll``.

    Orders that already have a pending or leased inbox row (a webhook's, or an earlier
    lookup's) are skipped and counted as duplicates: the worker's coming fetch answers
    this lookup too. The same goes for a lookup already stored at the same row version.

    Args:
        connection: the caller's connection, in its transaction; not committed.
        connection_id: the venue connection the orders belong to.
        lookups: the orders to fetch.
        now: when the lookups were asked for (aware); the rows are due at once.

    Returns:
        How many rows were stored and how many lookups were skipped.
    """
    if not lookups:
        return StoreResult(stored=0, duplicates=0, ids=())
    order_ids = sorted({lookup.order_id for lookup in lookups})
    # Searched among the in-flight rows, by state (the inbox has no index by order, and
    # a condition on connection_id would lead SQLite to the dedup key's index, which
    # holds every row the connection ever had): the connection is compared here.
    in_flight = connection.execute(
        sa.select(Inbox.connection_id, Inbox.order_id).where(
            Inbox.state.in_([InboxState.PENDING, InboxState.LEASED]),
            Inbox.order_id.in_(order_ids),
        )
    )
    waiting = {order_id for owner, order_id in in_flight if owner == connection_id}
    rows: list[NewInboxRow] = []
    for lookup in lookups:
        if lookup.order_id in waiting:
            continue
        payload: dict[str, Any] = {"orderId": lookup.order_id, "reason": lookup.reason}
        if lookup.status is not None:
            payload["status"] = lookup.status
        if lookup.row_version is not None:
            payload["rowVersion"] = lookup.row_version
        else:
            payload["requestedAt"] = now.isoformat()
        rows.append(
            {
                "connection_id": connection_id,
                "source": InboxSource.POLL,
                "event_name": POLL_EVENT,
                "order_id": lookup.order_id,
                "buy_from_order_reference": hint(
                    lookup.buy_from_order_reference, REFERENCE_HINT_MAX
                ),
                "notified_status": hint(lookup.status, STATUS_HINT_MAX),
                "notified_at": now,
                "received_at": now,
                "payload": payload,
            }
        )
    result = store_notifications(connection, rows)
    skipped = len(lookups) - len(rows)
    return StoreResult(stored=result.stored, duplicates=result.duplicates + skipped, ids=result.ids)


def replay_dead(
    session: Session,
    *,
    now: dt.datetime,
    connection_id: int | None = None,
    ids: Collection[int] | None = None,
) -> int:
    """Make dead-lettered rows pending again, due at ``now``, with their attempts reset.

    ``last_error`` stays until the row next succeeds or fails, so the reason remains
    visible meanwhile.

    Args:
        session: the caller's session; not committed.
        now: when the rows become due (aware).
        connection_id: only rows of this connection.
        ids: only these rows.

    Returns:
        How many rows were made pending.
    """
    query = sa.update(Inbox).where(Inbox.state == InboxState.DEAD)
    if connection_id is not None:
        query = query.where(Inbox.connection_id == connection_id)
    if ids is not None:
        query = query.where(Inbox.id.in_(sorted(ids)))
    result = session.execute(
        query.values(
            state=InboxState.PENDING,
            attempts=0,
            next_attempt_at=now,
            lease_owner=None,
            lease_expires_at=None,
        ).execution_options(**NO_SYNC)
    )
    count = int(result.rowcount)  # type: ignore[attr-defined]
    if count:
        logger.info("replayed %d dead-lettered inbox rows", count)
    return count


LIST_MAX = 1000
"""The most rows :func:`list_rows` returns at once."""


def list_rows(
    session: Session,
    *,
    state: InboxState | None = None,
    connection_id: int | None = None,
    before: tuple[dt.datetime, int] | None = None,
    limit: int = 50,
) -> list[Inbox]:
    """Inbox rows newest first, for a person: all, or those in one ``state``.

    Read through the ``(state, next_attempt_at)`` index when a state is given (a few
    dead rows among millions done cost a few index entries), else by id. ``before``
    (a row's ``(next_attempt_at, id)`` with a state, its id's only without) pages on.
    """
    limit = max(1, min(limit, LIST_MAX))
    query = sa.select(Inbox)
    if connection_id is not None:
        query = query.where(Inbox.connection_id == connection_id)
    if state is None:
        if before is not None:
            query = query.where(Inbox.id < before[1])
        return list(session.scalars(query.order_by(Inbox.id.desc()).limit(limit)))
    query = query.where(Inbox.state == state)
    if before is not None:
        moment, row_id = before
        query = query.where(
            sa.or_(
                Inbox.next_attempt_at < moment,
                sa.and_(Inbox.next_attempt_at == moment, Inbox.id < row_id),
            )
        )
    query = query.order_by(Inbox.next_attempt_at.desc(), Inbox.id.desc()).limit(limit)
    return list(session.scalars(query))


def count_rows(session: Session, state: InboxState, connection_id: int | None = None) -> int:
    """How many inbox rows are in ``state`` (the state index's count)."""
    query = sa.select(sa.func.count()).select_from(Inbox).where(Inbox.state == state)
    if connection_id is not None:
        query = query.where(Inbox.connection_id == connection_id)
    return int(session.scalar(query) or 0)


def row_json(row: Inbox, connection: str) -> dict[str, Any]:
    """One inbox row for a script: what it announced and where it stands, no payload."""
    return {
        "id": row.id,
        "connection": connection,
        "source": row.source.value,
        "event": row.event_name,
        "orderId": row.order_id,
        "notifiedStatus": row.notified_status,
        "notifiedAt": row.notified_at,
        "receivedAt": row.received_at,
        "state": row.state.value,
        "attempts": row.attempts,
        "nextAttemptAt": row.next_attempt_at,
        "processedAt": row.processed_at,
        "lastError": row.last_error,
    }
