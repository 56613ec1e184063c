"""The initial schema: ledger, inbox and outbox, the order mirror, heartbeat, reconciliation.

Written by hand from the models of the time, with plain column types so that it never
changes when ``storage.types`` does: timestamps are ``timestamp with time zone``
(``UTCDateTime``), money is a ``BIGINT`` of micro-units (``Money``), and enum-like
columns are strings with a named CHECK constraint. Names follow the models' naming
convention.

Revision ID: 0001
Revises:
Create Date: 2026-05-20
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (
    "venue_connection",
    "job_lease",
    "feed_cursor",
    "ledger_line",
    "inbox",
    "outbox",
    "venue_order",
    "order_item",
    "wallet",
    "asset",
    "status_change",
    "recon_run",
    "recon_total",
    "recon_exception",
    "exception_event",
)

ORDER_STATUSES = ("Submitted", "Scheduled", "Processing", "Draft", "Issued", "Error", "Cancelled")


def _big_id() -> sa.types.TypeEngine[int]:
    # SQLite only auto-increments a column declared exactly INTEGER.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _money() -> sa.BigInteger:
    # Micro-units (storage.types.Money).
    return sa.BigInteger()


def _id(table: str) -> list[sa.schema.SchemaItem]:
    return [
        sa.Column("id", _big_id(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
    ]


def _ref(
    table: str,
    column: str,
    target: str,
    *,
    big: bool = True,
    nullable: bool = False,
    ondelete: str | None = None,
) -> list[sa.schema.SchemaItem]:
    """A foreign key column to ``target.id`` and its named constraint."""
    return [
        sa.Column(column, _big_id() if big else sa.Integer(), nullable=nullable),
        sa.ForeignKeyConstraint(
            [column],
            [f"{target}.id"],
            name=op.f(f"fk_{table}_{column}_{target}"),
            ondelete=ondelete,
        ),
    ]


def _connection(table: str) -> list[sa.schema.SchemaItem]:
    return _ref(table, "connection_id", "venue_connection", big=False)


def _one_of(table: str, column: str, values: Sequence[str]) -> sa.CheckConstraint:
    """The CHECK that keeps an enum-like string column to its values."""
    listed = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f'"{column}" IN ({listed})', name=op.f(f"ck_{table}_{column}"))


def _unique(table: str, *columns: str) -> sa.UniqueConstraint:
    return sa.UniqueConstraint(*columns, name=op.f(f"uq_{table}_{'_'.join(columns)}"))


def _index(table: str, *columns: str) -> None:
    op.create_index(op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns))


def _lease_columns() -> list[sa.schema.SchemaItem]:
    return [
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(100), nullable=True),
        sa.Column("lease_expires_at", _utc(), nullable=True),
        sa.Column("next_attempt_at", _utc(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
    ]


def upgrade() -> None:
    """Create every table of the initial schema."""
    op.create_table(
        "venue_connection",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_venue_connection")),
        _unique("venue_connection", "name"),
    )
    op.create_table(
        "job_lease",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("expires_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_job_lease")),
    )
    op.create_table(
        "feed_cursor",
        *_connection("feed_cursor"),
        sa.Column("partner_id", sa.String(64), nullable=False),
        sa.Column("last_row_version", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("connection_id", "partner_id", name=op.f("pk_feed_cursor")),
    )

    _upgrade_ledger_and_queues()
    _upgrade_mirror()
    _upgrade_reconciliation()


def _upgrade_ledger_and_queues() -> None:
    op.create_table(
        "ledger_line",
        *_id("ledger_line"),
        *_connection("ledger_line"),
        sa.Column("partner_id", sa.String(64), nullable=False),
        sa.Column("shop_reference", sa.String(100), nullable=False),
        sa.Column("reference_key", sa.String(100), nullable=False),
        sa.Column("sold_at", _utc(), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("amount", _money(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("amount_includes_vat", sa.Boolean(), nullable=False),
        sa.Column("payment_reference", sa.String(100), nullable=True),
        sa.Column("venue_reference", sa.String(50), nullable=True),
        sa.Column("external_reference_numbers", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("request", sa.JSON(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        _unique("ledger_line", "connection_id", "partner_id", "reference_key"),
        sa.CheckConstraint("quantity >= 0", name=op.f("ck_ledger_line_quantity_not_negative")),
        _one_of("ledger_line", "state", ("active", "cancelled", "refunded")),
        _one_of("ledger_line", "source", ("import", "submit")),
    )
    _index("ledger_line", "connection_id", "sold_at")

    op.create_table(
        "inbox",
        *_id("inbox"),
        *_connection("inbox"),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("event_name", sa.String(100), nullable=False),
        sa.Column("order_id", sa.String(64), nullable=True),
        sa.Column("buy_from_order_reference", sa.String(50), nullable=True),
        sa.Column("notified_status", sa.String(32), nullable=True),
        sa.Column("notified_at", _utc(), nullable=True),
        sa.Column("received_at", _utc(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("dedup_key", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        *_lease_columns(),
        sa.Column("processed_at", _utc(), nullable=True),
        _unique("inbox", "connection_id", "dedup_key"),
        _one_of("inbox", "source", ("webhook", "poll", "feed")),
        _one_of("inbox", "state", ("pending", "leased", "done", "dead")),
    )
    _index("inbox", "state", "next_attempt_at")
    _index("inbox", "connection_id", "order_id")

    op.create_table(
        "outbox",
        *_id("outbox"),
        *_connection("outbox"),
        *_ref("outbox", "ledger_line_id", "ledger_line"),
        sa.Column("operation", sa.String(16), nullable=False),
        sa.Column("request", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        *_lease_columns(),
        sa.Column("order_id", sa.String(64), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("sent_at", _utc(), nullable=True),
        _one_of("outbox", "operation", ("create", "replace", "confirm", "delete")),
        _one_of("outbox", "state", ("pending", "leased", "sent", "failed", "dead")),
    )
    _index("outbox", "state", "next_attempt_at")
    _index("outbox", "ledger_line_id")


def _upgrade_mirror() -> None:
    op.create_table(
        "venue_order",
        *_id("venue_order"),
        *_connection("venue_order"),
        sa.Column("order_id", sa.String(64), nullable=False),
        sa.Column("partner_id", sa.String(64), nullable=False),
        sa.Column("sell_to_order_reference", sa.String(100), nullable=False),
        sa.Column("reference_key", sa.String(100), nullable=False),
        sa.Column("buy_from_order_reference", sa.String(50), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_message", sa.Text(), nullable=True),
        sa.Column("status_changed_at", _utc(), nullable=False),
        sa.Column("received_at", _utc(), nullable=True),
        sa.Column("sell_to_email", sa.Text(), nullable=True),
        sa.Column("sell_to_name", sa.Text(), nullable=True),
        sa.Column("sell_to_language", sa.String(16), nullable=True),
        sa.Column("payment_reference", sa.String(100), nullable=True),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("manifest_url", sa.Text(), nullable=True),
        sa.Column("row_version", sa.BigInteger(), nullable=True),
        sa.Column("items_digest", sa.String(64), nullable=True),
        sa.Column("removed_at", _utc(), nullable=True),
        sa.Column("first_seen_at", _utc(), nullable=False),
        sa.Column("fetched_at", _utc(), nullable=True),
        sa.Column("updated_at", _utc(), nullable=False),
        _unique("venue_order", "connection_id", "order_id"),
        _one_of("venue_order", "status", ORDER_STATUSES),
    )
    _index("venue_order", "connection_id", "partner_id", "reference_key")
    _index("venue_order", "connection_id", "buy_from_order_reference")
    _index("venue_order", "connection_id", "status")

    op.create_table(
        "order_item",
        *_id("order_item"),
        *_ref("order_item", "venue_order_id", "venue_order", ondelete="CASCADE"),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("item_number", sa.String(50), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("is_package", sa.Boolean(), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("visit_date", sa.Date(), nullable=True),
        sa.Column("visit_time", sa.Time(), nullable=True),
        sa.Column("sell_to_name", sa.Text(), nullable=True),
        sa.Column("sell_to_email", sa.Text(), nullable=True),
        sa.Column("sell_to_language", sa.String(16), nullable=True),
        _unique("order_item", "venue_order_id", "line_no"),
    )
    op.create_table(
        "wallet",
        *_id("wallet"),
        *_ref("wallet", "order_item_id", "order_item", ondelete="CASCADE"),
        sa.Column("seq_no", sa.Integer(), nullable=False),
        sa.Column("wallet_id", sa.String(64), nullable=True),
        sa.Column("wallet_reference_number", sa.String(50), nullable=True),
        sa.Column("external_reference_number", sa.String(100), nullable=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("issued_at", _utc(), nullable=True),
        sa.Column("unit_price_excl_vat", _money(), nullable=True),
        sa.Column("unit_price_incl_vat", _money(), nullable=True),
        sa.Column("currency_code", sa.String(3), nullable=True),
        sa.Column("manifest_url", sa.Text(), nullable=True),
        _unique("wallet", "order_item_id", "seq_no"),
    )
    _index("wallet", "wallet_reference_number")
    _index("wallet", "external_reference_number")

    op.create_table(
        "asset",
        *_id("asset"),
        *_ref("asset", "wallet_id", "wallet", ondelete="CASCADE"),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("asset_row_id", sa.String(64), nullable=True),
        sa.Column("type", sa.String(32), nullable=True),
        sa.Column("asset_id", sa.String(64), nullable=True),
        sa.Column("reference_number", sa.String(100), nullable=True),
        sa.Column("item_number", sa.String(50), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        _unique("asset", "wallet_id", "position"),
    )
    _index("asset", "reference_number")

    op.create_table(
        "status_change",
        *_id("status_change"),
        *_ref("status_change", "venue_order_id", "venue_order", ondelete="CASCADE"),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("status_message", sa.Text(), nullable=True),
        sa.Column("observed_at", _utc(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        *_ref("status_change", "inbox_id", "inbox", nullable=True, ondelete="SET NULL"),
        _one_of("status_change", "status", ORDER_STATUSES),
        _one_of(
            "status_change",
            "source",
            (
                "webhook",
                "poll",
                "feed",
                "fetch",
                "submit",
                "replace",
                "confirm",
                "delete",
                "import",
            ),
        ),
    )
    _index("status_change", "venue_order_id", "observed_at")
    _index("status_change", "inbox_id")


def _upgrade_reconciliation() -> None:
    op.create_table(
        "recon_run",
        *_id("recon_run"),
        *_connection("recon_run"),
        sa.Column("started_at", _utc(), nullable=False),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.Column("period_from", _utc(), nullable=False),
        sa.Column("period_to", _utc(), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(100), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _one_of("recon_run", "trigger", ("manual", "scheduled")),
        _one_of("recon_run", "state", ("running", "finished", "failed")),
    )
    _index("recon_run", "connection_id", "started_at")

    op.create_table(
        "recon_total",
        *_id("recon_total"),
        *_ref("recon_total", "recon_run_id", "recon_run", ondelete="CASCADE"),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("category", sa.String(32), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("ledger_amount", _money(), nullable=False),
        sa.Column("venue_amount", _money(), nullable=False),
        _unique("recon_total", "recon_run_id", "currency", "category"),
    )

    op.create_table(
        "recon_exception",
        *_id("recon_exception"),
        *_connection("recon_exception"),
        sa.Column("category", sa.String(32), nullable=False),
        sa.Column("subject_key", sa.String(100), nullable=False),
        *_ref(
            "recon_exception", "ledger_line_id", "ledger_line", nullable=True, ondelete="SET NULL"
        ),
        *_ref(
            "recon_exception", "venue_order_id", "venue_order", nullable=True, ondelete="SET NULL"
        ),
        sa.Column("currency", sa.String(3), nullable=True),
        sa.Column("ledger_amount", _money(), nullable=True),
        sa.Column("venue_amount", _money(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        *_ref("recon_exception", "first_seen_run_id", "recon_run"),
        *_ref("recon_exception", "last_seen_run_id", "recon_run"),
        *_ref("recon_exception", "closed_run_id", "recon_run", nullable=True),
        sa.Column("first_seen_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        _unique("recon_exception", "connection_id", "category", "subject_key"),
        _one_of("recon_exception", "state", ("open", "resolved", "accepted", "closed")),
    )
    _index("recon_exception", "connection_id", "state")

    op.create_table(
        "exception_event",
        *_id("exception_event"),
        *_ref("exception_event", "recon_exception_id", "recon_exception", ondelete="CASCADE"),
        *_ref("exception_event", "recon_run_id", "recon_run", nullable=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(100), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("at", _utc(), nullable=False),
        _one_of(
            "exception_event",
            "action",
            ("opened", "seen", "closed", "reopened", "resolved", "accepted"),
        ),
    )
    _index("exception_event", "recon_exception_id", "at")


def downgrade() -> None:
    """Drop every table of the initial schema (and all its data)."""
    for table in reversed(TABLES):
        op.drop_table(table)
