"""Currencies the venue writes hold up to ten characters.

The venue's wallets carry the company's currency code, a Business Central
``Currency.Code`` (CMOrderWallet ``CurrencyCode``, Code[10]): usually an ISO 4217 code,
but nothing keeps a company from naming its currency otherwise. A longer code did not fit
``wallet.currency_code`` (three characters), so every order of such a venue was
dead-lettered instead of mirrored. The columns that may hold a venue's currency widen to
ten: ``wallet.currency_code``, and ``recon_total.currency`` / ``recon_exception.currency``
(an orphan order counts in its wallets' currency). The ledger's currency stays an ISO
4217 code of three letters: the shop writes it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (
    ("wallet", "currency_code", True),
    ("recon_total", "currency", False),
    ("recon_exception", "currency", True),
)


def upgrade() -> None:
    """Widen the venue's currency columns to ten characters; every value is kept."""
    _set_width(3, 10)


def downgrade() -> None:
    """Narrow them back to three (PostgreSQL refuses while a longer code is stored)."""
    _set_width(10, 3)


def _set_width(old: int, new: int) -> None:
    for table, column, nullable in _COLUMNS:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(
                column,
                existing_type=sa.String(old),
                type_=sa.String(new),
                existing_nullable=nullable,
            )
