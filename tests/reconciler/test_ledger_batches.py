"""The ledger import writes in batches, each committed on its own, on SQLite and PostgreSQL:
the whole file is checked first, what a failure or a crash left stored is said and kept,
and importing the file again stores each sale once."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from reconciler.ledger import ImportInterrupted, import_ledger
from reconciler.ledger_file import LedgerFileError
from storage.engine import SQLITE_BEGIN_OPTION, make_engine, make_sessions
from storage.models import LedgerLine, VenueConnection, ensure_connection
from tests.reconciler.test_ledger import T0, sale, write_jsonl

ROWS = 10
BATCH = 4
"""Ten sales in batches of four: three batches (4, 4, 2)."""


@pytest.fixture
def connection_id(sessions: sessionmaker[Session]) -> int:
    with sessions.begin() as session:
        return ensure_connection(session, "default")


def url_of(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def references(engine: sa.Engine) -> list[str]:
    """The ledger's sales, as another connection sees them (what is committed); on SQLite
    in a deferred transaction, which never waits for the write lock."""
    with engine.connect() as connection:
        connection.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
        return list(
            connection.scalars(
                sa.select(LedgerLine.reference_key).order_by(LedgerLine.reference_key)
            )
        )


def on_batch_upsert(engine: sa.Engine, action: Any) -> list[int]:
    """Call ``action(connection, n)`` before the import's ``n``-th batch upsert (1, 2...)."""
    seen: list[int] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _before(connection: sa.Connection, cursor: Any, sql: str, *args: Any) -> None:
        if "INSERT INTO ledger_line" in sql:
            seen.append(len(seen) + 1)
            action(connection, seen[-1])

    return seen


def test_three_batches_are_each_committed_before_the_next(
    sessions: sessionmaker[Session],
    migrated_engine: sa.Engine,
    connection_id: int,
    tmp_path: Path,
) -> None:
    """Ten sales in batches of four: a reader sees 0, 4, 8 stored as each batch begins."""
    path = write_jsonl(tmp_path / "sales.jsonl", [sale(f"B-{n:02d}") for n in range(ROWS)])
    reader = make_engine(url_of(migrated_engine))
    seen_stored: list[int] = []
    try:
        batches = on_batch_upsert(
            migrated_engine, lambda connection, n: seen_stored.append(len(references(reader)))
        )
        result = import_ledger(
            sessions, path, connection_id=connection_id, now=T0, batch_size=BATCH
        )
    finally:
        reader.dispose()
    assert batches == [1, 2, 3]
    assert seen_stored == [0, 4, 8]
    assert (result.inserted, result.updated, result.unchanged, result.written) == (10, 0, 0, True)
    assert references(migrated_engine) == [f"B-{n:02d}" for n in range(ROWS)]


def test_a_bad_row_in_the_last_batch_stops_every_batch(
    sessions: sessionmaker[Session],
    migrated_engine: sa.Engine,
    tmp_path: Path,
) -> None:
    """The whole file is checked before the first batch: a bad last row writes nothing,
    not even the connection's row, when the import names a connection not stored yet."""
    rows = [sale(f"V-{n:02d}") for n in range(ROWS - 1)] + [sale("V-bad", currency="?")]
    path = write_jsonl(tmp_path / "sales.jsonl", rows)
    batches = on_batch_upsert(migrated_engine, lambda connection, n: None)
    result = import_ledger(sessions, path, connection_name="new-one", now=T0, batch_size=BATCH)
    assert not result.written
    assert [(bad.line, bad.column) for bad in result.bad_rows] == [(ROWS, "currency")]
    assert batches == []
    assert references(migrated_engine) == []
    with sessions() as session:
        assert session.scalars(sa.select(VenueConnection.name)).all() == []


def test_skip_bad_batches_the_good_rows(
    sessions: sessionmaker[Session], connection_id: int, tmp_path: Path, migrated_engine: sa.Engine
) -> None:
    """With skip_bad, the good rows around bad ones fill the batches in file order."""
    rows = [sale(f"S-{n:02d}", quantity=-1 if n % 3 == 0 else 1) for n in range(ROWS)]
    path = write_jsonl(tmp_path / "sales.jsonl", rows)
    result = import_ledger(
        sessions, path, connection_id=connection_id, now=T0, batch_size=2, skip_bad=True
    )
    assert (result.inserted, result.bad) == (6, 4)
    assert [bad.line for bad in result.bad_rows] == [1, 4, 7, 10]
    assert references(migrated_engine) == [f"S-{n:02d}" for n in range(ROWS) if n % 3]


@pytest.fixture
def break_the_database(
    migrated_engine: sa.Engine,
) -> Iterator[tuple[sa.Engine, Callable[[], None]]]:
    """A real failure of the database before the second batch: on SQLite another process
    holds the write lock (the import's engine waits 0.3 s for it); on PostgreSQL the
    server ends the import's connection (as a restart or an administrator would). Yields
    the import's engine, and what ends the failure (the lock released)."""
    url = url_of(migrated_engine)
    holders: list[sqlite3.Connection] = []

    def before_second_batch(connection: sa.Connection, n: int) -> None:
        if n != 2:
            return
        if connection.dialect.name == "sqlite":
            # The import's own transaction began already: the lock it takes for the
            # next batch is the one held here.
            return
        pid = connection.connection.driver_connection.info.backend_pid  # type: ignore[union-attr]
        with migrated_engine.connect() as other:
            other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    def holder(connection: sa.Connection, options: dict[str, Any]) -> None:
        # The import sets the begin mode of each transaction just before it begins it:
        # after one batch is stored, another connection takes the lock first.
        if connection.dialect.name == "sqlite" and batches and not holders:
            held = sqlite3.connect(sa.make_url(url).database or "", isolation_level=None)
            held.execute("BEGIN IMMEDIATE")
            holders.append(held)

    def release() -> None:
        while holders:
            held = holders.pop()
            held.execute("ROLLBACK")
            held.close()

    engine = make_engine(url, lock_timeout=0.3)
    batches = on_batch_upsert(engine, before_second_batch)
    sa.event.listen(engine, "set_connection_execution_options", holder)
    try:
        yield engine, release
    finally:
        release()
        engine.dispose()


def test_a_failure_between_batches_says_what_is_stored_and_a_rerun_finishes(
    break_the_database: tuple[sa.Engine, Callable[[], None]],
    sessions: sessionmaker[Session],
    migrated_engine: sa.Engine,
    connection_id: int,
    tmp_path: Path,
) -> None:
    """The database fails at the second batch: the first stays stored, the exception says
    so (counts, the last line stored), and importing the file again stores the rest,
    each sale once."""
    rows = [sale(f"F-{n:02d}") for n in range(ROWS)]
    rows[1] = sale("F-01", quantity=-1)  # a bad row, skipped: still reported
    path = write_jsonl(tmp_path / "sales.jsonl", rows)
    failing, end_the_failure = break_the_database
    with pytest.raises(ImportInterrupted) as raised:
        import_ledger(
            make_sessions(failing),
            path,
            connection_id=connection_id,
            now=T0,
            batch_size=BATCH,
            skip_bad=True,
        )
    interrupted = raised.value
    assert isinstance(interrupted, LedgerFileError)  # the command prints it: one line, exit 1
    assert (interrupted.result.inserted, interrupted.result.written) == (4, True)
    assert [bad.line for bad in interrupted.result.bad_rows] == [2]
    assert interrupted.stored_through == 5  # the fourth good row: line 5
    assert "up to line 5 are stored (4 inserted" in str(interrupted)
    assert "Import the file again" in str(interrupted)
    stored = ["F-00", "F-02", "F-03", "F-04"]
    assert references(migrated_engine) == stored

    end_the_failure()
    again = import_ledger(
        sessions, path, connection_id=connection_id, now=T0, batch_size=BATCH, skip_bad=True
    )
    assert (again.inserted, again.updated, again.unchanged, again.bad) == (5, 0, 4, 1)
    assert references(migrated_engine) == [f"F-{n:02d}" for n in range(ROWS) if n != 1]


CRASHING_IMPORT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import sqlalchemy as sa
    from reconciler.ledger import import_ledger
    from storage.engine import SQLITE_BEGIN_OPTION, make_engine, make_sessions
    from tests.reconciler.test_ledger import T0

    url, path, connection_id, batch = sys.argv[1:]
    engine = make_engine(url)
    upserts = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def die_in_the_second_batch(connection, cursor, sql, *args):
        if "INSERT INTO ledger_line" in sql:
            upserts.append(sql)
            if len(upserts) == 2:
                os._exit(3)  # killed: no rollback, no clean-up, the transaction open

    import_ledger(
        make_sessions(engine), Path(path), connection_id=int(connection_id), now=T0,
        batch_size=int(batch),
    )
    """
)


@pytest.mark.process
def test_a_process_killed_between_batches_then_run_again_stores_each_sale_once(
    sessions: sessionmaker[Session],
    migrated_engine: sa.Engine,
    connection_id: int,
    tmp_path: Path,
) -> None:
    """A real process dies in its second batch: the first batch stays, the second is
    rolled back by the database, and a re-run stores the rest without doubling any."""
    path = write_jsonl(tmp_path / "sales.jsonl", [sale(f"K-{n:02d}") for n in range(ROWS)])
    crashed = subprocess.run(
        [
            sys.executable,
            "-c",
            CRASHING_IMPORT,
            url_of(migrated_engine),
            str(path),
            str(connection_id),
            str(BATCH),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert crashed.returncode == 3, crashed.stderr
    assert references(migrated_engine) == [f"K-{n:02d}" for n in range(BATCH)]

    again = import_ledger(sessions, path, connection_id=connection_id, now=T0, batch_size=BATCH)
    assert (again.inserted, again.updated, again.unchanged) == (ROWS - BATCH, 0, BATCH)
    stored = references(migrated_engine)
    assert stored == [f"K-{n:02d}" for n in range(ROWS)]
    assert len(set(stored)) == len(stored)


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # PostgreSQL has no such lock
def test_setting_rows_aside_takes_no_write_lock_on_sqlite(
    sessions: sessionmaker[Session],
    migrated_engine: sa.Engine,
    connection_id: int,
    tmp_path: Path,
) -> None:
    """While the file is checked and set aside, another process can write at once."""
    path = write_jsonl(tmp_path / "sales.jsonl", [sale(f"L-{n:02d}") for n in range(ROWS)])
    database = migrated_engine.url.database or ""
    writes_meanwhile: list[str] = []
    batches = on_batch_upsert(migrated_engine, lambda connection, n: None)

    @sa.event.listens_for(migrated_engine, "commit")
    def _write_beside(connection: sa.Connection) -> None:
        if batches:
            return  # the batches have begun: they hold the lock, as they should
        with closing(sqlite3.connect(database, timeout=0, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # fails at once if the lock is held
            other.execute("ROLLBACK")
        writes_meanwhile.append("written")

    result = import_ledger(sessions, path, connection_id=connection_id, now=T0)
    assert result.inserted == ROWS
    assert writes_meanwhile  # the staging's commits, each with the lock free
