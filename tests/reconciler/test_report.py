"""Reports of a reconciliation run (`reconciler.report`, `otacm report`): the data read
from the database, and each format's content, on SQLite and PostgreSQL.

The runs, totals and exceptions are built with the ORM, as a run of the engine would
leave them, so these tests do not depend on the engine.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import zipfile
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner
from openpyxl import load_workbook
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from otacm.cli import main
from otacm.cli.finance import REPORT_FORMAT_NAMES
from reconciler.categories import Category
from reconciler.report import (
    AGING_BUCKETS,
    RunNotFound,
    aging_bucket,
    iter_exceptions,
    load_run_report,
    open_run_report,
)
from reconciler.report_formats import REPORT_FORMATS, render_report
from storage.models import LedgerLine, LedgerSource, VenueOrder, ensure_connection
from storage.records import (
    ExceptionAction,
    ExceptionEvent,
    ExceptionState,
    ReconException,
    ReconRun,
    ReconRunState,
    ReconTotal,
    ReconTrigger,
)
from venue.models import OrderStatus

NOW = dt.datetime(2024, 6, 30, 12, 0, tzinfo=dt.UTC)
PARTNER = "5f0c6a34-9a4f-4a53-9c53-0d7c9f1a2b3c"
XSS = "<script>alert(1)</script>"
FORMULA = "=HYPERLINK(1)"
CUSTOMER_NAME = "Jane Doe"
CUSTOMER_EMAIL = "jane@example.com"


@dataclass
class Built:
    run_id: int
    earlier_run_id: int
    ids: dict[str, int]  # exception ids by nickname
    order_ids: dict[str, str]


def days_ago(days: float) -> dt.datetime:
    return NOW - dt.timedelta(days=days)


def add_opened(session: Session, row: ReconException, run_id: int) -> int:
    """Store ``row`` with the event of run ``run_id`` opening it; its id."""
    session.add(row)
    session.flush()
    session.add(
        ExceptionEvent(
            recon_exception_id=row.id, recon_run_id=run_id, action=ExceptionAction.OPENED, at=NOW
        )
    )
    return row.id


def build(sessions: sessionmaker[Session]) -> Built:
    """Two runs of one connection; the second saw four exceptions and closed one."""
    with sessions.begin() as session:
        connection = ensure_connection(session, "shop-dk")

        def ledger(reference: str, amount: str, currency: str) -> LedgerLine:
            line = LedgerLine(
                connection_id=connection,
                partner_id=PARTNER,
                shop_reference=reference,
                sold_at=days_ago(45),
                quantity=2,
                amount=Decimal(amount),
                currency=currency,
                source=LedgerSource.IMPORT,
            )
            session.add(line)
            return line

        def venue(reference: str, order_id: str, venue_reference: str | None) -> VenueOrder:
            order = VenueOrder(
                connection_id=connection,
                order_id=order_id,
                partner_id=PARTNER,
                sell_to_order_reference=reference,
                buy_from_order_reference=venue_reference,
                status=OrderStatus.ISSUED,
                status_changed_at=days_ago(44),
                first_seen_at=days_ago(44),
                sell_to_name=CUSTOMER_NAME,
                sell_to_email=CUSTOMER_EMAIL,
            )
            session.add(order)
            return order

        earlier = ReconRun(
            connection_id=connection,
            started_at=days_ago(40),
            finished_at=days_ago(40),
            period_from=days_ago(70),
            period_to=days_ago(40),
            trigger=ReconTrigger.SCHEDULED,
            state=ReconRunState.FINISHED,
        )
        run = ReconRun(
            connection_id=connection,
            started_at=days_ago(0.1),
            finished_at=days_ago(0.09),
            period_from=days_ago(60),
            period_to=days_ago(0.1),
            trigger=ReconTrigger.MANUAL,
            actor="alice",
            state=ReconRunState.FINISHED,
        )
        session.add_all([earlier, run])
        session.flush()

        sale1 = ledger("SHOP-1", "1200.00", "DKK")
        order1 = venue("SHOP-1", "0b8f2f8e-1111-4c7e-9d55-3f1e2a9b0001", "V-1")
        sale2 = ledger(XSS, "99.50", "EUR")
        order3 = venue(FORMULA, "0b8f2f8e-3333-4c7e-9d55-3f1e2a9b0003", "-V-3")
        sale4 = ledger("SHOP-4", "1500", "JPY")
        order4 = venue("SHOP-4", "0b8f2f8e-4444-4c7e-9d55-3f1e2a9b0004", "V-4")
        sale5 = ledger("SHOP-5", "10.00", "DKK")
        sale6 = ledger("SHOP-6", "10.00", "DKK")
        session.flush()

        def exception(
            category: Category,
            subject: str,
            first_seen: dt.datetime,
            events: list[tuple[ReconRun, ExceptionAction]],
            *,
            state: ExceptionState = ExceptionState.OPEN,
            line: LedgerLine | None = None,
            order: VenueOrder | None = None,
            currency: str | None = None,
            ledger_amount: str | None = None,
            venue_amount: str | None = None,
            details: dict[str, object] | None = None,
        ) -> ReconException:
            row = ReconException(
                connection_id=connection,
                category=category,
                subject_key=subject,
                ledger_line_id=line.id if line else None,
                venue_order_id=order.id if order else None,
                currency=currency,
                ledger_amount=None if ledger_amount is None else Decimal(ledger_amount),
                venue_amount=None if venue_amount is None else Decimal(venue_amount),
                details=details,
                state=state,
                first_seen_run_id=events[0][0].id,
                last_seen_run_id=events[-1][0].id,
                closed_run_id=run.id if state is ExceptionState.CLOSED else None,
                first_seen_at=first_seen,
            )
            session.add(row)
            session.flush()
            for when, action in events:
                session.add(
                    ExceptionEvent(
                        recon_exception_id=row.id, recon_run_id=when.id, action=action, at=NOW
                    )
                )
            return row

        amount = exception(
            Category.AMOUNT_MISMATCH,
            "SHOP-1",
            days_ago(40),
            [(earlier, ExceptionAction.OPENED), (run, ExceptionAction.SEEN)],
            line=sale1,
            order=order1,
            currency="DKK",
            ledger_amount="1200.00",
            venue_amount="1180.00",
        )
        missing = exception(
            Category.MISSING_AT_VENUE,
            XSS.upper(),
            days_ago(3),
            [(run, ExceptionAction.OPENED)],
            line=sale2,
            currency="EUR",
            ledger_amount="99.50",
        )
        orphan = exception(
            Category.ORPHAN,
            order3.order_id,
            days_ago(0.5),
            [(run, ExceptionAction.OPENED)],
            order=order3,
            currency="DKK",
            venue_amount="50.00",
            details={"status": "Issued", "sellToEmail": CUSTOMER_EMAIL, "name": CUSTOMER_NAME},
        )
        quantity = exception(
            Category.QUANTITY_MISMATCH,
            "SHOP-4",
            days_ago(10),
            [(earlier, ExceptionAction.OPENED), (run, ExceptionAction.REOPENED)],
            line=sale4,
            order=order4,
            currency="JPY",
            ledger_amount="1500",
            venue_amount="1500",
            details={"ledger_quantity": 2, "venue_quantity": 3},
        )
        closed = exception(
            Category.STUCK_IN_FLIGHT,
            "SHOP-5",
            days_ago(40),
            [(earlier, ExceptionAction.OPENED), (run, ExceptionAction.CLOSED)],
            state=ExceptionState.CLOSED,
            line=sale5,
            currency="DKK",
            ledger_amount="10.00",
        )
        elsewhere = exception(
            Category.VENUE_ERROR,
            "SHOP-6",
            days_ago(40),
            [(earlier, ExceptionAction.OPENED)],
            state=ExceptionState.RESOLVED,
            line=sale6,
        )
        for currency, category, count, ledger_amount, venue_amount in [
            ("DKK", Category.MATCHED, 10, "2000.00", "2000.00"),
            ("DKK", Category.AMOUNT_MISMATCH, 1, "1200.00", "1180.00"),
            ("DKK", Category.ORPHAN, 1, "0", "50.00"),
            ("EUR", Category.MISSING_AT_VENUE, 1, "99.50", "0"),
            ("JPY", Category.QUANTITY_MISMATCH, 1, "1500", "1500"),
        ]:
            session.add(
                ReconTotal(
                    recon_run_id=run.id,
                    currency=currency,
                    category=category,
                    count=count,
                    ledger_amount=Decimal(ledger_amount),
                    venue_amount=Decimal(venue_amount),
                )
            )
        return Built(
            run_id=run.id,
            earlier_run_id=earlier.id,
            ids={
                "amount": amount.id,
                "missing": missing.id,
                "orphan": orphan.id,
                "quantity": quantity.id,
                "closed": closed.id,
                "elsewhere": elsewhere.id,
            },
            order_ids={"orphan": order3.order_id, "amount": order1.order_id},
        )


@pytest.fixture
def built(sessions: sessionmaker[Session]) -> Built:
    return build(sessions)


def render(sessions: sessionmaker[Session], built: Built, fmt: str) -> bytes:
    with sessions() as session:
        return render_report(load_run_report(session, built.run_id, now=NOW), fmt)


def assert_no_personal_data(content: str) -> None:
    assert CUSTOMER_NAME not in content
    assert CUSTOMER_EMAIL not in content


# --- the data --------------------------------------------------------------------------


def test_load_reads_the_run_its_totals_and_the_exceptions_it_saw_and_closed(
    sessions: sessionmaker[Session], built: Built
) -> None:
    """The report holds the run, totals in order, and only this run's exceptions, with
    their references, differences and ages."""
    with sessions() as session:
        report = load_run_report(session, built.run_id, now=NOW)

    assert report.run.id == built.run_id
    assert report.run.connection == "shop-dk"
    assert (report.run.trigger, report.run.actor, report.run.state) == (
        "manual",
        "alice",
        "finished",
    )
    assert report.run.period_from == days_ago(60)
    assert [(t.currency, t.category, t.count) for t in report.totals] == [
        ("DKK", Category.MATCHED, 10),
        ("DKK", Category.ORPHAN, 1),
        ("DKK", Category.AMOUNT_MISMATCH, 1),
        ("EUR", Category.MISSING_AT_VENUE, 1),
        ("JPY", Category.QUANTITY_MISMATCH, 1),
    ]
    assert report.totals[2].ledger_amount == Decimal("1200.00")
    assert report.totals[2].venue_amount == Decimal("1180.00")

    by_id = {row.id: row for row in report.exceptions}
    assert list(by_id) == [
        built.ids["amount"],
        built.ids["missing"],
        built.ids["orphan"],
        built.ids["quantity"],
    ], "in order of their id: oldest first"
    amount = by_id[built.ids["amount"]]
    assert (amount.shop_reference, amount.order_id, amount.buy_from_order_reference) == (
        "SHOP-1",
        built.order_ids["amount"],
        "V-1",
    )
    assert amount.difference == Decimal("-20.00")
    assert (amount.age_days, amount.aging_bucket) == (40, "over 30 days")
    orphan = by_id[built.ids["orphan"]]
    assert orphan.shop_reference == FORMULA, "an orphan's reference is the venue order's"
    assert orphan.ledger_amount is None and orphan.difference is None
    assert orphan.details == {"status": "Issued"}, "no customer data from details"
    assert (orphan.age_days, orphan.aging_bucket) == (0, "0-1 days")
    missing = by_id[built.ids["missing"]]
    assert (missing.order_id, missing.aging_bucket) == (None, "2-7 days")
    assert by_id[built.ids["quantity"]].aging_bucket == "8-30 days"
    assert by_id[built.ids["quantity"]].difference == Decimal(0)

    assert [(row.id, row.state) for row in report.closed] == [(built.ids["closed"], "closed")]
    assert report.aging == {
        Category.AMOUNT_MISMATCH: {**dict.fromkeys(AGING_BUCKETS, 0), "over 30 days": 1},
        Category.MISSING_AT_VENUE: {**dict.fromkeys(AGING_BUCKETS, 0), "2-7 days": 1},
        Category.ORPHAN: {**dict.fromkeys(AGING_BUCKETS, 0), "0-1 days": 1},
        Category.QUANTITY_MISMATCH: {**dict.fromkeys(AGING_BUCKETS, 0), "8-30 days": 1},
    }


def test_load_of_an_unknown_run_raises_run_not_found(
    sessions: sessionmaker[Session], built: Built
) -> None:
    """An id no run has is RunNotFound, naming the id."""
    with sessions() as session, pytest.raises(RunNotFound, match="no reconciliation run 999"):
        load_run_report(session, 999, now=NOW)


def test_an_earlier_run_reports_what_it_saw_then(
    sessions: sessionmaker[Session], built: Built
) -> None:
    """Each run's report lists the exceptions it saw, whatever their state since."""
    with sessions() as session:
        report = load_run_report(session, built.earlier_run_id, now=NOW)
    assert {row.id for row in report.exceptions} == {
        built.ids[name] for name in ("amount", "quantity", "closed", "elsewhere")
    }
    assert report.totals == [] and list(report.closed) == [] and not report.closed


def test_a_stream_carries_what_the_orm_reads_for_each_exception(
    sessions: sessionmaker[Session], built: Built
) -> None:
    """Streamed a row per batch, each exception carries the amounts (exact, to the
    micro-unit), first sighting, state and details the ORM reads for it; rows whose
    details are one document show it alike, personal keys removed from every one, and a
    document changed in between shows as it now is."""
    shared = {"status": "Issued", "sellToName": CUSTOMER_NAME, "lines": [1, 2]}
    with sessions.begin() as session:
        connection = ensure_connection(session, "shop-dk")
        added = []
        for index, (details, ledger_amount, venue_amount) in enumerate(
            [
                (shared, "0.000001", "-123456789.123456"),
                ({"note": "other"}, "12.3", None),
                (shared, "1000000", "999999.99"),
                (None, None, "7"),
                (shared, "-0.5", "0.50"),
            ]
        ):
            row = ReconException(
                connection_id=connection,
                category=Category.AMOUNT_MISMATCH,
                subject_key=f"stream-{index}",
                currency="BHD",
                ledger_amount=None if ledger_amount is None else Decimal(ledger_amount),
                venue_amount=None if venue_amount is None else Decimal(venue_amount),
                details=details,
                state=ExceptionState.ACCEPTED,
                first_seen_run_id=built.run_id,
                last_seen_run_id=built.run_id,
                first_seen_at=days_ago(index * 1.7),
            )
            added.append(add_opened(session, row, built.run_id))
    streamed = {row.id: row for row in iter_exceptions(sessions, built.run_id, now=NOW, batch=1)}
    assert list(streamed) == sorted(streamed)
    with sessions() as session:
        for exception in session.scalars(
            select(ReconException).where(ReconException.id.in_(streamed))
        ):
            row = streamed[exception.id]
            assert (row.ledger_amount, row.venue_amount) == (
                exception.ledger_amount,
                exception.venue_amount,
            )
            assert str(row.ledger_amount) == str(exception.ledger_amount)
            assert str(row.venue_amount) == str(exception.venue_amount)
            assert row.first_seen_at == exception.first_seen_at
            assert row.first_seen_at.tzinfo is dt.UTC
            assert row.state == exception.state.value and type(row.state) is str
            assert row.category is Category(exception.category)
            expected = {
                key: value
                for key, value in (exception.details or {}).items()
                if key not in ("sellToName", "name", "sellToEmail")
            }
            assert row.details == expected
    assert [streamed[added[index]].details for index in (0, 2, 4)] == [
        {"status": "Issued", "lines": [1, 2]}
    ] * 3
    assert streamed[added[1]].details == {"note": "other"} and streamed[added[3]].details == {}
    assert streamed[added[2]].difference == Decimal("-0.01")
    with sessions.begin() as session:
        session.get_one(ReconException, added[2]).details = {"note": "changed"}
    again = {row.id: row for row in iter_exceptions(sessions, built.run_id, now=NOW, batch=2)}
    assert again[added[2]].details == {"note": "changed"}
    assert (
        again[added[0]].details == again[added[4]].details == {"status": "Issued", "lines": [1, 2]}
    )


def test_a_streamed_report_counts_its_ages_only_when_they_are_read(
    sessions: sessionmaker[Session], built: Built
) -> None:
    """A streamed report's CSV, JSON and XLSX never count the exceptions by age (a pass
    over the run's exceptions that only the chart needs); the HTML counts them once, the
    same counts as a loaded report's."""
    statements: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        statements.append(statement)

    engine = sessions.kw["bind"]
    event.listen(engine, "before_cursor_execute", record)
    try:
        report = open_run_report(sessions, built.run_id, now=NOW)
        for fmt in ("csv", "json", "xlsx"):
            render_report(report, fmt)
        assert not [statement for statement in statements if "GROUP BY" in statement]
        render_report(report, "html")
        render_report(report, "html")
        assert len([statement for statement in statements if "GROUP BY" in statement]) == 1
    finally:
        event.remove(engine, "before_cursor_execute", record)
    with sessions() as session:
        assert dict(report.aging) == load_run_report(session, built.run_id, now=NOW).aging
    assert report.aging


@pytest.mark.parametrize(
    ("age", "bucket"),
    [
        (0, "0-1 days"),
        (1, "0-1 days"),
        (2, "2-7 days"),
        (7, "2-7 days"),
        (8, "8-30 days"),
        (30, "8-30 days"),
        (31, "over 30 days"),
    ],
)
def test_aging_buckets_bound_whole_days(age: int, bucket: str) -> None:
    """Ages fall in the documented buckets, bounds included."""
    assert aging_bucket(age) == bucket
    assert bucket in AGING_BUCKETS


# --- the formats -----------------------------------------------------------------------


def test_csv_is_the_exception_table_with_defused_formulas(
    sessions: sessionmaker[Session], built: Built
) -> None:
    """One header row then one row per exception: amounts with the currency's decimals,
    ISO times, and text a spreadsheet would run as a formula prefixed with an apostrophe."""
    content = render(sessions, built, "csv")
    assert content.startswith(b'\xef\xbb\xbf"id","in_this_run","category",')
    text = content.decode("utf-8-sig")
    assert_no_personal_data(text)
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[0] == [
        "id", "in_this_run", "category", "category_label", "state", "subject_key",
        "shop_reference", "order_id", "buy_from_order_reference", "currency",
        "ledger_amount", "venue_amount", "difference", "first_seen_at_utc", "age_days",
        "aging_bucket", "details",
    ]  # fmt: skip
    assert rows[1:] == [
        [str(built.ids["amount"]), "seen", "amount_mismatch", "Amount differs", "open",
         "SHOP-1", "SHOP-1", built.order_ids["amount"], "V-1", "DKK", "1200.00", "1180.00",
         "-20.00", "2024-05-21 12:00:00", "40", "over 30 days", ""],
        [str(built.ids["missing"]), "seen", "missing_at_venue", "Missing at the venue", "open",
         XSS.upper(), XSS, "", "", "EUR", "99.50", "", "", "2024-06-27 12:00:00", "3",
         "2-7 days", ""],
        [str(built.ids["orphan"]), "seen", "orphan", "Unknown to the ledger", "open",
         built.order_ids["orphan"], "'" + FORMULA, built.order_ids["orphan"], "'-V-3", "DKK",
         "", "50.00", "", "2024-06-30 00:00:00", "0", "0-1 days", '{"status": "Issued"}'],
        [str(built.ids["quantity"]), "seen", "quantity_mismatch", "Ticket count differs",
         "open", "SHOP-4", "SHOP-4", "0b8f2f8e-4444-4c7e-9d55-3f1e2a9b0004", "V-4", "JPY",
         "1500", "1500", "0", "2024-06-20 12:00:00", "10", "8-30 days",
         '{"ledger_quantity": 2, "venue_quantity": 3}'],
        [str(built.ids["closed"]), "closed", "stuck_in_flight", "Stuck in flight", "closed",
         "SHOP-5", "SHOP-5", "", "", "DKK", "10.00", "", "", "2024-05-21 12:00:00", "40",
         "over 30 days", ""],
        ["# end of report: 5 rows"],
    ]  # fmt: skip


HOSTILE = {
    "shop_reference": "SHOP;=1+1",
    "order_id": "=cmd|' /C calc'!A0",
    "buy_from_order_reference": "V,+2",
    "subject_key": "ledger:x\t@SUM(A1)",
}
"""References a spreadsheet would run as formulas, at a cell's start or after a separator."""


def add_hostile_exception(sessions: sessionmaker[Session], built: Built) -> int:
    """An exception of the built run whose every reference is one of :data:`HOSTILE`."""
    with sessions.begin() as session:
        connection = ensure_connection(session, "shop-dk")
        line = LedgerLine(
            connection_id=connection,
            partner_id=PARTNER,
            shop_reference=HOSTILE["shop_reference"],
            sold_at=days_ago(2),
            quantity=1,
            amount=Decimal("-5.00"),
            currency="DKK",
            source=LedgerSource.IMPORT,
        )
        order = VenueOrder(
            connection_id=connection,
            order_id=HOSTILE["order_id"],
            partner_id=PARTNER,
            sell_to_order_reference=HOSTILE["shop_reference"],
            buy_from_order_reference=HOSTILE["buy_from_order_reference"],
            status=OrderStatus.ISSUED,
            status_changed_at=days_ago(2),
            first_seen_at=days_ago(2),
        )
        session.add_all([line, order])
        session.flush()
        row = ReconException(
            connection_id=connection,
            category=Category.AMOUNT_MISMATCH,
            subject_key=HOSTILE["subject_key"],
            ledger_line_id=line.id,
            venue_order_id=order.id,
            currency="DKK",
            ledger_amount=Decimal("-5.00"),
            venue_amount=Decimal("5.00"),
            details={"note": "a;-1"},
            first_seen_run_id=built.run_id,
            last_seen_run_id=built.run_id,
            first_seen_at=days_ago(2),
        )
        return add_opened(session, row, built.run_id)


def _is_number(text: str) -> bool:
    try:
        Decimal(text)
    except ArithmeticError:
        return False
    return True


def test_csv_file_runs_no_formula_whatever_the_separator(
    sessions: sessionmaker[Session], built: Built, database_url: str, tmp_path: Path
) -> None:
    """The file `otacm report -o` writes, read by a spreadsheet splitting on commas (this
    file's separator), semicolons or tabs (other locales), has no cell that starts a
    formula; read as written, each reference is its text with apostrophes before the
    formula characters, and every field is quoted."""
    hostile_id = add_hostile_exception(sessions, built)
    target = tmp_path / "run.csv"
    code, _, _ = run_cli(["report", str(built.run_id), "-o", str(target)], database_url)
    assert code == 0
    text = target.read_bytes().decode("utf-8-sig")
    for delimiter in (",", ";", "\t"):
        for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter):
            for cell in row:
                assert not cell.startswith(("=", "+", "@", "\t", "\r")), (delimiter, cell)
                assert not cell.startswith("-") or _is_number(cell), (delimiter, cell)
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    hostile = next(row for row in rows if row["id"] == str(hostile_id))
    assert hostile["shop_reference"] == "SHOP;'=1+1"
    assert hostile["order_id"] == "'=cmd|' /C calc'!A0"
    assert hostile["buy_from_order_reference"] == "V,'+2"
    assert hostile["subject_key"] == "ledger:x\t'@SUM(A1)"
    assert hostile["details"] == '{"note": "a;\'-1"}'
    assert (hostile["ledger_amount"], hostile["difference"]) == ("-5.00", "10.00")
    # Every field quoted: a separator inside a cell stays in it.
    for line in text.splitlines():
        assert line.startswith('"') and line.endswith('"'), line


def test_xlsx_keeps_hostile_references_as_text_never_formulas(
    sessions: sessionmaker[Session], built: Built, tmp_path: Path
) -> None:
    """In the XLSX the same references are string cells holding their exact text: the
    workbook's sheets hold no formula at all."""
    add_hostile_exception(sessions, built)
    content = render(sessions, built, "xlsx")
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        sheets = [name for name in archive.namelist() if name.startswith("xl/worksheets/")]
        assert sheets
        for name in sheets:
            assert b"<f>" not in archive.read(name) and b"<f " not in archive.read(name), name
    path = tmp_path / "run.xlsx"
    path.write_bytes(content)
    cells = {
        cell.value: cell.data_type
        for row in load_workbook(path)["Exceptions"].iter_rows()
        for cell in row
        if isinstance(cell.value, str)
    }
    for value in HOSTILE.values():
        assert cells.get(value) == "s", value


def test_json_holds_the_same_data_with_amounts_as_strings(
    sessions: sessionmaker[Session], built: Built
) -> None:
    """JSON: the run with ISO times, totals and exceptions with amounts as strings."""
    content = render(sessions, built, "json").decode()
    assert_no_personal_data(content)
    data = json.loads(content)
    assert data["run"] == {
        "id": built.run_id,
        "connection": "shop-dk",
        "period_from": "2024-05-01T12:00:00+00:00",
        "period_to": "2024-06-30T09:36:00+00:00",
        "started_at": "2024-06-30T09:36:00+00:00",
        "finished_at": "2024-06-30T09:50:24+00:00",
        "trigger": "manual",
        "actor": "alice",
        "state": "finished",
        "error": None,
    }
    assert data["totals"][2] == {
        "currency": "DKK",
        "category": "amount_mismatch",
        "category_label": "Amount differs",
        "is_exception": True,
        "count": 1,
        "ledger_amount": "1200.00",
        "venue_amount": "1180.00",
    }
    assert data["aging_buckets"] == list(AGING_BUCKETS)
    assert [row["id"] for row in data["exceptions"]] == [
        built.ids[name] for name in ("amount", "missing", "orphan", "quantity")
    ]
    assert data["exceptions"][0] == {
        "id": built.ids["amount"],
        "category": "amount_mismatch",
        "category_label": "Amount differs",
        "state": "open",
        "subject_key": "SHOP-1",
        "shop_reference": "SHOP-1",
        "order_id": built.order_ids["amount"],
        "buy_from_order_reference": "V-1",
        "currency": "DKK",
        "ledger_amount": "1200.00",
        "venue_amount": "1180.00",
        "difference": "-20.00",
        "details": {},
        "first_seen_at": "2024-05-21T12:00:00+00:00",
        "age_days": 40,
        "aging_bucket": "over 30 days",
    }
    assert data["exceptions"][2]["shop_reference"] == FORMULA, "JSON is not for spreadsheets"
    assert [row["id"] for row in data["closed"]] == [built.ids["closed"]]


def test_xlsx_has_a_summary_and_an_exception_sheet_with_real_numbers_and_dates(
    sessions: sessionmaker[Session], built: Built, tmp_path: Path
) -> None:
    """The workbook reads back: numbers as numbers in the currency's format, times as
    dates, a frozen bold header, a filter, and references as text (never formulas)."""
    path = tmp_path / "report.xlsx"
    path.write_bytes(render(sessions, built, "xlsx"))
    book = load_workbook(path)
    assert book.sheetnames == ["Summary", "Exceptions"]

    summary = book["Summary"]
    assert summary["A1"].value == f"Reconciliation run {built.run_id}"
    assert (summary["A2"].value, summary["B2"].value) == ("Connection", "shop-dk")
    assert summary["B3"].value == dt.datetime(2024, 5, 1, 12, 0)
    assert summary["B3"].is_date
    header_row = 12
    assert [c.value for c in summary[header_row]] == [
        "Currency", "Category", "Code", "Count", "Ledger amount", "Venue amount", "Difference",
    ]  # fmt: skip
    assert all(cell.font.b for cell in summary[header_row])
    assert summary.freeze_panes == f"A{header_row + 1}"
    totals = [[c.value for c in row] for row in summary.iter_rows(min_row=header_row + 1)]
    assert totals[2] == ["DKK", "Amount differs", "amount_mismatch", 1, 1200, 1180, -20]
    assert totals[4][:4] == ["JPY", "Ticket count differs", "quantity_mismatch", 1]
    amount_cell = summary.cell(row=header_row + 3, column=5)
    assert isinstance(amount_cell.value, int | float)
    assert amount_cell.number_format == "#,##0.00;[Red]-#,##0.00"
    assert summary.cell(row=header_row + 5, column=5).number_format == "#,##0;[Red]-#,##0"
    assert summary.column_dimensions["B"].width > 30

    sheet = book["Exceptions"]
    assert sheet.freeze_panes == "A2"
    assert sheet.auto_filter.ref == "A1:Q6"
    assert all(cell.font.b for cell in sheet[1])
    rows = [[c.value for c in row] for row in sheet.iter_rows(min_row=2)]
    assert [row[0] for row in rows] == [
        built.ids[name] for name in ("amount", "missing", "orphan", "quantity", "closed")
    ]
    amount = rows[0]
    assert amount[:10] == [
        built.ids["amount"], "seen", "Amount differs", "amount_mismatch", "open", "SHOP-1",
        "SHOP-1", built.order_ids["amount"], "V-1", "DKK",
    ]  # fmt: skip
    assert amount[10:16] == [1200, 1180, -20, dt.datetime(2024, 5, 21, 12), 40, "over 30 days"]
    assert sheet.cell(row=2, column=14).is_date
    orphan = sheet.cell(row=4, column=7)
    assert (orphan.value, orphan.data_type) == (FORMULA, "s"), "a reference, not a formula"
    assert rows[2][16] == '{"status": "Issued"}'
    assert rows[4][1] == "closed"
    for worksheet in book.worksheets:
        for row in worksheet.iter_rows(values_only=True):
            assert_no_personal_data(" ".join(str(value) for value in row))


def test_html_is_one_self_contained_page_with_a_chart_and_the_tables(
    sessions: sessionmaker[Session], built: Built
) -> None:
    """The page has the summary, an inline SVG chart stacked by age, every exception row,
    no external resources, and every reference escaped."""
    page = render(sessions, built, "html").decode()
    assert_no_personal_data(page)
    assert page.startswith("<!doctype html>")
    assert XSS not in page, "a reference is escaped, never markup"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r"<script|<link|@import|src=|url\(", page, re.IGNORECASE)
    assert page.count("<svg") == 1
    svg = page[page.index("<svg") : page.index("</svg>")]
    for label in ("Missing at the venue", "Unknown to the ledger", "Ticket count differs",
                  "Amount differs", *AGING_BUCKETS):  # fmt: skip
        assert label in svg
    assert "Amount differs, over 30 days: 1" in svg
    assert "Stuck in flight" not in svg, "the chart shows what the run saw, not what it closed"
    assert "shop-dk" in page and "alice" in page
    assert '<td class="num">1,200.00</td>' in page
    assert '<td class="num neg">-20.00</td>' in page
    for exception_id in built.ids.values():
        listed = f'<td class="num">{exception_id}</td>' in page
        assert listed == (exception_id != built.ids["elsewhere"])
    assert "Closed by this run (1)" in page


def test_a_run_without_exceptions_renders_every_format(
    sessions: sessionmaker[Session], built: Built
) -> None:
    """A failed run with nothing found still renders: empty tables, no chart."""
    with sessions.begin() as session:
        run = ReconRun(
            connection_id=ensure_connection(session, "shop-dk"),
            started_at=NOW,
            period_from=days_ago(1),
            period_to=NOW,
            trigger=ReconTrigger.SCHEDULED,
            state=ReconRunState.FAILED,
            error="database went away",
        )
        session.add(run)
        session.flush()
        run_id = run.id
    with sessions() as session:
        report = load_run_report(session, run_id, now=NOW)
    assert list(report.exceptions) == list(report.closed) == report.totals == []
    assert report.aging == {}
    page = render_report(report, "html").decode()
    assert "<svg" not in page and "This run saw no exceptions." in page
    assert "database went away" in page
    assert render_report(report, "csv").decode("utf-8-sig").splitlines()[1:] == [
        '"# end of report: 0 rows"'
    ]
    assert json.loads(render_report(report, "json"))["run"]["error"] == "database went away"
    book = load_workbook(io.BytesIO(render_report(report, "xlsx")))
    assert book["Exceptions"].max_row == 1


def test_render_refuses_an_unknown_format(sessions: sessionmaker[Session], built: Built) -> None:
    """A format that is not a report format is a ValueError naming it."""
    with pytest.raises(ValueError, match="'pdf'"):
        render(sessions, built, "pdf")


# --- the command -----------------------------------------------------------------------


def run_cli(args: list[str], database_url: str) -> tuple[int, bytes, str]:
    result = CliRunner().invoke(
        main, args, env={"OTACM_DATABASE_URL": database_url}, catch_exceptions=False
    )
    return result.exit_code, result.stdout_bytes, result.stderr


@pytest.fixture
def database_url(sessions: sessionmaker[Session]) -> str:
    bind = sessions.kw["bind"]
    return str(bind.url.render_as_string(hide_password=False))


def test_the_command_offers_every_report_format() -> None:
    """`otacm report --format` lists exactly the report formats."""
    assert set(REPORT_FORMAT_NAMES) == set(REPORT_FORMATS)


def test_report_command_writes_each_format(built: Built, database_url: str, tmp_path: Path) -> None:
    """Text formats go to stdout, xlsx to -o FILE (or a redirected stdout)."""
    code, out, _ = run_cli(["report", str(built.run_id), "--format", "json"], database_url)
    assert code == 0
    data = json.loads(out)
    assert data["run"]["id"] == built.run_id
    assert len(data["exceptions"]) == 4

    code, out, _ = run_cli(["report", str(built.run_id)], database_url)
    assert code == 0
    assert out.decode("utf-8-sig").splitlines()[0].startswith('"id","in_this_run",')

    code, out, _ = run_cli(["report", str(built.run_id), "--format", "html"], database_url)
    assert code == 0 and b"<svg" in out

    target = tmp_path / "run.xlsx"
    code, out, err = run_cli(
        ["report", str(built.run_id), "--format", "xlsx", "-o", str(target)], database_url
    )
    assert code == 0 and out == b""
    assert str(target) in err
    assert load_workbook(target).sheetnames == ["Summary", "Exceptions"]

    code, out, _ = run_cli(["report", str(built.run_id), "--format", "xlsx"], database_url)
    assert code == 0
    assert load_workbook(io.BytesIO(out))["Exceptions"].max_row == 6


def test_report_command_of_an_unknown_run_exits_1(built: Built, database_url: str) -> None:
    """An id no run has is one clear line and exit 1."""
    code, out, err = run_cli(["report", "999"], database_url)
    assert code == 1
    assert out == b""
    assert "no reconciliation run 999" in err


def test_report_command_cut_short_leaves_no_file(
    built: Built, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report that fails part-way leaves no file at -o FILE (nor its part), and exits
    non-zero: nothing that looks like a whole report."""
    from reconciler import report_formats

    def broken(report: object, fmt: str, progress: object = None) -> object:
        yield b'"id","in_this_run"\r\n'
        raise RuntimeError("connection lost")

    monkeypatch.setattr(report_formats, "stream_report", broken)
    target = tmp_path / "run.csv"
    result = CliRunner().invoke(
        main, ["report", str(built.run_id), "-o", str(target)],
        env={"OTACM_DATABASE_URL": database_url},
    )  # fmt: skip
    assert result.exit_code != 0
    assert not target.exists()
    assert not (tmp_path / ".run.csv.part").exists()


def test_runs_list_newest_first_with_its_count(built: Built, database_url: str) -> None:
    """`otacm runs list`: the newest run first, "n of N", paging with --after, JSON."""
    code, out, _ = run_cli(["runs", "list"], database_url)
    assert code == 0
    lines = out.decode().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == [
        str(built.run_id),
        str(built.earlier_run_id),
    ]
    assert lines[-1] == "2 of 2 run(s)"
    code, out, _ = run_cli(["runs", "list", "--limit", "1", "--json"], database_url)
    listed = json.loads(out)
    assert ([r["id"] for r in listed["runs"]], listed["total"], listed["more"]) == (
        [built.run_id],
        2,
        True,
    )
    code, out, _ = run_cli(["runs", "list", "--after", str(built.run_id)], database_url)
    assert out.decode().splitlines()[0].split()[0] == str(built.earlier_run_id)


def test_exceptions_list_of_a_run_filters_and_pages(built: Built, database_url: str) -> None:
    """`otacm exceptions list`: the latest run's by default, oldest first, with filters,
    --closed, paging and "n of N"; a bad state or an unknown run is one line, exit 1."""
    code, out, _ = run_cli(["exceptions", "list"], database_url)
    assert code == 0
    lines = out.decode().splitlines()
    seen = sorted(built.ids[name] for name in ("amount", "missing", "orphan", "quantity"))
    assert [int(line.split()[0]) for line in lines[:-1]] == seen
    assert lines[-1] == f"4 of 4 exception(s) seen by run {built.run_id} (shop-dk)"
    code, out, _ = run_cli(["exceptions", "list", "--category", "orphan", "--json"], database_url)
    listed = json.loads(out)
    assert [row["id"] for row in listed["exceptions"]] == [built.ids["orphan"]]
    assert listed["total"] == 1
    code, out, _ = run_cli(["exceptions", "list", "--limit", "2"], database_url)
    assert out.decode().splitlines()[-1].endswith(f"; more: --after {seen[1]}")
    code, out, _ = run_cli(["exceptions", "list", "--after", str(seen[1])], database_url)
    assert [int(line.split()[0]) for line in out.decode().splitlines()[:-1]] == seen[2:]
    code, out, _ = run_cli(["exceptions", "list", "--closed"], database_url)
    assert [int(line.split()[0]) for line in out.decode().splitlines()[:-1]] == [
        built.ids["closed"]
    ]
    code, _, err = run_cli(["exceptions", "list", "--state", "gone"], database_url)
    assert (code, "--state 'gone': one of open" in err) == (1, True)
    code, _, err = run_cli(["exceptions", "list", "--run", "999"], database_url)
    assert (code, "no reconciliation run 999" in err) == (1, True)
