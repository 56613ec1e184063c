"""``bench/history``'s PostgreSQL build drops the secondary indexes and foreign keys for its
load and leaves exactly the migrated schema behind; a schema that changes meanwhile fails
the build."""

from __future__ import annotations

import importlib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa

from storage.engine import make_engine

pytestmark = pytest.mark.postgresql

HISTORY = Path(__file__).resolve().parents[2] / "bench" / "history"

CATALOG = {
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes "
    "WHERE schemaname = current_schema() ORDER BY 1, 2",
    "constraints": "SELECT conrelid::regclass::text, conname, contype, "
    "pg_get_constraintdef(oid), condeferrable, convalidated FROM pg_constraint "
    "WHERE connamespace = current_schema()::regnamespace ORDER BY 1, 2",
}


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ModuleType, ModuleType]]:
    """The benchmark's ``build`` and ``bulk`` modules, imported as its script does."""
    monkeypatch.syspath_prepend(str(HISTORY))
    for name in ("build", "bulk"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield importlib.import_module("build"), importlib.import_module("bulk")
    for name in ("build", "bulk"):
        sys.modules.pop(name, None)


def _admin(server_url: str, statement: str) -> None:
    admin = sa.create_engine(
        sa.make_url(server_url).set(database="otacm"),
        isolation_level="AUTOCOMMIT",
        poolclass=sa.NullPool,
    )
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(statement)
    finally:
        admin.dispose()


@pytest.fixture
def migrated(postgresql_url: str, postgresql_template: str) -> Iterator[Iterator[sa.Engine]]:
    """New migrated PostgreSQL databases, as many as the test takes."""
    names: list[str] = []
    engines: list[sa.Engine] = []

    def databases() -> Iterator[sa.Engine]:
        while True:
            name = f"test_{uuid.uuid4().hex[:12]}"
            _admin(postgresql_url, f"CREATE DATABASE {name} TEMPLATE {postgresql_template}")
            names.append(name)
            url = sa.make_url(postgresql_url).set(database=name)
            engines.append(make_engine(url.render_as_string(hide_password=False)))
            yield engines[-1]

    yield databases()
    for engine in engines:
        engine.dispose()
    for name in names:
        _admin(postgresql_url, f"DROP DATABASE {name} WITH (FORCE)")


def _catalog(engine: sa.Engine) -> dict[str, list[tuple[object, ...]]]:
    with engine.connect() as connection:
        return {
            what: [tuple(row) for row in connection.exec_driver_sql(query)]
            for what, query in CATALOG.items()
        }


def test_the_built_history_has_the_migrated_indexes_and_constraints(
    bench: tuple[ModuleType, ModuleType], migrated: Iterator[sa.Engine]
) -> None:
    """Every index and constraint comes back with its name and definition, rows in place."""
    build, _ = bench
    reference, built = next(migrated), next(migrated)
    history = build.build(built, 200)
    assert history.rows["venue_order"] == 200
    assert _catalog(built) == _catalog(reference)
    with built.connect() as connection:
        # A secondary index made again holds every loaded row: counted through it.
        connection.exec_driver_sql("SET enable_seqscan = off")
        query = "SELECT count(*) FROM status_change WHERE observed_at > '2000-01-01'"
        plan = "\n".join(connection.exec_driver_sql(f"EXPLAIN {query}").scalars())
        assert "ix_status_change_observed_at" in plan
        assert connection.exec_driver_sql(query).scalar_one() == history.rows["status_change"]


def test_the_load_runs_without_secondary_indexes_or_foreign_keys(
    bench: tuple[ModuleType, ModuleType], migrated: Iterator[sa.Engine]
) -> None:
    """Inside the load, only primary keys, partial indexes and check constraints remain."""
    _, bulk = bench
    engine = next(migrated)
    with engine.begin() as connection, bulk.loading(connection) as before:
        during = bulk.Schema.read(connection)
    assert {c[2] for c in before.constraints} >= {"p", "f", "u"}
    assert {c[2] for c in during.constraints} <= {"p", "c"}
    assert all(stays for *_, stays in during.indexes)
    assert len(during.indexes) < len(before.indexes)


def test_an_index_the_load_did_not_have_before_fails_the_build(
    bench: tuple[ModuleType, ModuleType], migrated: Iterator[sa.Engine]
) -> None:
    """A schema that differs after the load is refused, naming the difference, and the
    transaction does not commit."""
    _, bulk = bench
    engine = next(migrated)
    before = _catalog(engine)
    with (
        pytest.raises(bulk.SchemaDrift, match=r"\+ \('inbox', 'ix_extra'"),
        engine.begin() as connection,
        bulk.loading(connection),
    ):
        connection.exec_driver_sql("CREATE INDEX ix_extra ON inbox (event_name)")
    assert _catalog(engine) == before
