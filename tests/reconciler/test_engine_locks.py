"""What a running reconciliation blocks: another run of its connection, and nothing else.

On SQLite and PostgreSQL. A run is held half-way by an event hook (just after it took
its turn, at its first finding statement) while the test acts on other database
connections; nothing depends on timing. The waits below only keep a failing test from
hanging.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from reconciler.engine import reconcile
from storage.engine import make_sessions
from storage.records import (
    ExceptionEvent,
    ReconException,
    ReconRun,
    ReconRunState,
    ReconTotal,
    ReconTrigger,
)
from tests.reconciler.test_engine import (
    GRACE,
    NOW,
    PERIOD_FROM,
    PERIOD_TO,
    TOLERANCE,
    Book,
    plant_every_case,
)

HANG_GUARD = 60.0
"""Seconds a test waits for what should happen at once before it fails instead of hanging."""


class HeldRun:
    """A run of one connection in a thread, held at its first statement containing ``at``.

    By default its first finding statement, just after it took its turn.
    """

    def __init__(
        self,
        engine: sa.Engine,
        sessions: sessionmaker[Session],
        connection_id: int,
        at: str = "CREATE TEMPORARY TABLE recon_finding ",
    ):
        self.reached = threading.Event()
        self.release = threading.Event()
        self.run_ids: list[int] = []
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self._held_once = threading.Lock()
        self._engine = engine
        self._sessions = sessions
        self._connection_id = connection_id
        self._at = at

    def _hold(self, _conn: sa.Connection, _cursor: Any, statement: str, *_: Any) -> None:
        # The first run to reach its findings stops there; every later one passes.
        if self._at in statement and self._held_once.acquire(blocking=False):
            self.reached.set()
            self.release.wait(HANG_GUARD)

    def start(self) -> threading.Thread:
        """Start one run of the connection in a thread."""

        def run() -> None:
            try:
                self.run_ids.append(
                    reconcile(
                        self._sessions,
                        connection_id=self._connection_id,
                        period_from=PERIOD_FROM,
                        period_to=PERIOD_TO,
                        now=NOW,
                        trigger=ReconTrigger.MANUAL,
                        actor=None,
                        grace=GRACE,
                        tolerance=TOLERANCE,
                    )
                )
            except BaseException as exc:  # reported by the test, not lost in the thread
                self.errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)
        return thread

    @contextmanager
    def listening(self) -> Iterator[HeldRun]:
        """The hook installed on the engine for the block; the runs finished at its end."""
        sa.event.listen(self._engine, "before_cursor_execute", self._hold)
        try:
            yield self
        finally:
            self.release.set()
            for thread in self.threads:
                thread.join(HANG_GUARD)
            sa.event.remove(self._engine, "before_cursor_execute", self._hold)


def _in_thread(work: Callable[[], None]) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def target() -> None:
        work()
        done.set()

    thread = threading.Thread(target=target)
    thread.start()
    return thread, done


def _run_states(sessions: sessionmaker[Session]) -> list[ReconRunState]:
    with sessions.begin() as session:
        return list(session.scalars(sa.select(ReconRun.state).order_by(ReconRun.id)))


def test_a_running_reconciliation_blocks_no_insert_of_its_connections_orders_or_sales(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session]
) -> None:
    """A mirrored order and a ledger line of the connection are stored while a run holds."""
    connection_id = plant_every_case(sessions).connection_id
    held = HeldRun(migrated_engine, sessions, connection_id)
    with held.listening():
        runner = held.start()
        assert held.reached.wait(HANG_GUARD)

        def insert() -> None:
            with sessions.begin() as session:
                Book(session, connection_id).order("NEW-ORDER")
            with sessions.begin() as session:
                Book(session, connection_id).line("NEW-SALE")

        inserter, inserted = _in_thread(insert)
        stored = inserted.wait(HANG_GUARD)
        # Both inserts committed while the run was still held, unfinished.
        assert stored
        assert runner.is_alive()
        assert _run_states(sessions) == [ReconRunState.RUNNING]
    inserter.join(HANG_GUARD)
    assert held.errors == []
    assert _run_states(sessions) == [ReconRunState.FINISHED]


def test_two_runs_of_one_connection_take_turns(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """A second run of a connection waits for the first one's end, then finds the same."""
    caplog.set_level(logging.INFO, logger="reconciler")
    planted = plant_every_case(sessions)
    held = HeldRun(migrated_engine, sessions, planted.connection_id)
    with held.listening():
        first = held.start()
        assert held.reached.wait(HANG_GUARD)
        held.start()
        # The second run's row is stored, and the run says it waits for the first.
        waiting = threading.Event()
        for _ in range(int(HANG_GUARD * 20)):
            if any("waits for another run" in r.getMessage() for r in caplog.records):
                break
            waiting.wait(0.05)
        assert any("waits for another run" in r.getMessage() for r in caplog.records)
        assert _run_states(sessions) == [ReconRunState.RUNNING, ReconRunState.RUNNING]
        assert first.is_alive()
    assert held.errors == []
    assert _run_states(sessions) == [ReconRunState.FINISHED, ReconRunState.FINISHED]
    with sessions.begin() as session:
        keys = list(session.scalars(sa.select(ReconException.subject_key)))
    # Each case once: the second run found the first one's exceptions, never doubled them.
    assert sorted(keys) == sorted(planted.expected)


def test_a_runs_totals_appear_together_with_its_end(
    migrated_engine: sa.Engine, sessions: sessionmaker[Session]
) -> None:
    """Held at its totals, a run is still ``running`` to readers, with no totals.

    PostgreSQL records in one transaction: no exception shows either. SQLite records the
    exceptions in short transactions before the totals: those show, each with its event.
    """
    planted = plant_every_case(sessions)
    held = HeldRun(migrated_engine, sessions, planted.connection_id, at="INSERT INTO recon_total")
    with held.listening():
        held.start()
        assert held.reached.wait(HANG_GUARD)
        # As pages read: a read-only transaction.
        with make_sessions(migrated_engine, read_only=True).begin() as session:
            assert list(session.scalars(sa.select(ReconRun.state))) == [ReconRunState.RUNNING]
            assert session.scalar(sa.select(sa.func.count()).select_from(ReconTotal)) == 0
            shown = session.scalar(sa.select(sa.func.count()).select_from(ReconException))
            events = session.scalar(sa.select(sa.func.count()).select_from(ExceptionEvent))
            if migrated_engine.dialect.name == "postgresql":
                assert (shown, events) == (0, 0)
            else:
                assert shown == events == len(planted.expected)
    assert held.errors == []
    with sessions.begin() as session:
        assert list(session.scalars(sa.select(ReconRun.state))) == [ReconRunState.FINISHED]
        assert session.scalar(sa.select(sa.func.count()).select_from(ReconTotal)) > 0
        assert session.scalar(sa.select(sa.func.count()).select_from(ReconException)) == len(
            planted.expected
        )
