"""A reconciliation run's report as a file: CSV, XLSX, HTML or JSON.

:func:`stream_report` turns a :class:`~reconciler.report.RunReport` into the bytes of one
of :data:`REPORT_FORMATS`, a piece at a time: a report whose exceptions stream
(:func:`~reconciler.report.open_run_report`) is written in memory that does not grow
with them, whatever the format (XLSX in openpyxl's write-only mode, through a temporary
file: a workbook is a zip archive, complete only once closed). :func:`render_report`
gives the whole file at once, for small reports. The ``otacm report`` command and the
finance pages serve the same bytes, and the finance pages draw the same chart
(:func:`chart_svg`). Amounts are written with their currency's decimals
(:func:`money_text`). Exceptions come in order of their id (oldest first), those the
run saw, then those it closed.

A file cut short on its way (a process killed, a connection lost) never looks whole:
the CSV ends with a line of its own saying how many rows it holds, the JSON and the
XLSX do not parse without their ends, and the HTML page's footer, last, counts its rows.

The formats, for finance who open them in a spreadsheet or a browser:

- ``csv``: the exception table alone (one row per exception, a header row and nothing
  before it), UTF-8 with a byte order mark so Excel reads accented references right.
  The summary lives in the other formats. The last line, one quoted field, is the end
  marker ``# end of report: N rows``. Every field is quoted, and a text cell that a
  spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, tab or
  carriage return) gets a leading apostrophe (OWASP's advice on CSV injection). So
  does such a character right after a separator inside a cell (``;=``, ``,+``, a tab
  or a line break before ``@``): a spreadsheet that splits on another separator than
  the comma (``;`` in many locales) starts a cell there, whatever the quotes say.
  Amounts are written by us and are plain numbers.
- ``xlsx``: a "Summary" sheet (the run, then totals per currency and category) and an
  "Exceptions" sheet (one row per exception with a filter), numbers as numbers in the
  currency's format and times as real dates (UTC).
- ``html``: one self-contained page (inline CSS and SVG, no scripts, no fonts): the
  summary, a chart of exceptions by category stacked by age, and the exception tables.
- ``json``: the same data, amounts as strings, times as ISO 8601.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any, BinaryIO

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from reconciler.categories import Category
from reconciler.report import AGING_BUCKETS, ExceptionRow, RunReport

REPORT_FORMATS: dict[str, str] = {
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "html": "text/html; charset=utf-8",
    "json": "application/json",
}
"""Each report format and its MIME type (for downloads)."""

# Decimal places of the currencies that do not have two (ISO 4217 minor units).
_MINOR_UNITS = {
    "BHD": 3, "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "IQD": 3, "ISK": 0, "JOD": 3,
    "JPY": 0, "KMF": 0, "KRW": 0, "KWD": 3, "LYD": 3, "OMR": 3, "PYG": 0, "RWF": 0,
    "TND": 3, "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
}  # fmt: skip

# Where a spreadsheet would start a formula: a formula character (OWASP's CSV injection
# list) at the start of a cell, or after a character some spreadsheet splits cells on.
_FORMULA_START = re.compile("(?:^|(?<=[,;\t\r\n]))(?=[=+\\-@\t\r])")


def render_report(report: RunReport, fmt: str) -> bytes:
    """The whole report in one of :data:`REPORT_FORMATS`, at once (see :func:`stream_report`).

    Raises:
        ValueError: ``fmt`` is not a report format.
    """
    return b"".join(stream_report(report, fmt))


def stream_report(
    report: RunReport, fmt: str, *, progress: Callable[[], None] | None = None
) -> Iterator[bytes]:
    """The report in one of :data:`REPORT_FORMATS`, a piece at a time.

    Args:
        report: from :func:`~reconciler.report.open_run_report` (streamed) or
            :func:`~reconciler.report.load_run_report`.
        fmt: ``"csv"``, ``"xlsx"``, ``"html"`` or ``"json"``.
        progress: called every :data:`PROGRESS_EVERY` rows written, to say the work
            goes on (a web worker's liveness).

    Returns:
        The file's bytes in pieces (text formats in UTF-8).

    Raises:
        ValueError: ``fmt`` is not a report format (at once, before any piece).
    """
    tick = progress or _nothing
    if fmt == "csv":
        return _stream_csv(report, tick)
    if fmt == "xlsx":
        return _stream_xlsx(report, tick)
    if fmt == "html":
        return _stream_html(report, tick)
    if fmt == "json":
        return _stream_json(report, tick)
    raise ValueError(f"unknown report format {fmt!r}: use one of {', '.join(REPORT_FORMATS)}")


PROGRESS_EVERY = 1000
"""Rows between two calls of a stream's ``progress``."""

_CHUNK = 64 * 1024  # bytes gathered before a piece of a text format is handed on


def _nothing() -> None:
    """No progress to tell."""


def currency_places(currency: str | None) -> int:
    """Decimal places amounts in ``currency`` are shown with (two when unknown)."""
    return _MINOR_UNITS.get((currency or "").upper(), 2)


def money_text(amount: Decimal | None, currency: str | None) -> str:
    """An amount as plain text with the currency's decimals: ``-20.00``; ``""`` for none.

    An amount finer than the currency's decimals keeps its digits, so nothing is hidden.
    """
    if amount is None:
        return ""
    quantum = Decimal(1).scaleb(-currency_places(currency))
    rounded = amount.quantize(quantum)
    if rounded != amount:
        return format(amount.normalize(), "f")
    return format(rounded, "f")


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat()


def _details_text(details: dict[str, Any]) -> str:
    return json.dumps(details, sort_keys=True, ensure_ascii=False) if details else ""


# The exception table's columns, shared by CSV and XLSX.
_COLUMNS = (
    "id",
    "in_this_run",
    "category",
    "category_label",
    "state",
    "subject_key",
    "shop_reference",
    "order_id",
    "buy_from_order_reference",
    "currency",
    "ledger_amount",
    "venue_amount",
    "difference",
    "first_seen_at_utc",
    "age_days",
    "aging_bucket",
    "details",
)


def _tagged_rows(
    report: RunReport, progress: Callable[[], None]
) -> Iterator[tuple[str, ExceptionRow]]:
    """Every row with the list it is in: the run saw it, or closed it."""
    written = 0
    for in_run, rows in (("seen", report.exceptions), ("closed", report.closed)):
        for row in rows:
            yield in_run, row
            written += 1
            if written % PROGRESS_EVERY == 0:
                progress()


def _ticking(rows: Iterable[ExceptionRow], progress: Callable[[], None]) -> Iterator[ExceptionRow]:
    for written, row in enumerate(rows, start=1):
        yield row
        if written % PROGRESS_EVERY == 0:
            progress()


def _defused(text: str | None) -> str:
    """Text a spreadsheet shows as text, never runs as a formula: an apostrophe before
    each formula character that would start a cell (see :data:`_FORMULA_START`)."""
    if not text:
        return ""
    return _FORMULA_START.sub("'", text)


def _csv_row(in_run: str, row: ExceptionRow) -> list[str]:
    return [
        str(row.id),
        in_run,
        str(row.category),
        _defused(row.category.label),
        row.state,
        _defused(row.subject_key),
        _defused(row.shop_reference),
        _defused(row.order_id),
        _defused(row.buy_from_order_reference),
        _defused(row.currency),
        money_text(row.ledger_amount, row.currency),
        money_text(row.venue_amount, row.currency),
        money_text(row.difference, row.currency),
        # ISO 8601 with a space: what Excel reads as a date and time.
        row.first_seen_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        str(row.age_days),
        row.aging_bucket,
        _defused(_details_text(row.details)),
    ]


CSV_END_MARKER = "# end of report: {rows} rows"
"""The CSV's last line (one field): a file without it was cut short."""


def _stream_csv(report: RunReport, progress: Callable[[], None]) -> Iterator[bytes]:
    out = io.StringIO(newline="")
    # Quoted, a separator or line break inside a cell stays in it for readers that
    # split on the comma; _defused covers those that split on something else.
    writer = csv.writer(out, quoting=csv.QUOTE_ALL)
    # The byte order mark is how Excel knows the file is UTF-8.
    out.write("\ufeff")
    writer.writerow(_COLUMNS)
    rows = 0
    for in_run, row in _tagged_rows(report, progress):
        writer.writerow(_csv_row(in_run, row))
        rows += 1
        if out.tell() >= _CHUNK:
            yield out.getvalue().encode()
            out.seek(0)
            out.truncate()
    writer.writerow([CSV_END_MARKER.format(rows=rows)])
    yield out.getvalue().encode()


def _json_row(row: ExceptionRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "category": str(row.category),
        "category_label": row.category.label,
        "state": row.state,
        "subject_key": row.subject_key,
        "shop_reference": row.shop_reference,
        "order_id": row.order_id,
        "buy_from_order_reference": row.buy_from_order_reference,
        "currency": row.currency,
        "ledger_amount": money_text(row.ledger_amount, row.currency) or None,
        "venue_amount": money_text(row.venue_amount, row.currency) or None,
        "difference": money_text(row.difference, row.currency) or None,
        "details": row.details,
        "first_seen_at": _iso(row.first_seen_at),
        "age_days": row.age_days,
        "aging_bucket": row.aging_bucket,
    }


def _run_json(report: RunReport) -> dict[str, Any]:
    """The report's head: the run, its totals and the age groups, JSON-ready."""
    run = report.run
    return {
        "run": {
            "id": run.id,
            "connection": run.connection,
            "period_from": _iso(run.period_from),
            "period_to": _iso(run.period_to),
            "started_at": _iso(run.started_at),
            "finished_at": _iso(run.finished_at),
            "trigger": run.trigger,
            "actor": run.actor,
            "state": run.state,
            "error": run.error,
        },
        "totals": [
            {
                "currency": total.currency,
                "category": str(total.category),
                "category_label": total.category.label,
                "is_exception": total.category.is_exception,
                "count": total.count,
                "ledger_amount": money_text(total.ledger_amount, total.currency),
                "venue_amount": money_text(total.venue_amount, total.currency),
            }
            for total in report.totals
        ],
        "aging_buckets": list(AGING_BUCKETS),
    }


def _stream_json(report: RunReport, progress: Callable[[], None]) -> Iterator[bytes]:
    """The head indented, then ``exceptions`` and ``closed`` one row per line: the same
    document as one ``json.dumps`` would make, written a row at a time."""
    head = json.dumps(_run_json(report), indent=2, ensure_ascii=False)
    parts = [head.removesuffix("\n}")]
    size = 0
    for name, rows in (("exceptions", report.exceptions), ("closed", report.closed)):
        parts.append(f',\n  "{name}": [')
        separator = "\n    "
        for row in _ticking(rows, progress):
            text = json.dumps(_json_row(row), ensure_ascii=False)
            parts.append(separator + text)
            separator = ",\n    "
            size += len(text)
            if size >= _CHUNK:
                yield "".join(parts).encode()
                parts, size = [], 0
        parts.append("]" if separator == "\n    " else "\n  ]")
    parts.append("\n}\n")
    yield "".join(parts).encode()


# --- XLSX ------------------------------------------------------------------------------


def _number_format(currency: str | None) -> str:
    places = currency_places(currency)
    pattern = "#,##0" + ("." + "0" * places if places else "")
    # Negative amounts in red, as accountants expect.
    return f"{pattern};[Red]-{pattern}"


def _excel_time(value: dt.datetime | None) -> dt.datetime | None:
    # Excel has no time zones: UTC wall time, and the headers say UTC.
    return None if value is None else value.astimezone(dt.UTC).replace(tzinfo=None)


def _stream_xlsx(report: RunReport, progress: Callable[[], None]) -> Iterator[bytes]:
    """The workbook, built in a temporary file, then read out of it."""
    with tempfile.TemporaryFile() as spool:
        write_xlsx(report, spool, progress=progress)
        spool.seek(0)
        while piece := spool.read(_CHUNK):
            yield piece


def write_xlsx(
    report: RunReport, target: BinaryIO, *, progress: Callable[[], None] | None = None
) -> None:
    """Write the report's workbook to ``target``, in openpyxl's write-only mode.

    Rows go to openpyxl's temporary files as they come, so memory does not grow with
    the exceptions; the archive is written to ``target`` once the last row is in.

    Args:
        report: the report.
        target: a binary file (seekable or not).
        progress: called every :data:`PROGRESS_EVERY` rows.
    """
    from openpyxl import Workbook
    from openpyxl.cell import WriteOnlyCell
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
    from openpyxl.styles import Alignment, Font, PatternFill
    from openpyxl.utils import get_column_letter
    from openpyxl.worksheet._write_only import WriteOnlyWorksheet

    tick = progress or _nothing
    bold = Font(bold=True)
    header_fill = PatternFill("solid", fgColor="E8EEF4")
    middle = Alignment(vertical="center")
    time_format = "yyyy-mm-dd hh:mm:ss"

    def cell(sheet: WriteOnlyWorksheet, value: Any, number_format: str = "") -> Any:
        """A value as openpyxl writes it: text always as text, never a formula."""
        if isinstance(value, str):
            value = ILLEGAL_CHARACTERS_RE.sub("", value)
            if value.startswith("="):
                # openpyxl would store "=..." as a formula; a reference is text.
                text = WriteOnlyCell(sheet, value)
                text.data_type = "s"
                return text
            return value
        if number_format and value is not None:
            formatted = WriteOnlyCell(sheet, value)
            formatted.number_format = number_format
            return formatted
        return value

    def header(sheet: WriteOnlyWorksheet, titles: list[str]) -> list[Any]:
        cells = []
        for title in titles:
            head = WriteOnlyCell(sheet, title)
            head.font, head.fill, head.alignment = bold, header_fill, middle
            cells.append(head)
        return cells

    def widths(sheet: WriteOnlyWorksheet, values: list[int]) -> None:
        # Before the first row: a write-only sheet writes its columns first.
        for column, width in enumerate(values, start=1):
            # A write-only sheet has them, though openpyxl's stubs do not say so.
            sheet.column_dimensions[get_column_letter(column)].width = width  # type: ignore[attr-defined]

    book = Workbook(write_only=True)
    try:
        summary = book.create_sheet("Summary")
        run = report.run
        info: list[tuple[str, Any]] = [
            ("Connection", run.connection),
            ("Period from (UTC)", _excel_time(run.period_from)),
            ("Period to (UTC)", _excel_time(run.period_to)),
            ("Started (UTC)", _excel_time(run.started_at)),
            ("Finished (UTC)", _excel_time(run.finished_at)),
            ("Trigger", run.trigger),
            ("Started by", run.actor or ""),
            ("State", run.state),
            ("Error", run.error or ""),
        ]
        top = len(info) + 3
        summary.freeze_panes = f"A{top + 1}"
        widths(summary, [20, 44, 28, 10, 18, 18, 18])
        title = WriteOnlyCell(summary, f"Reconciliation run {run.id}")
        title.font = Font(bold=True, size=14)
        summary.append([title])
        for label, value in info:
            name = WriteOnlyCell(summary, label)
            name.font = bold
            number_format = time_format if isinstance(value, dt.datetime) else ""
            summary.append([name, cell(summary, value, number_format)])
        summary.append([])
        summary.append(
            header(
                summary,
                [
                    "Currency",
                    "Category",
                    "Code",
                    "Count",
                    "Ledger amount",
                    "Venue amount",
                    "Difference",
                ],
            )
        )
        for total in report.totals:
            money = _number_format(total.currency)
            summary.append(
                [
                    cell(summary, total.currency),
                    cell(summary, total.category.label),
                    cell(summary, str(total.category)),
                    cell(summary, total.count, "#,##0"),
                    cell(summary, total.ledger_amount, money),
                    cell(summary, total.venue_amount, money),
                    cell(summary, total.venue_amount - total.ledger_amount, money),
                ]
            )

        sheet = book.create_sheet("Exceptions")
        sheet.freeze_panes = "A2"
        widths(sheet, [8, 11, 30, 22, 10, 28, 22, 38, 22, 9, 15, 15, 15, 20, 10, 13, 50])
        sheet.append(
            header(
                sheet,
                [
                    "ID",
                    "In this run",
                    "Category",
                    "Code",
                    "State",
                    "Subject",
                    "Shop reference",
                    "Order ID",
                    "Venue reference",
                    "Currency",
                    "Ledger amount",
                    "Venue amount",
                    "Difference",
                    "First seen (UTC)",
                    "Age (days)",
                    "Aging",
                    "Details",
                ],
            )
        )
        rows = 0
        for in_run, row in _tagged_rows(report, tick):
            money = _number_format(row.currency)
            sheet.append(
                [
                    row.id,  # an integer shows whole in the General format
                    in_run,
                    cell(sheet, row.category.label),
                    str(row.category),
                    row.state,
                    cell(sheet, row.subject_key),
                    cell(sheet, row.shop_reference),
                    cell(sheet, row.order_id),
                    cell(sheet, row.buy_from_order_reference),
                    cell(sheet, row.currency),
                    cell(sheet, row.ledger_amount, money),
                    cell(sheet, row.venue_amount, money),
                    cell(sheet, row.difference, money),
                    cell(sheet, _excel_time(row.first_seen_at), time_format),
                    row.age_days,
                    row.aging_bucket,
                    cell(sheet, _details_text(row.details) or None),
                ]
            )
            rows += 1
        # The filter's range is written after the rows, with the sheet's tail.
        sheet.auto_filter.ref = f"A1:{get_column_letter(len(_COLUMNS))}{rows + 1}"
        # Saving compresses every row into the archive in one call: each megabyte of it
        # written counts as progress too.
        book.save(_ProgressWriter(target, tick))
    except BaseException:
        _discard(book)
        raise


def _discard(book: Any) -> None:
    """A write-only workbook given up halfway (rows that stopped coming, a client gone):
    its sheets' writers closed and their temporary files removed now, not when the
    process exits (openpyxl's own clean-up), as a long-lived web worker would."""
    for sheet in book.worksheets:
        writer = getattr(sheet, "_writer", None)
        if writer is None:  # no row written yet: no file
            continue
        for step in (getattr(sheet, "_rows", None), writer):
            if step is not None:
                # Half-written XML cannot close cleanly; nothing of it is kept.
                with contextlib.suppress(Exception):
                    step.close()
        with contextlib.suppress(OSError, ValueError):
            writer.cleanup()


class _ProgressWriter:
    """A binary file that calls ``progress`` each time another megabyte is written."""

    def __init__(self, target: BinaryIO, progress: Callable[[], None]) -> None:
        self._target = target
        self._progress = progress
        self._since = 0

    def write(self, data: bytes) -> int:
        written = self._target.write(data)
        self._since += len(data)
        if self._since >= 1 << 20:
            self._since = 0
            self._progress()
        return written

    def tell(self) -> int:
        return self._target.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._target.seek(offset, whence)

    def seekable(self) -> bool:
        return self._target.seekable()

    def flush(self) -> None:
        self._target.flush()


# --- HTML ------------------------------------------------------------------------------

# Youngest to oldest: calm to alarming, and distinct for red-green colour blindness.
_BUCKET_COLOURS = ("#9ecae1", "#3182bd", "#f4a259", "#c0392b")


@dataclass(frozen=True)
class _Segment:
    x: float
    width: float
    colour: str
    count: int
    bucket: str


@dataclass(frozen=True)
class _Bar:
    label: str
    y: float
    total: int
    segments: list[_Segment]


@dataclass(frozen=True)
class _Chart:
    width: int
    height: int
    label_width: int
    bars: list[_Bar]
    legend: list[tuple[str, str]]


def _chart(counts: Mapping[Category, Mapping[str, int]]) -> _Chart | None:
    """Bars of exceptions per category, stacked by age group; None when there are none.

    ``counts`` is :attr:`RunReport.aging`: per category, the count of each age group.
    """
    counts = {
        category: per_bucket for category, per_bucket in counts.items() if any(per_bucket.values())
    }
    if not counts:
        return None
    label_width, bar_width, row_height, top = 300, 420, 30, 36
    largest = max(sum(per_bucket.values()) for per_bucket in counts.values())
    bars = []
    for index, category in enumerate(c for c in Category if c in counts):
        x = float(label_width)
        segments = []
        for bucket, colour in zip(AGING_BUCKETS, _BUCKET_COLOURS, strict=True):
            count = counts[category][bucket]
            if count:
                width = bar_width * count / largest
                segments.append(_Segment(x, width, colour, count, bucket))
                x += width
        bars.append(
            _Bar(category.label, top + index * row_height, sum(counts[category].values()), segments)
        )
    return _Chart(
        width=label_width + bar_width + 60,
        height=top + len(bars) * row_height,
        label_width=label_width,
        bars=bars,
        legend=list(zip(AGING_BUCKETS, _BUCKET_COLOURS, strict=True)),
    )


def _html_money(amount: Decimal | None, currency: str | None) -> str:
    if amount is None:
        return ""
    places = currency_places(currency)
    text = money_text(amount, currency)
    digits = len(text.partition(".")[2]) if "." in text else 0
    return f"{amount:,.{max(places, digits)}f}"


def _html_time(value: dt.datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@cache
def _templates() -> Environment:
    environment = Environment(
        loader=PackageLoader("reconciler", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["money"] = _html_money
    environment.filters["time"] = _html_time
    environment.filters["details"] = _details_text
    return environment


def chart_svg(counts: Mapping[Category, Mapping[str, int]]) -> Markup | None:
    """The chart of exceptions per category, stacked by age, as SVG markup.

    The HTML report and the finance pages draw the same chart from the same figures
    (:attr:`RunReport.aging`). ``None`` when there are no exceptions to draw.
    """
    chart = _chart(counts)
    if chart is None:
        return None
    return Markup(_templates().get_template("chart.svg").render(chart=chart))  # noqa: S704


def _stream_html(report: RunReport, progress: Callable[[], None]) -> Iterator[bytes]:
    environment = _templates()
    exception_count = sum(total.count for total in report.totals if total.category.is_exception)
    pieces = environment.get_template("report.html").generate(
        report=report,
        exceptions=_ticking(report.exceptions, progress),
        closed=_ticking(report.closed, progress),
        chart_svg=chart_svg(report.aging),
        exception_count=exception_count,
        old_count=sum(per_bucket[AGING_BUCKETS[-1]] for per_bucket in report.aging.values()),
        ledger_count=sum(
            total.count for total in report.totals if total.category is not Category.ORPHAN
        ),
    )
    parts: list[str] = []
    size = 0
    for piece in pieces:
        parts.append(piece)
        size += len(piece)
        if size >= _CHUNK:
            yield "".join(parts).encode()
            parts, size = [], 0
    yield "".join(parts).encode()
