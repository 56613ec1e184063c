"""otacm's roles without what they need: a PostgreSQL server that is down when they start or
goes away while they run, a SQLite path that cannot be used, no venue connection.

Real processes (``otacm web`` under gunicorn, ``otacm worker``, ``otacm scheduler``,
``otacm serve``) against a real PostgreSQL server of the test's own, stopped and started
as an administrator would (:meth:`storage.testing.PostgresqlServer.stopped`). A role
waits for its database with backoff, one log line per attempt and no traceback, while
the web role answers ``/healthz`` and a 503 on ``/readyz``; when the server is back they
work without being restarted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from otacm.settings import Settings
from receiver.webhook import WEBHOOK_PATH
from sandbox import SandboxServer
from storage.engine import make_engine
from storage.migrate import upgrade
from storage.models import Inbox, InboxState
from storage.testing import PostgresqlServer, free_port, throwaway_postgresql
from tests.receiver.notifications import notification
from tests.sandbox.conftest import order_body
from tests.support.processes import ROOT, OtacmProcess, otacm_environment
from tests.support.stack import sandbox_settings, serve_sandbox, wait_until

pytestmark = pytest.mark.process

CLIENT_STATE = "startup-client-state-3f9a1c"
PASSWORD = "startup-db-password-7d2e"
"""In the database URL (the test server trusts every local connection, so any will do):
it must appear in no log line."""

ATTEMPT = re.compile(
    r"(worker|scheduler|inbox worker): database not reachable \((?P<reason>[^)]*)\); "
    r"retrying in \d+ s$"
)


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresqlServer]:
    """A PostgreSQL server of this module's own: stopping it disturbs no other test."""
    with throwaway_postgresql(durable=False, prefix="otacm-pg-startup-") as server:
        yield server


@pytest.fixture(scope="module")
def database_url(server: PostgresqlServer) -> str:
    """The server's ``postgres`` database, migrated, with a password in its URL."""
    url = sa.make_url(server.url).set(password=PASSWORD)
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return url.render_as_string(hide_password=False)


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    """The simulated venue, which the worker fetches orders from."""
    with serve_sandbox() as server:
        yield server


@pytest.fixture
def settings(sandbox: SandboxServer, database_url: str) -> Settings:
    """otacm for the sandbox, on the module's PostgreSQL database."""
    engine = sa.create_engine(database_url)  # only its URL is read
    own = {"webhook_client_states": [SecretStr(CLIENT_STATE)], "poll_interval": 10.0}
    return sandbox_settings(sandbox, engine, own)


@pytest.fixture
def otacm(tmp_path: Path) -> Iterator[Callable[..., OtacmProcess]]:
    """Start ``otacm`` roles; after the test, each must stop cleanly (exit 0) and none may
    have written a traceback or the database password."""
    started: list[OtacmProcess] = []

    def start(*args: str, environment: dict[str, str]) -> OtacmProcess:
        process = OtacmProcess(list(args), environment, tmp_path / f"{len(started)}-{args[0]}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        status = process.stop()
        output = process.output()
        sys.stderr.write(f"--- otacm {' '.join(process.args)} ---\n{output}\n")
        assert status == 0, output
        assert "Traceback" not in output
        assert PASSWORD not in output


def attempts(process: OtacmProcess) -> list[str]:
    """The lines where ``process`` said it waits for the database."""
    return [line for line in process.output().splitlines() if "database not reachable" in line]


def settle_one_order(sandbox: SandboxServer, http: httpx.Client, database_url: str) -> None:
    """An order at the venue, its webhook posted to the web role: the worker settles the
    inbox row (fetches the order and mirrors it)."""
    order = sandbox.runtime.orders.create(order_body(f"STARTUP-{free_port()}")).order
    body = {"value": [notification(order.order_id, state=CLIENT_STATE)]}
    answer = http.post(WEBHOOK_PATH, json=body)
    assert answer.status_code == 200, answer.text
    engine = make_engine(database_url)
    try:

        def settled() -> bool:
            with engine.connect() as connection:
                state = connection.scalar(
                    sa.select(Inbox.state).where(Inbox.order_id == order.order_id)
                )
            return state == InboxState.DONE

        wait_until(settled, 60, what=f"the worker to settle the inbox row of {order.order_id}")
    finally:
        engine.dispose()


@pytest.mark.postgresql
def test_roles_started_while_the_database_is_down_wait_and_then_work(
    server: PostgresqlServer,
    database_url: str,
    sandbox: SandboxServer,
    settings: Settings,
    otacm: Callable[..., OtacmProcess],
) -> None:
    """PostgreSQL down at start: worker and scheduler log one line per attempt (the reason,
    the wait, no traceback, no password) and stay up; web answers /healthz 200 and /readyz
    503. The server back: /readyz 200 and the worker settles a webhook's inbox row."""
    environment = otacm_environment(settings)
    port = free_port()
    with server.stopped(), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        worker = otacm("worker", environment=environment)
        scheduler = otacm("scheduler", environment=environment)
        web = otacm("web", "--bind", f"127.0.0.1:{port}", "--workers", "1", environment=environment)

        wait_until(lambda: len(attempts(worker)) >= 3, 30, what="three attempts of the worker")
        wait_until(lambda: attempts(scheduler), 30, what="an attempt of the scheduler")

        def web_answers() -> bool:
            assert web.alive(), web.output()
            try:
                return http.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(web_answers, 30, what="otacm web to answer /healthz")
        ready = http.get("/readyz")
        assert (ready.status_code, ready.json()["code"]) == (503, "database_unavailable")
        assert worker.alive() and scheduler.alive()
        for line in attempts(worker) + attempts(scheduler):
            found = ATTEMPT.search(line)
            assert found, line
            assert "No such file or directory" in found["reason"] or "refused" in found["reason"], (
                line
            )
        # The waits grow: 1-2 s, then 2-3 s, then 4-5 s (tenacity's exponential backoff).
        waits = [int(line.rsplit(" ", 2)[1]) for line in attempts(worker)]
        assert waits[2] > waits[0], waits

    wait_until(lambda: http_status(port, "/readyz") == 200, 60, what="/readyz to answer 200")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        settle_one_order(sandbox, http, database_url)
    wait_until(lambda: "started with jobs" in scheduler.output(), 60, what="the scheduler to start")


@pytest.mark.postgresql
def test_a_database_that_goes_away_while_the_roles_run_kills_none(
    server: PostgresqlServer,
    database_url: str,
    sandbox: SandboxServer,
    settings: Settings,
    otacm: Callable[..., OtacmProcess],
) -> None:
    """PostgreSQL stopped under running roles: the worker waits with backoff, a scheduled
    job that finds it away fails in one line, web answers /readyz 503; none dies, none
    writes a traceback; the server back, the worker settles a webhook's inbox row."""
    environment = otacm_environment(settings)
    port = free_port()
    worker = otacm("worker", environment=environment)
    scheduler = otacm("scheduler", environment=environment)
    web = otacm("web", "--bind", f"127.0.0.1:{port}", "--workers", "1", environment=environment)
    wait_until(lambda: http_status(port, "/readyz") == 200, 60, what="/readyz to answer 200")
    wait_until(lambda: "started with jobs" in scheduler.output(), 60, what="the scheduler")

    with server.stopped():
        wait_until(lambda: len(attempts(worker)) >= 2, 30, what="two attempts of the worker")
        job_failed = re.compile(r"job \w+ (failed|could not be run): database not reachable")
        wait_until(lambda: job_failed.search(scheduler.output()), 30, what="a job to find it away")
        assert http_status(port, "/readyz") == 503
        assert worker.alive() and scheduler.alive() and web.alive()

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        wait_until(lambda: http_status(port, "/readyz") == 200, 60, what="/readyz 200 again")
        settle_one_order(sandbox, http, database_url)


def http_status(port: int, path: str) -> int | None:
    """The status of ``GET path`` at the web role, or ``None`` when it does not answer."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code
    except httpx.TransportError:
        return None


def test_serve_waits_for_the_database_and_stops_when_asked(
    otacm: Callable[..., OtacmProcess],
) -> None:
    """`otacm serve` against a PostgreSQL where nothing listens waits before migrating, one
    line per attempt; SIGTERM meanwhile ends it cleanly (exit 0, no traceback)."""
    environment = {
        **otacm_environment_base(),
        "OTACM_DATABASE_URL": f"postgresql://otacm:{PASSWORD}@127.0.0.1:{free_port()}/otacm",
        "OTACM_TENANT": "t",
        "OTACM_COMPANY": "c",
        "OTACM_API_KEY": "startup-api-key",
    }
    serve = otacm("serve", "--bind", f"127.0.0.1:{free_port()}", environment=environment)

    wait_until(lambda: len(attempts(serve)) >= 2, 30, what="two attempts of serve")
    for line in attempts(serve):
        assert "serve: database not reachable (connection to server at" in line, line
        assert "Connection refused" in line and re.search(r"retrying in \d+ s$", line), line
    assert serve.alive()


def test_serve_without_a_venue_connection_is_not_ready(
    tmp_path: Path, otacm: Callable[..., OtacmProcess]
) -> None:
    """`otacm serve` with a database but no venue configured runs, and /readyz answers 503
    not_configured, naming the settings to set."""
    port = free_port()
    environment = {
        **otacm_environment_base(),
        "OTACM_DATABASE_URL": f"sqlite:///{tmp_path / 'otacm.sqlite3'}",
    }
    otacm("serve", "--bind", f"127.0.0.1:{port}", "--workers", "1", environment=environment)

    wait_until(lambda: http_status(port, "/healthz") == 200, 60, what="otacm serve to answer")
    ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    assert ready.status_code == 503
    assert ready.json()["code"] == "not_configured"
    assert "no venue connection configured: set OTACM_TENANT" in ready.json()["message"]


def otacm_environment_base() -> dict[str, str]:
    """This process's environment without any otacm setting."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("OTACM_") and name != "PROMETHEUS_MULTIPROC_DIR"
    }


@pytest.mark.parametrize(
    ("command", "make_url", "says"),
    [
        (
            ("db", "upgrade"),
            lambda tmp: f"sqlite:///{tmp / 'file'}/otacm.sqlite3",
            "the SQLite database's directory: ",
        ),
        (("worker",), lambda tmp: f"sqlite:///{tmp / 'file'}/otacm.sqlite3", "directory"),
        (("db", "upgrade"), lambda tmp: f"sqlite:///{tmp}", "unable to open database file"),
        (("worker",), lambda tmp: f"sqlite:///{tmp}", "unable to open database file"),
        (("scheduler",), lambda tmp: f"sqlite:///{tmp}", "unable to open database file"),
        (
            ("db", "upgrade"),
            lambda tmp: f"postgresql://otacm:{PASSWORD}@127.0.0.1:{free_port()}/otacm",
            "Connection refused",
        ),
    ],
    ids=[
        "upgrade-sqlite-no-directory",
        "worker-sqlite-no-directory",
        "upgrade-sqlite-cannot-open",
        "worker-sqlite-cannot-open",
        "scheduler-sqlite-cannot-open",
        "upgrade-postgresql-unreachable",
    ],
)
def test_a_database_that_cannot_be_used_is_one_line_and_exit_1(
    tmp_path: Path, command: tuple[str, ...], make_url: Callable[[Path], str], says: str
) -> None:
    """A SQLite path whose directory cannot be made (a file in the way) or that cannot be
    opened (a directory), and `db upgrade` against a PostgreSQL where nothing listens: one
    line naming the database (password masked) and why, exit 1, no traceback."""
    (tmp_path / "file").write_text("")
    environment = {
        **otacm_environment_base(),
        "OTACM_DATABASE_URL": make_url(tmp_path),
        "OTACM_TENANT": "t",
        "OTACM_COMPANY": "c",
        "OTACM_API_KEY": "startup-api-key",
    }
    done = subprocess.run(
        [sys.executable, "-m", "otacm", *command],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()  # nothing else: not a traceback, not a library's INFO
    assert line.startswith("Error: ") and says in line
    assert PASSWORD not in line


def test_a_role_that_cannot_start_says_so_in_a_json_line(tmp_path: Path) -> None:
    """With OTACM_LOG_FORMAT=json, a worker whose database cannot be used ends with exit 1
    and one JSON log record saying why: its standard error stays JSON lines."""
    environment = {
        **otacm_environment_base(),
        "OTACM_LOG_FORMAT": "json",
        "OTACM_DATABASE_URL": f"sqlite:///{tmp_path}",
        "OTACM_TENANT": "t",
        "OTACM_COMPANY": "c",
        "OTACM_API_KEY": "startup-api-key",
    }
    done = subprocess.run(
        [sys.executable, "-m", "otacm", "worker"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR"
    assert record["message"] == f"database sqlite:///{tmp_path}: unable to open database file"
