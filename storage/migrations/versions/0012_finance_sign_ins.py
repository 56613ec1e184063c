"""Finance sign-ins are kept server-side, and sign-in attempts are counted.

``finance_session`` holds each sign-in to the finance pages (found by the SHA-256 of the
cookie's token), so that signing out, an idle time, an absolute lifetime, a changed
password or ``otacm finance sign-out-all`` ends it for every copy of the cookie.
``sign_in_attempt`` holds recent attempts, so that every process of a deployment
throttles wrong passwords per user and per address together. Both start empty: signed-in
users sign in again once. The downgrade drops both tables.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from storage.types import UTCDateTime

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``finance_session`` and ``sign_in_attempt``."""
    op.create_table(
        "finance_session",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("user_name", sa.String(100), nullable=False),
        sa.Column("password_fingerprint", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_finance_session")),
    )
    op.create_index(op.f("ix_finance_session_user_name"), "finance_session", ["user_name"])
    op.create_index(op.f("ix_finance_session_expires_at"), "finance_session", ["expires_at"])
    op.create_table(
        "sign_in_attempt",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_name", sa.String(100), nullable=False),
        sa.Column("address", sa.String(100), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sign_in_attempt")),
    )
    op.create_index(op.f("ix_sign_in_attempt_user_name_at"), "sign_in_attempt", ["user_name", "at"])
    op.create_index(op.f("ix_sign_in_attempt_address_at"), "sign_in_attempt", ["address", "at"])
    op.create_index(op.f("ix_sign_in_attempt_at"), "sign_in_attempt", ["at"])


def downgrade() -> None:
    """Drop ``sign_in_attempt`` and ``finance_session``."""
    op.drop_table("sign_in_attempt")
    op.drop_table("finance_session")
