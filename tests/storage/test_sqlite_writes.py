"""SQLite's write lock taken through storage.sqlite_writes: promptly, waiters before bulk work."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from storage.engine import driver_transaction, make_engine
from storage.locks import default_lock_dir
from storage.sqlite_writes import SQLITE_BULK_OPTION, WAITING_FILE
from tests.support.stack import wait_until

scratch = sa.MetaData()
entry = sa.Table(
    "entry",
    scratch,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("writer", sa.String(20), nullable=False),
)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    """A SQLite engine with the scratch table."""
    engine = make_engine(f"sqlite:///{tmp_path / 'otacm.sqlite3'}")
    scratch.create_all(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def _someone_waits(engine: sa.Engine) -> bool:
    """Whether a writer says it waits: the waiting file is held shared by someone."""
    path = default_lock_dir(engine) / WAITING_FILE
    if not path.exists():
        return False
    descriptor = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)  # closing releases the lock if it was taken
    return False


def test_a_waiting_writer_goes_before_the_next_batch_of_bulk_work(engine: sa.Engine) -> None:
    """A lock held; a writer waits for it, then a bulk batch asks too: when the lock is let
    go, the writer commits first, every time (without the priority it is a coin toss)."""
    bulk_engine = engine.execution_options(**{SQLITE_BULK_OPTION: True})

    def write(target: sa.Engine, name: str, order: list[str], ready: threading.Event) -> None:
        ready.set()
        with target.begin() as connection:
            connection.execute(entry.insert(), {"writer": name})
            order.append(name)

    for _ in range(15):
        order: list[str] = []
        bulk_waiting = threading.Event()
        with engine.begin() as holder:
            holder.execute(entry.insert(), {"writer": "holder"})
            webhook = threading.Thread(
                target=write, args=(engine, "webhook", order, threading.Event())
            )
            webhook.start()
            wait_until(lambda: _someone_waits(engine), what="the writer waiting")
            bulk = threading.Thread(target=write, args=(bulk_engine, "bulk", order, bulk_waiting))
            bulk.start()
            wait_until(bulk_waiting.is_set, what="the bulk batch begun")
            time.sleep(0.02)  # the bulk batch is at its BEGIN by now
        webhook.join(10)
        bulk.join(10)
        assert order == ["webhook", "bulk"]


def test_a_bulk_writer_waiting_for_the_lock_does_not_say_it_waits(engine: sa.Engine) -> None:
    """Only writers other than bulk work hold the waiting file while they wait."""
    bulk_engine = engine.execution_options(**{SQLITE_BULK_OPTION: True})
    done = threading.Event()

    def bulk_write() -> None:
        with bulk_engine.begin() as connection:
            connection.execute(entry.insert(), {"writer": "bulk"})
        done.set()

    with engine.begin() as holder:
        holder.execute(entry.insert(), {"writer": "holder"})
        thread = threading.Thread(target=bulk_write)
        thread.start()
        time.sleep(0.05)
        assert not done.is_set()  # it waits for the lock...
        assert not _someone_waits(engine)  # ...without saying so
    thread.join(10)
    assert done.is_set()


def test_a_writer_gives_up_after_the_lock_timeout_and_the_connection_stays_usable(
    tmp_path: Path,
) -> None:
    """Past the busy timeout, ``database is locked`` as SQLAlchemy's OperationalError (for
    the webhook, a 503); the waiting file is let go, and the pooled connection works on."""
    path = tmp_path / "otacm.sqlite3"
    holder_engine = make_engine(f"sqlite:///{path}")
    impatient = make_engine(f"sqlite:///{path}", lock_timeout=0.2)
    scratch.create_all(holder_engine)
    try:
        with holder_engine.begin() as holder:
            holder.execute(entry.insert(), {"writer": "holder"})
            started = time.monotonic()
            with (
                pytest.raises(OperationalError, match="database is locked"),
                driver_transaction(impatient, one_statement=True) as transaction,
            ):
                transaction.returning("INSERT INTO entry (writer) VALUES (?)", ("late",))
            assert time.monotonic() - started >= 0.2
            with pytest.raises(OperationalError, match="database is locked"), impatient.begin():
                pass
            assert not _someone_waits(holder_engine)
        with driver_transaction(impatient, one_statement=True) as transaction:
            transaction.returning("INSERT INTO entry (writer) VALUES (?) RETURNING id", ("now",))
        with impatient.connect() as connection:
            writers = connection.scalars(sa.select(entry.c.writer).order_by(entry.c.id)).all()
            busy = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
        assert writers == ["holder", "now"]
        assert busy == 200  # restored after the wait, for what the connection reads
    finally:
        impatient.dispose()
        holder_engine.dispose()


def test_a_bulk_batch_waits_no_longer_than_its_limit_for_a_writer_that_cannot_write(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that says it waits forever (here the file held by hand) delays bulk work
    by YIELD_MAX only: bulk work is never stopped altogether."""
    monkeypatch.setattr("storage.sqlite_writes.YIELD_MAX", 0.1)
    bulk_engine = engine.execution_options(**{SQLITE_BULK_OPTION: True})
    lock_dir = default_lock_dir(engine)
    lock_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock_dir / WAITING_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH)
        with bulk_engine.begin() as connection:
            connection.execute(entry.insert(), {"writer": "bulk"})
    finally:
        os.close(descriptor)
    with engine.connect() as connection:
        assert connection.scalars(sa.select(entry.c.writer)).all() == ["bulk"]
