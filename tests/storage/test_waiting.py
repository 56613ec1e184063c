"""Waiting for a database that is away: which errors waiting helps with, what is said of
them, and :func:`storage.engine.retry_while_unavailable` against real databases that
cannot be reached (a closed port) or used (a SQLite path that is a directory)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from storage.engine import (
    DatabaseUnusable,
    WaitStopped,
    database_error_reason,
    describe_database_error,
    make_engine,
    retry_while_unavailable,
    waiting_helps,
)
from storage.testing import free_port

PASSWORD = "waiting-password-5c1d"


def _unreachable() -> sa.Engine:
    return make_engine(f"postgresql://otacm:{PASSWORD}@127.0.0.1:{free_port()}/otacm")


def _connect(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(sa.text("SELECT 1")) or 0)


def test_an_unreachable_server_is_waited_for_and_described_without_secrets() -> None:
    """A refused connection is worth waiting for; its reason names host and port, not the
    password; an answer to another party names only the driver's class."""
    engine = _unreachable()
    try:
        with pytest.raises(sa.exc.OperationalError) as caught:
            _connect(engine)
    finally:
        engine.dispose()
    assert waiting_helps(caught.value)
    reason = database_error_reason(caught.value)
    assert "127.0.0.1" in reason and "Connection refused" in reason
    assert PASSWORD not in reason and "\n" not in reason
    assert describe_database_error(caught.value) == "OperationalError"


def test_a_sqlite_file_that_cannot_be_opened_is_not_waited_for(tmp_path: Path) -> None:
    """A SQLite path that is a directory fails at once, with SQLite's reason: its
    permissions or shape will not change by waiting."""
    engine = make_engine(f"sqlite:///{tmp_path}")
    stop = threading.Event()
    try:
        with pytest.raises(sa.exc.OperationalError) as caught:
            retry_while_unavailable(lambda: _connect(engine), stop=stop, what="test")
    finally:
        engine.dispose()
    assert not waiting_helps(caught.value)
    assert database_error_reason(caught.value) == "unable to open database file"


def test_a_sqlite_directory_that_cannot_be_made_is_unusable(tmp_path: Path) -> None:
    """A SQLite database under a file: make_engine says which directory it cannot make."""
    (tmp_path / "file").write_text("")
    with pytest.raises(DatabaseUnusable, match=r"cannot create .*/file, the SQLite database's"):
        make_engine(f"sqlite:///{tmp_path / 'file' / 'otacm.sqlite3'}")


def test_retry_logs_one_line_per_attempt_and_stops_when_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each failed attempt is one WARNING line (who, why, the wait; no traceback); the
    stop event ends the wait at once, with WaitStopped; what the work returns comes back."""
    engine = _unreachable()
    stop = threading.Event()
    calls = []

    def work() -> int:
        calls.append(1)
        if len(calls) == 3:
            stop.set()
        return _connect(engine)

    caplog.set_level(logging.WARNING, logger="storage.engine")
    try:
        with pytest.raises(WaitStopped):
            retry_while_unavailable(work, stop=stop, what="test", wait_initial=0.01, wait_max=0.02)
    finally:
        engine.dispose()
    assert len(calls) == 3
    lines = [r for r in caplog.records if r.name == "storage.engine"]
    assert len(lines) == 3
    for record in lines:
        assert record.levelno == logging.WARNING and record.exc_info is None
        message = record.getMessage()
        assert message.startswith("test: database not reachable (")
        assert "Connection refused" in message and message.endswith(" s")

    assert retry_while_unavailable(lambda: 7, stop=threading.Event(), what="test") == 7
