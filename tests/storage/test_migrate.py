"""Migrations: from an empty database to the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from storage import migrate
from storage.models import Base


def test_upgrade_from_empty_creates_every_table(engine: sa.Engine) -> None:
    """An upgrade of an empty database creates exactly the models' tables."""
    migrate.upgrade(engine)

    tables = set(sa.inspect(engine).get_table_names())
    assert tables == set(Base.metadata.tables) | {"alembic_version"}


def test_migrated_schema_matches_the_models(migrated_engine: sa.Engine) -> None:
    """Alembic's autogenerate finds no difference between the migrated schema and the models."""
    with migrated_engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)

    assert differences == []


def test_schema_comparison_notices_a_drift(migrated_engine: sa.Engine) -> None:
    """The comparison above can fail: a column added to the models shows up as a difference."""
    drifted = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["ledger_line"].append_column(sa.Column("shop_note", sa.Text()))
    drifted.tables["venue_order"].c.order_id.type = sa.String(80)

    with migrated_engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, drifted)

    # Column modifications come grouped in a list per column.
    kinds = [d[0] if isinstance(d, tuple) else d[0][0] for d in differences]
    assert kinds == ["add_column", "modify_type"]


def test_is_current_only_after_upgrade(engine: sa.Engine) -> None:
    """``is_current`` is false on an empty database and true once it is upgraded."""
    assert migrate.current_revision(engine) is None
    assert not migrate.is_current(engine)

    migrate.upgrade(engine)

    assert migrate.current_revision(engine) == migrate.head_revision()
    assert migrate.is_current(engine)


def test_upgrade_twice_changes_nothing(migrated_engine: sa.Engine) -> None:
    """Upgrading a database that is already current is a no-op, not an error."""
    migrate.upgrade(migrated_engine)

    assert migrate.is_current(migrated_engine)


def test_upgrade_by_url_disposes_its_own_engine(engine: sa.Engine) -> None:
    """``upgrade`` also takes a URL, and the caller's engine then sees the new schema."""
    migrate.upgrade(engine.url.render_as_string(hide_password=False))

    assert migrate.is_current(engine)


def test_downgrade_to_base_removes_every_table(migrated_engine: sa.Engine) -> None:
    """The initial revision's downgrade drops everything its upgrade created."""
    with migrated_engine.begin() as connection:
        command.downgrade(migrate.alembic_config(connection), "base")

    assert set(sa.inspect(migrated_engine).get_table_names()) <= {"alembic_version"}
    assert migrate.current_revision(migrated_engine) is None


def test_check_constraints_exist_in_the_database(migrated_engine: sa.Engine) -> None:
    """The migration creates the models' named CHECK constraints, which autogenerate ignores."""
    inspector = sa.inspect(migrated_engine)

    names = {check["name"] for check in inspector.get_check_constraints("inbox")}

    assert {"ck_inbox_state", "ck_inbox_source"} <= names
