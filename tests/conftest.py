"""Fixtures shared by every test package, one layer each: environment → settings → engine.

Databases: ``engine`` is parametrized over SQLite and PostgreSQL (a real server started
once per session in a temporary directory, ``postgresql_url``) and gives an empty
database per test; ``migrated_engine`` has the schema; ``sessions`` is their session
factory. Layers further up (apps, the sandbox) live beside the tests that use them.

The migrations run once per session and database kind, into a template (a SQLite file,
a PostgreSQL template database); each test that asks for the schema gets a copy of it,
which costs a few milliseconds instead of a run of every migration. The migration tests
(``tests/storage/test_migrate.py``) still run every migration up and down, on ``engine``.

Under pytest-xdist every worker is a session of its own: its own PostgreSQL server, its
own templates.

The lanes: the hooks below put every test that runs real processes in the ``process``
lane and guard the others against starting any (:mod:`tests.support.lanes`).
"""

from __future__ import annotations

import os
import sqlite3
import uuid
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from storage.engine import make_engine, make_sessions
from storage.migrate import upgrade
from storage.testing import PostgresqlError, PostgresqlMissing, throwaway_postgresql
from tests.support import lanes

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


# --- lanes ---------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """Install the guard that keeps processes in the ``process`` lane."""
    lanes.install_guard()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of the ``process`` lane (by its fixtures and markers)."""
    lanes.mark_process_lane(items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """A test outside the lane starts no process in its set-up, …"""
    with lanes.guarded(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """… nor in its body, …"""
    with lanes.guarded(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """… nor in its tear-down."""
    with lanes.guarded(item):
        return (yield)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees the developer's own OTACM_* configuration."""
    for name in list(os.environ):
        if name.startswith("OTACM_"):
            monkeypatch.delenv(name)
    yield


# --- databases ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    """A real PostgreSQL server in a temporary directory (in memory, :func:`_memory`, where
    the machine has it); yields the URL of a database on it.

    :func:`storage.testing.throwaway_postgresql`, not durable: fsync, full-page writes and
    synchronous commit off, for speed (its data is thrown away). As root, the server runs
    as the ``postgres`` system user.
    """
    with ExitStack() as stack:
        try:
            # Started (in a test's set-up) and stopped (in the last one's tear-down) as
            # infrastructure: the guard of the lanes lets this server through.
            server = stack.enter_context(
                lanes.infrastructure(
                    throwaway_postgresql(durable=False, prefix="otacm-pg-", parent=_memory())
                )
            )
        except PostgresqlMissing as exc:
            pytest.fail(f"{exc}; the tests run on PostgreSQL as well as SQLite", pytrace=False)
        except PostgresqlError as exc:
            pytest.fail(str(exc), pytrace=False)
        _admin_statement(server.url, "CREATE DATABASE otacm", database="postgres")
        yield server.database_url("otacm")


def _memory() -> Path | None:
    """A memory-backed directory for the tests' server, if the machine has one.

    Every test that asks for a PostgreSQL database gets a new one (``CREATE DATABASE``):
    on tmpfs that takes a few hundredths of a second, on this disk tenths. What the server
    holds is thrown away at the end anyway.
    """
    # The server's own directory in it is made by mkdtemp: private, never guessed.
    memory = Path("/dev/shm")  # noqa: S108
    return memory if memory.is_dir() and os.access(memory, os.W_OK | os.X_OK) else None


def _admin_statement(url: str, statement: str, *, database: str) -> None:
    """Run a statement that cannot run in a transaction (CREATE/DROP DATABASE)."""
    admin = sa.create_engine(
        sa.make_url(url).set(database=database), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(statement)
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file with every migration run, made once per session."""
    path = tmp_path_factory.mktemp("template") / "otacm.sqlite3"
    template = make_engine(f"sqlite:///{path}")
    try:
        upgrade(template)
    finally:
        template.dispose()
    return path


@pytest.fixture(scope="session")
def postgresql_template(postgresql_url: str) -> str:
    """The name of a PostgreSQL template database with every migration run, made once
    per session (no connection stays open on it: CREATE DATABASE … TEMPLATE needs that)."""
    name = "otacm_template"
    _admin_statement(postgresql_url, f"CREATE DATABASE {name}", database="otacm")
    template = make_engine(
        sa.make_url(postgresql_url).set(database=name).render_as_string(hide_password=False)
    )
    try:
        upgrade(template)
    finally:
        template.dispose()
    return name


@contextmanager
def _new_database(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, *, migrated: bool
) -> Iterator[str]:
    """A database of the test's own: empty, or a copy of the migrated template."""
    if backend == "sqlite":
        path = tmp_path / "otacm.sqlite3"
        if migrated:
            template: Path = request.getfixturevalue("sqlite_template")
            # SQLite's backup API: a whole, consistent copy whatever the journal mode.
            with (
                closing(sqlite3.connect(template)) as source,
                closing(sqlite3.connect(path)) as copy,
            ):
                source.backup(copy)
        yield f"sqlite:///{path}"
        return
    server_url: str = request.getfixturevalue("postgresql_url")
    name = f"test_{uuid.uuid4().hex[:12]}"
    create = f"CREATE DATABASE {name}"
    if migrated:
        create += f" TEMPLATE {request.getfixturevalue('postgresql_template')}"
    _admin_statement(server_url, create, database="otacm")
    try:
        yield sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        _admin_statement(server_url, f"DROP DATABASE {name} WITH (FORCE)", database="otacm")


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
    ]
)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """An engine from ``make_engine`` on a new database: SQLite, then PostgreSQL. Empty,
    unless the test also asks for ``migrated_engine``: then a copy of the template."""
    migrated = "migrated_engine" in request.fixturenames
    with _new_database(request, request.param, tmp_path, migrated=migrated) as url:
        engine = make_engine(url)
        if migrated:
            _COPIED_FROM_TEMPLATE.add(engine)
        try:
            yield engine
        finally:
            engine.dispose()


_COPIED_FROM_TEMPLATE: weakref.WeakSet[sa.Engine] = weakref.WeakSet()
"""Engines whose database was copied from a migrated template (already at the head)."""


@pytest.fixture
def migrated_engine(engine: sa.Engine) -> sa.Engine:
    """The ``engine`` database at the latest schema."""
    if engine not in _COPIED_FROM_TEMPLATE:
        upgrade(engine)
    return engine


@pytest.fixture
def sessions(migrated_engine: sa.Engine) -> sessionmaker[Session]:
    """The session factory on the migrated database."""
    return make_sessions(migrated_engine)
