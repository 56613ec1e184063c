"""Schema migrations: bring a database to the schema of :mod:`storage.models`.

Alembic runs from code here, with no ``alembic.ini``: the script directory is
``storage/migrations`` inside the installed package, and the database is given as an
engine (or URL). ``otacm db upgrade`` calls :func:`upgrade`; ``otacm doctor`` and
``/readyz`` call :func:`is_current`.

A whole upgrade runs in one transaction on both databases (SQLite's DDL is transactional
once SQLAlchemy emits ``BEGIN``; see :mod:`storage.engine`). On SQLite, foreign key
enforcement is switched off for the upgrade, because batch migrations rebuild a table by
copying it and dropping the original, and a ``DROP TABLE`` with foreign keys on would
cascade into the child tables; the keys are checked with ``PRAGMA foreign_key_check``
before the upgrade commits.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

from storage.engine import SQLITE_BEGIN_OPTION, make_engine

SCRIPT_LOCATION = Path(__file__).resolve().parent / "migrations"


class MigrationError(RuntimeError):
    """A migration left the database inconsistent; it was rolled back."""


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for otacm's migrations, built in code.

    Args:
        connection: the connection migrations run on; ``env.py`` reads it from
            ``config.attributes["connection"]``.
    """
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(engine_or_url: Engine | str, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` (default: the latest), in one transaction.

    Args:
        engine_or_url: an engine, which stays the caller's, or a URL, for which an
            engine is made and disposed of here.
        revision: the Alembic revision to upgrade to.

    Raises:
        MigrationError: on SQLite, the upgraded data breaks a foreign key.
    """
    if isinstance(engine_or_url, str):
        engine = make_engine(engine_or_url)
        try:
            upgrade(engine, revision)
        finally:
            engine.dispose()
        return

    with engine_or_url.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            _sqlite_foreign_keys(connection, enabled=False)
        try:
            with connection.begin():
                command.upgrade(alembic_config(connection), revision)
                if sqlite:
                    _check_sqlite_foreign_keys(connection)
        finally:
            if sqlite:
                _sqlite_foreign_keys(connection, enabled=True)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or ``None`` when it has never been migrated."""
    reader = engine.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
    with reader.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The latest revision that the installed code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise MigrationError(f"no migrations found in {SCRIPT_LOCATION}")
    return head


def known_revisions() -> list[str]:
    """Every revision id the installed code knows, in order of their ids."""
    return sorted(
        s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()
    )


def is_current(engine: Engine) -> bool:
    """Whether the database is at the latest revision (``otacm db upgrade`` is not needed)."""
    return current_revision(engine) == head_revision()


def _sqlite_foreign_keys(connection: Connection, *, enabled: bool) -> None:
    # PRAGMA foreign_keys is ignored inside a transaction, so it goes straight to the
    # driver connection, before SQLAlchemy begins one.
    driver_connection = connection.connection.driver_connection
    assert driver_connection is not None
    driver_connection.execute(f"PRAGMA foreign_keys = {'ON' if enabled else 'OFF'}")


def _check_sqlite_foreign_keys(connection: Connection) -> None:
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        tables = sorted({str(row[0]) for row in broken})
        raise MigrationError(f"migration broke foreign keys in: {', '.join(tables)}")
