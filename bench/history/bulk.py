"""PostgreSQL's bulk load: secondary indexes and constraints dropped, rows written, all
made again exactly as the migrations made them.

Every row written into a table with live indexes updates each of them, one entry at a
time, in B-trees soon larger than the server's cache; an index built over the loaded table
sorts its entries once. A million orders (about 12M rows) took 236 s to build with every
index live, 89 s this way; 10M, 852 s. So, in the load's own transaction: the schema's
secondary indexes, unique and exclusion constraints and foreign keys are read from the
catalog (``pg_get_indexdef``, ``pg_get_constraintdef``) and dropped; the rows come; then
they are made again from those definitions, under the same names, with room to sort
(``maintenance_work_mem``). Primary keys stay (the load reads rows by id), and so do
partial indexes: the load writes few rows into them (they hold the queues' in-flight
rows), and their predicate would not come back the same (PostgreSQL prints ``state IN
(...)`` over a ``varchar`` as an array cast that it then reads as another expression: the
claim's plan still uses the index, but the schema would no longer be the migrated one).
What the catalog says afterwards is compared with what it said before: a difference fails
the build, so the measured schema is always the migrated one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa

MAINTENANCE_WORK_MEM = "1GB"
"""Memory an index build (or a foreign key's check) may sort in, for the load only."""

WORK_MEM = "256MB"
"""Memory a foreign key's check may hash the referenced keys in, for the load only."""

_INDEXES = """
SELECT t.relname, i.relname, pg_get_indexdef(x.indexrelid),
       x.indpred IS NOT NULL OR EXISTS (
           SELECT 1 FROM pg_constraint AS c WHERE c.conindid = x.indexrelid)
FROM pg_index AS x
JOIN pg_class AS i ON i.oid = x.indexrelid
JOIN pg_class AS t ON t.oid = x.indrelid
WHERE t.relnamespace = current_schema()::regnamespace
"""

_CONSTRAINTS = """
SELECT t.relname, c.conname, c.contype, pg_get_constraintdef(c.oid)
FROM pg_constraint AS c
JOIN pg_class AS t ON t.oid = c.conrelid
WHERE t.relnamespace = current_schema()::regnamespace
"""


class SchemaDrift(RuntimeError):
    """The schema after the load is not the one before it."""


@dataclass(frozen=True)
class Schema:
    """The schema's indexes and constraints, as the catalog defines them.

    Attributes:
        indexes: (table, index, definition, whether it stays through the load: a
            constraint's, or partial) per index.
        constraints: (table, constraint, type, definition) per constraint.
    """

    indexes: frozenset[tuple[str, str, str, bool]]
    constraints: frozenset[tuple[str, str, str, str]]

    @classmethod
    def read(cls, connection: sa.Connection) -> Schema:
        """The current schema's indexes and constraints."""
        indexes = connection.exec_driver_sql(_INDEXES).all()
        constraints = connection.exec_driver_sql(_CONSTRAINTS).all()
        return cls(
            indexes=frozenset((str(t), str(n), str(d), bool(o)) for t, n, d, o in indexes),
            constraints=frozenset((str(t), str(n), str(k), str(d)) for t, n, k, d in constraints),
        )

    def differences(self, other: Schema) -> list[str]:
        """What ``other`` lacks of this schema (``-``) and has beyond it (``+``)."""
        lines = [f"- {entry}" for entry in sorted(self.indexes - other.indexes)]
        lines += [f"+ {entry}" for entry in sorted(other.indexes - self.indexes)]
        lines += [f"- {entry}" for entry in sorted(self.constraints - other.constraints)]
        lines += [f"+ {entry}" for entry in sorted(other.constraints - self.constraints)]
        return lines


def _name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _execute(connection: sa.Connection, statement: str) -> None:
    # psycopg reads "%" as a placeholder's start; a definition's own is "%%" to it.
    connection.exec_driver_sql(statement.replace("%", "%%"))


@contextmanager
def loading(connection: sa.Connection) -> Iterator[Schema]:
    """Within ``connection``'s transaction: the schema's secondary indexes, unique and
    exclusion constraints and foreign keys dropped for the block, made again after it.

    Also for the transaction only: its commit not waited for on disk (the build is
    redone if the server stops before it is), and room to sort the indexes.

    Yields:
        The schema as it was before (and is again after).

    Raises:
        SchemaDrift: the indexes or constraints after the block differ from before.
    """
    before = Schema.read(connection)
    for setting, value in (
        ("synchronous_commit", "off"),
        ("maintenance_work_mem", MAINTENANCE_WORK_MEM),
        ("work_mem", WORK_MEM),
    ):
        _execute(connection, f"SET LOCAL {setting} = '{value}'")
    foreign = sorted(c for c in before.constraints if c[2] == "f")
    unique = sorted(c for c in before.constraints if c[2] in ("u", "x"))
    plain = sorted(index for index in before.indexes if not index[3])
    # Foreign keys first: one may lean on a unique constraint dropped after it.
    for table, name, _, _ in foreign + unique:
        _execute(connection, f"ALTER TABLE {_name(table)} DROP CONSTRAINT {_name(name)}")
    for _, name, _, _ in plain:
        _execute(connection, f"DROP INDEX {_name(name)}")
    yield before
    for _, _, definition, _ in plain:
        _execute(connection, definition)
    # Unique constraints before the foreign keys that may reference them.
    for table, name, _, definition in unique + foreign:
        _execute(
            connection, f"ALTER TABLE {_name(table)} ADD CONSTRAINT {_name(name)} {definition}"
        )
    after = Schema.read(connection)
    if after != before:
        drift = "\n".join(before.differences(after))
        raise SchemaDrift(f"the schema after the bulk load is not the migrated one:\n{drift}")
