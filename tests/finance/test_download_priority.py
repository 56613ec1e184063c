"""A report download is computed at the batch priority, in a thread of its own: the
thread's nice value read from the kernel while it streams, the caller's unchanged; the
same bytes as made in the caller's thread; a reader that goes away stops the thread and
leaves no connection out; an error in the thread ends the stream with it; progress is
told from the caller's thread; a slow reader holds the thread back. On SQLite and
PostgreSQL; and under a real ``otacm web``, the serving worker's tasks read from /proc."""

from __future__ import annotations

import io
import itertools
import os
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import Session, sessionmaker

from otacm.settings import Settings
from receiver.finance import streaming
from receiver.finance.streaming import HANDOVER_PIECES, at_batch_priority
from reconciler.report import open_run_report
from reconciler.report_formats import REPORT_FORMATS, stream_report
from storage.testing import free_port
from storage.types import utcnow
from tests.finance.conftest import (
    Many,
    seed_many,
    sign_in,
    web_environment,
)
from tests.finance.test_downloads import Broken, _cut_short, _up, _worker_of
from tests.support.processes import OtacmProcess
from tests.support.stack import wait_until

NICE = 10
T = TypeVar("T")
COUNT = 2500

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="thread priorities are Linux's")


@pytest.fixture
def many(sessions: sessionmaker[Session]) -> Many:
    return seed_many(sessions, COUNT, closed=30)


def _nice_of(task: Path) -> int:
    """A task's nice value, as the kernel has it (field 19 of its ``stat``)."""
    stat = (task / "stat").read_text()
    # The command name, in parentheses, may hold spaces: count after its end.
    return int(stat[stat.rindex(")") + 2 :].split()[16])


def _thread_nice(native_id: int) -> int:
    return _nice_of(Path(f"/proc/self/task/{native_id}"))


def _download_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "report-download"]


def _in_time(work: Callable[[], T], what: str) -> T:
    """``work()`` done in another thread: its result or its error, or a failure rather
    than a hang if it never ends."""
    done: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            done.append(work())
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: not thread.is_alive(), 30, what=what)
    if failed:
        raise failed[0]
    return done[0]


def _closed_in_time(stream: Iterator[bytes]) -> None:
    _in_time(cast(Any, stream).close, "the stream closed")


def test_the_report_is_made_at_the_batch_priority_and_the_caller_keeps_its_own(
    sessions: sessionmaker[Session], migrated_engine: sa.Engine, many: Many
) -> None:
    """While the CSV streams, the thread making it runs ``nice`` lower than the caller,
    whose priority is unchanged; the bytes are those made in the caller's thread; once
    read, the thread is gone and no connection is out."""
    report = open_run_report(sessions, many.run_id, now=utcnow(), batch=500)
    expected = b"".join(stream_report(report, "csv"))
    before = _thread_nice(threading.get_native_id())

    stream = at_batch_priority(lambda tell: stream_report(report, "csv", progress=tell), NICE)
    with closing(cast(Any, stream)):
        first = next(stream)
        # More pieces than the handover holds: the thread waits to hand the next one over.
        assert len(expected) > (HANDOVER_PIECES + 2) * 64 * 1024
        [thread] = _download_threads()
        assert thread.native_id is not None
        assert _thread_nice(thread.native_id) == min(before + NICE, 19)
        assert _thread_nice(threading.get_native_id()) == before

        assert first + b"".join(stream) == expected
    assert not thread.is_alive() and _download_threads() == []
    assert migrated_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert _thread_nice(threading.get_native_id()) == before


def test_a_reader_that_goes_away_stops_the_thread(
    sessions: sessionmaker[Session], migrated_engine: sa.Engine, many: Many
) -> None:
    """Closed after its first piece (as gunicorn does when the client goes away), the
    stream stops making the report: its generator is closed part-way, the thread is
    gone and its connections are back in the pool."""
    report = open_run_report(sessions, many.run_id, now=utcnow(), batch=100)
    made: list[int] = []
    ended: list[str] = []

    def produce(tell: Callable[[], None]) -> Iterator[bytes]:
        try:
            for piece in stream_report(report, "json", progress=tell):
                made.append(len(piece))
                yield piece
            ended.append("whole")
        finally:
            ended.append("closed")

    stream = at_batch_priority(produce, NICE)
    assert next(stream)
    [thread] = _download_threads()
    _closed_in_time(stream)
    assert not thread.is_alive()
    assert ended == ["closed"], "the report went on to its end"
    assert migrated_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert list(stream) == []


def test_an_error_in_the_thread_ends_the_stream_with_it(
    sessions: sessionmaker[Session], many: Many
) -> None:
    """Rows that fail halfway: the reader gets what was made, then the error itself (in
    its own thread, as without one); the thread is gone."""
    report = _cut_short(open_run_report(sessions, many.run_id, now=utcnow(), batch=500), 1200)
    stream = at_batch_priority(lambda tell: stream_report(report, "csv", progress=tell), NICE)
    sent = bytearray()

    def read() -> None:
        for piece in stream:
            sent.extend(piece)

    with pytest.raises(Broken, match="connection lost"):
        _in_time(read, "the stream ended")
    assert sent and b"# end of report" not in sent
    assert _download_threads() == []


def test_progress_is_told_from_the_readers_thread(
    sessions: sessionmaker[Session], many: Many
) -> None:
    """The gunicorn worker hears of every thousand rows, from the thread that reads the
    stream (the worker's own), not from the one that makes it."""
    report = open_run_report(sessions, many.run_id, now=utcnow())
    told: list[int] = []

    class Worker:
        def notify(self) -> None:
            told.append(threading.get_native_id())

    streaming.remember_worker(Worker())
    try:
        stream = at_batch_priority(lambda tell: stream_report(report, "csv", progress=tell), NICE)
        for _ in stream:
            pass
    finally:
        streaming.remember_worker(None)
    assert len(told) >= COUNT // 1000
    assert set(told) == {threading.get_native_id()}


def test_a_slow_reader_holds_the_thread_back(request: pytest.FixtureRequest) -> None:
    """A long body read one piece at a time: the thread stops at a few pieces ahead,
    waiting to hand the next over, rather than gathering the body in memory; closed, it
    ends."""
    made = itertools.count()

    def long(tell: Callable[[], None]) -> Iterator[bytes]:
        for number in itertools.islice(made, 100_000):  # bounded, should the handover not be
            tell()
            yield b"%d" % number

    stream = at_batch_priority(long, NICE)
    assert next(stream) == b"0"
    [thread] = _download_threads()
    request.addfinalizer(cast(Any, stream).close)  # a failure below leaves no thread behind

    def waiting_to_hand_over() -> bool:
        frame = sys._current_frames().get(thread.ident or 0)
        while frame is not None:
            if frame.f_code.co_name == "put":
                return True
            frame = frame.f_back
        return False

    wait_until(waiting_to_hand_over, 30, what="the thread waits for room")
    # One piece read; the handover holds a few, pieces and progress alike.
    assert next(made) <= HANDOVER_PIECES + 2
    _closed_in_time(stream)
    assert not thread.is_alive()


def test_no_batch_nice_makes_the_report_in_the_readers_thread() -> None:
    """``batch_nice`` 0: no thread, the body made as it is read, as it always was."""
    makers: list[int] = []

    def produce(tell: Callable[[], None]) -> Iterator[bytes]:
        makers.append(threading.get_ident())
        yield b"whole"

    stream = at_batch_priority(produce, 0)
    assert list(stream) == [b"whole"]
    assert makers == [threading.get_ident()]


def _members(archive: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        return {name: opened.read(name) for name in opened.namelist()}


def test_downloads_are_the_same_bytes_at_any_batch_nice(
    make_app: Callable[[Settings], Flask], settings: Settings, many: Many
) -> None:
    """Every format, downloaded from an app at ``batch_nice`` 10 and one at 0: the same
    bytes (the XLSX's members: its archive stamps each with the time it was written)."""
    clients = []
    for nice in (NICE, 0):
        client = make_app(settings.model_copy(update={"batch_nice": nice})).test_client()
        assert sign_in(client).status_code == 302
        clients.append(client)
    for fmt in REPORT_FORMATS:
        lowered, as_is = (
            client.get(f"/finance/runs/{many.run_id}/report.{fmt}") for client in clients
        )
        assert lowered.status_code == as_is.status_code == 200
        assert lowered.headers == as_is.headers
        if fmt == "xlsx":
            assert _members(lowered.get_data()) == _members(as_is.get_data())
        else:
            assert lowered.get_data() == as_is.get_data(), fmt


ROWS = 60_000


@pytest.mark.process
@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_download_under_gunicorn_runs_in_a_lowered_task_of_its_worker(
    migrated_engine: sa.Engine,
    sessions: sessionmaker[Session],
    tmp_path: Path,
    user_entry: str,
) -> None:
    """Under ``otacm web`` (one sync worker, ``OTACM_BATCH_NICE=10``), a CSV of 60,000
    rows read slowly: while it streams, one task of the serving worker runs at the batch
    priority and its main task at its own; read whole, the report is whole, no task of
    the worker is left lowered, and the same worker answers /healthz. A second download
    left after its first piece (the client goes away) leaves no task lowered either; a
    third, whose rows the database stops giving, ends cut short and is logged."""
    many = seed_many(sessions, ROWS)
    environment = web_environment(migrated_engine, user_entry, tmp_path, OTACM_BATCH_NICE=str(NICE))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = OtacmProcess(
        ["web", "--bind", f"127.0.0.1:{port}", "--workers", "1"], environment, tmp_path / "web.log"
    )
    base = os.nice(0)
    lowered = min(base + NICE, 19)
    try:
        wait_until(lambda: _up(url, process), 60, what=url)
        worker = _worker_of(process.popen.pid)
        tasks = Path(f"/proc/{worker}/task")

        def nices() -> dict[int, int]:
            found = {}
            for task in tasks.iterdir():
                try:
                    found[int(task.name)] = _nice_of(task)
                except FileNotFoundError:  # a task that ended as it was listed
                    continue
            return found

        assert set(nices().values()) == {base}
        with httpx.Client(base_url=url, timeout=300) as client:
            signed = sign_in(client)
            assert signed.status_code == 302
            with client.stream("GET", f"/finance/runs/{many.run_id}/report.csv") as response:
                assert response.status_code == 200
                pieces = response.iter_raw(64 * 1024)
                content = next(pieces)

                # The client reads no more: the report (several MB) waits, its thread alive.
                def lowered_task() -> dict[int, int]:
                    found = nices()
                    return found if lowered in found.values() else {}

                during = wait_until(
                    lowered_task, 30, what="a task of the worker at the batch priority"
                )
                assert during[worker] == base, "the worker's own thread was lowered"
                assert sorted(during.values()).count(lowered) == 1, during
                content += b"".join(pieces)
            text = content.decode("utf-8-sig")
            assert text.rstrip().endswith(f'"# end of report: {ROWS} rows"')
            wait_until(lambda: lowered not in nices().values(), 30, what="the thread ended")
            assert nices()[worker] == base
            assert client.get("/healthz").status_code == 200

            # A client that goes away mid-download: the worker, told as it writes, closes
            # the stream, and the thread ends with it.
            with client.stream("GET", f"/finance/runs/{many.run_id}/report.csv") as response:
                assert next(response.iter_raw(64 * 1024))
                wait_until(lowered_task, 30, what="the second download's thread")
            wait_until(lambda: lowered not in nices().values(), 30, what="the thread ended")
            assert client.get("/healthz").status_code == 200
            assert set(nices().values()) == {base}

            # The database fails mid-download: the stream ends cut short (no last chunk),
            # the worker logs why, and goes on serving.
            with client.stream("GET", f"/finance/runs/{many.run_id}/report.csv") as response:
                pieces = response.iter_raw(64 * 1024)
                assert next(pieces)
                with migrated_engine.begin() as connection:
                    connection.exec_driver_sql("ALTER TABLE exception_event RENAME TO gone")
                with pytest.raises(httpx.RemoteProtocolError):
                    for _ in pieces:
                        pass
            wait_until(lambda: lowered not in nices().values(), 30, what="the thread ended")
            assert "Error handling request" in process.output()
            assert "no such table: exception_event" in process.output()
            assert client.get("/healthz").status_code == 200
        assert _worker_of(process.popen.pid) == worker, "the worker was replaced"
    finally:
        process.stop()
        sys.stderr.write(f"--- otacm web ---\n{process.output()[-3000:]}\n")
