"""Runs of one connection take turns: a lock of their own, never the connection's row.

:mod:`reconciler.engine` takes one of these around each run. Both block only another run
of the same connection: the receiver, the worker and ledger imports go on storing the
connection's orders and sales meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from filelock import FileLock, Timeout

from storage.locks import advisory_lock_key, default_lock_dir

logger = logging.getLogger(__name__)


def take_turn_postgresql(connection: sa.Connection, connection_id: int, run_id: int) -> None:
    """Wait until no other run of ``connection_id`` is under way; hold that until commit.

    A transaction-level advisory lock on the connection's key
    (:func:`~storage.locks.advisory_lock_key`): it locks a number, not the connection's
    row. A ``FOR UPDATE`` on the row (as runs once took) also blocks every insert that
    references it (the foreign key check takes ``FOR KEY SHARE`` on the row): new
    mirrored orders, ledger lines, even another run's row, for as long as the run lasts.
    A run that must wait says so in the log first.
    """
    key = sa.bindparam("key", advisory_lock_key(f"reconcile-{connection_id}"), sa.BigInteger)
    if not connection.scalar(sa.select(sa.func.pg_try_advisory_xact_lock(key))):
        _log_waiting(run_id, connection_id)
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


@contextmanager
def take_turn_sqlite(engine: sa.Engine, connection_id: int, run_id: int) -> Iterator[None]:
    """Wait until no other run of ``connection_id`` is under way; hold that for the block.

    A file lock beside the database (:func:`~storage.locks.default_lock_dir`), which the
    kernel releases if the process dies: the run computes outside SQLite's write lock,
    so that lock no longer keeps two runs apart. A run that must wait says so first.
    """
    directory = default_lock_dir(engine)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / f"reconcile-{connection_id}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _log_waiting(run_id, connection_id)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _log_waiting(run_id: int, connection_id: int) -> None:
    logger.info(
        "reconciliation run %s waits for another run of connection %s to end",
        run_id,
        connection_id,
    )
