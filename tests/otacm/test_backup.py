"""Backups as an operator takes them: ``otacm db backup`` while otacm writes, a restore
that otacm runs on, and PostgreSQL's pg_dump / pg_restore as the README gives them."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session, sessionmaker

from orders.outbox import record_submission
from otacm.cli import main
from storage.engine import make_engine, make_sessions
from storage.migrate import head_revision, upgrade
from storage.models import LedgerLine, Outbox, ensure_connection
from storage.testing import postgresql_program
from tests.support.processes import ROOT
from tests.support.stack import line, visit_date
from venue.models import OrderRequest

PARTNER = "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e"
ENOUGH = 25
"""Sales written before the backup, and again after it."""


def environment(database_url: str) -> dict[str, str]:
    """This process's environment without ``OTACM_*``, on ``database_url``, with a venue
    connection configured (nothing here calls it)."""
    kept = {name: value for name, value in os.environ.items() if not name.startswith("OTACM_")}
    return {
        **kept,
        "OTACM_DATABASE_URL": database_url,
        "OTACM_TENANT": "backup-test",
        "OTACM_COMPANY": "CRONUS International Ltd.",
        "OTACM_API_KEY": "backup-test-key",
        "OTACM_API_BASE_URL": "http://127.0.0.1:9",
        "OTACM_PARTNER_IDS": PARTNER,
    }


def otacm(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    """``otacm ARGS`` in a process of its own, to its end."""
    return subprocess.run(
        [sys.executable, "-m", "otacm", *args],
        cwd=ROOT,
        env=environment(database_url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def sale(reference: str) -> OrderRequest:
    return OrderRequest.model_validate(
        {
            "partnerId": PARTNER,
            "sellToOrderReference": reference,
            "sellToEmail": "guest@example.com",
            "items": [line(visitDate=visit_date(30))],
        }
    )


class Writer:
    """Sales recorded one transaction each (a ledger line and its outbox row together),
    in a thread of its own with its own engine, until stopped."""

    def __init__(self, database_url: str) -> None:
        self.engine = make_engine(database_url)
        self.sessions = make_sessions(self.engine)
        with self.sessions.begin() as session:
            self.connection_id = ensure_connection(session, "default")
        self.written = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)

    def _write(self) -> None:
        while not self.stop.is_set():
            with self.sessions.begin() as session:
                record_submission(
                    session,
                    self.connection_id,
                    sale(f"B-{self.written:05d}"),
                    now=dt.datetime.now(dt.UTC),
                )
            self.written += 1

    def wait_for(self, count: int) -> None:
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)
        while self.written < count:
            assert dt.datetime.now(dt.UTC) < deadline, f"only {self.written} sales written"
            self.stop.wait(0.01)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Writer]:
    url = f"sqlite:///{tmp_path / 'live.sqlite3'}"
    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    running = Writer(url)
    running.thread.start()
    try:
        yield running
    finally:
        running.stop.set()
        running.thread.join(timeout=30)
        running.engine.dispose()


def counts(sessions: sessionmaker[Session]) -> tuple[int, int, list[int]]:
    """Ledger lines, outbox rows, and the lines' ids."""
    with sessions.begin() as session:
        ids = list(session.scalars(sa.select(LedgerLine.id).order_by(LedgerLine.id)))
        outbox = session.scalar(sa.select(sa.func.count()).select_from(Outbox))
    return len(ids), int(outbox or 0), ids


@pytest.mark.process
def test_a_backup_taken_while_otacm_writes_restores_to_a_database_otacm_runs_on(
    writer: Writer, tmp_path: Path
) -> None:
    """`otacm db backup` in its own process while sales are being written: the copy is
    one consistent moment (each sale's line and outbox row together, no gap in the
    ids, some sales but not the later ones); `otacm db restore` puts it in an empty
    database, which `otacm db current` reads as current, where the scheduled jobs run
    and new sales are recorded after the restored ones."""
    backup = tmp_path / "backups" / "otacm.sqlite3"
    backup.parent.mkdir()
    writer.wait_for(ENOUGH)

    done = otacm("db", "backup", str(backup), database_url=str(writer.engine.url))

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"backed up to {backup}: ")
    at_backup = writer.written
    writer.wait_for(at_backup + ENOUGH)
    writer.stop.set()
    writer.thread.join(timeout=30)
    assert list(backup.parent.iterdir()) == [backup]  # no partial file left beside it

    restored_url = f"sqlite:///{tmp_path / 'restored.sqlite3'}"
    done = otacm("db", "restore", str(backup), database_url=restored_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"restored from {backup}: database at revision {head_revision()}"
    done = otacm("db", "current", database_url=restored_url)
    assert (done.returncode, done.stdout.strip()) == (0, f"{head_revision()}: current")

    engine = make_engine(restored_url)
    try:
        sessions = make_sessions(engine)
        lines, outbox, ids = counts(sessions)
        assert lines == outbox
        assert ENOUGH <= lines <= at_backup + 1 < writer.written
        assert ids == list(range(1, lines + 1))

        done = otacm(
            "poll", "--job", "reconcile", "--job", "erase_personal_data", database_url=restored_url
        )
        assert done.returncode == 0, done.stderr
        with sessions.begin() as session:
            connection_id = ensure_connection(session, "default")
            record_submission(
                session, connection_id, sale("AFTER-RESTORE"), now=dt.datetime.now(dt.UTC)
            )
        assert counts(sessions)[2][-1] == lines + 1
    finally:
        engine.dispose()


@pytest.mark.process
def test_restore_refuses_a_database_with_rows_and_a_file_that_is_no_backup(
    writer: Writer, tmp_path: Path
) -> None:
    """Restoring over a database that holds rows needs --force (one line, exit 1, nothing
    changed); a file that is no otacm database is refused; a backup does not overwrite
    an existing file without --force, nor write into a folder that does not exist."""
    writer.wait_for(3)
    writer.stop.set()
    writer.thread.join(timeout=30)
    live = str(writer.engine.url)
    backup = tmp_path / "backup.sqlite3"
    assert otacm("db", "backup", str(backup), database_url=live).returncode == 0
    before = counts(writer.sessions)

    done = otacm("db", "restore", str(backup), database_url=live)
    assert done.returncode == 1
    # The last line: the schema check before it may log (Alembic's INFO lines).
    assert done.stderr.strip().splitlines()[-1:] == [
        "Error: the database is not empty (table ledger_line has rows): restoring would replace"
        " it; stop every role and add --force to do so"
    ]
    not_a_backup = tmp_path / "notes.txt"
    not_a_backup.write_text("hello")
    done = otacm("db", "restore", str(not_a_backup), "--force", database_url=live)
    assert done.returncode == 1
    assert "is not a backup of an otacm database" in done.stderr
    done = otacm("db", "backup", str(backup), database_url=live)
    assert done.returncode == 1 and "exists" in done.stderr
    done = otacm("db", "backup", str(tmp_path / "missing" / "b.sqlite3"), database_url=live)
    assert done.returncode == 1 and "is not a folder" in done.stderr
    nowhere = tmp_path / "nowhere.sqlite3"
    done = otacm("db", "backup", str(tmp_path / "b.sqlite3"), database_url=f"sqlite:///{nowhere}")
    assert done.returncode == 1 and "there is no database at" in done.stderr
    assert not nowhere.exists()
    assert counts(writer.sessions) == before

    done = otacm("db", "restore", str(backup), "--force", database_url=live)
    assert done.returncode == 0, done.stderr
    assert counts(writer.sessions) == before


def test_backup_of_postgresql_points_to_pg_dump() -> None:
    """On PostgreSQL `otacm db backup` is one line naming pg_dump, exit 1."""
    result = CliRunner().invoke(
        main,
        ["db", "backup", "out.dump"],
        env={"OTACM_DATABASE_URL": "postgresql://otacm@db.invalid/otacm"},
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: otacm db backup and restore copy SQLite databases; back up PostgreSQL with"
        " pg_dump -Fc and restore with pg_restore (README: Backups)"
    ]


@pytest.mark.process
@pytest.mark.postgresql
def test_pg_dump_and_pg_restore_as_the_readme_says_give_a_database_otacm_accepts(
    postgresql_url: str, tmp_path: Path
) -> None:
    """The README's commands: `pg_dump -Fc` of a migrated database with sales, then
    `createdb` and `pg_restore --no-owner` into a new one: `otacm db current` reads it as
    current and it holds the same rows."""
    server = sa.make_url(postgresql_url)
    host, port = str(server.query["host"]), str(server.query["port"])
    source = server.set(database="backup_source").render_as_string(hide_password=False)
    target = server.set(database="backup_target").render_as_string(hide_password=False)
    libpq = ["-h", host, "-p", port, "-U", "postgres"]
    subprocess.run([postgresql_program("createdb"), *libpq, "backup_source"], check=True)
    subprocess.run([postgresql_program("createdb"), *libpq, "backup_target"], check=True)
    engine = make_engine(source)
    try:
        upgrade(engine)
        sessions = make_sessions(engine)
        with sessions.begin() as session:
            connection_id = ensure_connection(session, "default")
            for number in range(5):
                record_submission(
                    session, connection_id, sale(f"PG-{number}"), now=dt.datetime.now(dt.UTC)
                )
        written = counts(sessions)
    finally:
        engine.dispose()
    dump = tmp_path / "otacm.dump"

    subprocess.run(
        [postgresql_program("pg_dump"), "-Fc", *libpq, "-d", "backup_source", "-f", str(dump)],
        check=True,
    )
    subprocess.run(
        [
            postgresql_program("pg_restore"),
            "--no-owner",
            "--exit-on-error",
            *libpq,
            "-d",
            "backup_target",
            str(dump),
        ],
        check=True,
    )

    done = otacm("db", "current", database_url=target)
    assert (done.returncode, done.stdout.strip()) == (0, f"{head_revision()}: current")
    engine = make_engine(target)
    try:
        assert counts(make_sessions(engine)) == written
    finally:
        engine.dispose()
