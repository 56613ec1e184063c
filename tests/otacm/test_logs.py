"""otacm's logs: text or one JSON object per line, configured secrets masked in either, and
libraries' chatter kept off a command's output.

The formatters on their own, then the processes as an operator runs them: `otacm serve`
(web under gunicorn, worker, scheduler) with ``OTACM_LOG_FORMAT=json``, and `otacm db
upgrade`, whose output is its one line of result.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from otacm.logs import JSON_FIELDS, configure_logging
from storage.migrate import head_revision
from storage.testing import free_port
from tests.support.processes import ROOT, OtacmProcess
from tests.support.stack import wait_until

SECRET = "s3cret-api-key-0f9e8d"
STATE = 'state-with-"quote"-and-\\-7a6b'


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger's handler, as configure_logging leaves it, writing to a buffer."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)
        for name in ("alembic", "httpx", "werkzeug"):
            logging.getLogger(name).setLevel(logging.NOTSET)


def configure(stream: io.StringIO, log_format: str, level: str = "INFO") -> None:
    configure_logging(level, [SecretStr(SECRET), SecretStr(STATE)], log_format)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)


def test_json_lines_carry_the_fields_and_mask_secrets_everywhere(captured: io.StringIO) -> None:
    """One JSON object per record with time, level, logger, pid and message; a configured
    secret is masked in the message, in an extra field and in a traceback, even when JSON
    escapes it."""
    configure(captured, "json")
    log = logging.getLogger("otacm.test")
    log.info("calling with key %s", SECRET)
    log.warning("state %s", STATE, extra={"detail": f"key={SECRET}"})
    try:
        raise RuntimeError(f"refused {SECRET}")
    except RuntimeError:
        log.exception("failed")

    lines = captured.getvalue().splitlines()
    assert len(lines) == 3  # the traceback is inside its record's line
    records = [json.loads(line) for line in lines]
    for record in records:
        assert set(JSON_FIELDS.values()) | {"time"} <= set(record)
        assert record["logger"] == "otacm.test" and record["pid"] == os.getpid()
        assert record["time"].endswith("+00:00")
    assert records[0]["message"] == "calling with key ****"
    assert (records[1]["level"], records[1]["message"]) == ("WARNING", "state ****")
    assert records[1]["detail"] == "key=****"
    assert "RuntimeError: refused ****" in records[2]["exc_info"]
    assert SECRET not in captured.getvalue()
    assert "quote" not in captured.getvalue()


def test_text_lines_mask_secrets_in_the_message_and_the_traceback(
    captured: io.StringIO,
) -> None:
    """The text format masks a configured secret in the message and in a traceback."""
    configure(captured, "text")
    log = logging.getLogger("otacm.test")
    try:
        raise RuntimeError(f"refused {SECRET}")
    except RuntimeError:
        log.exception("failed with %s", STATE)

    output = captured.getvalue()
    assert " ERROR otacm.test: failed with ****\n" in output
    assert "RuntimeError: refused ****" in output
    assert SECRET not in output and STATE not in output


@pytest.mark.parametrize(("level", "shown"), [("INFO", False), ("DEBUG", True)])
def test_library_chatter_only_at_debug(captured: io.StringIO, level: str, shown: bool) -> None:
    """Alembic's and httpx's INFO lines are written at DEBUG only."""
    configure(captured, "text", level)
    logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
    logging.getLogger("httpx").info("HTTP Request: GET ...")
    assert ("Context impl SQLiteImpl." in captured.getvalue()) is shown
    assert ("HTTP Request" in captured.getvalue()) is shown


def _environment(**settings: str) -> dict[str, str]:
    own = {k: v for k, v in os.environ.items() if not k.startswith("OTACM_")}
    own.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return {**own, **settings}


@pytest.mark.process
def test_db_upgrade_prints_its_one_line(tmp_path: Path) -> None:
    """`otacm db upgrade` on a new database: its result and nothing else (no Alembic line)."""
    done = subprocess.run(
        [sys.executable, "-m", "otacm", "db", "upgrade"],
        cwd=ROOT,
        env=_environment(OTACM_DATABASE_URL=f"sqlite:///{tmp_path / 'otacm.sqlite3'}"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == (f"database at revision {head_revision()}\n", "")


@pytest.mark.process
def test_every_role_of_serve_writes_json_lines(tmp_path: Path) -> None:
    """`otacm serve` with OTACM_LOG_FORMAT=json: every line it and its roles write (gunicorn's
    master and workers, the worker, the scheduler) is a JSON object with the fields, and
    the API key appears in none."""
    port = free_port()
    environment = _environment(
        OTACM_LOG_FORMAT="json",
        OTACM_DATABASE_URL=f"sqlite:///{tmp_path / 'otacm.sqlite3'}",
        OTACM_API_BASE_URL=f"http://127.0.0.1:{free_port()}",
        OTACM_TENANT="t",
        OTACM_COMPANY="c",
        OTACM_API_KEY=SECRET,
        OTACM_SECRETS_DIR=str(tmp_path / "secrets"),
    )
    serve = OtacmProcess(
        ["serve", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
        environment,
        tmp_path / "serve.log",
    )
    try:

        def started() -> bool:
            assert serve.alive(), serve.output()
            output = serve.output()
            return "scheduler" in output and "inbox worker" in output and "Booting" in output

        wait_until(started, 90, what="serve's roles to start")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    finally:
        assert serve.stop() == 0, serve.output()

    records = [json.loads(line) for line in serve.output().splitlines()]
    for record in records:
        assert set(JSON_FIELDS.values()) | {"time"} <= set(record), record
    loggers = {record["logger"] for record in records}
    assert {"gunicorn.error", "orders.worker", "otacm.processes"} <= loggers
    assert len({record["pid"] for record in records}) >= 4  # serve, master, worker(s)...
    assert SECRET not in serve.output()
