"""Looking at otacm's database as a whole: what a search of every stored text would find."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Base


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
