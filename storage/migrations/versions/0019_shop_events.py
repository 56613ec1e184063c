"""Events to the shop: each recorded with the mirror change that caused it, and its deliveries.

``shop_event`` holds an event per change the shop is told of (an order Issued, Draft,
Error, Cancelled or removed, a sale the venue refused), numbered per order
(``order_seq``, unique per order) with its Standard Webhooks id and its payload;
``shop_delivery`` one row per event and configured shop endpoint, a leased queue with a
partial index of its in-flight rows by endpoint and due time (what a sender claims) and
another by endpoint, order and sequence (what keeps an order's events in order).
``storage.records.ShopEvent`` and ``ShopDelivery``. The downgrade drops both.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from storage.types import UTCDateTime

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The same text as storage.models.IN_FLIGHT: the claims repeat it term for term.
_IN_FLIGHT = sa.text("state IN ('pending', 'leased')")

_EVENT_TYPES = (
    "order.issued",
    "order.draft",
    "order.error",
    "order.cancelled",
    "order.removed",
    "order.submission_failed",
)
_DELIVERY_STATES = ("pending", "leased", "delivered", "dead")


def _enum(values: Sequence[str], name: str, length: int) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=length)


def _big_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the tables and their indexes."""
    op.create_table(
        "shop_event",
        sa.Column("id", _big_id(), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("venue_order_id", _big_id(), nullable=True),
        sa.Column("order_seq", sa.Integer(), nullable=False),
        sa.Column(
            "type",
            sa.Enum(
                *_EVENT_TYPES, name="type", native_enum=False, create_constraint=True, length=32
            ),
            nullable=False,
        ),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["venue_connection.id"],
            name=op.f("fk_shop_event_connection_id_venue_connection"),
        ),
        sa.ForeignKeyConstraint(
            ["venue_order_id"],
            ["venue_order.id"],
            name=op.f("fk_shop_event_venue_order_id_venue_order"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shop_event")),
        sa.UniqueConstraint("event_id", name=op.f("uq_shop_event_event_id")),
        sa.UniqueConstraint(
            "venue_order_id", "order_seq", name=op.f("uq_shop_event_venue_order_id_order_seq")
        ),
    )
    op.create_index("ix_shop_event_created_at", "shop_event", ["created_at"])
    op.create_table(
        "shop_delivery",
        sa.Column("id", _big_id(), nullable=False),
        sa.Column("shop_event_id", _big_id(), nullable=False),
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("venue_order_id", _big_id(), nullable=True),
        sa.Column("order_seq", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                *_DELIVERY_STATES,
                name="state",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("retry_from", UTCDateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(100), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(300), nullable=True),
        sa.Column("delivered_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["shop_event_id"],
            ["shop_event.id"],
            name=op.f("fk_shop_delivery_shop_event_id_shop_event"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shop_delivery")),
        sa.UniqueConstraint(
            "shop_event_id", "endpoint", name=op.f("uq_shop_delivery_shop_event_id_endpoint")
        ),
    )
    op.create_index(
        "ix_shop_delivery_in_flight",
        "shop_delivery",
        ["endpoint", "next_attempt_at"],
        postgresql_where=_IN_FLIGHT,
        sqlite_where=_IN_FLIGHT,
    )
    op.create_index(
        "ix_shop_delivery_in_flight_order",
        "shop_delivery",
        ["endpoint", "venue_order_id", "order_seq"],
        postgresql_where=_IN_FLIGHT,
        sqlite_where=_IN_FLIGHT,
    )
    op.create_index("ix_shop_delivery_state_endpoint", "shop_delivery", ["state", "endpoint"])


def downgrade() -> None:
    """Drop the tables (their indexes go with them)."""
    op.drop_table("shop_delivery")
    op.drop_table("shop_event")
