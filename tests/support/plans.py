"""Query plans in tests: the statements a piece of work sends, and each database's plan.

:func:`sent_statements` captures the statements on their way to the driver (so the plan
read is that of what otacm really sends, parameters and all); :func:`query_plan` asks the
database for its plan of one: SQLite's ``EXPLAIN QUERY PLAN``, PostgreSQL's ``EXPLAIN``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa


@contextmanager
def sent_statements(engine: sa.Engine, prefix: str) -> Iterator[list[tuple[str, Any]]]:
    """The statements starting with ``prefix`` (case aside) sent to the driver in the block,
    with their parameters."""
    sent: list[tuple[str, Any]] = []
    wanted = prefix.upper()

    def capture(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if statement.lstrip().upper().startswith(wanted):
            sent.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        yield sent
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)


def query_plan(engine: sa.Engine, statement: str, parameters: Any) -> str:
    """The database's plan of ``statement``, one line per step."""
    sqlite = engine.dialect.name == "sqlite"
    explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(explain + statement, parameters).all()
        connection.rollback()
    return "\n".join(str(row[-1] if sqlite else row[0]) for row in rows)
