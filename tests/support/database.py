"""Looking at otacm's database as a whole: every row as one comparable value (to prove a
refusal changed nothing), and what a search of every stored text would find."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

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


def texts_in_database(sessions: sessionmaker[Session]) -> str:
    """Every text and JSON value of otacm's database, joined: what a search would find."""
    found: list[str] = []
    with sessions.begin() as session:
        for table in Base.metadata.sorted_tables:
            columns = [
                column
                for column in table.columns
                if isinstance(column.type, sa.String | sa.Text | sa.JSON)
            ]
            if columns:
                for row in session.execute(sa.select(*columns)):
                    found.extend(str(value) for value in row if value is not None)
    return "\n".join(found)
