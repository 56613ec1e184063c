"""The inbox's ``connection_id`` is no longer a foreign key.

PostgreSQL checks a foreign key by locking the referenced row (``FOR KEY SHARE``) for
every row inserted, so every webhook POST locked its connection's one row, and POSTs
stored at once by several web workers shared that lock as a new multixact each. Five
writers storing batches of twenty, with and without the key in six alternating rounds
of 4,000 batches: with it the server made about 3,400 multixacts a round (none without),
spent 1.19 against 1.00 ms of CPU per batch and took 18,700 against 21,300 notifications
a second (medians). What the key guarded cannot happen: inbox rows are written with the
ids of connections otacm has registered (``receiver`` reads them from
``venue_connection``), and otacm never deletes a connection. The other tables keep
theirs; none is written per notification.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = "fk_inbox_connection_id_venue_connection"


def upgrade() -> None:
    """Drop the inbox's foreign key to ``venue_connection``; its rows stay as they are."""
    # SQLite cannot drop a constraint in place: batch mode copies the table.
    with op.batch_alter_table("inbox") as batch:
        batch.drop_constraint(_KEY, type_="foreignkey")


def downgrade() -> None:
    """Restore the foreign key (every row's connection must exist)."""
    with op.batch_alter_table("inbox") as batch:
        batch.create_foreign_key(_KEY, "venue_connection", ["connection_id"], ["id"])
