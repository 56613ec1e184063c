"""A reconciliation run's report as an XLSX workbook, written as a stream.

:func:`stream_xlsx` writes a "Summary" sheet (the run, then totals per currency and
category) and an "Exceptions" sheet (one row per exception with a filter), numbers as
numbers in the currency's format and times as real dates (UTC), every text as text
(inline strings: never a formula). A sheet holds at most :data:`SHEET_ROWS` rows (the
format's limit, header included): the exceptions beyond go on "Exceptions 2", "Exceptions
3"... each with its header, filter and frozen first row.

The workbook is a zip archive of XML parts. Its rows are formatted here, a row per
string, and compressed into the archive as they come: the archive's bytes leave as
they are made (its members sized by data descriptors, as a zip written to a pipe), so a
download starts at once, nothing waits in a temporary file, and memory does not grow
with the exceptions. A general-purpose writer builds an object per cell: on 100k
exceptions openpyxl's write-only mode took 89 s, XlsxWriter's constant-memory mode about
half that, this writer 12 s (reading the rows aside). The parts naming the sheets come
last, once their number is known, so an archive cut short has no central directory and
no reader takes it for whole.
"""

from __future__ import annotations

import datetime as dt
import re
import zipfile
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import BinaryIO
from xml.sax.saxutils import escape, quoteattr

from reconciler.report import ExceptionRow, RunReport
from reconciler.report_formats import (
    EXCEPTION_COLUMNS,
    currency_places,
    details_text,
    tagged_rows,
)

SHEET_ROWS = 1_048_576
"""The rows an XLSX sheet holds at most (the format's limit), its header included."""

SHEET_BYTES = 1 << 30
"""A sheet's XML is closed at about this size and the rows go on in the next sheet: a
zip member written as a stream holds at most 2 GiB without ZIP64, which not every
spreadsheet reads."""

CELL_CHARACTERS = 32_767
"""The longest text a cell holds; a longer one is cut to it, ending in an ellipsis."""

_PIECE = 64 * 1024  # bytes of the archive gathered before a piece is handed on
_ROWS_PER_WRITE = 500  # rows formatted before they go to the compressor together
_COMPRESSION = 6  # zlib's default: a fifth smaller than level 1, for a few per cent more time

_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_RELATIONSHIPS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PACKAGE = "http://schemas.openxmlformats.org/package/2006/relationships"
_DECLARATION = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'

# Characters XML 1.0 cannot hold (control characters but tab and line breaks, and the
# two non-characters): dropped, as openpyxl drops them.
_ILLEGAL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
# A carriage return as a reference: XML readers turn a bare one into a line feed.
_ENTITIES = {"\r": "&#13;"}
# Text that goes into XML as it is: no markup character, nothing illegal, no space at
# either end.
_PLAIN = re.compile(r"(?!\s)[^&<>\x00-\x08\x0b-\x1f\ufffe\uffff]*(?<!\s)")
_EXCEL_EPOCH = dt.datetime(1899, 12, 30, tzinfo=dt.UTC)
_SECONDS_PER_DAY = 86_400

SUMMARY_COLUMNS = ("Currency", "Category", "Code", "Count", "Ledger amount", "Venue amount",
                   "Difference")  # fmt: skip
SUMMARY_WIDTHS = (20, 44, 28, 10, 18, 18, 18)
EXCEPTION_HEADERS = ("ID", "In this run", "Category", "Code", "State", "Subject",
                     "Shop reference", "Order ID", "Venue reference", "Currency",
                     "Ledger amount", "Venue amount", "Difference", "First seen (UTC)",
                     "Age (days)", "Aging", "Details")  # fmt: skip
EXCEPTION_WIDTHS = (8, 11, 30, 22, 10, 28, 22, 38, 22, 9, 15, 15, 15, 20, 10, 13, 50)


def _letter(column: int) -> str:
    """A column's letters, counted from 1: 1 is A, 27 is AA."""
    letters = ""
    while column:
        column, rest = divmod(column - 1, 26)
        letters = chr(65 + rest) + letters
    return letters


# --- styles ----------------------------------------------------------------------------

# The cell formats of styles.xml, by index (s="..." on a cell): fonts 0 plain, 1 bold,
# 2 the title; fills 0 and 1 the two every workbook has, 2 the header's.
_HEADER, _LABEL, _TITLE, _TIME, _COUNT = 1, 2, 3, 4, 5
_MONEY_STYLE = {0: 6, 2: 7, 3: 8}  # a currency's decimal places: its amounts' format
_TIME_FORMAT = "yyyy-mm-dd hh:mm:ss"


def _money_format(places: int) -> str:
    pattern = "#,##0" + ("." + "0" * places if places else "")
    # Negative amounts in red, as accountants expect.
    return f"{pattern};[Red]-{pattern}"


def _styles() -> str:
    formats = [(164, _TIME_FORMAT)] + [
        (165 + index, _money_format(places)) for index, places in enumerate(_MONEY_STYLE)
    ]
    number_formats = "".join(
        f"<numFmt numFmtId={quoteattr(str(number))} formatCode={quoteattr(code)}/>"
        for number, code in formats
    )
    money = "".join(
        f'<xf numFmtId="{165 + index}" fontId="0" fillId="0" borderId="0" applyNumberFormat="1"/>'
        for index in range(len(_MONEY_STYLE))
    )
    return (
        f'{_DECLARATION}<styleSheet xmlns="{_MAIN}">'
        f'<numFmts count="{len(formats)}">{number_formats}</numFmts>'
        '<fonts count="3"><font><sz val="11"/><name val="Calibri"/></font>'
        '<font><b/><sz val="11"/><name val="Calibri"/></font>'
        '<font><b/><sz val="14"/><name val="Calibri"/></font></fonts>'
        '<fills count="3"><fill><patternFill patternType="none"/></fill>'
        '<fill><patternFill patternType="gray125"/></fill>'
        '<fill><patternFill patternType="solid"><fgColor rgb="FFE8EEF4"/></patternFill></fill>'
        "</fills>"
        '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>'
        '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/>'
        "</cellStyleXfs>"
        f'<cellXfs count="{6 + len(_MONEY_STYLE)}">'
        '<xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/>'
        '<xf numFmtId="0" fontId="1" fillId="2" borderId="0" xfId="0" applyFont="1" '
        'applyFill="1" applyAlignment="1"><alignment vertical="center"/></xf>'
        '<xf numFmtId="0" fontId="1" fillId="0" borderId="0" xfId="0" applyFont="1"/>'
        '<xf numFmtId="0" fontId="2" fillId="0" borderId="0" xfId="0" applyFont="1"/>'
        '<xf numFmtId="164" fontId="0" fillId="0" borderId="0" xfId="0" '
        'applyNumberFormat="1"/>'
        '<xf numFmtId="3" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/>'
        f"{money}</cellXfs>"
        '<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles>'
        "</styleSheet>"
    )


# --- cells -----------------------------------------------------------------------------


def _text(reference: str, value: str | None, style: int = 0) -> str:
    """A text cell, inline (a string cell is never read as a formula); "" for none."""
    if not value:
        return ""
    styled = f' s="{style}"' if style else ""
    if _PLAIN.fullmatch(value) and len(value) <= CELL_CHARACTERS:
        # Most text: nothing to escape, drop or keep (a row is mostly such cells).
        return f'<c r="{reference}"{styled} t="inlineStr"><is><t>{value}</t></is></c>'
    value = _ILLEGAL.sub("", value)
    if len(value) > CELL_CHARACTERS:
        value = value[: CELL_CHARACTERS - 1] + "\u2026"
    # Spaces at either end are kept only when the text says so.
    space = ' xml:space="preserve"' if value[:1].isspace() or value[-1:].isspace() else ""
    text = escape(value, _ENTITIES)
    return f'<c r="{reference}"{styled} t="inlineStr"><is><t{space}>{text}</t></is></c>'


def _number(reference: str, value: int | Decimal | None, style: int = 0) -> str:
    """A number cell, written from the exact value (a Decimal keeps its digits)."""
    if value is None:
        return ""
    styled = f' s="{style}"' if style else ""
    return f'<c r="{reference}"{styled}><v>{value}</v></c>'


def _serial(value: dt.datetime) -> str:
    """A time as Excel's serial number of days, in UTC (Excel has no time zones: UTC
    wall time, and the headers say UTC)."""
    wall = value - _EXCEL_EPOCH  # aware: counted in UTC
    return repr(wall.days + (wall.seconds + wall.microseconds / 1e6) / _SECONDS_PER_DAY)


def _time(reference: str, value: dt.datetime | None) -> str:
    if value is None:
        return ""
    return f'<c r="{reference}" s="{_TIME}"><v>{_serial(value)}</v></c>'


def _row(number: int, cells: list[str]) -> str:
    return f'<row r="{number}">{"".join(cells)}</row>'


def _header(number: int, titles: tuple[str, ...]) -> str:
    return _row(
        number,
        [
            _text(f"{_letter(index)}{number}", title, _HEADER)
            for index, title in enumerate(titles, start=1)
        ],
    )


def _sheet_head(widths: tuple[int, ...], frozen_rows: int) -> str:
    """A sheet's XML up to its first row: the first rows frozen, the columns' widths."""
    top = f"A{frozen_rows + 1}"
    columns = "".join(
        f'<col min="{index}" max="{index}" width="{width}" customWidth="1"/>'
        for index, width in enumerate(widths, start=1)
    )
    return (
        f'{_DECLARATION}<worksheet xmlns="{_MAIN}" xmlns:r="{_RELATIONSHIPS}">'
        '<sheetViews><sheetView workbookViewId="0">'
        f'<pane ySplit="{frozen_rows}" topLeftCell="{top}" activePane="bottomLeft" '
        'state="frozen"/>'
        f'<selection pane="bottomLeft" activeCell="{top}" sqref="{top}"/>'
        "</sheetView></sheetViews>"
        f"<cols>{columns}</cols><sheetData>"
    )


def _sheet_tail(filter_range: str | None) -> str:
    # The filter's range follows the rows, known once they are all written.
    auto_filter = f'<autoFilter ref="{filter_range}"/>' if filter_range else ""
    return f"</sheetData>{auto_filter}</worksheet>"


# --- the sheets ------------------------------------------------------------------------


def _summary(report: RunReport) -> str:
    """The Summary sheet, whole: the run, then its totals (a few rows)."""
    run = report.run
    info: list[tuple[str, str | dt.datetime | None]] = [
        ("Connection", run.connection),
        ("Period from (UTC)", run.period_from),
        ("Period to (UTC)", run.period_to),
        ("Started (UTC)", run.started_at),
        ("Finished (UTC)", run.finished_at),
        ("Trigger", run.trigger),
        ("Started by", run.actor),
        ("State", run.state),
        ("Error", run.error),
    ]
    rows = [_row(1, [_text("A1", f"Reconciliation run {run.id}", _TITLE)])]
    for number, (label, value) in enumerate(info, start=2):
        shown = (
            _time(f"B{number}", value)
            if isinstance(value, dt.datetime)
            else _text(f"B{number}", value)
        )
        rows.append(_row(number, [_text(f"A{number}", label, _LABEL), shown]))
    top = len(info) + 3  # a blank row, then the totals' header
    rows.append(_header(top, SUMMARY_COLUMNS))
    for number, total in enumerate(report.totals, start=top + 1):
        money = _MONEY_STYLE.get(currency_places(total.currency), _MONEY_STYLE[2])
        rows.append(
            _row(
                number,
                [
                    _text(f"A{number}", total.currency),
                    _text(f"B{number}", total.category.label),
                    _text(f"C{number}", str(total.category)),
                    _number(f"D{number}", total.count, _COUNT),
                    _number(f"E{number}", total.ledger_amount, money),
                    _number(f"F{number}", total.venue_amount, money),
                    _number(f"G{number}", total.venue_amount - total.ledger_amount, money),
                ],
            )
        )
    return _sheet_head(SUMMARY_WIDTHS, top) + "".join(rows) + _sheet_tail(None)


def _exception_row(line: int, in_run: str, row: ExceptionRow) -> str:
    """One exception as row ``line`` of its sheet."""
    money = _MONEY_STYLE.get(currency_places(row.currency), _MONEY_STYLE[2])
    n = str(line)
    cells = [
        _number("A" + n, row.id),  # an integer shows whole in the General format
        _text("B" + n, in_run),
        _text("C" + n, row.category.label),
        _text("D" + n, str(row.category)),
        _text("E" + n, row.state),
        _text("F" + n, row.subject_key),
        _text("G" + n, row.shop_reference),
        _text("H" + n, row.order_id),
        _text("I" + n, row.buy_from_order_reference),
        _text("J" + n, row.currency),
        _number("K" + n, row.ledger_amount, money),
        _number("L" + n, row.venue_amount, money),
        _number("M" + n, row.difference, money),
        _time("N" + n, row.first_seen_at),
        _number("O" + n, row.age_days),
        _text("P" + n, row.aging_bucket),
        _text("Q" + n, details_text(row.details)),
    ]
    return f'<row r="{n}">{"".join(cells)}</row>'


class _Pipe:
    """Where the archive's bytes go: gathered, then taken as pieces by the stream.

    It has no ``tell`` or ``seek``, so :class:`zipfile.ZipFile` writes each member's
    sizes after its data (a data descriptor), as it does to a pipe."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> int:
        self._pieces.append(bytes(data))
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing held back: :meth:`take` hands on all there is."""

    def close(self) -> None:
        """Nothing to close: what is left is taken after the archive closes."""

    def take(self) -> bytes:
        piece = b"".join(self._pieces)
        self._pieces, self.size = [], 0
        return piece


def stream_xlsx(
    report: RunReport,
    progress: Callable[[], None] | None = None,
    *,
    sheet_rows: int = SHEET_ROWS,
    sheet_bytes: int = SHEET_BYTES,
) -> Iterator[bytes]:
    """The report's workbook, a piece at a time as it is made.

    Args:
        report: the report (its exceptions may stream).
        progress: called every :data:`~reconciler.report_formats.PROGRESS_EVERY` rows.
        sheet_rows: rows per exception sheet, its header included (the format's limit;
            smaller in tests).
        sheet_bytes: a sheet's XML beyond which the rows go on in the next sheet.

    Returns:
        The archive's bytes in pieces of about 64 KiB; the last ones (the workbook's
        list of sheets and the archive's directory) only once every row is in.
    """
    tick = progress or (lambda: None)
    pipe = _Pipe()
    with zipfile.ZipFile(pipe, "w", zipfile.ZIP_DEFLATED, compresslevel=_COMPRESSION) as archive:
        archive.writestr("xl/worksheets/sheet1.xml", _summary(report))
        sheets: list[tuple[str, str | None]] = [("Summary", None)]
        rows = tagged_rows(report, tick)
        done = False
        while not done:
            number = len(sheets) + 1
            name = "Exceptions" if number == 2 else f"Exceptions {number - 1}"
            with archive.open(f"xl/worksheets/sheet{number}.xml", "w") as sheet:
                written = sheet.write(
                    (_sheet_head(EXCEPTION_WIDTHS, 1) + _header(1, EXCEPTION_HEADERS)).encode()
                )
                line = 1
                batch: list[str] = []
                done = True
                for in_run, row in rows:
                    line += 1
                    batch.append(_exception_row(line, in_run, row))
                    if len(batch) >= _ROWS_PER_WRITE:
                        written += sheet.write("".join(batch).encode())
                        batch = []
                        if pipe.size >= _PIECE:
                            yield pipe.take()
                    if line >= sheet_rows or written >= sheet_bytes:
                        done = False  # a row may follow: it goes on the next sheet
                        break
                if batch:
                    sheet.write("".join(batch).encode())
                last = _letter(len(EXCEPTION_COLUMNS))
                sheet.write(_sheet_tail(f"A1:{last}{line}").encode())
            sheets.append((name, f"'{name}'!$A$1:${last}${line}"))
            if pipe.size >= _PIECE:
                yield pipe.take()
            if not done:
                # A sheet that ended at the limit with nothing after it would leave an
                # empty sheet: look at the next row before opening one.
                following = next(rows, None)
                if following is None:
                    break
                rows = _chain(following, rows)
        archive.writestr("xl/styles.xml", _styles())
        archive.writestr("xl/workbook.xml", _workbook(sheets))
        archive.writestr("xl/_rels/workbook.xml.rels", _workbook_relationships(len(sheets)))
        archive.writestr("_rels/.rels", _package_relationships())
        archive.writestr("[Content_Types].xml", _content_types(len(sheets)))
    yield pipe.take()


def _chain(
    first: tuple[str, ExceptionRow], rest: Iterator[tuple[str, ExceptionRow]]
) -> Iterator[tuple[str, ExceptionRow]]:
    """``first``, then the rest."""
    yield first
    yield from rest


def _workbook(sheets: list[tuple[str, str | None]]) -> str:
    listed = "".join(
        f'<sheet name={quoteattr(name)} sheetId="{index}" r:id="rId{index}"/>'
        for index, (name, _) in enumerate(sheets, start=1)
    )
    filters = "".join(
        f'<definedName name="_xlnm._FilterDatabase" localSheetId="{index}" hidden="1">'
        f"{escape(area)}</definedName>"
        for index, (_, area) in enumerate(sheets)
        if area
    )
    return (
        f'{_DECLARATION}<workbook xmlns="{_MAIN}" xmlns:r="{_RELATIONSHIPS}">'
        '<bookViews><workbookView activeTab="0"/></bookViews>'
        f"<sheets>{listed}</sheets><definedNames>{filters}</definedNames></workbook>"
    )


def _workbook_relationships(sheets: int) -> str:
    kind = f"{_RELATIONSHIPS}/worksheet"
    listed = "".join(
        f'<Relationship Id="rId{index}" Type="{kind}" Target="worksheets/sheet{index}.xml"/>'
        for index in range(1, sheets + 1)
    )
    styles = (
        f'<Relationship Id="rId{sheets + 1}" Type="{_RELATIONSHIPS}/styles" Target="styles.xml"/>'
    )
    return f'{_DECLARATION}<Relationships xmlns="{_PACKAGE}">{listed}{styles}</Relationships>'


def _package_relationships() -> str:
    return (
        f'{_DECLARATION}<Relationships xmlns="{_PACKAGE}">'
        f'<Relationship Id="rId1" Type="{_RELATIONSHIPS}/officeDocument" '
        'Target="xl/workbook.xml"/></Relationships>'
    )


def _content_types(sheets: int) -> str:
    office = "application/vnd.openxmlformats-officedocument.spreadsheetml"
    parts = "".join(
        f'<Override PartName="/xl/worksheets/sheet{index}.xml" '
        f'ContentType="{office}.worksheet+xml"/>'
        for index in range(1, sheets + 1)
    )
    return (
        f"{_DECLARATION}"
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" '
        'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        f'<Override PartName="/xl/workbook.xml" ContentType="{office}.sheet.main+xml"/>'
        f'<Override PartName="/xl/styles.xml" ContentType="{office}.styles+xml"/>'
        f"{parts}</Types>"
    )


def write_xlsx(
    report: RunReport, target: BinaryIO, *, progress: Callable[[], None] | None = None
) -> None:
    """Write the report's workbook to ``target`` (see :func:`stream_xlsx`).

    Args:
        report: the report.
        target: a binary file (seekable or not).
        progress: called every :data:`~reconciler.report_formats.PROGRESS_EVERY` rows.
    """
    for piece in stream_xlsx(report, progress):
        target.write(piece)
