"""Migrations: from an empty database to the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from orders.inbox import store_notifications
from storage import migrate
from storage.models import Base, InboxSource, canonical_payload, inbox_dedup_key


def test_upgrade_from_empty_creates_every_table(engine: sa.Engine) -> None:
    """An upgrade of an empty database creates exactly the models' tables."""
    migrate.upgrade(engine)

    tables = set(sa.inspect(engine).get_table_names())
    assert tables == set(Base.metadata.tables) | {"alembic_version"}


def test_migrated_schema_matches_the_models(migrated_engine: sa.Engine) -> None:
    """Alembic's autogenerate finds no difference between the migrated schema and the models."""
    with migrated_engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)

    assert differences == []


def test_schema_comparison_notices_a_drift(migrated_engine: sa.Engine) -> None:
    """The comparison above can fail: a column added to the models shows up as a difference."""
    drifted = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["ledger_line"].append_column(sa.Column("shop_note", sa.Text()))
    drifted.tables["venue_order"].c.order_id.type = sa.String(80)

    with migrated_engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, drifted)

    # Column modifications come grouped in a list per column.
    kinds = [d[0] if isinstance(d, tuple) else d[0][0] for d in differences]
    assert kinds == ["add_column", "modify_type"]


def test_is_current_only_after_upgrade(engine: sa.Engine) -> None:
    """``is_current`` is false on an empty database and true once it is upgraded."""
    assert migrate.current_revision(engine) is None
    assert not migrate.is_current(engine)

    migrate.upgrade(engine)

    assert migrate.current_revision(engine) == migrate.head_revision()
    assert migrate.is_current(engine)


def test_upgrade_twice_changes_nothing(migrated_engine: sa.Engine) -> None:
    """Upgrading a database that is already current is a no-op, not an error."""
    migrate.upgrade(migrated_engine)

    assert migrate.is_current(migrated_engine)


def test_upgrade_by_url_disposes_its_own_engine(engine: sa.Engine) -> None:
    """``upgrade`` also takes a URL, and the caller's engine then sees the new schema."""
    migrate.upgrade(engine.url.render_as_string(hide_password=False))

    assert migrate.is_current(engine)


def test_downgrade_to_base_removes_every_table(migrated_engine: sa.Engine) -> None:
    """The initial revision's downgrade drops everything its upgrade created."""
    with migrated_engine.begin() as connection:
        command.downgrade(migrate.alembic_config(connection), "base")

    assert set(sa.inspect(migrated_engine).get_table_names()) <= {"alembic_version"}
    assert migrate.current_revision(migrated_engine) is None


def test_check_constraints_exist_in_the_database(migrated_engine: sa.Engine) -> None:
    """The migration creates the models' named CHECK constraints, which autogenerate ignores."""
    inspector = sa.inspect(migrated_engine)

    names = {check["name"] for check in inspector.get_check_constraints("inbox")}

    assert {"ck_inbox_state", "ck_inbox_source"} <= names


def _outbox_row(connection: sa.Connection, ledger_line_id: int | None) -> None:
    connection.execute(
        sa.text(
            "INSERT INTO outbox (connection_id, ledger_line_id, operation, state, attempts,"
            " next_attempt_at, created_at) VALUES (1, :line, 'delete', 'pending', 0, :at, :at)"
        ),
        {"line": ledger_line_id, "at": "2026-05-27 12:00:00+00:00"},
    )


def test_0002_keeps_outbox_rows_and_lets_them_go_without_a_ledger_line(
    engine: sa.Engine,
) -> None:
    """Upgrading from 0001 keeps the outbox's rows and CHECKs; a row may then have no sale."""
    migrate.upgrade(engine, "0001")
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO venue_connection (id, name, created_at) VALUES (1, 'v', :at)"),
            {"at": "2026-05-27 12:00:00+00:00"},
        )
        connection.execute(
            sa.text(
                "INSERT INTO ledger_line (id, connection_id, partner_id, shop_reference,"
                " reference_key, sold_at, quantity, amount, currency, amount_includes_vat,"
                " state, source, created_at, updated_at) VALUES (1, 1, 'p', 'S-1', 'S-1', :at,"
                " 1, 0, 'DKK', true, 'active', 'import', :at, :at)"
            ),
            {"at": "2026-05-27 12:00:00+00:00"},
        )
        _outbox_row(connection, 1)

    migrate.upgrade(engine)

    with engine.begin() as connection:
        _outbox_row(connection, None)
        lines = connection.scalars(sa.text("SELECT ledger_line_id FROM outbox ORDER BY id")).all()
    assert lines == [1, None]
    inspector = sa.inspect(engine)
    assert {"ck_outbox_state", "ck_outbox_operation"} <= {
        check["name"] for check in inspector.get_check_constraints("outbox")
    }
    assert "job_run" in inspector.get_table_names()
    assert "job_lease" not in inspector.get_table_names()


def test_0002_downgrade_refuses_outbox_rows_without_a_ledger_line(
    migrated_engine: sa.Engine,
) -> None:
    """Revision 0001 cannot hold an outbox row without a sale: the downgrade says so."""
    with migrated_engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO venue_connection (id, name, created_at) VALUES (1, 'v', :at)"),
            {"at": "2026-05-27 12:00:00+00:00"},
        )
        _outbox_row(connection, None)

    with pytest.raises(RuntimeError, match="1 outbox row"), migrated_engine.begin() as connection:
        command.downgrade(migrate.alembic_config(connection), "0001")

    assert migrate.is_current(migrated_engine)


def test_0005_rekeys_the_inbox_so_a_repeat_of_an_older_notification_is_still_one(
    engine: sa.Engine,
) -> None:
    """Keys stored before 0005 are recomputed; a repeat after the upgrade is not stored."""
    migrate.upgrade(engine, "0004")
    webhook: dict[str, Any] = {
        "eventName": "ota_cm_order_processed",
        "timestamp": "2026-05-15T09:31:05Z",
        "payload": {"orderId": "o-1", "status": "Issued"},
    }
    lookup: dict[str, Any] = {"orderId": "o-2", "reason": "feed", "rowVersion": 7}
    at = "2026-05-15 09:31:06.000000"
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO venue_connection (id, name, created_at) VALUES (1, 'v', :at)"),
            {"at": at},
        )
        for row_id, payload in ((1, webhook), (2, lookup)):
            text = canonical_payload(payload)
            connection.execute(
                sa.text(
                    "INSERT INTO inbox (id, connection_id, source, event_name, order_id,"
                    " received_at, payload, dedup_key, state, attempts, next_attempt_at)"
                    " VALUES (:id, 1, 'webhook', 'e', :order, :at, :payload, :key, 'done', 1, :at)"
                ),
                {
                    "id": row_id,
                    "order": f"o-{row_id}",
                    "at": at,
                    "payload": text,
                    "key": hashlib.sha256(text.encode()).hexdigest(),  # the key before 0005
                },
            )

    migrate.upgrade(engine)

    def keys() -> dict[int, str]:
        with engine.connect() as connection:
            return dict(connection.execute(sa.text("SELECT id, dedup_key FROM inbox")).all())

    new_webhook_key = inbox_dedup_key(canonical_payload(webhook), webhook["timestamp"])
    assert new_webhook_key.startswith("20260515093105")
    assert keys() == {1: new_webhook_key, 2: inbox_dedup_key(canonical_payload(lookup))}
    with engine.begin() as connection:
        repeat = store_notifications(
            connection,
            [
                {
                    "connection_id": 1,
                    "source": InboxSource.WEBHOOK,
                    "event_name": "ota_cm_order_processed",
                    "order_id": "o-1",
                    "buy_from_order_reference": None,
                    "notified_status": "Issued",
                    "notified_at": dt.datetime(2026, 5, 15, 9, 31, 5, tzinfo=dt.UTC),
                    "received_at": dt.datetime(2026, 5, 15, 9, 40, tzinfo=dt.UTC),
                    "payload": webhook | {"clientState": "rotated"},
                }
            ],
        )
    assert (repeat.stored, repeat.duplicates) == (0, 1)

    with engine.begin() as connection:
        command.downgrade(migrate.alembic_config(connection), "0004")
    plain = {
        row_id: hashlib.sha256(canonical_payload(payload).encode()).hexdigest()
        for row_id, payload in ((1, webhook), (2, lookup))
    }
    assert keys() == plain


def test_0006_keeps_each_orders_first_webhook_time_and_drops_the_inbox_index_by_order(
    engine: sa.Engine,
) -> None:
    """0006 fills first_notified_at from the earliest webhook row (polls aside)."""
    migrate.upgrade(engine, "0005")
    at = "2026-05-15 09:31:06.000000"
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO venue_connection (id, name, created_at) VALUES (1, 'v', :at)"),
            {"at": at},
        )
        for order in ("o-1", "o-2"):
            connection.execute(
                sa.text(
                    "INSERT INTO venue_order (connection_id, order_id, partner_id,"
                    " sell_to_order_reference, reference_key, status, status_changed_at,"
                    " first_seen_at, updated_at)"
                    " VALUES (1, :order, 'p', 'r', :order, 'Issued', :at, :at, :at)"
                ),
                {"order": order, "at": at},
            )
        rows = [
            (1, "webhook", "o-1", "2026-05-15 09:31:05.000000"),
            (2, "webhook", "o-1", "2026-05-15 09:30:05.000000"),
            (3, "poll", "o-1", "2026-05-15 09:29:05.000000"),
            (4, "poll", "o-2", "2026-05-15 09:29:05.000000"),
        ]
        for row_id, source, order, notified in rows:
            connection.execute(
                sa.text(
                    "INSERT INTO inbox (id, connection_id, source, event_name, order_id,"
                    " notified_at, received_at, payload, dedup_key, state, attempts,"
                    " next_attempt_at)"
                    " VALUES (:id, 1, :source, 'e', :order, :notified, :at, '{}', :key, 'done',"
                    " 1, :at)"
                ),
                {
                    "id": row_id,
                    "source": source,
                    "order": order,
                    "notified": notified,
                    "at": at,
                    "key": f"k{row_id}",
                },
            )

    migrate.upgrade(engine)

    def first_notified() -> dict[str, Any]:
        with engine.connect() as connection:
            table = Base.metadata.tables["venue_order"]
            query = sa.select(table.c.order_id, table.c.first_notified_at)
            return {order: notified for order, notified in connection.execute(query)}

    assert first_notified() == {
        "o-1": dt.datetime(2026, 5, 15, 9, 30, 5, tzinfo=dt.UTC),
        "o-2": None,
    }
    assert "ix_inbox_connection_id_order_id" not in {
        index["name"] for index in sa.inspect(engine).get_indexes("inbox")
    }

    with engine.begin() as connection:
        command.downgrade(migrate.alembic_config(connection), "0005")
    inspector = sa.inspect(engine)
    assert "ix_inbox_connection_id_order_id" in {
        index["name"] for index in inspector.get_indexes("inbox")
    }
    columns = {column["name"] for column in inspector.get_columns("venue_order")}
    assert "first_notified_at" not in columns


def test_0007_drops_the_inbox_foreign_key_and_keeps_every_row(engine: sa.Engine) -> None:
    """The inbox is copied whole (SQLite rebuilds the table) and goes on numbering its rows."""
    migrate.upgrade(engine, "0006")
    at = "2026-05-15 09:31:06.000000"
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO venue_connection (id, name, created_at) VALUES (1, 'v', :at)"),
            {"at": at},
        )
        connection.execute(
            sa.text(
                "INSERT INTO inbox (connection_id, source, event_name, order_id,"
                " notified_at, received_at, payload, dedup_key, state, attempts,"
                " next_attempt_at)"
                " VALUES (1, 'webhook', 'e', 'o-1', :at, :at, :payload, 'k7', 'pending',"
                " 0, :at)"
            ),
            {"at": at, "payload": '{"a":1}'},
        )

    def inbox_rows() -> list[tuple[Any, ...]]:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sa.text("SELECT * FROM inbox"))]

    before = inbox_rows()

    migrate.upgrade(engine)

    assert inbox_rows() == before
    assert sa.inspect(engine).get_foreign_keys("inbox") == []
    stored = store_notifications(
        engine,
        [
            {
                "connection_id": 1,
                "source": InboxSource.WEBHOOK,
                "event_name": "e",
                "order_id": "o-2",
                "buy_from_order_reference": None,
                "notified_status": None,
                "notified_at": None,
                "received_at": dt.datetime(2026, 5, 15, 9, 32, tzinfo=dt.UTC),
                "payload": {"b": 2},
            }
        ],
    )
    assert stored.ids[0] > before[0][0]

    with engine.begin() as connection:
        command.downgrade(migrate.alembic_config(connection), "0006")
    keys = sa.inspect(engine).get_foreign_keys("inbox")
    assert [(key["name"], key["referred_table"]) for key in keys] == [
        ("fk_inbox_connection_id_venue_connection", "venue_connection")
    ]
    assert len(inbox_rows()) == 2


def test_0008_widens_the_venues_currency_columns_to_ten(engine: sa.Engine) -> None:
    """Business Central's Currency.Code is a Code[10] (CMOrderWallet CurrencyCode): the
    columns holding a venue's currency take ten characters, and narrow back on downgrade."""

    def widths() -> dict[str, int | None]:
        inspector = sa.inspect(engine)
        return {
            f"{table}.{column['name']}": getattr(column["type"], "length", None)
            for table, name in (
                ("wallet", "currency_code"),
                ("recon_total", "currency"),
                ("recon_exception", "currency"),
                ("ledger_line", "currency"),
            )
            for column in inspector.get_columns(table)
            if column["name"] == name
        }

    migrate.upgrade(engine, "0007")
    assert set(widths().values()) == {3}

    migrate.upgrade(engine, "0008")
    assert widths() == {
        "wallet.currency_code": 10,
        "recon_total.currency": 10,
        "recon_exception.currency": 10,
        "ledger_line.currency": 3,
    }

    with engine.begin() as connection:
        command.downgrade(migrate.alembic_config(connection), "0007")
    assert set(widths().values()) == {3}


def test_0010_records_each_feed_cursor_as_its_first_mark(engine: sa.Engine) -> None:
    """The feed's overlap is a time (APIRequest GetRecords: rowVersion is the database's
    row version): each existing cursor becomes the first mark of its history, recorded
    at its updated_at; the downgrade drops the history."""
    migrate.upgrade(engine, "0009")
    at = "2026-05-15 09:31:06.000000"
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO venue_connection (id, name, created_at) VALUES (1, 'v', :at)"),
            {"at": at},
        )
        connection.execute(
            sa.text(
                "INSERT INTO feed_cursor (connection_id, partner_id, last_row_version,"
                " updated_at) VALUES (1, 'p-1', 9007199254740993, :at)"
            ),
            {"at": at},
        )

    migrate.upgrade(engine)

    table = Base.metadata.tables["feed_mark"]
    with engine.connect() as connection:
        rows = connection.execute(sa.select(table)).all()
    assert [tuple(row) for row in rows] == [
        (1, "p-1", 9007199254740993, dt.datetime(2026, 5, 15, 9, 31, 6, tzinfo=dt.UTC))
    ]

    with engine.begin() as connection:
        command.downgrade(migrate.alembic_config(connection), "0009")
    assert "feed_mark" not in sa.inspect(engine).get_table_names()


def test_0014_fills_the_visit_dates_the_erasure_of_personal_data_selects_by(
    engine: sa.Engine,
) -> None:
    """An order's last visit date is its lines' latest; a sale's, its request's latest,
    a scheduled component's included; an order without lines and an imported sale (no
    request) have none. Nothing is erased yet."""
    migrate.upgrade(engine, "0011")
    at = "2026-05-15 09:31:06.000000"
    request = {
        "items": [
            {"visitDate": "2026-06-01"},
            {
                "visitDate": "2026-06-02",
                "wallet": {"componentSchedule": [{"visitDate": "2026-06-09"}]},
            },
        ]
    }
    order = (
        "INSERT INTO venue_order (id, connection_id, order_id, partner_id,"
        " sell_to_order_reference, reference_key, status, status_changed_at, first_seen_at,"
        " updated_at) VALUES (:id, 1, :order_id, 'p', :ref, :ref, 'Issued', :at, :at, :at)"
    )
    sale = (
        "INSERT INTO ledger_line (id, connection_id, partner_id, shop_reference,"
        " reference_key, sold_at, quantity, amount, currency, amount_includes_vat, state,"
        " source, request, created_at, updated_at) VALUES (:id, 1, 'p', :ref, :ref, :at, 1,"
        " 1000000, 'DKK', true, 'active', :source, :request, :at, :at)"
    )
    item = (
        "INSERT INTO order_item (venue_order_id, line_no, item_number, is_package, quantity,"
        " visit_date) VALUES (1, :line_no, '31001', false, 1, :visit)"
    )
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO venue_connection (id, name, created_at) VALUES (1, 'v', :at)"),
            {"at": at},
        )
        connection.execute(sa.text(order), {"id": 1, "order_id": "o-1", "ref": "A", "at": at})
        connection.execute(sa.text(order), {"id": 2, "order_id": "o-2", "ref": "B", "at": at})
        for line_no, visit in ((1, "2026-07-01"), (2, "2026-07-03"), (3, None)):
            connection.execute(sa.text(item), {"line_no": line_no, "visit": visit})
        insert_sale = sa.text(sale).bindparams(sa.bindparam("request", type_=sa.JSON))
        connection.execute(
            insert_sale, {"id": 1, "ref": "A", "at": at, "source": "submit", "request": request}
        )
        connection.execute(
            insert_sale, {"id": 2, "ref": "B", "at": at, "source": "import", "request": None}
        )

    migrate.upgrade(engine)

    with engine.connect() as connection:
        for table in ("venue_order", "ledger_line"):
            rows = connection.execute(
                sa.select(
                    sa.column("id"),
                    sa.column("last_visit_date", sa.Date),
                    sa.column("personal_data_erased_at"),
                ).select_from(sa.table(table))
            ).all()
            expected = {
                "venue_order": [(1, dt.date(2026, 7, 3), None), (2, None, None)],
                "ledger_line": [(1, dt.date(2026, 6, 9), None), (2, None, None)],
            }[table]
            assert sorted(tuple(row) for row in rows) == expected
