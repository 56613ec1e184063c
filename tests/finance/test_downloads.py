"""Report downloads at thousands of rows, on SQLite and PostgreSQL: each format streams
and reads back with every row; a report cut short never looks whole; the stream tells of
its progress; and under a real gunicorn, a download longer than the worker timeout is
served whole by the same worker."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import time
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient
from openpyxl import load_workbook
from sqlalchemy.orm import Session, sessionmaker

from reconciler.report import ExceptionRows, RunReport, open_run_report
from reconciler.report_formats import PROGRESS_EVERY, stream_report
from reconciler.report_xlsx import write_xlsx
from storage.testing import free_port
from storage.types import utcnow
from tests.finance.conftest import (
    Many,
    seed_many,
    sign_in,
    web_environment,
)
from tests.support.processes import OtacmProcess
from tests.support.stack import wait_until

COUNT = 2500
CLOSED = 30


@pytest.fixture
def many(sessions: sessionmaker[Session]) -> Many:
    return seed_many(sessions, COUNT, closed=CLOSED)


def test_every_format_streams_every_row(signed_in: FlaskClient, many: Many) -> None:
    """CSV, JSON, HTML and XLSX of 2,530 rows: each holds every exception once, in order
    (those seen, then those closed), with the end that says it is whole."""
    base = f"/finance/runs/{many.run_id}/report"
    expected = sorted(many.seen) + many.closed

    response = signed_in.get(f"{base}.csv")
    assert response.is_streamed and "Content-Length" not in response.headers
    text = response.get_data().decode("utf-8-sig")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[-1] == [f"# end of report: {COUNT + CLOSED} rows"]
    assert [int(row[0]) for row in rows[1:-1]] == expected
    assert [row[1] for row in rows[1:-1]] == ["seen"] * COUNT + ["closed"] * CLOSED

    data = json.loads(signed_in.get(f"{base}.json").get_data())
    assert [row["id"] for row in data["exceptions"]] == sorted(many.seen)
    assert [row["id"] for row in data["closed"]] == many.closed

    page = signed_in.get(f"{base}.html").get_data(as_text=True)
    assert f"end of report: {COUNT + CLOSED} rows</footer>" in page
    listed = [int(found) for found in re.findall(r'<tr>\s*<td class="num">(\d+)</td>', page)]
    assert listed == expected

    response = signed_in.get(f"{base}.xlsx")
    assert response.is_streamed and "Content-Length" not in response.headers
    body = response.get_data()
    book = load_workbook(io.BytesIO(body), read_only=True)
    sheet = book["Exceptions"]
    ids = [row[0] for row in sheet.iter_rows(min_row=2, values_only=True)]
    assert ids == expected
    book.close()
    full = load_workbook(io.BytesIO(body))
    assert full["Exceptions"].auto_filter.ref == f"A1:Q{COUNT + CLOSED + 1}"
    assert full["Exceptions"].freeze_panes == "A2"


class Broken(RuntimeError):
    """The database went away halfway through a report."""


def _cut_short(report: RunReport, after: int) -> RunReport:
    """``report`` whose rows fail after ``after`` of them."""

    def rows() -> Iterator[object]:
        for number, row in enumerate(report.exceptions):
            if number == after:
                raise Broken("connection lost")
            yield row

    return RunReport(
        run=report.run,
        totals=report.totals,
        exceptions=ExceptionRows(len(report.exceptions), rows),  # type: ignore[arg-type]
        closed=report.closed,
        aging=report.aging,
    )


@pytest.mark.parametrize("fmt", ["csv", "json", "html", "xlsx"])
def test_a_report_cut_short_never_looks_whole(
    sessions: sessionmaker[Session], many: Many, fmt: str
) -> None:
    """When rows stop coming halfway, what was sent is not a whole file: the CSV lacks
    its end marker, the JSON does not parse, the HTML has no footer, and the XLSX, whose
    first rows have gone, is no archive (its directory comes last)."""
    report = _cut_short(open_run_report(sessions, many.run_id, now=utcnow(), batch=500), 1200)
    sent = bytearray()
    with pytest.raises(Broken):
        for piece in stream_report(report, fmt):
            sent += piece
    if fmt == "csv":
        assert sent and b"# end of report" not in sent
    elif fmt == "json":
        with pytest.raises(json.JSONDecodeError):
            json.loads(sent)
    elif fmt == "html":
        assert b"<footer>" not in sent
    else:
        with pytest.raises(zipfile.BadZipFile):
            zipfile.ZipFile(io.BytesIO(bytes(sent)))


def test_streams_tell_of_their_progress(sessions: sessionmaker[Session], many: Many) -> None:
    """Every thousand rows a stream calls its progress."""
    report = open_run_report(sessions, many.run_id, now=utcnow())
    rows = COUNT + CLOSED
    for fmt in ("csv", "json", "html"):
        told: list[int] = []
        for _ in stream_report(report, fmt, progress=partial(told.append, 1)):
            pass
        assert len(told) >= rows // PROGRESS_EVERY, fmt
    told = []
    write_xlsx(report, io.BytesIO(), progress=partial(told.append, 1))
    assert len(told) == rows // PROGRESS_EVERY


def test_a_report_streams_in_short_transactions(
    sessions: sessionmaker[Session], many: Many
) -> None:
    """A streamed report reads a batch per transaction: a thousand-row batch for 2,530
    rows is three transactions for what the run saw, one for what it closed."""
    engine = sessions.kw["bind"]
    begun: list[object] = []

    def count(connection: object) -> None:
        begun.append(connection)

    sa.event.listen(engine, "begin", count)
    try:
        report = open_run_report(sessions, many.run_id, now=utcnow(), batch=1000)
        begun.clear()
        assert sum(1 for _ in report.exceptions) == COUNT
        assert len(begun) == 3
        assert sum(1 for _ in report.closed) == CLOSED
        assert len(begun) == 4
    finally:
        sa.event.remove(engine, "begin", count)


TIMEOUT = 2
ROWS = 80_000


@pytest.mark.process
@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_download_longer_than_the_worker_timeout_keeps_its_worker(
    migrated_engine: sa.Engine,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    user_entry: str,
) -> None:
    """Under ``otacm web`` with a worker timeout of two seconds (room for signing in,
    which hashes slowly on purpose), an XLSX of 80,000 rows (several times as long to
    write) starts at once and arrives whole, from the worker that began it: the report
    tells the master the worker lives as it progresses."""
    many = seed_many(sessions, ROWS)
    environment = web_environment(
        migrated_engine, user_entry, tmp_path, GUNICORN_CMD_ARGS=f"--timeout {TIMEOUT}"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = OtacmProcess(
        ["web", "--bind", f"127.0.0.1:{port}", "--workers", "1"], environment, tmp_path / "web.log"
    )
    try:
        wait_until(lambda: _up(url, process), 60, what=url)
        worker = _worker_of(process.popen.pid)
        with httpx.Client(base_url=url, timeout=300) as client:
            signed = sign_in(client)
            assert signed.status_code == 302
            started = time.monotonic()
            with client.stream("GET", f"/finance/runs/{many.run_id}/report.xlsx") as response:
                assert response.status_code == 200
                pieces = response.iter_bytes()
                content = next(pieces)
                first = time.monotonic() - started
                content += b"".join(pieces)
            elapsed = time.monotonic() - started
        # Longer than the timeout, or the test would show nothing about it.
        assert elapsed > TIMEOUT, f"it took {elapsed:.1f} s: too quick to test the timeout"
        assert first < TIMEOUT, "the archive streams from its first rows"
        # Whole: every member's checksum holds and the sheet has every row (the rows
        # themselves read back with openpyxl in the tests above, at a size it reads fast).
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            assert archive.testzip() is None
            assert archive.read("xl/worksheets/sheet2.xml").count(b"<row ") == ROWS + 1
        assert _worker_of(process.popen.pid) == worker, "the worker was replaced"
        assert "WORKER TIMEOUT" not in process.output()
    finally:
        process.stop()
        sys.stderr.write(f"--- otacm web ---\n{process.output()[-3000:]}\n")


def _up(url: str, process: OtacmProcess) -> bool:
    assert process.alive(), process.output()
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _worker_of(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])
