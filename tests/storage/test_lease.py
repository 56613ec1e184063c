"""Leased-queue claims read the queue's in-flight rows, not its history: plans and results.

The plans are read from each database's own EXPLAIN, of the SELECT a real claim sends
(captured on its way to the driver), over a queue holding thousands of finished rows
before the pending ones: the shape where a claim that reads history costs most. SQLite
is left without statistics, as otacm runs it; PostgreSQL is analyzed, as autovacuum
would.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from orders.outbox import claim_outbox
from orders.worker import claim_batch
from storage.models import Inbox, InboxState, Outbox, OutboxState, ensure_connection
from tests.support.plans import query_plan, sent_statements

T0 = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
LEASE = 600.0
FINISHED_AT = T0 - dt.timedelta(days=30)

Claimer = Callable[..., list[Any]]


def _inbox_rows(
    connection_id: int, first: int, count: int, *, done: bool, order_from: int
) -> list[dict[str, Any]]:
    at = FINISHED_AT if done else T0 - dt.timedelta(minutes=1)
    return [
        {
            "connection_id": connection_id,
            "source": "webhook",
            "event_name": "orderStatusChanged",
            "order_id": f"order-{order_from + number}",
            "received_at": at,
            "payload": {"n": first + number},
            "dedup_key": f"{first + number:020d}",
            "state": InboxState.DONE if done else InboxState.PENDING,
            "attempts": 0,
            "next_attempt_at": at,
        }
        for number in range(count)
    ]


def _outbox_rows(
    connection_id: int, first: int, count: int, *, done: bool, order_from: int
) -> list[dict[str, Any]]:
    at = FINISHED_AT if done else T0 - dt.timedelta(minutes=1)
    return [
        {
            "connection_id": connection_id,
            "operation": "create" if done else "confirm",
            "state": OutboxState.SENT if done else OutboxState.PENDING,
            "attempts": 0,
            "next_attempt_at": at,
            "order_id": f"order-{order_from + number}",
            "created_at": at,
        }
        for number in range(count)
    ]


@dataclass(frozen=True)
class Queue:
    """A queue as these tests use it: its claim, table, rows and indexes."""

    claim: Claimer
    model: type[Inbox] | type[Outbox]
    rows: Callable[..., list[dict[str, Any]]]
    in_flight_index: str
    history_indexes: tuple[str, ...]
    """Indexes of every row ever stored, as each database names them."""

    def add(
        self,
        session: Session,
        connection_id: int,
        first: int,
        count: int,
        *,
        done: bool,
        order_from: int | None = None,
    ) -> None:
        """Insert ``count`` rows, finished or due, about orders from ``order_from`` on."""
        order_from = first if order_from is None else order_from
        rows = self.rows(connection_id, first, count, done=done, order_from=order_from)
        if rows:
            session.execute(sa.insert(self.model), rows)


QUEUES = {
    "inbox": Queue(
        claim_batch,
        Inbox,
        _inbox_rows,
        "ix_inbox_in_flight",
        ("uq_inbox_connection_id_dedup_key", "sqlite_autoindex_inbox_1", "pk_inbox"),
    ),
    "outbox": Queue(claim_outbox, Outbox, _outbox_rows, "ix_outbox_in_flight", ("pk_outbox",)),
}


def _fill(sessions: sessionmaker[Session], queue: Queue, *, finished: int, pending: int) -> int:
    """``finished`` finished rows then ``pending`` due ones, for connection ``a``; a few of
    each for connection ``b``. Each due row's order has a finished row before it (the
    outbox then looks its turn up in history). Returns ``a``'s id."""
    with sessions.begin() as session:
        a, b = ensure_connection(session, "a"), ensure_connection(session, "b")
        for connection_id, done, due, first in ((a, finished, pending, 0), (b, 50, 5, 10**7)):
            queue.add(session, connection_id, first, done, done=True)
            queue.add(session, connection_id, first + done, due, done=False, order_from=first)
    return a


@pytest.mark.parametrize("name", sorted(QUEUES))
@pytest.mark.parametrize(
    ("finished", "pending", "may_sort"),
    [
        pytest.param(8000, 100, True, id="history"),
        pytest.param(4000, 4000, False, id="backlog"),
    ],
)
def test_a_claim_reads_the_partial_index_of_in_flight_rows(
    sessions: sessionmaker[Session],
    migrated_engine: sa.Engine,
    name: str,
    finished: int,
    pending: int,
    may_sort: bool,
) -> None:
    """The claim's SELECT reads the queue's in-flight index first, and neither the dedup
    key's index nor the primary key (which hold every row ever stored); with few rows
    waiting after a long history (where PostgreSQL may sort those few), and with as many
    waiting as finished (read in the index's order, no sort)."""
    queue = QUEUES[name]
    a = _fill(sessions, queue, finished=finished, pending=pending)
    if migrated_engine.dialect.name == "postgresql":
        with migrated_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"ANALYZE {name}")

    with sent_statements(migrated_engine, "SELECT") as sent:
        claims = queue.claim(
            sessions, owner="w", now=T0, limit=50, lease_seconds=LEASE, connection_ids=[a]
        )
    [(statement, parameters)] = sent
    plan = query_plan(migrated_engine, statement, parameters)

    assert len(claims) == 50
    assert INDEX_READ.findall(plan)[0] == queue.in_flight_index, plan
    assert not any(index in plan for index in queue.history_indexes), plan
    assert "SCAN " + name not in plan and "Seq Scan" not in plan, plan
    if not may_sort:
        assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan


INDEX_READ = re.compile(
    r"(?:USING INDEX|USING COVERING INDEX|Index Scan using|Index Scan on) (\w+)"
)
"""A plan's step reading an index, in SQLite's words and PostgreSQL's; the index's name."""


@pytest.mark.parametrize("name", sorted(QUEUES))
def test_a_claim_over_several_connections_takes_the_oldest_due_rows_of_all(
    sessions: sessionmaker[Session], name: str
) -> None:
    """Connections are read one at a time, yet a claim takes the lowest due ids among
    those it names, and leaves the others'; ``None`` names every connection."""
    queue = QUEUES[name]
    with sessions.begin() as session:
        connections = [ensure_connection(session, name) for name in "abc"]
        # Interleaved, a b c a b c ...: a claim of 4 over a and b takes rows of both.
        for number in range(9):
            queue.add(session, connections[number % 3], number, 1, done=False)
    with sessions.begin() as session:
        model = queue.model
        ids = {
            connection_id: set(
                session.scalars(sa.select(model.id).where(model.connection_id == connection_id))
            )
            for connection_id in connections
        }
    a, b, c = connections

    first = queue.claim(
        sessions, owner="w", now=T0, limit=4, lease_seconds=LEASE, connection_ids=[b, a]
    )
    rest = queue.claim(
        sessions, owner="w", now=T0, limit=10, lease_seconds=LEASE, connection_ids=None
    )

    assert [row.id for row in first] == sorted(ids[a] | ids[b])[:4]
    assert [row.id for row in rest] == sorted((ids[a] | ids[b] | ids[c]) - {r.id for r in first})
