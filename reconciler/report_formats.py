"""A reconciliation run's report as a file: CSV, XLSX, HTML or JSON.

:func:`render_report` turns a :class:`~reconciler.report.RunReport` (from
:func:`~reconciler.report.load_run_report`) into the bytes of one of
:data:`REPORT_FORMATS`; the ``otacm report`` command and the finance pages serve the
same bytes, and the finance pages draw the same chart (:func:`chart_svg`). Amounts are
written with their currency's decimals (:func:`money_text`).

The formats, for finance who open them in a spreadsheet or a browser:

- ``csv``: the exception table alone (one row per exception, a header row and nothing
  before it), UTF-8 with a byte order mark so Excel reads accented references right.
  The summary lives in the other formats. Every field is quoted, and a text cell that a
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

import csv
import datetime as dt
import io
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any

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
    """The report in one of :data:`REPORT_FORMATS`.

    Args:
        report: from :func:`~reconciler.report.load_run_report`.
        fmt: ``"csv"``, ``"xlsx"``, ``"html"`` or ``"json"``.

    Returns:
        The file's bytes (text formats in UTF-8).

    Raises:
        ValueError: ``fmt`` is not a report format.
    """
    if fmt == "csv":
        return _render_csv(report)
    if fmt == "xlsx":
        return _render_xlsx(report)
    if fmt == "html":
        return _render_html(report)
    if fmt == "json":
        return _render_json(report)
    raise ValueError(f"unknown report format {fmt!r}: use one of {', '.join(REPORT_FORMATS)}")


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


def _tagged_rows(report: RunReport) -> list[tuple[str, ExceptionRow]]:
    return [("seen", row) for row in report.exceptions] + [("closed", row) for row in report.closed]


def _defused(text: str | None) -> str:
    """Text a spreadsheet shows as text, never runs as a formula: an apostrophe before
    each formula character that would start a cell (see :data:`_FORMULA_START`)."""
    if not text:
        return ""
    return _FORMULA_START.sub("'", text)


def _render_csv(report: RunReport) -> bytes:
    out = io.StringIO(newline="")
    # Quoted, a separator or line break inside a cell stays in it for readers that
    # split on the comma; _defused covers those that split on something else.
    writer = csv.writer(out, quoting=csv.QUOTE_ALL)
    writer.writerow(_COLUMNS)
    for in_run, row in _tagged_rows(report):
        writer.writerow(
            [
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
        )
    # The byte order mark is how Excel knows the file is UTF-8.
    return out.getvalue().encode("utf-8-sig")


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


def report_json(report: RunReport) -> dict[str, Any]:
    """The report as JSON-ready data: amounts as strings, times as ISO 8601 (UTC)."""
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
        "exceptions": [_json_row(row) for row in report.exceptions],
        "closed": [_json_row(row) for row in report.closed],
    }


def _render_json(report: RunReport) -> bytes:
    return (json.dumps(report_json(report), indent=2, ensure_ascii=False) + "\n").encode()


# --- XLSX ------------------------------------------------------------------------------


def _number_format(currency: str | None) -> str:
    places = currency_places(currency)
    pattern = "#,##0" + ("." + "0" * places if places else "")
    # Negative amounts in red, as accountants expect.
    return f"{pattern};[Red]-{pattern}"


def _excel_time(value: dt.datetime | None) -> dt.datetime | None:
    # Excel has no time zones: UTC wall time, and the headers say UTC.
    return None if value is None else value.astimezone(dt.UTC).replace(tzinfo=None)


def _render_xlsx(report: RunReport) -> bytes:
    from openpyxl import Workbook
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
    from openpyxl.styles import Alignment, Font, PatternFill
    from openpyxl.utils import get_column_letter
    from openpyxl.worksheet.worksheet import Worksheet

    bold = Font(bold=True)
    header_fill = PatternFill("solid", fgColor="E8EEF4")
    time_format = "yyyy-mm-dd hh:mm:ss"

    def put(sheet: Worksheet, row: int, column: int, value: Any, number_format: str = "") -> None:
        cell = sheet.cell(row=row, column=column)
        if isinstance(value, str):
            cell.value = ILLEGAL_CHARACTERS_RE.sub("", value)
            # openpyxl would store "=..." as a formula; a reference is text.
            cell.data_type = "s"
        else:
            cell.value = value
        if number_format:
            cell.number_format = number_format

    def header(sheet: Worksheet, row: int, titles: list[str]) -> None:
        for column, title in enumerate(titles, start=1):
            put(sheet, row, column, title)
            cell = sheet.cell(row=row, column=column)
            cell.font, cell.fill = bold, header_fill
            cell.alignment = Alignment(vertical="center")

    def widths(sheet: Worksheet, values: list[int]) -> None:
        for column, width in enumerate(values, start=1):
            sheet.column_dimensions[get_column_letter(column)].width = width

    book = Workbook()
    summary = book.active
    assert summary is not None  # a new workbook has one sheet
    summary.title = "Summary"
    run = report.run
    put(summary, 1, 1, f"Reconciliation run {run.id}")
    summary.cell(row=1, column=1).font = Font(bold=True, size=14)
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
    for offset, (label, value) in enumerate(info, start=2):
        put(summary, offset, 1, label)
        summary.cell(row=offset, column=1).font = bold
        put(summary, offset, 2, value, time_format if isinstance(value, dt.datetime) else "")
    top = len(info) + 3
    header(
        summary,
        top,
        ["Currency", "Category", "Code", "Count", "Ledger amount", "Venue amount", "Difference"],
    )
    for offset, total in enumerate(report.totals, start=top + 1):
        money = _number_format(total.currency)
        put(summary, offset, 1, total.currency)
        put(summary, offset, 2, total.category.label)
        put(summary, offset, 3, str(total.category))
        put(summary, offset, 4, total.count, "#,##0")
        put(summary, offset, 5, total.ledger_amount, money)
        put(summary, offset, 6, total.venue_amount, money)
        put(summary, offset, 7, total.venue_amount - total.ledger_amount, money)
    summary.freeze_panes = f"A{top + 1}"
    widths(summary, [20, 44, 28, 10, 18, 18, 18])

    sheet = book.create_sheet("Exceptions")
    header(
        sheet,
        1,
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
    tagged = _tagged_rows(report)
    for number, (in_run, row) in enumerate(tagged, start=2):
        money = _number_format(row.currency)
        values: list[tuple[Any, str]] = [
            (row.id, "0"),
            (in_run, ""),
            (row.category.label, ""),
            (str(row.category), ""),
            (row.state, ""),
            (row.subject_key, ""),
            (row.shop_reference, ""),
            (row.order_id, ""),
            (row.buy_from_order_reference, ""),
            (row.currency, ""),
            (row.ledger_amount, money),
            (row.venue_amount, money),
            (row.difference, money),
            (_excel_time(row.first_seen_at), time_format),
            (row.age_days, "0"),
            (row.aging_bucket, ""),
            (_details_text(row.details) or None, ""),
        ]
        for column, (value, number_format) in enumerate(values, start=1):
            put(sheet, number, column, value, number_format)
    last = get_column_letter(len(_COLUMNS))
    sheet.auto_filter.ref = f"A1:{last}{len(tagged) + 1}"
    sheet.freeze_panes = "A2"
    widths(sheet, [8, 11, 30, 22, 10, 28, 22, 38, 22, 9, 15, 15, 15, 20, 10, 13, 50])

    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


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


def _chart(exceptions: list[ExceptionRow]) -> _Chart | None:
    """Bars of exceptions per category, stacked by age group; None when there are none."""
    counts: dict[Category, dict[str, int]] = {}
    for row in exceptions:
        per_bucket = counts.setdefault(row.category, dict.fromkeys(AGING_BUCKETS, 0))
        per_bucket[row.aging_bucket] += 1
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


def chart_svg(exceptions: list[ExceptionRow]) -> Markup | None:
    """The chart of exceptions per category, stacked by age, as inline SVG markup.

    The HTML report and the finance pages draw the same chart. ``None`` when there are
    no exceptions to draw.
    """
    chart = _chart(exceptions)
    if chart is None:
        return None
    return Markup(_templates().get_template("chart.svg").render(chart=chart))  # noqa: S704


def _render_html(report: RunReport) -> bytes:
    environment = _templates()
    exception_count = sum(total.count for total in report.totals if total.category.is_exception)
    page = environment.get_template("report.html").render(
        report=report,
        chart=_chart(report.exceptions),
        chart_svg=chart_svg(report.exceptions),
        exception_count=exception_count,
        old_count=sum(row.aging_bucket == AGING_BUCKETS[-1] for row in report.exceptions),
        ledger_count=sum(
            total.count for total in report.totals if total.category is not Category.ORPHAN
        ),
    )
    return page.encode()
