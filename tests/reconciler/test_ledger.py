"""`otacm ledger import` and :mod:`reconciler.ledger`: the shop's export into the ledger,
idempotently, all or nothing, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session, sessionmaker

from orders.outbox import record_submission
from otacm.cli import main
from reconciler.ledger import import_ledger
from reconciler.ledger_file import COLUMNS, LedgerFileError
from storage.models import LedgerLine, LedgerSource, LedgerState, ensure_connection
from venue.models import OrderRequest

PARTNER = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)

HEADER = "partner_id,reference,sold_at,quantity,amount,currency,amount_includes_vat,state\n"


def sale(reference: str, **changes: Any) -> dict[str, Any]:
    """One row of the export, as JSON lines would have it."""
    return {
        "partner_id": PARTNER,
        "reference": reference,
        "sold_at": "2025-02-27T09:30:00+01:00",
        "quantity": 2,
        "amount": "200.00",
        "currency": "DKK",
        **changes,
    }


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, lines: list[str], header: str = HEADER) -> Path:
    path.write_text(header + "".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def connection_id(sessions: sessionmaker[Session]) -> int:
    with sessions.begin() as session:
        return ensure_connection(session, "default")


def lines(sessions: sessionmaker[Session]) -> dict[str, LedgerLine]:
    with sessions() as session:
        return {line.reference_key: line for line in session.scalars(sa.select(LedgerLine))}


def test_csv_is_imported_exactly(
    sessions: sessionmaker[Session], connection_id: int, tmp_path: Path
) -> None:
    """A CSV (with a BOM, optional columns) becomes ledger lines: UTC times, exact amounts."""
    path = tmp_path / "sales.csv"
    header = ",".join(COLUMNS) + "\n"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + (
            header
            + f"{{{PARTNER.upper()}}}, Shop-1 ,2025-02-27T09:30:00+01:00,3,35.956,dkk,no,"
            + "PAY-1,VEN-1,A1; A2,refunded\n"
            + f"{PARTNER},shop-2,2025-02-27T23:00:00Z,0,0.10,EUR,,,,,\n"
        ).encode()
    )
    result = import_ledger(sessions, path, connection_id=connection_id, now=T0)
    assert (result.inserted, result.updated, result.unchanged, result.bad) == (2, 0, 0, 0)
    found = lines(sessions)
    first, second = found["SHOP-1"], found["SHOP-2"]
    assert first.partner_id == PARTNER
    assert first.shop_reference == "Shop-1"
    assert first.sold_at == dt.datetime(2025, 2, 27, 8, 30, tzinfo=dt.UTC)
    assert (first.quantity, first.amount, first.currency) == (3, Decimal("35.956"), "DKK")
    assert first.amount_includes_vat is False
    assert (first.payment_reference, first.venue_reference) == ("PAY-1", "VEN-1")
    assert first.external_reference_numbers == ["A1", "A2"]
    assert first.external_references_key == "A1\nA2"
    assert first.state is LedgerState.REFUNDED
    assert first.source is LedgerSource.IMPORT
    assert first.created_at == first.updated_at == T0
    assert second.amount_includes_vat is True
    assert second.state is LedgerState.ACTIVE
    assert second.payment_reference is None
    assert second.external_reference_numbers is None
    assert second.external_references_key is None
    assert (second.quantity, second.amount) == (0, Decimal("0.10"))


def test_jsonl_is_imported_and_reimport_changes_nothing(
    sessions: sessionmaker[Session], connection_id: int, tmp_path: Path
) -> None:
    """JSON lines (numbers exact, lists as lists) import; the same file again is unchanged."""
    path = tmp_path / "sales.ndjson"
    path.write_text(
        json.dumps(sale("J-1"))
        + "\n\n"
        + json.dumps(
            {
                "partner_id": PARTNER,
                "reference": "J-2",
                "sold_at": "2025-02-27T10:00:00Z",
                "quantity": 1,
                "amount": "@AMOUNT@",
                "currency": "eur",
                "amount_includes_vat": False,
                "external_reference_numbers": ["X-1"],
                "state": "cancelled",
            }
        ).replace('"@AMOUNT@"', "12.30")  # a JSON number, not text
        + "\n"
    )
    first = import_ledger(sessions, path, connection_id=connection_id, now=T0)
    assert (first.inserted, first.updated, first.unchanged) == (2, 0, 0)
    j2 = lines(sessions)["J-2"]
    assert (j2.amount, j2.currency, j2.amount_includes_vat) == (Decimal("12.30"), "EUR", False)
    assert j2.external_reference_numbers == ["X-1"]
    assert j2.state is LedgerState.CANCELLED

    again = import_ledger(sessions, path, connection_id=connection_id, now=T0 + dt.timedelta(1))
    assert (again.inserted, again.updated, again.unchanged, again.bad) == (0, 0, 2, 0)
    assert {line.updated_at for line in lines(sessions).values()} == {T0}
    assert len(lines(sessions)) == 2


def test_a_changed_row_updates_its_sale_only(
    sessions: sessionmaker[Session], connection_id: int, tmp_path: Path
) -> None:
    """A re-import with one sale changed updates that one; blank optional fields keep theirs."""
    path = tmp_path / "sales.jsonl"
    rows = [
        sale("U-1", payment_reference="PAY-U1", external_reference_numbers=["b", "A"]),
        sale("U-2", external_reference_numbers=["C"]),
    ]
    import_ledger(sessions, write_jsonl(path, rows), connection_id=connection_id, now=T0)
    later = T0 + dt.timedelta(hours=1)
    rows = [
        sale("u-1", state="cancelled", amount="150.5"),
        sale("U-2", external_reference_numbers=["C"]),
    ]
    result = import_ledger(
        sessions, write_jsonl(path, rows), connection_id=connection_id, now=later
    )
    assert (result.inserted, result.updated, result.unchanged) == (0, 1, 1)
    found = lines(sessions)
    assert len(found) == 2
    changed = found["U-1"]
    assert (changed.state, changed.amount) == (LedgerState.CANCELLED, Decimal("150.50"))
    assert changed.payment_reference == "PAY-U1"  # absent in the file: kept
    assert changed.external_references_key == "A\nB"  # and so are the listed numbers
    assert changed.shop_reference == "U-1"  # the first spelling stays
    assert (changed.created_at, changed.updated_at) == (T0, later)
    assert found["U-2"].updated_at == T0


def test_references_compare_case_insensitively(
    sessions: sessionmaker[Session], connection_id: int, tmp_path: Path
) -> None:
    """`abc-1` and `ABC-1` are one sale: in two imports, and as a duplicate within a file."""
    path = tmp_path / "sales.jsonl"
    import_ledger(sessions, write_jsonl(path, [sale("abc-1")]), connection_id=connection_id, now=T0)
    result = import_ledger(
        sessions, write_jsonl(path, [sale(" ABC-1 ")]), connection_id=connection_id, now=T0
    )
    assert (result.inserted, result.unchanged) == (0, 1)
    assert list(lines(sessions)) == ["ABC-1"]

    write_jsonl(path, [sale("dup-9"), sale("x-1"), sale("DUP-9", quantity=5)])
    result = import_ledger(sessions, path, connection_id=connection_id, now=T0)
    assert not result.written
    ((bad),) = result.bad_rows
    assert (bad.line, bad.column) == (3, "reference")
    assert "line 1" in bad.reason


CSV_BAD = [
    # (line in the file, column, part of the reason)
    (f"{PARTNER},B-1,2025-02-27,1,10.00,DKK,,", "sold_at", "no offset"),
    (f"{PARTNER},B-2,yesterday,1,10.00,DKK,,", "sold_at", "not an ISO 8601 time"),
    (f"{PARTNER},B-3,2025-02-27T10:00:00,1,10.00,DKK,,", "sold_at", "no offset"),
    (f"{PARTNER},B-4,2025-02-27T10:00:00Z,-1,10.00,DKK,,", "quantity", "whole number"),
    (f"{PARTNER},B-5,2025-02-27T10:00:00Z,1.5,10.00,DKK,,", "quantity", "whole number"),
    (f"{PARTNER},B-6,2025-02-27T10:00:00Z,1,1e3,DKK,,", "amount", "not an amount"),
    (f'{PARTNER},B-7,2025-02-27T10:00:00Z,1,"1,000.00",DKK,,', "amount", "not an amount"),
    (f"{PARTNER},B-8,2025-02-27T10:00:00Z,1,-5,DKK,,", "amount", "not an amount"),
    (f"{PARTNER},B-9,2025-02-27T10:00:00Z,1,0.1234567,DKK,,", "amount", "decimal places"),
    (f"{PARTNER},B-10,2025-02-27T10:00:00Z,1,10,DKKK,,", "currency", "ISO 4217"),
    (f"{PARTNER},B-11,2025-02-27T10:00:00Z,1,10,DKK,maybe,", "amount_includes_vat", "true/false"),
    (f"{PARTNER},B-12,2025-02-27T10:00:00Z,1,10,DKK,,sold", "state", "active, cancelled"),
    (f"{PARTNER},,2025-02-27T10:00:00Z,1,10,DKK,,", "reference", "required"),
    ("not-a-guid,B-14,2025-02-27T10:00:00Z,1,10,DKK,,", "partner_id", "not a GUID"),
    (f"{PARTNER},B-15,2025-02-27T10:00:00Z,1,10", None, "5 fields, the header has 8"),
    (f"{PARTNER},{'R' * 51},2025-02-27T10:00:00Z,1,10,DKK,,", "reference", "longer than 50"),
    (f"{PARTNER},b-1,2025-02-27T10:00:00Z,1,10,DKK,,", None, None),  # good: B-1 was bad
    (f"{PARTNER},G-1,2025-02-27T10:00:00Z,1,10,DKK,,", None, None),  # good
    (f"{PARTNER},g-1,2025-02-27T10:00:00Z,1,10,DKK,,", "reference", "also on line 19"),
]


def test_every_kind_of_bad_row_is_reported_and_nothing_written(
    sessions: sessionmaker[Session], connection_id: int, tmp_path: Path
) -> None:
    """Each bad row is named by line, column and reason; with any, nothing is written."""
    path = write_csv(tmp_path / "sales.csv", [row for row, _, _ in CSV_BAD])
    result = import_ledger(sessions, path, connection_id=connection_id, now=T0)
    expected = [
        (number, column)
        for number, (_, column, reason) in enumerate(CSV_BAD, start=2)
        if reason is not None
    ]
    assert [(bad.line, bad.column) for bad in result.bad_rows] == expected
    for bad, (_, _, reason) in zip(result.bad_rows, [b for b in CSV_BAD if b[2]], strict=True):
        assert reason in bad.reason, bad
    assert result.bad == len(expected)
    assert not result.written
    assert (result.inserted, result.updated, result.unchanged) == (0, 0, 0)
    assert lines(sessions) == {}


def test_skip_bad_imports_the_good_rows(
    sessions: sessionmaker[Session], connection_id: int, tmp_path: Path
) -> None:
    """With skip_bad, the good rows are imported and the bad ones still reported."""
    path = write_csv(tmp_path / "sales.csv", [row for row, _, _ in CSV_BAD])
    result = import_ledger(sessions, path, connection_id=connection_id, now=T0, skip_bad=True)
    assert result.written
    assert (result.inserted, result.bad) == (2, 17)
    assert set(lines(sessions)) == {"B-1", "G-1"}


def test_jsonl_bad_lines(
    sessions: sessionmaker[Session], connection_id: int, tmp_path: Path
) -> None:
    """JSON lines: broken JSON, a non-object, an unknown key, a missing column, by line."""
    path = tmp_path / "sales.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(sale("OK-1")),
                "{not json",
                "[1, 2]",
                json.dumps({**sale("K-1"), "ammount": "1.00"}),
                json.dumps({k: v for k, v in sale("K-2").items() if k != "currency"}),
                json.dumps(sale("K-3", external_reference_numbers="A;B", quantity=True)),
            ]
        )
        + "\n"
    )
    result = import_ledger(sessions, path, connection_id=connection_id, now=T0)
    assert [(bad.line, bad.column) for bad in result.bad_rows] == [
        (2, None),
        (3, None),
        (4, "ammount"),
        (5, "currency"),
        (6, "quantity"),
    ]
    assert "did you mean 'amount'" in result.bad_rows[2].reason
    assert "required" in result.bad_rows[3].reason
    assert lines(sessions) == {}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("partner_id,reference,sold_at,quantity,ammount,currency\n", "did you mean 'amount'"),
        ("partner_id,reference,sold_at,quantity,currency\n", "missing from the header: amount"),
        ("partner_id,reference,reference,sold_at,quantity,amount,currency\n", "given twice"),
        ("", "empty"),
    ],
)
def test_a_bad_header_refuses_the_file(
    sessions: sessionmaker[Session], connection_id: int, tmp_path: Path, header: str, message: str
) -> None:
    """Unknown, missing or doubled columns refuse the whole file: a typo drops nothing."""
    path = write_csv(tmp_path / "sales.csv", [], header=header)
    with pytest.raises(LedgerFileError, match=message):
        import_ledger(sessions, path, connection_id=connection_id, now=T0)


def test_a_submitted_sale_keeps_its_source_and_request(
    sessions: sessionmaker[Session], connection_id: int, tmp_path: Path
) -> None:
    """The export's row of a submitted sale updates the shop's fields, not source or request."""
    request = OrderRequest.model_validate(
        {
            "partnerId": PARTNER,
            "sellToOrderReference": "Web-77",
            "paymentReference": "PAY-77",
            "items": [
                {
                    "itemNumber": "31001",
                    "visitDate": "2025-03-10",
                    "visitTime": "10:00:00",
                    "quantity": 2,
                },
            ],
        }
    )
    with sessions.begin() as session:
        record_submission(session, connection_id, request, now=T0)
    path = write_jsonl(tmp_path / "sales.jsonl", [sale("WEB-77", amount="199.00")])
    result = import_ledger(sessions, path, connection_id=connection_id, now=T0 + dt.timedelta(1))
    assert (result.inserted, result.updated) == (0, 1)
    line = lines(sessions)["WEB-77"]
    assert line.source is LedgerSource.SUBMIT
    assert line.request is not None
    assert line.request["sellToOrderReference"] == "Web-77"
    assert line.shop_reference == "Web-77"
    assert (line.amount, line.currency, line.quantity) == (Decimal("199.00"), "DKK", 2)
    assert line.payment_reference == "PAY-77"


def test_chunks_count_like_one_batch(
    sessions: sessionmaker[Session], connection_id: int, tmp_path: Path
) -> None:
    """Across several upsert chunks, the counts of inserted, updated, unchanged add up."""
    path = tmp_path / "sales.jsonl"
    rows = [sale(f"C-{n}") for n in range(23)]
    first = import_ledger(
        sessions, write_jsonl(path, rows[:10]), connection_id=connection_id, now=T0, batch_size=4
    )
    assert first.inserted == 10
    rows[3] = sale("C-3", quantity=9)
    again = import_ledger(
        sessions, write_jsonl(path, rows), connection_id=connection_id, now=T0, batch_size=4
    )
    assert (again.inserted, again.updated, again.unchanged) == (13, 1, 9)
    assert len(lines(sessions)) == 23


# --- the command ------------------------------------------------------------------------


def cli_env(tmp_path: Path) -> dict[str, str]:
    """One venue connection (never called) and a migrated SQLite database."""
    env = {
        "OTACM_DATABASE_URL": f"sqlite:///{tmp_path / 'otacm.sqlite3'}",
        "OTACM_API_BASE_URL": "http://127.0.0.1:9",
        "OTACM_TENANT": "t",
        "OTACM_COMPANY": "CRONUS",
        "OTACM_API_KEY": "ledger-secret-key",
    }
    assert run(["db", "upgrade"], env)[0] == 0
    return env


def run(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Exit code, standard output, standard error (where logs go)."""
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_cli_import_prints_counts_and_exit_codes(tmp_path: Path) -> None:
    """`otacm ledger import`: counts, bad rows with lines, exit 1 unless --skip-bad."""
    env = cli_env(tmp_path)
    good = write_jsonl(tmp_path / "good.jsonl", [sale("A-1"), sale("A-2")])
    assert run(["ledger", "import", str(good)], env)[:2] == (
        0,
        "2 inserted, 0 updated, 0 unchanged, 0 bad\n",
    )
    code, output, _ = run(["ledger", "import", str(good), "--json"], env)
    assert code == 0
    assert json.loads(output) == {
        "inserted": 0,
        "updated": 0,
        "unchanged": 2,
        "bad": 0,
        "bad_rows": [],
        "written": True,
    }
    bad = write_jsonl(tmp_path / "bad.jsonl", [sale("A-3"), sale("A-4", currency="1")])
    code, output, errors = run(["ledger", "import", str(bad)], env)
    assert code == 1
    assert "bad: line 2, currency: '1' is not an ISO 4217 code" in output
    assert "0 inserted, 0 updated, 0 unchanged, 1 bad" in output
    assert "nothing imported" in errors
    code, output, _ = run(
        ["ledger", "import", str(bad), "--skip-bad", "--connection", "default"], env
    )
    assert code == 0
    assert "1 inserted, 0 updated, 0 unchanged, 1 bad" in output


def test_cli_import_stopped_by_the_database_says_what_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds SQLite's write lock for the whole import: one error line and
    exit 1; with --json the counts (nothing written) and why it stopped, on stdout."""
    env = cli_env(tmp_path)
    monkeypatch.setattr("storage.engine.SQLITE_BUSY_TIMEOUT_MS", 200)
    path = write_jsonl(tmp_path / "sales.jsonl", [sale("L-1"), sale("L-2")])
    held = sqlite3.connect(tmp_path / "otacm.sqlite3", isolation_level=None)
    held.execute("BEGIN IMMEDIATE")
    try:
        code, output, errors = run(["ledger", "import", str(path)], env)
        assert (code, output) == (1, "")
        said = errors.splitlines()[-1]  # after the log's warning, the one error line
        assert said.startswith("Error: ") and "the import stopped: the database failed" in said
        assert "nothing was stored" in said
        code, output, errors = run(["ledger", "import", str(path), "--json"], env)
    finally:
        held.execute("ROLLBACK")
        held.close()
    assert code == 1
    printed = json.loads(output)
    assert (printed["written"], printed["inserted"]) == (False, 0)
    assert printed["interrupted"]["stored_through"] == 0
    assert "locked" in printed["interrupted"]["reason"]
    assert "the import stopped" in errors
    assert run(["ledger", "import", str(path)], env)[:2] == (
        0,
        "2 inserted, 0 updated, 0 unchanged, 0 bad\n",
    )


def test_cli_caps_the_bad_rows_it_prints(tmp_path: Path) -> None:
    """Past 50 bad rows the command prints a count, not every one."""
    env = cli_env(tmp_path)
    path = tmp_path / "export.txt"
    write_jsonl(path, [sale(f"Q-{n}", quantity=-1) for n in range(60)])
    code, output, _ = run(["ledger", "import", str(path), "--format", "jsonl"], env)
    assert code == 1
    assert output.count("bad: line") == 50
    assert "bad: ... and 10 more" in output
    code, output, _ = run(["ledger", "import", str(path), "--format", "jsonl", "--json"], env)
    assert code == 1
    printed = json.loads(output)
    assert (printed["bad"], len(printed["bad_rows"]), printed["written"]) == (60, 50, False)


def test_cli_file_and_connection_errors(tmp_path: Path) -> None:
    """An unknown extension, an unknown column or connection: one line, exit 1."""
    env = cli_env(tmp_path)
    path = tmp_path / "export.txt"
    write_jsonl(path, [sale("E-1")])
    code, _, errors = run(["ledger", "import", str(path)], env)
    assert (code, "--format csv|jsonl" in errors) == (1, True)
    csv_path = write_csv(tmp_path / "s.csv", [], header="partner_id,refrence\n")
    code, _, errors = run(["ledger", "import", str(csv_path)], env)
    assert (code, "did you mean 'reference'" in errors) == (1, True)
    args = ["ledger", "import", str(path), "--format", "jsonl", "--connection", "zoo"]
    code, _, errors = run(args, env)
    assert (code, "no venue connection named 'zoo'" in errors) == (1, True)
    assert "ledger-secret-key" not in errors
