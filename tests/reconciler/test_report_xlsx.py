"""The XLSX report's sheets past their limits, and its cells' text, read back with openpyxl:
exceptions beyond a sheet's rows (or its size) go on in the next sheet, each sheet a
whole table; text comes back exactly as stored, whatever characters it holds."""

from __future__ import annotations

import datetime as dt
import io
from decimal import Decimal

import pytest
from openpyxl import load_workbook
from openpyxl.workbook import Workbook
from sqlalchemy.orm import Session, sessionmaker

from reconciler.categories import Category
from reconciler.report import ExceptionRow, ExceptionRows, RunInfo, RunReport, load_run_report
from reconciler.report_xlsx import CELL_CHARACTERS, stream_xlsx
from tests.reconciler.test_report import NOW, Built, build

PLUS_TWO = dt.timezone(dt.timedelta(hours=2))


@pytest.fixture
def built(sessions: sessionmaker[Session]) -> Built:
    return build(sessions)


def _book(report: RunReport, **limits: int) -> Workbook:
    return load_workbook(io.BytesIO(b"".join(stream_xlsx(report, **limits))))


def _report(sessions: sessionmaker[Session], built: Built) -> RunReport:
    with sessions() as session:
        return load_run_report(session, built.run_id, now=NOW)


def _ids_by_sheet(book: Workbook) -> dict[str, list[int]]:
    return {
        sheet.title: [row[0] for row in sheet.iter_rows(min_row=2, values_only=True)]
        for sheet in book.worksheets[1:]
    }


def test_exceptions_beyond_a_sheet_go_on_in_the_next_sheets(
    sessions: sessionmaker[Session], built: Built
) -> None:
    """With three rows a sheet (the header and two exceptions), the run's five rows fill
    "Exceptions", "Exceptions 2" and "Exceptions 3" in order, each sheet with its bold
    frozen header and a filter over its own rows."""
    book = _book(_report(sessions, built), sheet_rows=3)
    expected = [built.ids[name] for name in ("amount", "missing", "orphan", "quantity", "closed")]
    assert book.sheetnames == ["Summary", "Exceptions", "Exceptions 2", "Exceptions 3"]
    assert _ids_by_sheet(book) == {
        "Exceptions": expected[:2],
        "Exceptions 2": expected[2:4],
        "Exceptions 3": expected[4:],
    }
    for sheet, last in zip(book.worksheets[1:], (3, 3, 2), strict=True):
        assert [cell.value for cell in sheet[1]][:2] == ["ID", "In this run"]
        assert all(cell.font.b for cell in sheet[1])
        assert sheet.freeze_panes == "A2"
        assert sheet.auto_filter.ref == f"A1:Q{last}"
    assert book["Exceptions 3"]["B2"].value == "closed"


def test_a_sheet_filled_to_its_last_row_leaves_no_empty_sheet_after_it(
    sessions: sessionmaker[Session], built: Built
) -> None:
    """Five exceptions in a sheet of six rows fit it exactly: no second, empty sheet."""
    book = _book(_report(sessions, built), sheet_rows=6)
    assert book.sheetnames == ["Summary", "Exceptions"]
    assert len(_ids_by_sheet(book)["Exceptions"]) == 5


def test_a_sheet_past_its_size_goes_on_in_the_next(
    sessions: sessionmaker[Session], built: Built
) -> None:
    """A sheet whose XML has passed its size takes no more rows: with a size of one
    byte, each exception is on a sheet of its own, none lost or doubled."""
    book = _book(_report(sessions, built), sheet_bytes=1)
    sheets = _ids_by_sheet(book)
    assert list(sheets) == ["Exceptions", *(f"Exceptions {n}" for n in range(2, 6))]
    assert [ids for ids in sheets.values()] == [
        [built.ids[name]] for name in ("amount", "missing", "orphan", "quantity", "closed")
    ]


def _row(exception_id: int, details: dict[str, object], subject: str) -> ExceptionRow:
    return ExceptionRow(
        id=exception_id,
        category=Category.AMOUNT_MISMATCH,
        state="open",
        subject_key=subject,
        shop_reference=subject,
        order_id=None,
        buy_from_order_reference=None,
        currency="KWD",
        ledger_amount=Decimal("1.234"),
        venue_amount=Decimal("-0.5"),
        difference=Decimal("-1.734"),
        details=details,
        first_seen_at=dt.datetime(
            2024, 2, 29, 23, 59, 58, tzinfo=dt.timezone(dt.timedelta(hours=2))
        ),
        age_days=3,
        aging_bucket="0-7 days",
    )


@pytest.mark.parametrize(
    "subject",
    [
        "  spaced at both ends  ",
        "<b>R&D</b> \"quoted\" 'single'",
        "line\r\nbreaks\tand tabs",
        "Åse Ødegård 東京 🎟",
        '=HYPERLINK("x")',
        "{braces} {n} }{",
    ],
)
def test_text_reads_back_exactly_as_stored(subject: str) -> None:
    """References come back as the same text (markup characters, spaces at the ends,
    carriage returns, any script), as text cells; amounts with their exact digits in
    their currency's format; the time as UTC wall time."""
    run = RunInfo(1, "shop", NOW, NOW, NOW, None, "manual", None, "running", None)
    report = RunReport(run, [], ExceptionRows.of([_row(7, {}, subject)]), ExceptionRows.of([]), {})
    sheet = _book(report)["Exceptions"]
    assert (sheet["F2"].value, sheet["F2"].data_type) == (subject, "s")
    assert sheet["G2"].value == subject
    assert sheet["H2"].value is None
    assert (sheet["K2"].value, sheet["L2"].value, sheet["M2"].value) == (1.234, -0.5, -1.734)
    assert sheet["K2"].number_format == "#,##0.000;[Red]-#,##0.000"
    assert sheet["N2"].value == dt.datetime(2024, 2, 29, 21, 59, 58)


def test_characters_a_workbook_cannot_hold_are_dropped_and_long_text_is_cut() -> None:
    """Control characters XML cannot carry are left out; a text longer than a cell holds
    is cut to its limit, ending in an ellipsis, and the rest of the row is intact."""
    long = {"note": "x" * 40_000}
    rows = [_row(1, {}, "bell\x07 and nul\x00 gone"), _row(2, long, "long")]
    run = RunInfo(1, "shop", NOW, NOW, NOW, NOW, "manual", None, "finished", None)
    report = RunReport(run, [], ExceptionRows.of(rows), ExceptionRows.of([]), {})
    sheet = _book(report)["Exceptions"]
    assert sheet["F2"].value == "bell and nul gone"
    details = sheet["Q3"].value
    assert len(details) == CELL_CHARACTERS and details.endswith("\u2026")
    assert details.startswith('{"note": "xxx')
    assert (sheet["A3"].value, sheet["P3"].value) == (2, "0-7 days")
