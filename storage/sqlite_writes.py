"""Taking SQLite's one write lock promptly, and before bulk work: :class:`WriteLock`.

SQLite's own busy handler waits for the write lock in sleeps that grow to 100 ms (1, 2, 5,
10, 15, 20, 25... ms): a webhook's INSERT that finds a batch of a ledger import holding
the lock tries again 18, 33, 53... ms after it began waiting, however soon the batch
ended, and may then lose the lock to the import's next batch and wait on. So every
write transaction of otacm on SQLite takes the lock itself (:meth:`WriteLock.begin`):

- ``BEGIN IMMEDIATE`` is tried with no busy timeout, and again every
  :data:`POLL_SECONDS` (every :data:`SLOW_POLL_SECONDS` once it has waited
  :data:`SLOW_AFTER`) until it gets the lock or the connection's busy timeout has passed;
  then it fails with ``database is locked``, as SQLite's own wait would have.
- A writer that has to wait says so: while it waits it holds a shared ``flock`` on the
  database's :data:`WAITING_FILE` (in its lock directory, :func:`storage.locks.default_lock_dir`).
- Bulk work (a ledger import's batches, a reconciliation's recording, pruning: work on a
  connection with the execution option :data:`SQLITE_BULK_OPTION`) begins each batch
  only once nobody says so (for :data:`YIELD_MAX` seconds at most), and does not say so
  itself while it waits. A webhook or the worker then waits for the batch in progress at
  most, never for the next one nor for another bulk writer's.

Nothing is written to the database to say who waits: a lock file's ``flock`` is gone with
its process, however it died. SQLite clients outside otacm still take the lock with
their own busy handlers; bulk work leaves them a short gap after each batch
(:data:`storage.pacing.SQLITE_PAUSE`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path

SQLITE_BULK_OPTION = "otacm_sqlite_bulk"
"""Execution option: this connection's write transactions are batches of bulk work, which
wait for every other writer that waits (see the module docstring)."""

WAITING_FILE = "sqlite-writers-waiting"
"""The file in the database's lock directory a waiting writer holds a shared lock on."""

POLL_SECONDS = 0.001
"""How often a waiting writer tries the lock again, for its first :data:`SLOW_AFTER`."""

SLOW_POLL_SECONDS = 0.005
"""How often after that: a lock held that long is held by a long transaction, and many
waiting threads need not spin."""

SLOW_AFTER = 0.1
"""Seconds of waiting after which a writer tries less often."""

YIELD_MAX = 1.0
"""The longest a bulk batch waits for other writers to have had their turn: a steady
stream of them must not stop the bulk work altogether."""


class WriteLock:
    """How the connections of one SQLite database take its write lock (module docstring).

    Args:
        lock_dir: the database's lock directory, where :data:`WAITING_FILE` lives (made
            when first needed).
        busy_timeout_ms: how long a writer waits for the lock in all, as the
            connections' busy timeout is set to.
    """

    def __init__(self, lock_dir: Path, busy_timeout_ms: int) -> None:
        self.lock_dir = lock_dir
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()

    def begin(self, connection: sqlite3.Connection, mode: str, *, bulk: bool = False) -> None:
        """``BEGIN <mode>`` on ``connection``, waiting for the write lock as the module says.

        ``DEFERRED`` takes no lock and is sent as it is.

        Raises:
            sqlite3.OperationalError: ``database is locked`` after the busy timeout, or
                whatever else ``BEGIN`` failed with.
        """
        statement = f"BEGIN {mode}"
        if mode == "DEFERRED":
            connection.execute(statement)
            return
        if bulk:
            self._let_waiting_writers_first()
        connection.execute("PRAGMA busy_timeout = 0")
        try:
            try:
                connection.execute(statement)
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise
                self._wait(connection, statement, announce=not bulk)
        finally:
            connection.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms:d}")

    def _wait(self, connection: sqlite3.Connection, statement: str, *, announce: bool) -> None:
        started = time.monotonic()
        deadline = started + self.busy_timeout_ms / 1000
        waiting = self._say_waiting() if announce else None
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    connection.execute(statement)  # locked still: raises as SQLite would
                    return
                time.sleep(POLL_SECONDS if now - started < SLOW_AFTER else SLOW_POLL_SECONDS)
                try:
                    connection.execute(statement)
                except sqlite3.OperationalError as exc:
                    if not _busy(exc):
                        raise
                    continue
                return
        finally:
            if waiting is not None:
                fcntl.flock(waiting, fcntl.LOCK_UN)

    def _say_waiting(self) -> int | None:
        """Hold the waiting file shared; its descriptor, or ``None`` if it cannot be had."""
        descriptor = self._descriptor()
        if descriptor is None:
            return None
        try:
            # A bulk writer holds it exclusively only for as long as it takes to look.
            fcntl.flock(descriptor, fcntl.LOCK_SH)
        except OSError:
            return None
        return descriptor

    def _let_waiting_writers_first(self) -> None:
        """Return once no writer says it waits (or after :data:`YIELD_MAX` seconds)."""
        descriptor = self._descriptor()
        if descriptor is None:
            return
        deadline = time.monotonic() + YIELD_MAX
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    return
                if time.monotonic() >= deadline:
                    return
                time.sleep(POLL_SECONDS)
                continue
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            return

    def _descriptor(self) -> int | None:
        """This thread's descriptor of the waiting file: ``flock`` locks belong to an open
        file, so each thread (and each process after a fork) needs its own."""
        held: _OpenFile | None = getattr(self._local, "file", None)
        if held is not None and held.pid == os.getpid():
            return held.descriptor
        try:
            self.lock_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.lock_dir / WAITING_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            # No lock directory (a read-only place): writers still take the lock, only
            # without the bulk work letting them first.
            return None
        self._local.file = _OpenFile(descriptor)
        return descriptor


class _OpenFile:
    """A thread's descriptor of the waiting file, closed when the thread (and so its
    ``threading.local`` value) is gone."""

    def __init__(self, descriptor: int) -> None:
        self.descriptor = descriptor
        self.pid = os.getpid()

    def __del__(self) -> None:
        if self.pid == os.getpid():  # a forked child's copy is its parent's to close
            os.close(self.descriptor)


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Whether ``exc`` is SQLite's "the lock is held" (``SQLITE_BUSY`` and its kinds)."""
    return str(getattr(exc, "sqlite_errorname", "")).startswith("SQLITE_BUSY")
