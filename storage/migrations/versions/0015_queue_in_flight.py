"""Queue claims read only the rows still to be worked.

``inbox`` and ``outbox`` gain a partial index of their pending and leased rows, by
connection and id (``storage.models._in_flight_index``), which their claims
(``storage.lease.LeasedQueue.claim``) read: a claim then costs what is waiting, not what
was ever stored. Before it, the worker's claim on SQLite walked the dedup key's index of
every row of the connection and sorted them, and PostgreSQL walked the primary key past
every finished row to the first due one. The downgrade drops both indexes.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("inbox", "outbox")
# The same text as storage.models.IN_FLIGHT: the claims repeat it term for term.
_IN_FLIGHT = sa.text("state IN ('pending', 'leased')")


def upgrade() -> None:
    """Create each queue's index of its in-flight rows."""
    for table in _TABLES:
        op.create_index(
            f"ix_{table}_in_flight",
            table,
            ["connection_id", "id"],
            postgresql_where=_IN_FLIGHT,
            sqlite_where=_IN_FLIGHT,
        )


def downgrade() -> None:
    """Drop the indexes."""
    for table in _TABLES:
        op.drop_index(f"ix_{table}_in_flight", table_name=table)
