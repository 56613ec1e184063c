"""A run records in short steps on SQLite: the same results, resumable, writers get in.

Two connections hold the same ledger and mirror (:func:`build`): thousands of exceptions
opened, then closed, seen and reopened over three rounds of changes. One connection's
runs record a hundred rows per write transaction, the other's everything at once; both
must end with the same exceptions, events and totals. A run stopped between its batches
(an error injected at a batch's first statement; a real process killed there) leaves
every exception agreeing with its history, and the next run of the period completes it.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from reconciler import recording
from reconciler.engine import ReconRunFailed
from storage.engine import make_engine, make_sessions
from storage.models import LedgerLine, LedgerSource, LedgerState, VenueOrder, ensure_connection
from storage.records import ExceptionEvent, ReconException, ReconRun, ReconRunState
from tests.reconciler.test_engine import NOW, PARTNER, SOLD, run, totals
from venue.models import OrderStatus

SALES = 1200
"""Sales missing at the venue, and orphan orders, in the first round: 2,400 exceptions."""

STEP = 100
"""Rows per write transaction of the stepped runs: two dozen batches a round."""

REPOSITORY = Path(__file__).resolve().parents[2]

HANG_GUARD = 60.0
"""Seconds a test waits for what should happen at once before it fails instead of hanging."""


def _order_id(number: int) -> str:
    return str(uuid.UUID(int=number))


def _line(connection_id: int, reference: str) -> LedgerLine:
    return LedgerLine(
        connection_id=connection_id,
        partner_id=PARTNER,
        shop_reference=reference,
        sold_at=SOLD,
        quantity=2,
        amount=20,
        currency="EUR",
        amount_includes_vat=True,
        state=LedgerState.ACTIVE,
        source=LedgerSource.IMPORT,
    )


def _order(connection_id: int, number: int, reference: str) -> VenueOrder:
    # No items: a sale of two it answers is a quantity mismatch.
    return VenueOrder(
        connection_id=connection_id,
        order_id=_order_id(number),
        partner_id=PARTNER,
        sell_to_order_reference=reference,
        status=OrderStatus.ISSUED,
        status_changed_at=SOLD,
        received_at=SOLD,
        first_seen_at=SOLD,
        items=[],
    )


def build(sessions: sessionmaker[Session], name: str) -> int:
    """Round one: :data:`SALES` sales with no order, as many orders with no sale."""
    with sessions.begin() as session:
        connection_id = ensure_connection(session, name)
        session.add_all(_line(connection_id, f"L-{i}") for i in range(SALES))
        session.add_all(_order(connection_id, i + 1, f"O-{i}") for i in range(SALES))
    return connection_id


def change(sessions: sessionmaker[Session], connection_id: int, round_no: int) -> None:
    """Round two: a third of the missing sales get an order (missing closed, quantity
    opened), half of the orphans a sale (orphan closed, quantity opened). Round three:
    those orders are removed (missing reopened, quantity closed)."""
    with sessions.begin() as session:
        if round_no == 2:
            session.add_all(
                _order(connection_id, SALES + i + 1, f"L-{i}") for i in range(0, SALES, 3)
            )
            session.add_all(_line(connection_id, f"O-{i}") for i in range(0, SALES, 2))
        else:
            session.execute(
                sa.update(VenueOrder)
                .where(
                    VenueOrder.connection_id == connection_id,
                    VenueOrder.order_id.in_([_order_id(SALES + i + 1) for i in range(0, SALES, 3)]),
                )
                .values(removed_at=NOW)
            )


def exceptions(session: Session, connection_id: int) -> list[tuple[Any, ...]]:
    """The connection's exceptions, as a finance user reads them, by subject."""
    rows = session.scalars(
        sa.select(ReconException).where(ReconException.connection_id == connection_id)
    )
    return sorted(
        (
            row.subject_key,
            row.category,
            str(row.state),
            row.currency,
            row.ledger_amount,
            row.venue_amount,
            sorted((row.details or {}).items(), key=str),
            row.subject_at,
        )
        for row in rows
    )


def events(session: Session, run_id: int) -> Counter[tuple[str, str, str]]:
    """What the run wrote: (subject, category, action) of each of its events."""
    query = (
        sa.select(ReconException.subject_key, ReconException.category, ExceptionEvent.action)
        .join(ExceptionEvent, ExceptionEvent.recon_exception_id == ReconException.id)
        .where(ExceptionEvent.recon_run_id == run_id)
    )
    return Counter((key, category, str(action)) for key, category, action in session.execute(query))


def assert_histories_agree(session: Session, connection_id: int) -> None:
    """Every exception's state is what its last event says, and each run's events are
    the rows that name the run."""
    for exception in session.scalars(
        sa.select(ReconException).where(ReconException.connection_id == connection_id)
    ):
        actions = [str(event.action) for event in exception.events]
        assert actions[0] == "opened"
        assert str(exception.state) == ("closed" if actions[-1] == "closed" else "open")
        last_run = exception.events[-1].recon_run_id
        assert last_run == (
            exception.closed_run_id if actions[-1] == "closed" else exception.last_seen_run_id
        )


@contextmanager
def batches_of(rows: int) -> Iterator[None]:
    """Runs record at most ``rows`` rows per write transaction inside the block."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recording, "BATCH_ROWS", rows)
        patch.setattr(recording, "FIRST_BATCH_ROWS", rows)
        yield


def _batch_starts(statement: str) -> bool:
    """A merge batch's first statement (its seen events) or a close batch's update."""
    return "THEN 'reopened' ELSE 'seen'" in statement or "SET state = 'closed'" in statement


def test_recording_in_steps_equals_recording_at_once(sessions: sessionmaker[Session]) -> None:
    """Three rounds: the same exceptions, events and totals, batched or not."""
    stepped, at_once = build(sessions, "stepped"), build(sessions, "at-once")
    for round_no in (1, 2, 3):
        if round_no > 1:
            change(sessions, stepped, round_no)
            change(sessions, at_once, round_no)
        with batches_of(STEP):
            stepped_run = run(sessions, stepped)
        with batches_of(10**9):
            at_once_run = run(sessions, at_once)
        with sessions() as session:
            assert exceptions(session, stepped) == exceptions(session, at_once)
            assert events(session, stepped_run) == events(session, at_once_run)
            assert totals(session, stepped_run) == totals(session, at_once_run)
            assert_histories_agree(session, stepped)
            done = Counter(action for _, _, action in events(session, stepped_run).elements())
        # What each round does, thousands of exceptions at a time.
        thirds, halves = len(range(0, SALES, 3)), len(range(0, SALES, 2))
        changed = thirds + halves
        assert (
            done
            == {
                1: {"opened": 2 * SALES},
                2: {"opened": changed, "closed": changed, "seen": 2 * SALES - changed},
                3: {"reopened": thirds, "closed": thirds, "seen": 2 * SALES - thirds},
            }[round_no]
        )


def test_a_run_failing_between_batches_is_completed_by_the_next(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session]
) -> None:
    """An error at the start of a later batch: the run is failed, what it recorded is
    consistent, and the next run of the period ends where an unbroken run would."""
    broken, whole = build(sessions, "broken"), build(sessions, "whole")
    for connection_id in (broken, whole):
        run(sessions, connection_id)
        change(sessions, connection_id, 2)
    run(sessions, whole)
    starts: list[str] = []
    # SQLite: the fifth merge batch; PostgreSQL (one step each): the closing.
    fail_at = 5 if migrated_engine.dialect.name == "sqlite" else 2

    def fail_at_a_batch(_c: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if _batch_starts(statement):
            starts.append(statement)
            if len(starts) == fail_at:
                raise RuntimeError("injected at a batch's start")

    sa.event.listen(migrated_engine, "before_cursor_execute", fail_at_a_batch)
    try:
        with batches_of(STEP), pytest.raises(ReconRunFailed) as failure:
            run(sessions, broken)
    finally:
        sa.event.remove(migrated_engine, "before_cursor_execute", fail_at_a_batch)
    with sessions() as session:
        failed = session.get(ReconRun, failure.value.run_id)
        assert failed is not None and failed.state == ReconRunState.FAILED
        assert totals(session, failed.id) == {}
        assert_histories_agree(session, broken)
        recorded = sum(events(session, failed.id).values())
        if migrated_engine.dialect.name == "sqlite":
            assert recorded == 4 * STEP  # the four batches before: an event per finding
        else:
            assert recorded == 0  # one transaction: all or nothing
    with batches_of(STEP):
        run(sessions, broken)
    with sessions() as session:
        assert exceptions(session, broken) == exceptions(session, whole)
        assert_histories_agree(session, broken)


KILLER = """
import os, sys
import sqlalchemy as sa
from reconciler import recording
from storage.engine import make_engine, make_sessions
from tests.reconciler.test_engine import run
from tests.reconciler.test_engine_steps import STEP, _batch_starts

url, connection_id, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
recording.BATCH_ROWS = recording.FIRST_BATCH_ROWS = STEP
engine = make_engine(url)
starts = []

def kill(_c, _cursor, statement, *_):
    if _batch_starts(statement):
        starts.append(statement)
        if len(starts) == kill_at:
            os._exit(9)  # as a killed process: no rollback, no clean-up, no failed run

sa.event.listen(engine, "before_cursor_execute", kill)
run(make_sessions(engine), connection_id)
sys.exit(0)
"""


@pytest.mark.process
@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
@pytest.mark.parametrize("kill_at", [6, 27], ids=["merging", "closing"])
def test_a_process_killed_between_batches_leaves_a_run_the_next_one_completes(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session], kill_at: int
) -> None:
    """A real process killed at a batch's start (while merging, or while closing, its
    batch's first statement done): its run stays ``running`` with no totals and its
    exceptions agree with their events; the next run marks it failed and ends where an
    unbroken run of the period ends."""
    killed, whole = build(sessions, "killed"), build(sessions, "whole")
    for connection_id in (killed, whole):
        run(sessions, connection_id)
        change(sessions, connection_id, 2)
    run(sessions, whole)
    url = migrated_engine.url.render_as_string(hide_password=False)
    ended = subprocess.run(
        [sys.executable, "-c", KILLER, url, str(killed), str(kill_at)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD * 5,
        check=False,
    )
    assert ended.returncode == 9, ended.stderr
    with sessions() as session:
        interrupted = session.scalars(
            sa.select(ReconRun).where(ReconRun.connection_id == killed).order_by(ReconRun.id)
        ).all()[-1]
        interrupted_id = interrupted.id
        assert interrupted.state == ReconRunState.RUNNING
        assert totals(session, interrupted.id) == {}
        assert sum(events(session, interrupted.id).values()) > 0
        assert_histories_agree(session, killed)
    completing = run(sessions, killed)
    with sessions() as session:
        interrupted = session.get_one(ReconRun, interrupted_id)
        assert interrupted.state == ReconRunState.FAILED
        assert interrupted.error == recording.INTERRUPTED
        finished = session.get(ReconRun, completing)
        assert finished is not None and finished.state == ReconRunState.FINISHED
        assert exceptions(session, killed) == exceptions(session, whole)
        assert_histories_agree(session, killed)


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_writer_gets_the_lock_between_batches(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session]
) -> None:
    """An insert begun while a batch holds SQLite's write lock is stored before the run
    has recorded its last batch: it waits for one batch, not for the run."""
    connection_id = build(sessions, "busy")
    # As the receiver's engine: a busy timeout of its own (the default, 5 s).
    writer_engine = make_engine(migrated_engine.url.render_as_string(hide_password=False))
    writer = make_sessions(writer_engine)
    starts: list[str] = []
    stored_after: list[int] = []
    errors: list[BaseException] = []
    stored = threading.Event()

    def insert() -> None:
        try:
            with writer.begin() as session:
                session.add(_order(connection_id, 10**6, "WEBHOOK"))
            stored_after.append(len(starts))
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)
        stored.set()

    inserter = threading.Thread(target=insert)

    def start_the_writer(_c: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if _batch_starts(statement):
            starts.append(statement)
            if len(starts) == 2:  # the second batch holds the lock now
                inserter.start()

    sa.event.listen(migrated_engine, "before_cursor_execute", start_the_writer)
    try:
        with batches_of(STEP):
            run(sessions, connection_id)
    finally:
        sa.event.remove(migrated_engine, "before_cursor_execute", start_the_writer)
    assert stored.wait(HANG_GUARD)
    inserter.join(HANG_GUARD)
    writer_engine.dispose()
    assert errors == []
    batches = len(starts)
    assert batches == len(range(0, 2 * SALES, STEP))
    # Stored while the run still had batches to record.
    assert stored_after and stored_after[0] < batches
