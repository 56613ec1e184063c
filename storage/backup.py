"""Backing up and restoring a SQLite database of otacm (``otacm db backup`` / ``restore``).

A backup goes through SQLite's online backup API (``sqlite3.Connection.backup``), in one
step: it reads one consistent snapshot of the database under a read transaction, which
in WAL mode (:mod:`storage.engine`) blocks no writer, so it is safe while every role
runs; copying the file instead could catch a write half done, or miss what still sits
in the ``-wal`` file. The copy is written beside the target under a temporary name,
checked (``PRAGMA quick_check``), switched to a rollback journal (so it is one
self-contained file) and renamed into place: a backup that fails leaves no half file.

A restore copies a backup into the configured database with the same API, after
checking that the file is a database of otacm's (it has a schema revision) and that the
configured one holds no rows (only a schema), unless forced. Stop the roles first: the
copy takes the database's write lock, and a role that kept running would carry on from
state the restore replaced.

PostgreSQL has its own tools (``pg_dump``, WAL archiving); the README says how.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from storage.migrate import current_revision

_VERSION_TABLE = "alembic_version"


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why, nothing was changed."""


@dataclass(frozen=True)
class BackupResult:
    """A backup or restore done.

    Attributes:
        path: the backup file.
        size: its size in bytes.
        revision: the schema revision it holds.
    """

    path: Path
    size: int
    revision: str | None


def backup_sqlite(engine: sa.Engine, target: Path, *, force: bool = False) -> BackupResult:
    """Copy the SQLite database of ``engine`` to ``target``, online (module docstring).

    Args:
        engine: the database to back up (a SQLite file); stays the caller's.
        target: the backup file to write.
        force: replace ``target`` if it exists.

    Raises:
        BackupError: not a SQLite file database or no such file, ``target`` exists
            (without ``force``) or its folder does not, or the copy failed its check.
    """
    database = _sqlite_file(engine)
    if not database.is_file():
        raise BackupError(f"there is no database at {database}: nothing to back up")
    if target.exists() and not force:
        raise BackupError(f"{target} exists: name another file, or replace it with --force")
    if not target.parent.is_dir():
        raise BackupError(f"{target.parent} is not a folder")
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        raw = engine.raw_connection()
        try:
            destination = sqlite3.connect(partial)
            try:
                # pages=-1: the whole database in one step, from one snapshot.
                raw.driver_connection.backup(destination, pages=-1)  # type: ignore[union-attr]
                _check(destination, partial)
                destination.execute("PRAGMA journal_mode = DELETE")
            finally:
                destination.close()
        finally:
            raw.close()
        os.replace(partial, target)
    except sqlite3.Error as exc:
        raise BackupError(f"the backup to {target} failed: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return BackupResult(target, target.stat().st_size, _revision_of(target))


def restore_sqlite(engine: sa.Engine, source: Path, *, force: bool = False) -> BackupResult:
    """Copy the backup ``source`` into the SQLite database of ``engine`` (module docstring).

    Args:
        engine: the database to restore into (a SQLite file); stays the caller's.
        source: a file written by :func:`backup_sqlite` (or any copy of an otacm database).
        force: replace a database that holds rows.

    Raises:
        BackupError: not a SQLite file database, ``source`` is no otacm database, or the
            database holds rows and ``force`` is not given.
    """
    _sqlite_file(engine)
    revision = _revision_of(source)
    if revision is None:
        raise BackupError(f"{source} is not a backup of an otacm database (no schema revision)")
    if not force and (table := _first_table_with_rows(engine)) is not None:
        raise BackupError(
            f"the database is not empty (table {table} has rows): restoring would replace"
            " it; stop every role and add --force to do so"
        )
    try:
        with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as backup:
            raw = engine.raw_connection()
            try:
                backup.backup(raw.driver_connection, pages=-1)  # type: ignore[arg-type]
            finally:
                raw.close()
    except sqlite3.Error as exc:
        raise BackupError(f"the restore from {source} failed: {exc}") from exc
    return BackupResult(source, source.stat().st_size, current_revision(engine))


def _sqlite_file(engine: sa.Engine) -> Path:
    """The file of ``engine``'s SQLite database.

    Raises:
        BackupError: PostgreSQL (with what to use instead), or a database in memory.
    """
    if engine.dialect.name != "sqlite":
        raise BackupError(
            "otacm db backup and restore copy SQLite databases; back up PostgreSQL with"
            " pg_dump -Fc and restore with pg_restore (README: Backups)"
        )
    database = engine.url.database or ""
    if database in ("", ":memory:") or "mode=memory" in str(engine.url):
        raise BackupError("the database is in memory: there is nothing lasting to copy")
    if database.startswith("file:"):
        # A URI filename (``?uri=true``): the path is before any query.
        database = database.removeprefix("file:").split("?", 1)[0]
    return Path(database).expanduser()


def _check(connection: sqlite3.Connection, path: Path) -> None:
    (verdict,) = connection.execute("PRAGMA quick_check").fetchone()
    if verdict != "ok":
        raise BackupError(f"the copy at {path} failed its check: {verdict}")


def _revision_of(path: Path) -> str | None:
    """The schema revision of the otacm database in ``path``; ``None`` if it is none."""
    if not path.is_file():
        raise BackupError(f"{path} is not a file")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute(f"SELECT version_num FROM {_VERSION_TABLE}").fetchone()  # noqa: S608
    except sqlite3.Error:
        return None
    return None if row is None else str(row[0])


def _first_table_with_rows(engine: sa.Engine) -> str | None:
    """A table of the database other than the schema revision's that holds a row."""
    with engine.connect() as connection:
        for table in sorted(sa.inspect(connection).get_table_names()):
            if table == _VERSION_TABLE:
                continue
            query = sa.select(sa.literal(1)).select_from(sa.table(table)).limit(1)
            if connection.execute(query).first() is not None:
                return table
    return None
