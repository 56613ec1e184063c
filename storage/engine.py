"""Engines and sessions: the one place that knows each database's quirks.

:func:`make_engine` turns ``OTACM_DATABASE_URL`` into an ``Engine`` tuned for its dialect,
and :func:`make_sessions` gives the session factory that views and jobs open one unit of
work with (``with sessions.begin() as session:``).

SQLite (one box): the database file's directory is created; every connection runs in WAL
mode (readers never block the writer, nor the writer readers), with
``synchronous=NORMAL`` (durable at checkpoints, safe with WAL), foreign keys enforced and
a busy timeout of :data:`SQLITE_BUSY_TIMEOUT_MS`. Transactions: the ``sqlite3`` driver's
own transaction handling is turned off (it skips ``BEGIN`` before SELECTs and DDL, which
breaks savepoints and transactional DDL) and SQLAlchemy emits ``BEGIN IMMEDIATE`` itself.
``IMMEDIATE`` takes SQLite's single write lock when the transaction starts, so:

- a transaction that reads and then writes (claiming an inbox row, a lease, an upsert)
  cannot fail half-way with ``database is locked`` when another writer got there first;
  it waits up to the busy timeout at ``BEGIN`` instead, and writers run one at a time.
  That serialization is what stands in for PostgreSQL's ``FOR UPDATE SKIP LOCKED``.
- savepoints (``session.begin_nested()``) and DDL are inside the transaction, so
  migrations are atomic.

Work that only reads (pages, reports, health checks) uses
``make_sessions(engine, read_only=True)``: a plain deferred transaction, which takes no
write lock (the execution option ``sqlite_begin="DEFERRED"`` underneath).

PostgreSQL (several nodes): ``postgresql://`` means psycopg 3; connections are pinged
before use (a restarted server or a dropped idle connection costs a retry, not an error)
and pooled. Transactions run at PostgreSQL's default READ COMMITTED; row claims use
``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite connection waits for the write lock before ``database is locked``."""

SQLITE_BEGIN_OPTION = "sqlite_begin"
"""Execution option naming the ``BEGIN`` mode on SQLite: ``IMMEDIATE`` (default),
``DEFERRED`` (read-only work) or ``EXCLUSIVE``."""

_SQLITE_BEGIN_MODES = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE"})
_POSTGRESQL_DRIVERS = {"postgres": "postgresql+psycopg", "postgresql": "postgresql+psycopg"}


def make_engine(url: str) -> Engine:
    """An engine for ``url``, configured for its database (see the module docstring).

    The caller owns the engine and disposes of it (``engine.dispose()``) when done.

    Args:
        url: a SQLAlchemy database URL; ``sqlite:///path`` or ``postgresql://...``
            (``postgresql://`` and ``postgres://`` use psycopg 3).

    Returns:
        A new engine; no connection is opened until it is first used.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed)
    if parsed.drivername in _POSTGRESQL_DRIVERS:
        parsed = parsed.set(drivername=_POSTGRESQL_DRIVERS[parsed.drivername])
    if parsed.get_backend_name() == "postgresql":
        return create_engine(
            parsed,
            pool_pre_ping=True,
            pool_size=5,
            max_overflow=10,
            # Recycle before typical firewall and PgBouncer idle limits cut connections.
            pool_recycle=1800,
            connect_args={"application_name": "otacm"},
        )
    return create_engine(parsed, pool_pre_ping=True)


def make_sessions(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """The session factory for ``engine``: one session per unit of work.

    Objects stay readable after their transaction commits (``expire_on_commit=False``):
    a view can render what it just stored without another query. The engine still
    belongs to the caller.

    Args:
        engine: from :func:`make_engine`.
        read_only: for work that only reads (pages, reports, health checks). On SQLite
            its transactions begin DEFERRED and so never wait for, nor hold, the write
            lock; PostgreSQL runs them as READ ONLY transactions, which refuse writes.
    """
    if read_only and engine.dialect.name == "sqlite":
        engine = engine.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
    elif read_only and engine.dialect.name == "postgresql":
        engine = engine.execution_options(postgresql_readonly=True)
    return sessionmaker(engine, expire_on_commit=False)


def _sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    in_memory = database in ("", ":memory:") or "mode=memory" in database
    if not in_memory and not url.query.get("uri"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def _configure_sqlite_connection(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    # Hand transaction control to SQLAlchemy (see _begin_sqlite_transaction): the driver's
    # legacy mode would start transactions only before INSERT/UPDATE/DELETE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # Pragmas outside a transaction: journal_mode and foreign_keys are no-ops inside one.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS:d}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _begin_sqlite_transaction(connection: Connection) -> None:
    mode = str(connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "IMMEDIATE"))
    if mode.upper() not in _SQLITE_BEGIN_MODES:
        raise ValueError(f"{SQLITE_BEGIN_OPTION} must be one of {sorted(_SQLITE_BEGIN_MODES)}")
    connection.exec_driver_sql(f"BEGIN {mode.upper()}")
