"""Reconciliation exceptions know when their subject happened; subject keys grow to 200.

``recon_exception.subject_at`` is the time of what an exception is about: the sale's
``sold_at`` for a ledger-side exception, the order's ``received_at`` (or
``first_seen_at``) for an orphan. A run closes the exceptions it did not find again only
among those whose subject lies in its period, so a run over one week never closes what
another week found. ``subject_key`` (``ledger:<partner id>:<reference key>``) can exceed
100 characters: 36 for the partner id plus up to 100 for the reference key.

On SQLite the table is rebuilt (batch mode) to change the column's length.

Revision ID: 0003
Revises: 0002
Create Date: 2026-06-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``recon_exception.subject_at`` (and its index); widen ``subject_key``."""
    with op.batch_alter_table("recon_exception") as batch:
        batch.add_column(sa.Column("subject_at", sa.DateTime(timezone=True), nullable=True))
        batch.alter_column(
            "subject_key", existing_type=sa.String(100), type_=sa.String(200), nullable=False
        )
        batch.create_index(
            op.f("ix_recon_exception_connection_id_subject_at"), ["connection_id", "subject_at"]
        )


def downgrade() -> None:
    """Drop ``subject_at``; subject keys back to 100 characters.

    Raises:
        RuntimeError: a subject key is longer than 100 characters; it is not cut silently.
    """
    too_long = op.get_bind().scalar(
        sa.text("SELECT count(*) FROM recon_exception WHERE length(subject_key) > 100")
    )
    if too_long:
        raise RuntimeError(
            f"cannot downgrade: {too_long} reconciliation exception(s) have a subject key "
            "longer than 100 characters; revision 0002 cannot hold them"
        )
    with op.batch_alter_table("recon_exception") as batch:
        batch.drop_index(op.f("ix_recon_exception_connection_id_subject_at"))
        batch.alter_column(
            "subject_key", existing_type=sa.String(200), type_=sa.String(100), nullable=False
        )
        batch.drop_column("subject_at")
