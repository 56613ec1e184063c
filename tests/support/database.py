"""What a database holds, as one comparable value: to prove a refusal changed nothing."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from storage.models import Base


def dump(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the schema, by table, in a stable order."""
    with engine.connect() as connection:
        return {
            table.name: sorted(
                (tuple(row) for row in connection.execute(sa.select(table))), key=repr
            )
            for table in Base.metadata.sorted_tables
        }
