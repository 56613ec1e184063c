"""Engines: SQLite's pragmas and transaction mode, PostgreSQL's driver, shared behaviour."""

from __future__ import annotations

import sqlite3
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, InternalError, OperationalError

from storage.engine import (
    SQLITE_BEGIN_OPTION,
    SQLITE_BUSY_TIMEOUT_MS,
    SQLITE_CHECKPOINT_PAGES,
    SQLITE_LATE_CHECKPOINT_PAGES,
    driver_statements,
    driver_transaction,
    make_engine,
    make_sessions,
    native_placeholders,
)

scratch = sa.MetaData()
note = sa.Table(
    "note",
    scratch,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("text", sa.String(20), unique=True),
)


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Path:
    """A SQLite database path in a directory that does not exist yet."""
    return tmp_path / "var" / "nested" / "otacm.sqlite3"


def test_sqlite_creates_directory_and_sets_pragmas(sqlite_file: Path) -> None:
    """A file database gets its directory, WAL, NORMAL sync, foreign keys and a busy timeout."""
    engine = make_engine(f"sqlite:///{sqlite_file}")
    try:
        with engine.connect() as connection:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in (
                    "journal_mode",
                    "synchronous",
                    "foreign_keys",
                    "busy_timeout",
                    "wal_autocheckpoint",
                )
            }
    finally:
        engine.dispose()

    assert sqlite_file.exists()
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 1,
        "foreign_keys": 1,
        "busy_timeout": SQLITE_BUSY_TIMEOUT_MS,
        "wal_autocheckpoint": SQLITE_CHECKPOINT_PAGES,
    }


@pytest.mark.parametrize("checkpoint_late", [True, False])
def test_late_checkpointing_connections_leave_the_wal_to_the_others(
    sqlite_file: Path, checkpoint_late: bool
) -> None:
    """Past the default threshold, a receiver's commits leave their pages in the WAL; the next
    commit of an ordinary connection checkpoints it (the database file takes the rows)."""
    others = make_engine(f"sqlite:///{sqlite_file}")
    receiver = make_engine(
        f"sqlite:///{sqlite_file}", lock_timeout=5, checkpoint_late=checkpoint_late
    )
    blob = sa.table("blob", sa.column("data"))
    try:
        with others.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE blob (id INTEGER PRIMARY KEY, data BLOB)")
            page_size = int(connection.exec_driver_sql("PRAGMA page_size").scalar_one())
        with receiver.connect() as connection:
            threshold = connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one()
        # Three times the default threshold, in commits of a hundred pages each.
        for _ in range(3 * SQLITE_CHECKPOINT_PAGES // 100):
            with receiver.begin() as connection:
                connection.execute(sa.insert(blob).values(data=b"x" * (100 * page_size)))
        written_by_receiver = sqlite_file.stat().st_size
        with others.begin() as connection:
            connection.execute(sa.insert(blob).values(data=b"y"))
        written_after_others = sqlite_file.stat().st_size
    finally:
        receiver.dispose()
        others.dispose()

    rows_bytes = 3 * SQLITE_CHECKPOINT_PAGES * page_size
    if checkpoint_late:
        assert threshold == SQLITE_LATE_CHECKPOINT_PAGES
        assert written_by_receiver < SQLITE_CHECKPOINT_PAGES * page_size
    else:
        assert threshold == SQLITE_CHECKPOINT_PAGES
        assert written_by_receiver >= 2 * SQLITE_CHECKPOINT_PAGES * page_size
    assert written_after_others >= rows_bytes


def test_sqlite_transaction_holds_the_write_lock_from_begin(sqlite_file: Path) -> None:
    """A transaction takes SQLite's write lock at BEGIN, before it writes anything."""
    engine = make_engine(f"sqlite:///{sqlite_file}")
    scratch.create_all(engine)
    other = sqlite3.connect(sqlite_file, timeout=0, isolation_level=None)
    try:
        with engine.begin() as connection:
            connection.execute(sa.select(note.c.id)).all()
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()
        engine.dispose()


def test_sqlite_deferred_reader_does_not_block_a_writer(sqlite_file: Path) -> None:
    """With ``sqlite_begin="DEFERRED"`` a read-only transaction leaves the write lock free."""
    engine = make_engine(f"sqlite:///{sqlite_file}")
    scratch.create_all(engine)
    reader = engine.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
    other = sqlite3.connect(sqlite_file, timeout=0, isolation_level=None)
    try:
        with reader.begin() as connection:
            connection.execute(sa.select(note.c.id)).all()
            other.execute("BEGIN IMMEDIATE")
            other.execute("INSERT INTO note (text) VALUES ('written')")
            other.execute("COMMIT")
    finally:
        other.close()
        engine.dispose()


def test_postgresql_urls_use_psycopg() -> None:
    """``postgresql://`` and ``postgres://`` mean psycopg 3, without connecting."""
    for url in ("postgresql://otacm@db.example/otacm", "postgres://otacm@db.example/otacm"):
        engine = make_engine(url)
        try:
            assert engine.dialect.name == "postgresql"
            assert engine.dialect.driver == "psycopg"
        finally:
            engine.dispose()


def test_savepoint_rolls_back_alone(engine: sa.Engine) -> None:
    """A failed savepoint undoes only its own work; the enclosing transaction commits."""
    scratch.create_all(engine)
    with engine.begin() as connection:
        connection.execute(note.insert().values(text="kept"))
        with pytest.raises(IntegrityError), connection.begin_nested():
            connection.execute(note.insert().values(text="doubled"))
            connection.execute(note.insert().values(text="doubled"))
        connection.execute(note.insert().values(text="after"))

    with engine.connect() as connection:
        texts = connection.execute(sa.select(note.c.text).order_by(note.c.id)).scalars().all()
    assert texts == ["kept", "after"]


def test_ddl_is_transactional(engine: sa.Engine) -> None:
    """A table created in a rolled-back transaction is gone: migrations are all or nothing."""
    with engine.connect() as connection:
        transaction = connection.begin()
        scratch.create_all(connection)
        transaction.rollback()

    assert not sa.inspect(engine).has_table("note")


def test_read_only_sessions_leave_sqlite_write_lock_free(sqlite_file: Path) -> None:
    """A read-only session's transaction does not hold SQLite's write lock."""
    engine = make_engine(f"sqlite:///{sqlite_file}")
    scratch.create_all(engine)
    other = sqlite3.connect(sqlite_file, timeout=0, isolation_level=None)
    try:
        with make_sessions(engine, read_only=True).begin() as session:
            session.execute(sa.select(note.c.id)).all()
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
    finally:
        other.close()
        engine.dispose()


@pytest.mark.postgresql
def test_read_only_sessions_refuse_writes_on_postgresql(postgresql_url: str) -> None:
    """On PostgreSQL a read-only session is a READ ONLY transaction; the pool is left clean."""
    engine = make_engine(postgresql_url)
    try:
        scratch.create_all(engine)
        read_only = make_sessions(engine, read_only=True)
        with pytest.raises(InternalError, match="read-only"), read_only.begin() as session:
            session.execute(note.insert().values(text="refused"))
        with make_sessions(engine).begin() as session:
            session.execute(note.insert().values(text="written"))
            assert session.execute(sa.select(note.c.text)).scalars().all() == ["written"]
            session.execute(note.delete())
    finally:
        scratch.drop_all(engine)
        engine.dispose()


@pytest.mark.postgresql
def test_pooled_connections_the_server_closed_are_replaced_on_checkout(
    postgresql_url: str,
) -> None:
    """Backends the server terminated (as a restart does) cost a reconnection, not an error;
    a pooled connection the server kept is reused."""
    engine = make_engine(postgresql_url)
    try:
        with ExitStack() as held:  # three connections at once, so the pool keeps three
            connections = [held.enter_context(engine.connect()) for _ in range(3)]
            pids = [_backend_pid(connection) for connection in connections]
        kept, *terminated = pids
        _terminate_backends(postgresql_url, terminated)

        with ExitStack() as held:
            connections = [held.enter_context(engine.connect()) for _ in range(3)]
            after = [_backend_pid(connection) for connection in connections]
        assert kept in after
        assert not set(terminated) & set(after)
        # The hot path's driver connections come from the same pool, checked the same way.
        _terminate_backends(postgresql_url, after)
        with driver_transaction(engine, one_statement=True) as transaction:
            assert transaction.returning("SELECT pg_backend_pid()", ())[0] not in after
    finally:
        engine.dispose()


def _backend_pid(connection: sa.Connection) -> int:
    pid: int = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    return pid


def _terminate_backends(url: str, pids: list[int]) -> None:
    """Terminate the backends from a connection of their own and wait until they are gone."""
    observer = make_engine(url)
    try:
        with observer.connect() as connection:
            connection.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM unnest(%(pids)s::int[]) AS pid",
                {"pids": pids},
            )
        for _ in range(200):
            with observer.connect() as connection:
                left = connection.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%(pids)s)",
                    {"pids": pids},
                ).scalar_one()
            if not left:
                return
            time.sleep(0.05)
        raise AssertionError(f"backends {pids} still running")
    finally:
        observer.dispose()


def _insert_note(engine: sa.Engine, text: str) -> str:
    """The INSERT ... RETURNING of one note, as SQL text for the engine's driver."""
    placeholder = native_placeholders(engine.dialect, 1)[0]
    return f"INSERT INTO note (text) VALUES ({placeholder}) RETURNING text"  # noqa: S608


def test_driver_transaction_commits_on_exit(engine: sa.Engine) -> None:
    """What a driver transaction wrote is there for every other connection once it ends."""
    scratch.create_all(engine)

    with driver_transaction(engine) as transaction:
        assert transaction.returning(_insert_note(engine, "a"), ("a",)) == ["a"]

    with engine.connect() as connection:
        assert connection.scalars(sa.select(note.c.text)).all() == ["a"]


def test_driver_transaction_rolls_back_and_raises_sqlalchemy_errors(engine: sa.Engine) -> None:
    """A failed statement undoes the whole transaction and is raised as SQLAlchemy's class."""
    scratch.create_all(engine)
    with engine.begin() as connection:
        connection.execute(note.insert(), {"text": "taken"})

    with pytest.raises(IntegrityError) as raised, driver_transaction(engine) as transaction:
        transaction.returning(_insert_note(engine, "new"), ("new",))
        transaction.returning(_insert_note(engine, "taken"), ("taken",))

    # The parameters (payloads, on the hot path) are not quoted; PostgreSQL's own
    # message may still name the key, so callers log the error's class only.
    assert "[parameters:" not in str(raised.value)
    with engine.connect() as connection:
        assert connection.scalars(sa.select(note.c.text)).all() == ["taken"]
    # The connection went back to the pool usable.
    with driver_transaction(engine) as transaction:
        transaction.returning(_insert_note(engine, "later"), ("later",))


def test_a_one_statement_transaction_commits_its_statement_and_refuses_a_second(
    engine: sa.Engine,
) -> None:
    """One statement is committed; a second is never sent; the pooled connection lends
    transactions again afterwards, failed statement or not. PostgreSQL sends the one
    statement alone (autocommit), so it stays committed when a second is refused; SQLite
    takes its write lock in a transaction of its own (storage.sqlite_writes), which the
    refusal rolls back."""
    scratch.create_all(engine)
    with engine.begin() as connection:
        connection.execute(note.insert(), {"text": "taken"})

    with (
        pytest.raises(RuntimeError, match="one-statement"),
        driver_transaction(engine, one_statement=True) as transaction,
    ):
        assert transaction.returning(_insert_note(engine, "a"), ("a",)) == ["a"]
        transaction.returning(_insert_note(engine, "b"), ("b",))
    with (
        pytest.raises(IntegrityError),
        driver_transaction(engine, one_statement=True) as transaction,
    ):
        transaction.returning(_insert_note(engine, "taken"), ("taken",))

    # Back in a transaction of several statements: a failing second undoes the first.
    with pytest.raises(IntegrityError), driver_transaction(engine) as transaction:
        transaction.returning(_insert_note(engine, "undone"), ("undone",))
        transaction.returning(_insert_note(engine, "taken"), ("taken",))
    autocommitted = ["a"] if engine.dialect.name == "postgresql" else []
    with engine.connect() as connection:
        assert sorted(connection.scalars(sa.select(note.c.text))) == [*autocommitted, "taken"]
    with driver_transaction(engine, one_statement=True) as transaction:
        transaction.returning(_insert_note(engine, "alone"), ("alone",))
    with engine.connect() as connection:
        assert "alone" in connection.scalars(sa.select(note.c.text)).all()


def test_driver_statements_run_in_the_connections_transaction(engine: sa.Engine) -> None:
    """Statements on the driver connection under a Connection commit or roll back with it."""
    scratch.create_all(engine)

    with engine.connect() as connection:
        with pytest.raises(ValueError, match="transaction"), driver_statements(connection):
            pass
        with connection.begin(), driver_statements(connection) as transaction:
            assert transaction.returning(_insert_note(engine, "kept"), ("kept",)) == ["kept"]
        outer = connection.begin()
        with driver_statements(connection) as transaction:
            transaction.returning(_insert_note(engine, "undone"), ("undone",))
        outer.rollback()

    with engine.connect() as connection:
        assert connection.scalars(sa.select(note.c.text)).all() == ["kept"]


def test_driver_transaction_waits_for_the_sqlite_write_lock_then_fails(
    sqlite_file: Path,
) -> None:
    """On a locked SQLite database the write waits out the lock timeout: OperationalError."""
    engine = make_engine(f"sqlite:///{sqlite_file}", lock_timeout=0.2)
    scratch.create_all(engine)
    other = sqlite3.connect(sqlite_file, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with (
            pytest.raises(OperationalError, match="locked"),
            driver_transaction(engine) as transaction,
        ):
            transaction.returning(_insert_note(engine, "a"), ("a",))
        other.execute("ROLLBACK")
        with driver_transaction(engine) as transaction:
            assert transaction.returning(_insert_note(engine, "a"), ("a",)) == ["a"]
    finally:
        other.close()
        engine.dispose()
