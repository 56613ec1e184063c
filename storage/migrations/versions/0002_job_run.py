"""Scheduled jobs' run records replace leases; outbox rows may have no ledger line.

``job_lease`` was never used: who runs a job right now is decided by a database lock
(a PostgreSQL advisory lock, a file lock beside a SQLite database), which dies with its
holder, so no row has to expire. What is shared through a row is the run record,
``job_run``: when each job last ran, by whom, how it ended, and when it is next due.

``outbox.ledger_line_id`` becomes nullable: a call on a venue order with no sale in the
ledger (cancelling an orphan) is recorded in the outbox too. On SQLite the column is
changed by rebuilding the table (batch mode); :mod:`storage.migrate` turns foreign keys
off for that and checks them before the upgrade commits.

Revision ID: 0002
Revises: 0001
Create Date: 2026-05-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Replace ``job_lease`` by ``job_run``; make ``outbox.ledger_line_id`` nullable."""
    op.drop_table("job_lease")
    op.create_table(
        "job_run",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("started_at", _utc(), nullable=False),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.Column("last_success_at", _utc(), nullable=True),
        sa.Column("next_due_at", _utc(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_job_run")),
    )
    with op.batch_alter_table("outbox") as batch:
        batch.alter_column("ledger_line_id", existing_type=_big_id(), nullable=True)


def downgrade() -> None:
    """Back to ``job_lease`` and a required ``outbox.ledger_line_id``.

    Raises:
        RuntimeError: outbox rows without a ledger line exist; the old schema cannot
            hold them, and they are not deleted silently.
    """
    orphans = op.get_bind().scalar(
        sa.text("SELECT count(*) FROM outbox WHERE ledger_line_id IS NULL")
    )
    if orphans:
        raise RuntimeError(
            f"cannot downgrade: {orphans} outbox row(s) have no ledger line; "
            "revision 0001 requires one"
        )
    with op.batch_alter_table("outbox") as batch:
        batch.alter_column("ledger_line_id", existing_type=_big_id(), nullable=False)
    op.drop_table("job_run")
    op.create_table(
        "job_lease",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("expires_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_job_lease")),
    )


def _big_id() -> sa.types.TypeEngine[int]:
    # As in 0001: SQLite only auto-increments a column declared exactly INTEGER.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")
