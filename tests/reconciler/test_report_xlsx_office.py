"""The XLSX report as a spreadsheet application reads it: LibreOffice Calc, headless,
converts the workbook otacm streamed to one CSV per sheet, and every sheet holds what
the tests' own reader (openpyxl) finds in it. otacm writes the format itself
(:mod:`reconciler.report_xlsx`), so a second, independent reader checks it is a
workbook an office suite opens, not only one openpyxl forgives.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from pathlib import Path

import pytest
from openpyxl import load_workbook
from sqlalchemy.orm import Session, sessionmaker

from reconciler.report import ExceptionRows, RunInfo, RunReport
from reconciler.report_xlsx import stream_xlsx
from tests.reconciler.test_report import NOW, Built, build
from tests.reconciler.test_report_xlsx import _report, _row

pytestmark = pytest.mark.process

# LibreOffice's CSV filter: comma, double quote, UTF-8, from row 1, every sheet to a file
# of its own (the last field, -1).
CSV_EVERY_SHEET = "csv:Text - txt - csv (StarCalc):44,34,76,1,,0,false,true,false,false,false,-1"


def _office_sheets(workbook: bytes, directory: Path) -> dict[str, list[list[str]]]:
    """Each sheet of ``workbook`` as LibreOffice reads it, by sheet name: its rows of text."""
    soffice = shutil.which("soffice")
    assert soffice, "LibreOffice is needed: scripts/ensure-libreoffice installs it"
    source = directory / "report.xlsx"
    source.write_bytes(workbook)
    out = directory / "out"
    subprocess.run(
        [
            soffice,
            f"-env:UserInstallation={(directory / 'profile').as_uri()}",
            "--headless",
            "--convert-to",
            CSV_EVERY_SHEET,
            "--outdir",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    return {
        path.stem.removeprefix("report-"): list(csv.reader(io.StringIO(path.read_text("utf-8"))))
        for path in sorted(out.glob("report-*.csv"))
    }


def test_libreoffice_opens_every_sheet_of_a_streamed_report(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A run's report over three exception sheets: LibreOffice finds the same sheets, the
    same header on each, and every exception, by id, on the sheet openpyxl finds it on."""
    built: Built = build(sessions)
    workbook = b"".join(stream_xlsx(_report(sessions, built), sheet_rows=3))
    book = load_workbook(io.BytesIO(workbook))

    sheets = _office_sheets(workbook, tmp_path)

    assert sorted(sheets) == sorted(book.sheetnames)
    assert sheets["Summary"][0][0] == book["Summary"]["A1"].value
    for name in book.sheetnames[1:]:
        header, *rows = sheets[name]
        assert header == [cell.value for cell in book[name][1]]
        expected = [row[0] for row in book[name].iter_rows(min_row=2, values_only=True)]
        assert [int(row[0]) for row in rows] == expected
    found = [int(row[0]) for name in book.sheetnames[1:] for row in sheets[name][1:]]
    assert len(found) == 5 and set(found) <= set(built.ids.values())


def test_libreoffice_reads_text_as_text(tmp_path: Path) -> None:
    """Markup characters, line breaks, any script and a would-be formula come back as
    the text stored (a formula is never evaluated), and amounts as their numbers."""
    subjects = ['<b>R&D</b> "quoted"', "line\nbreak\tand tab", "Åse 東京 🎟", '=HYPERLINK("x")']
    run = RunInfo(1, "shop", NOW, NOW, NOW, None, "manual", None, "running", None)
    rows = [_row(n, {}, subject) for n, subject in enumerate(subjects, start=1)]
    report = RunReport(run, [], ExceptionRows.of(rows), ExceptionRows.of([]), {})

    sheets = _office_sheets(b"".join(stream_xlsx(report)), tmp_path)

    _, *found = sheets["Exceptions"]
    assert [row[5] for row in found] == subjects
    assert {(float(row[10]), float(row[11])) for row in found} == {(1.234, -0.5)}
