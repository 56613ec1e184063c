"""Engines and sessions: the one place that knows each database's quirks.

:func:`make_engine` turns ``OTACM_DATABASE_URL`` into an ``Engine`` tuned for its dialect,
and :func:`make_sessions` gives the session factory that views and jobs open one unit of
work with (``with sessions.begin() as session:``).

SQLite (one box): the database file's directory is created; every connection runs in WAL
mode (readers never block the writer, nor the writer readers), with
``synchronous=NORMAL`` (durable at checkpoints, safe with WAL), foreign keys enforced and
a busy timeout of :data:`SQLITE_BUSY_TIMEOUT_MS` (or ``lock_timeout``). Transactions: the
``sqlite3`` driver's own transaction handling is turned off (it skips ``BEGIN`` before
SELECTs and DDL, which breaks savepoints and transactional DDL) and otacm emits
``BEGIN IMMEDIATE`` itself, waiting for the lock promptly and ahead of bulk work
(:class:`storage.sqlite_writes.WriteLock`; bulk work sets
:data:`~storage.sqlite_writes.SQLITE_BULK_OPTION`).
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

PostgreSQL (several nodes): ``postgresql://`` means psycopg 3; connections are pooled,
and each is checked as it leaves the pool without a round trip to the server
(:func:`_drop_if_server_hung_up`): a restarted server or a terminated backend costs a
reconnection, not an error. Transactions run at PostgreSQL's default READ COMMITTED; row claims use
``FOR UPDATE SKIP LOCKED``.

``make_engine(url, lock_timeout=seconds)`` bounds how long a statement waits for a lock
on either database, for callers that must answer in time (the webhook receiver answers
503 rather than keep the venue waiting). Such callers also pass ``checkpoint_late=True``:
on SQLite the commit that takes the WAL past its checkpoint threshold copies the WAL into
the database and syncs it before it returns, waiting behind whatever else the disk is
writing, and a webhook's answer should not pay for that. Their connections checkpoint
only at :data:`SQLITE_LATE_CHECKPOINT_PAGES`, so the worker's and the scheduler's commits,
at SQLite's default, run the checkpoints while they run at all (``bench/checkpoint``: with
another process syncing its writes, the receiver's commit p99 was 15-64 ms checkpointing
at the default, 3-5 ms so).

A database that is away (a PostgreSQL server restarting or unreachable, a SQLite lock held
too long) raises one of :data:`DATABASE_UNAVAILABLE`; :func:`waiting_helps` tells those
from what waiting will not change (a SQLite file that cannot be opened or written, a
missing table), :func:`describe_database_error` says why in a few secret-free words, and
:func:`retry_while_unavailable` runs a piece of work again with backoff until the database
is back, one log line per attempt: the roles wait for their database rather than die.

:func:`driver_transaction` is for the one hot path where SQLAlchemy's own ``Connection``
costs more CPU than the database's work (the webhook's single INSERT): a pooled driver
connection in one transaction (``BEGIN IMMEDIATE`` through the write lock on SQLite,
the driver's implicit ``BEGIN`` on PostgreSQL; or, on PostgreSQL, for a caller that sends
one statement, that statement alone in autocommit mode, which spares the ``BEGIN`` and
``COMMIT`` round trips),
whose errors are raised as SQLAlchemy's exception classes, so callers handle them as
they would anywhere else. :func:`driver_statements` gives the same interface inside a
SQLAlchemy ``Connection``'s transaction; its ``load`` appends many rows to a table at
once (``COPY`` on PostgreSQL, ``executemany`` on SQLite). Statements there are SQL text
with the database's native placeholders (:func:`native_placeholders`: ``?`` on SQLite,
``$1, $2...`` on PostgreSQL, sent by psycopg's ``RawCursor``): psycopg rewrites ``%s``
placeholders with a regular expression on every call of a statement of more than 50
parameters, which cost more CPU than PostgreSQL's own work for a batch of twenty rows.
"""

from __future__ import annotations

import logging
import math
import select
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import tenacity
from sqlalchemy import Dialect, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from storage.changes import register_change_hooks
from storage.flush import register_flush_hooks
from storage.locks import default_lock_dir
from storage.sqlite_writes import SQLITE_BULK_OPTION, WriteLock

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite connection waits for the write lock before ``database is locked``."""

SQLITE_CHECKPOINT_PAGES = 1_000
"""SQLite's default WAL size, in pages, at which a commit checkpoints the WAL into the database."""

SQLITE_LATE_CHECKPOINT_PAGES = 10 * SQLITE_CHECKPOINT_PAGES
"""The WAL size at which ``checkpoint_late`` connections checkpoint: late, yet bounded, so
that a receiver running alone (its worker stopped) still keeps the WAL in check."""

SQLITE_BEGIN_OPTION = "sqlite_begin"
"""Execution option naming the ``BEGIN`` mode on SQLite: ``IMMEDIATE`` (default),
``DEFERRED`` (read-only work) or ``EXCLUSIVE``."""

CONNECT_TIMEOUT = 10
"""Seconds a new PostgreSQL connection may take when the caller sets no ``lock_timeout``:
a server that does not answer at all (a host down, a packet filter dropping) is then an
error to retry rather than a process hanging in ``connect``."""

DATABASE_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
"""The database errors that mean "not now" rather than "never": locks, timeouts, full
pools, connections refused or dropped (:func:`waiting_helps` narrows SQLite's)."""

WAIT_INITIAL = 1.0
"""Seconds :func:`retry_while_unavailable` waits after a first failed attempt; the wait
doubles with each attempt..."""

WAIT_MAX = 30.0
"""...up to this many seconds, plus up to a second of jitter, so that the roles of
several nodes do not all knock at the same moment when the database returns."""

_SQLITE_WAITING_HELPS = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})

T = TypeVar("T")

logger = logging.getLogger(__name__)

_SQLITE_BEGIN_MODES = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE"})
_WRITE_LOCK = "otacm_write_lock"
"""Where a pooled SQLite connection's ``info`` keeps its database's :class:`WriteLock`."""
_POSTGRESQL_DRIVERS = {"postgres": "postgresql+psycopg", "postgresql": "postgresql+psycopg"}


def make_engine(
    url: str, *, lock_timeout: float | None = None, checkpoint_late: bool = False
) -> Engine:
    """An engine for ``url``, configured for its database (see the module docstring).

    The caller owns the engine and disposes of it (``engine.dispose()``) when done.

    Args:
        url: a SQLAlchemy database URL; ``sqlite:///path`` or ``postgresql://...``
            (``postgresql://`` and ``postgres://`` use psycopg 3).
        lock_timeout: seconds a statement may wait for a lock (or, on PostgreSQL, run)
            before it fails with ``OperationalError``; for callers that must answer in
            time, such as the webhook receiver. SQLite: the busy timeout (default
            :data:`SQLITE_BUSY_TIMEOUT_MS`). PostgreSQL: the session's ``lock_timeout``
            and ``statement_timeout``, and the waits for a new connection and for a
            pooled one (default: no limit but the server's).
        checkpoint_late: SQLite: leave the WAL's checkpoints to other processes'
            connections up to :data:`SQLITE_LATE_CHECKPOINT_PAGES` (for the webhook
            receiver; see the module docstring). PostgreSQL: no effect.

    Returns:
        A new engine; no connection is opened until it is first used.
    """
    if lock_timeout is not None and lock_timeout <= 0:
        raise ValueError("lock_timeout must be positive")
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        busy_ms = SQLITE_BUSY_TIMEOUT_MS if lock_timeout is None else round(lock_timeout * 1000)
        checkpoint_pages = (
            SQLITE_LATE_CHECKPOINT_PAGES if checkpoint_late else SQLITE_CHECKPOINT_PAGES
        )
        return _sqlite_engine(
            parsed, busy_timeout_ms=max(busy_ms, 1), checkpoint_pages=checkpoint_pages
        )
    if parsed.drivername in _POSTGRESQL_DRIVERS:
        parsed = parsed.set(drivername=_POSTGRESQL_DRIVERS[parsed.drivername])
    if parsed.get_backend_name() == "postgresql":
        connect_args: dict[str, Any] = {"application_name": "otacm"}
        pool_options: dict[str, Any] = {}
        if lock_timeout is not None:
            timeout_ms = max(round(lock_timeout * 1000), 1)
            connect_args["options"] = (
                f"-c lock_timeout={timeout_ms:d} -c statement_timeout={timeout_ms:d}"
            )
            # libpq counts whole seconds and treats anything below 2 as 2.
            connect_args["connect_timeout"] = max(math.ceil(lock_timeout), 2)
            pool_options["pool_timeout"] = lock_timeout
        else:
            connect_args["connect_timeout"] = CONNECT_TIMEOUT
        engine = create_engine(
            parsed,
            pool_size=5,
            max_overflow=10,
            # Recycle before typical firewall and PgBouncer idle limits cut connections.
            pool_recycle=1800,
            connect_args=connect_args,
            **pool_options,
        )
        event.listen(engine, "checkout", _drop_if_server_hung_up)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


def _drop_if_server_hung_up(
    dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
) -> None:
    """Refuse a pooled PostgreSQL connection the server has closed, without asking it.

    An idle connection has nothing to read: the server speaks only when asked. When a
    server shuts down or terminates a backend, it sends a last error and closes the socket,
    which the client sees as readable. So a readable socket (or one libpq already knows is
    broken) at checkout means the connection must go: ``DisconnectionError`` makes the pool
    open a new one in its place, as ``pool_pre_ping`` would, but without pre-ping's
    ``SELECT 1`` round trip, which cost about a fifth of the webhook's CPU per request.
    (A rare unprompted message, such as a setting's new value after the server reloads its
    configuration, costs one needless reconnection.) A connection cut silently on the way,
    as a firewall may do, is found by its first statement, as pre-ping would have hung
    there; ``pool_recycle`` renews connections before such idle limits.
    """
    if dbapi_connection.closed:
        raise sa_exc.DisconnectionError("the connection is closed")
    poller = select.poll()
    poller.register(dbapi_connection.pgconn.socket, select.POLLIN)
    if poller.poll(0):
        raise sa_exc.DisconnectionError("the server closed the connection")


class DatabaseUnusable(RuntimeError):
    """The database cannot be used and waiting will not change that (a SQLite file whose
    directory cannot be created); the message says why in one line."""


class WaitStopped(Exception):
    """:func:`retry_while_unavailable` was asked to stop while the database was away."""


def waiting_helps(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is unavailable for now, so that trying again later
    may succeed: a server refusing connections, restarting, cut off or too busy, a lock
    held too long. Not a SQLite file that cannot be opened or written (its permissions do
    not change by themselves), nor a bad statement or a missing table."""
    if not isinstance(exc, DATABASE_UNAVAILABLE):
        return False
    # sqlite3 names each error (Python 3.11+); psycopg's have no such name.
    name = getattr(getattr(exc, "orig", None), "sqlite_errorname", None)
    return name is None or name in _SQLITE_WAITING_HELPS


def describe_database_error(exc: BaseException) -> str:
    """A short, secret-free reason for a database failure, for an answer to another party
    (the venue, a probe): the driver's error class ("OperationalError", "LockNotAvailable",
    "QueryCanceled"). SQLAlchemy's text, and some of the drivers', quote the statement and
    its parameters (the payloads), and a connection error names the database's host: none
    of it leaves the process."""
    original = getattr(exc, "orig", None)
    return type(original if original is not None else exc).__name__


def database_error_reason(exc: BaseException) -> str:
    """Why the database failed, for otacm's own log and an operator's terminal.

    The driver's first line for an error of the connection or of the server's state
    (``OperationalError``, ``InterfaceError``: "connection to server at "db" (10.0.0.5),
    port 5432 failed: Connection refused", "unable to open database file", "canceling
    statement due to lock timeout"): they name a host and a port, never the password nor
    any data. Any other error only as :func:`describe_database_error` does: a constraint's
    or a type's message may quote the values.
    """
    original = getattr(exc, "orig", None)
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        lines = [line.strip() for line in str(original or exc).splitlines() if line.strip()]
        if lines:
            return lines[0].removeprefix("connection failed: ")
    return describe_database_error(exc)


def retry_while_unavailable(
    work: Callable[[], T],
    *,
    stop: threading.Event,
    what: str,
    wait_initial: float = WAIT_INITIAL,
    wait_max: float = WAIT_MAX,
) -> T:
    """``work()``, tried again with backoff for as long as the database is unavailable.

    An attempt that fails with an error :func:`waiting_helps` with is logged as one line at
    WARNING, ``"<what>: database not reachable (<reason>); retrying in 4 s"``, without a
    traceback; the wait doubles from ``wait_initial`` to ``wait_max``, with jitter, and
    ends at once when ``stop`` is set (a role told to stop while waiting stops). Through
    tenacity (which stamina, used for the venue's calls, is built on) for its interruptible
    sleep: stamina's own would hold a stopping process for up to ``wait_max``.

    Args:
        work: what needs the database; called until it returns or fails otherwise.
        stop: set it to give up waiting.
        what: who waits, for the log line ("worker", "scheduler").
        wait_initial: seconds of the first wait.
        wait_max: the longest wait, in seconds.

    Returns:
        What ``work`` returned.

    Raises:
        WaitStopped: ``stop`` was set before ``work`` succeeded.
        Exception: whatever else ``work`` raised: waiting does not help with it.
    """

    def say_so(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.warning(
            "%s: database not reachable (%s); retrying in %.0f s",
            what,
            database_error_reason(error) if error else "unknown",
            state.next_action.sleep if state.next_action else 0.0,
        )

    def sleep(seconds: float) -> None:
        stop.wait(seconds)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(waiting_helps),
        # Doubling from wait_initial up to wait_max, plus up to a second of jitter.
        wait=tenacity.wait_exponential(multiplier=wait_initial, max=wait_max)
        + tenacity.wait_random(0, min(1.0, wait_initial)),
        sleep=sleep,
        before_sleep=say_so,
        reraise=True,
    )
    for attempt in retrying:
        with attempt:
            if stop.is_set():
                raise WaitStopped(what)
            return work()
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def make_sessions(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """The session factory for ``engine``: one session per unit of work.

    Objects stay readable after their transaction commits (``expire_on_commit=False``):
    a view can render what it just stored without another query. Every flush keeps the
    rules of :data:`storage.flush.FLUSH_HOOKS` (orders' totals...), and every commit
    numbers the orders it changed for the shop (:mod:`storage.changes`), both registered
    on this factory alone. The engine still belongs to the caller.

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
    sessions = sessionmaker(engine, expire_on_commit=False)
    register_flush_hooks(sessions)
    register_change_hooks(sessions)
    return sessions


def _sqlite_engine(url: URL, *, busy_timeout_ms: int, checkpoint_pages: int) -> Engine:
    database = url.database or ""
    in_memory = database in ("", ":memory:") or "mode=memory" in database
    if not in_memory and not url.query.get("uri"):
        directory = Path(database).expanduser().parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseUnusable(
                f"cannot create {directory}, the SQLite database's directory: {exc.strerror or exc}"
            ) from exc
    # The driver's own timeout covers opening the file, before the pragma below is set.
    engine = create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000})
    write_lock = WriteLock(default_lock_dir(engine), busy_timeout_ms)
    event.listen(
        engine, "connect", partial(_configure_sqlite_connection, write_lock, checkpoint_pages)
    )
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def _configure_sqlite_connection(
    write_lock: WriteLock,
    checkpoint_pages: int,
    dbapi_connection: Any,
    record: ConnectionPoolEntry,
) -> None:
    busy_timeout_ms = write_lock.busy_timeout_ms
    # Every transaction that writes takes the lock through it (_begin_sqlite_transaction,
    # driver_transaction).
    record.info[_WRITE_LOCK] = write_lock
    # Hand transaction control to SQLAlchemy (see _begin_sqlite_transaction): the driver's
    # legacy mode would start transactions only before INSERT/UPDATE/DELETE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # Pragmas outside a transaction: journal_mode and foreign_keys are no-ops inside one.
        cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms:d}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute(f"PRAGMA wal_autocheckpoint = {checkpoint_pages:d}")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _begin_sqlite_transaction(connection: Connection) -> None:
    options = connection.get_execution_options()
    mode = str(options.get(SQLITE_BEGIN_OPTION, "IMMEDIATE")).upper()
    if mode not in _SQLITE_BEGIN_MODES:
        raise ValueError(f"{SQLITE_BEGIN_OPTION} must be one of {sorted(_SQLITE_BEGIN_MODES)}")
    bulk = bool(options.get(SQLITE_BULK_OPTION))
    _sqlite_begin(connection.dialect, connection.connection, mode, bulk=bulk)


def _sqlite_begin(
    dialect: Dialect, pooled: PoolProxiedConnection, mode: str, *, bulk: bool = False
) -> None:
    """``BEGIN <mode>`` on a pooled SQLite connection, through its database's write lock."""
    write_lock: WriteLock = pooled.info[_WRITE_LOCK]
    with _driver_errors(dialect, f"BEGIN {mode}"):
        write_lock.begin(pooled.driver_connection, mode, bulk=bulk)  # type: ignore[arg-type]


def native_placeholders(dialect: Dialect, count: int) -> list[str]:
    """``count`` placeholders in ``dialect``'s own syntax, for :class:`DriverTransaction`."""
    if dialect.name == "sqlite":
        return ["?"] * count
    if dialect.name == "postgresql":
        return [f"${number}" for number in range(1, count + 1)]
    raise NotImplementedError(f"otacm runs on SQLite or PostgreSQL, not {dialect.name}")


class DriverTransaction:
    """A driver connection's transaction (:func:`driver_transaction`, :func:`driver_statements`)."""

    __slots__ = ("_statements_left", "cursor", "dialect")

    def __init__(
        self, dialect: Dialect, cursor: DBAPICursor, *, one_statement: bool = False
    ) -> None:
        self.dialect = dialect
        self.cursor = cursor
        self._statements_left = 1 if one_statement else None

    def returning(self, statement: str, parameters: Sequence[Any]) -> list[Any]:
        """Run ``statement`` (SQL text, :func:`native_placeholders`); its rows' first column.

        Raises:
            RuntimeError: a second statement in a ``one_statement`` transaction.
            sqlalchemy.exc.DBAPIError: the driver's error, as SQLAlchemy's class for it
                (``OperationalError`` for a locked or unreachable database...).
        """
        if self._statements_left is not None:
            if self._statements_left == 0:
                # Sent in autocommit mode, the first one is already committed.
                raise RuntimeError("a one-statement transaction has sent its statement")
            self._statements_left -= 1
        with _driver_errors(self.dialect, statement):
            self.cursor.execute(statement, parameters)
            return [row[0] for row in self.cursor.fetchall()]

    def load(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """Append ``rows`` to ``table``, in the order of ``columns``, the database's fast way.

        ``COPY … FROM STDIN`` on PostgreSQL: the rows stream to the server with no
        statement per row and no placeholders to rewrite. One prepared ``INSERT`` run for
        every row (``executemany``) on SQLite. The values are the driver's (the column
        types' bind processors applied); ``table`` and ``columns`` are trusted SQL names.

        Raises:
            sqlalchemy.exc.DBAPIError: the driver's error, as SQLAlchemy's class for it.
        """
        names = ", ".join(columns)
        if self.dialect.name == "postgresql":
            statement = f"COPY {table} ({names}) FROM STDIN"
            with _driver_errors(self.dialect, statement), self.cursor.copy(statement) as copy:
                for row in rows:
                    copy.write_row(row)
            return
        marks = ", ".join(native_placeholders(self.dialect, len(columns)))
        statement = f"INSERT INTO {table} ({names}) VALUES ({marks})"  # noqa: S608
        with _driver_errors(self.dialect, statement):
            self.cursor.executemany(statement, rows)  # type: ignore[arg-type]


@contextmanager
def driver_transaction(
    engine: Engine, *, one_statement: bool = False
) -> Iterator[DriverTransaction]:
    """One transaction on a pooled driver connection: committed on exit, rolled back on error.

    The connection comes from (and goes back to) ``engine``'s pool, configured as every
    other (busy or lock timeout, WAL, the check for a closed connection). A connection the
    driver reports lost is invalidated rather than pooled again.

    Args:
        engine: whose pool lends the connection.
        one_statement: the caller sends a single statement, which is atomic by itself,
            and a second one is refused: on PostgreSQL it runs in the driver's
            autocommit mode, without ``BEGIN`` and ``COMMIT`` (two round trips fewer).

    Raises:
        sqlalchemy.exc.DBAPIError: the driver failed to connect, begin or commit.
    """
    dialect = engine.dialect
    with _driver_errors(dialect, "connect"):
        connection = engine.raw_connection()
    driver = connection.driver_connection
    # SQLite's driver is always in autocommit mode here (see make_engine): BEGIN opens a
    # transaction. psycopg's opens one before the first statement unless told not to.
    autocommit = one_statement and dialect.name == "postgresql"
    try:
        cursor = _native_cursor(dialect, driver)
        try:
            if autocommit:
                driver.autocommit = True  # type: ignore[union-attr]
            elif dialect.name == "sqlite":
                # The write lock taken promptly and ahead of bulk work (WriteLock), which
                # a statement left to SQLite's own busy handler would not be.
                _sqlite_begin(dialect, connection, "IMMEDIATE")
            yield DriverTransaction(dialect, cursor, one_statement=one_statement)
            with _driver_errors(dialect, "COMMIT"):
                connection.commit()
        except BaseException as exc:
            original = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
            if isinstance(original, dialect.loaded_dbapi.Error) and dialect.is_disconnect(
                original, connection.dbapi_connection, cursor
            ):
                connection.invalidate(original)
                autocommit = False  # nothing left to restore
            else:
                _roll_back(connection, dialect)
            raise
        finally:
            cursor.close()
            if autocommit:
                _leave_autocommit(connection, dialect)
    finally:
        connection.close()


@contextmanager
def driver_statements(connection: Connection) -> Iterator[DriverTransaction]:
    """The driver connection under ``connection``, in ``connection``'s transaction.

    For code that holds a SQLAlchemy ``Connection`` and calls what the hot path calls
    (:func:`orders.inbox.store_notifications`). The transaction stays the caller's:
    nothing is committed or rolled back here.

    Raises:
        ValueError: ``connection`` is not in a transaction (on SQLite, with the driver's
            own transactions off, each statement would commit on its own).
    """
    if not connection.in_transaction():
        raise ValueError("driver statements need the connection's transaction to have begun")
    cursor = _native_cursor(connection.dialect, connection.connection.driver_connection)
    try:
        yield DriverTransaction(connection.dialect, cursor)
    finally:
        cursor.close()


def _native_cursor(dialect: Dialect, driver_connection: Any) -> DBAPICursor:
    """A cursor of ``driver_connection`` that takes :func:`native_placeholders`."""
    if dialect.name == "postgresql":
        from psycopg import RawCursor

        return RawCursor(driver_connection)  # type: ignore[return-value]
    return driver_connection.cursor()  # type: ignore[no-any-return]


def _leave_autocommit(connection: Any, dialect: Dialect) -> None:
    # Pooled connections are all alike: transactions begin implicitly.
    try:
        connection.driver_connection.autocommit = False
    except dialect.loaded_dbapi.Error:
        # Still in a transaction, or broken: not to be lent again.
        connection.invalidate()


def _roll_back(connection: Any, dialect: Dialect) -> None:
    try:
        connection.rollback()
    except dialect.loaded_dbapi.Error:
        # Nothing was committed; the pool's reset on return tries again or discards it.
        connection.invalidate()


@contextmanager
def _driver_errors(dialect: Dialect, statement: str) -> Iterator[None]:
    """Raise the driver's errors inside as SQLAlchemy's class for each, naming ``statement``."""
    try:
        yield
    except dialect.loaded_dbapi.Error as exc:
        # Parameters hidden: they are payloads, and never belong in an error or a log.
        raise sa_exc.DBAPIError.instance(
            statement,
            None,
            exc,
            dialect.loaded_dbapi.Error,
            hide_parameters=True,
            dialect=dialect,
        ) from exc
