"""A reconciliation run's report as a file: CSV, XLSX, HTML or JSON.

:func:`stream_report` turns a :class:`~reconciler.report.RunReport` into the bytes of one
of :data:`REPORT_FORMATS`, a piece at a time: a report whose exceptions stream
(:func:`~reconciler.report.open_run_report`) is written in memory that does not grow
with them, whatever the format (XLSX too: :mod:`reconciler.report_xlsx` compresses its
rows into the archive as they come). :func:`render_report`
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
  currency's format and times as real dates (UTC); past a sheet's 1,048,576 rows the
  exceptions go on in "Exceptions 2" and so on.
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
from collections.abc import Callable, Iterable, Iterator, Mapping
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
_FORMULA_CHARACTERS = "=+-@\t\r"
# Without one of these, only the first character can start a formula: most cells.
_SPLITTING = re.compile("[,;\t\r\n]")


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


# The smallest amount shown, per number of decimal places.
_QUANTA = {places: Decimal(1).scaleb(-places) for places in {2, *_MINOR_UNITS.values()}}


def money_text(amount: Decimal | None, currency: str | None) -> str:
    """An amount as plain text with the currency's decimals: ``-20.00``; ``""`` for none.

    An amount finer than the currency's decimals keeps its digits, so nothing is hidden.
    """
    return _money_text(amount, _QUANTA[currency_places(currency)])


def _money_text(amount: Decimal | None, quantum: Decimal) -> str:
    """:func:`money_text` with the currency's :data:`_QUANTA` known (a row's amounts share it)."""
    if amount is None:
        return ""
    rounded = amount.quantize(quantum)
    if rounded != amount:
        return format(amount.normalize(), "f")
    return format(rounded, "f")


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo is dt.UTC else value.astimezone(dt.UTC)).isoformat()


def _sheet_time(value: dt.datetime) -> str:
    """A time as ``2026-12-07 12:00:00`` in UTC: ISO 8601 with a space, which Excel reads
    as a date and time."""
    if value.tzinfo is not dt.UTC:
        value = value.astimezone(dt.UTC)
    if value.year < 1000:  # isoformat pads the year to four digits, strftime does not
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return value.isoformat(" ", "seconds")[:19]  # without the offset: UTC is said


def details_text(details: dict[str, Any]) -> str:
    """A details dict as one line of JSON (keys sorted); "" for none."""
    return json.dumps(details, sort_keys=True, ensure_ascii=False) if details else ""


class _DetailsTexts:
    """A stream's texts of its rows' details, each dict's worked out once.

    The rows of one stream share one dict per distinct details document
    (:func:`reconciler.report.iter_exceptions`), so most rows find their text here. A
    dict is known by its identity, and kept while its text is, so that no other dict
    can take its id meanwhile.
    """

    _KEPT = 4096  # dicts remembered at most (then forgotten: a run of unique details)

    def __init__(self, text: Callable[[dict[str, Any]], str]) -> None:
        self._text = text
        self._known: dict[int, tuple[dict[str, Any], str]] = {}

    def __call__(self, details: dict[str, Any]) -> str:
        known = self._known.get(id(details))
        if known is not None and known[0] is details:
            return known[1]
        text = self._text(details)
        if len(self._known) >= self._KEPT:
            self._known.clear()
        self._known[id(details)] = (details, text)
        return text


EXCEPTION_COLUMNS = (
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
"""The exception table's columns: the CSV's header, the XLSX's width."""


def tagged_rows(
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
    if text[0] in _FORMULA_CHARACTERS or _SPLITTING.search(text):
        return _FORMULA_START.sub("'", text)
    return text


def _defused_details(details: dict[str, Any]) -> str:
    return _defused(details_text(details))


def _csv_row(in_run: str, row: ExceptionRow, details: Callable[[dict[str, Any]], str]) -> list[str]:
    quantum = _QUANTA[currency_places(row.currency)]
    return [
        str(row.id),
        in_run,
        row.category.value,
        _defused(row.category.label),
        row.state,
        _defused(row.subject_key),
        _defused(row.shop_reference),
        _defused(row.order_id),
        _defused(row.buy_from_order_reference),
        _defused(row.currency),
        _money_text(row.ledger_amount, quantum),
        _money_text(row.venue_amount, quantum),
        _money_text(row.difference, quantum),
        _sheet_time(row.first_seen_at),
        str(row.age_days),
        row.aging_bucket,
        details(row.details),
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
    writer.writerow(EXCEPTION_COLUMNS)
    rows = 0
    details = _DetailsTexts(_defused_details)
    for in_run, row in tagged_rows(report, progress):
        writer.writerow(_csv_row(in_run, row, details))
        rows += 1
        if out.tell() >= _CHUNK:
            yield out.getvalue().encode()
            out.seek(0)
            out.truncate()
    writer.writerow([CSV_END_MARKER.format(rows=rows)])
    yield out.getvalue().encode()


def exception_json(row: ExceptionRow) -> dict[str, Any]:
    """One exception as the JSON report and ``otacm exceptions list --json`` write it."""
    quantum = _QUANTA[currency_places(row.currency)]
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
        "ledger_amount": _money_text(row.ledger_amount, quantum) or None,
        "venue_amount": _money_text(row.venue_amount, quantum) or None,
        "difference": _money_text(row.difference, quantum) or None,
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


# json.dumps with an option builds an encoder per call: one serves every row.
_encode_row = json.JSONEncoder(ensure_ascii=False).encode


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
            text = _encode_row(exception_json(row))
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


def _stream_xlsx(report: RunReport, progress: Callable[[], None]) -> Iterator[bytes]:
    """The workbook, its archive's bytes as they are made."""
    from reconciler.report_xlsx import stream_xlsx  # it builds on this module

    yield from stream_xlsx(report, progress)


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
    environment.filters["details"] = details_text
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
