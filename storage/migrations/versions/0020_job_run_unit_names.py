"""Room in ``job_run.name`` for the names of units of work.

The change feed is one unit of work per partner, each with its run record named
``change_feed:<connection>:<partner>``: up to 113 characters with a 64-character
connection name, so the column widens from 100 to 200. The downgrade narrows it again,
first deleting the run records whose names do not fit (bookkeeping only: the next run of
each job writes its record anew).

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Widen ``job_run.name``."""
    with op.batch_alter_table("job_run") as batch:
        batch.alter_column(
            "name", existing_type=sa.String(100), type_=sa.String(200), existing_nullable=False
        )


def downgrade() -> None:
    """Narrow ``job_run.name``, without the records whose names are too long for it."""
    op.execute(sa.text("DELETE FROM job_run WHERE length(name) > 100"))
    with op.batch_alter_table("job_run") as batch:
        batch.alter_column(
            "name", existing_type=sa.String(200), type_=sa.String(100), existing_nullable=False
        )
