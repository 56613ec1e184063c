"""A reconciliation run's report as an XLSX workbook, in openpyxl's write-only mode.

:func:`write_xlsx` writes a "Summary" sheet (the run, then totals per currency and
category) and an "Exceptions" sheet (one row per exception with a filter), numbers as
numbers in the currency's format and times as real dates (UTC), references always as
text. Rows go to openpyxl's temporary files as they come, so memory does not grow with
the exceptions; :func:`reconciler.report_formats.stream_report` serves the result.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from typing import Any, BinaryIO

from reconciler.report import RunReport
from reconciler.report_formats import (
    EXCEPTION_COLUMNS,
    currency_places,
    details_text,
    tagged_rows,
)


def _number_format(currency: str | None) -> str:
    places = currency_places(currency)
    pattern = "#,##0" + ("." + "0" * places if places else "")
    # Negative amounts in red, as accountants expect.
    return f"{pattern};[Red]-{pattern}"


def _excel_time(value: dt.datetime | None) -> dt.datetime | None:
    # Excel has no time zones: UTC wall time, and the headers say UTC.
    return None if value is None else value.astimezone(dt.UTC).replace(tzinfo=None)


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

    tick = progress or (lambda: None)
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
        for in_run, row in tagged_rows(report, tick):
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
                    cell(sheet, details_text(row.details) or None),
                ]
            )
            rows += 1
        # The filter's range is written after the rows, with the sheet's tail.
        sheet.auto_filter.ref = f"A1:{get_column_letter(len(EXCEPTION_COLUMNS))}{rows + 1}"
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
