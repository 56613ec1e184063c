"""`otacm demo` end to end, as a user runs it: sandbox and daemon as real processes, the
planted mismatches found by the closing reconciliation, and the finance pages it points at.

Each test runs the demo in a subprocess in a temporary working directory, so its `var/`
(ledger export, finance settings, log) is the test's own.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import pytest
import sqlalchemy as sa

from reconciler.report import RunReport, load_run_report
from storage.engine import make_engine, make_sessions
from storage.records import ReconRun, ReconRunState, ReconTrigger
from storage.types import utcnow

pytestmark = pytest.mark.process

PLANTED_CATEGORIES = {"missing_at_venue", "orphan", "amount_mismatch", "cancelled_in_ledger"}
DEMO_ARGUMENTS = ["--orders", "6", "--pickup-interval", "0.3", "--seed", "7", "--timeout", "90"]
FINANCE_LINE = re.compile(r"^finance pages: (http://\S+)/finance/  \(user (\S+), password (\S+)\)$")
RUN_PAGE_LINE = re.compile(r"^this run's page: (http://\S+/finance/runs/(\d+))$")
REOPEN_LINE = re.compile(
    r"^(?:later, )?reopen them on this database \(same user and password\): (.+)$"
)
DEADLINE = 150.0
"""Seconds a demo may take before a test gives up on it (a ceiling, not a measurement)."""


def demo_command(*extra: str) -> list[str]:
    """``python -m otacm demo`` with the tests' small, fast settings."""
    return [sys.executable, "-m", "otacm", "demo", *DEMO_ARGUMENTS, *extra]


def demo_environment() -> dict[str, str]:
    """This environment without OTACM_*, with unbuffered output so lines arrive as printed."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTACM_")}
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def planted(output: str) -> dict[str, str]:
    """The demo's "planted for the reconciliation" section: reference by category."""
    lines = output.splitlines()
    start = lines.index("planted for the reconciliation:") + 1
    found = {}
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        category, reference = line.split()[:2]
        found[category] = reference
    return found


def the_demo_run(url: str) -> RunReport:
    """The report of the one finished manual run by ``demo`` in the database at ``url``."""
    engine = make_engine(url)
    try:
        with make_sessions(engine, read_only=True).begin() as session:
            runs = session.scalars(
                sa.select(ReconRun).where(
                    ReconRun.actor == "demo", ReconRun.trigger == ReconTrigger.MANUAL
                )
            ).all()
            assert [run.state for run in runs] == [ReconRunState.FINISHED]
            return load_run_report(session, runs[0].id, now=utcnow())
    finally:
        engine.dispose()


def assert_planted_found(report: RunReport, plants: dict[str, str]) -> None:
    """Each planted mismatch is exactly one exception of the run, of its category only."""
    assert set(plants) == PLANTED_CATEGORIES
    for category, reference in plants.items():
        about = [row for row in report.exceptions if row.shop_reference == reference]
        assert [str(row.category) for row in about] == [category], (reference, about)
    found = {str(row.category) for row in report.exceptions}
    # The demo's own unpaid order and broken package.
    assert {"draft_unconfirmed", "venue_error"} <= found


def sign_in(client: httpx.Client, base: str, user: str, password: str) -> None:
    """Sign in to the finance pages as a browser does: the form's CSRF token, then POST."""
    form = client.get(f"{base}/finance/sign-in")
    assert form.status_code == 200
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None, form.text
    answer = client.post(
        f"{base}/finance/sign-in",
        data={"csrf_token": token.group(1), "name": user, "password": password},
    )
    assert answer.status_code == 302, answer.text
    assert answer.headers["location"].endswith("/finance/")


def assert_run_page(
    base: str, run_id: int, user: str, password: str, plants: dict[str, str]
) -> None:
    """Signed in with the printed credentials, the run's page shows the run's exceptions."""
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{base}/finance/runs/{run_id}").status_code == 302  # signed out
        sign_in(client, base, user, password)
        page = client.get(f"{base}/finance/runs/{run_id}")
    assert page.status_code == 200
    assert f"Run #{run_id}" in page.text
    for reference in plants.values():
        assert reference in page.text


class OutputLines:
    """A child's output, read line by line on a thread, so a test waits with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def until(self, pattern: re.Pattern[str], *, timeout: float) -> re.Match[str]:
        """Wait for a line matching ``pattern``; fail on the deadline or at the end of output."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line matching {pattern.pattern!r}:\n" + "\n".join(self.lines))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"output ended before {pattern.pattern!r}:\n" + "\n".join(self.lines))
            self.lines.append(line)
            found = pattern.match(line)
            if found:
                return found

    def rest(self, timeout: float) -> str:
        """All output until the child closes it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return "\n".join(self.lines)


@contextmanager
def child_process(command: list[str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """A child with its output on a pipe (stderr included) and no terminal on stdin; ended
    (terminated, then killed) if the test leaves it running."""
    child = subprocess.Popen(
        command,
        cwd=cwd,
        env=demo_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield child
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if child.stdout is not None:
            child.stdout.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def assert_demo_outcome(output: str, database_url: str, workdir: Path) -> dict[str, str]:
    """What every demo run must show, from its output and its database.

    A finished manual run by ``demo`` found each planted mismatch exactly once; the
    printed summary is that run's report (every exception, every category's count); the
    ledger export was imported; the finance address, user and password, the run's page
    and the reopen command are printed; the reopen settings are the owner's alone and
    hold the password's hash, never the password, and neither does the daemon's log.

    Returns:
        The planted references by category.
    """
    plants = planted(output)
    report = the_demo_run(database_url)
    assert_planted_found(report, plants)

    assert f"reconciliation run {report.run.id} (manual, by demo)" in output
    for row in report.exceptions:
        reference = re.escape(row.shop_reference or "")
        assert re.search(rf"^  {row.category} +{reference} ", output, re.M), row
    for category in {total.category for total in report.totals}:
        count = sum(total.count for total in report.totals if total.category is category)
        assert re.search(rf"^  {category} +{count}  ", output, re.M), category
    imported = "imported the shop's ledger export var/demo-ledger.jsonl: 1 inserted, 2 updated"
    assert imported in output
    # The demo's shop endpoint verified every event it got; the sample orders all issue.
    events = re.search(
        r"^the shop's endpoint received (\d+) events, each signature verified \(0 refused\):$",
        output,
        re.M,
    )
    issued = re.search(r"^  order\.issued +(\d+)$", output, re.M)
    assert events is not None and issued is not None, output
    assert int(events.group(1)) >= int(issued.group(1)) > 0

    lines = output.splitlines()
    finance = [found for found in map(FINANCE_LINE.match, lines) if found]
    assert len(finance) == 1 and finance[0].group(2) == "demo"
    base, password = finance[0].group(1), finance[0].group(3)
    assert f"this run's page: {base}/finance/runs/{report.run.id}" in lines
    assert any(REOPEN_LINE.match(line) for line in lines)
    settings = workdir / "var" / "demo-finance.toml"
    assert stat.S_IMODE(settings.stat().st_mode) == 0o600
    assert password not in settings.read_text()
    assert password not in (workdir / "var" / "demo-serve.log").read_text()
    return plants


# The stay test below runs on SQLite (the demo's default); this one on PostgreSQL.
@pytest.mark.parametrize(
    "engine", [pytest.param("postgresql", marks=pytest.mark.postgresql)], indirect=True
)
def test_demo_reconciles_what_it_planted_and_exits(engine: sa.Engine, tmp_path: Path) -> None:
    """Without --stay (and with no terminal) the demo imports its ledger export, reconciles,
    finds each planted mismatch exactly once, prints the run and where the finance pages
    are, says they close with it, and exits 0."""
    url = engine.url.render_as_string(hide_password=False)
    result = subprocess.run(
        demo_command("--no-stay", "--database-url", url),
        cwd=tmp_path,
        env=demo_environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert_demo_outcome(result.stdout, url, tmp_path)
    assert "the pages close with the demo" in result.stdout


def test_demo_stays_up_for_the_finance_pages_until_interrupted(tmp_path: Path) -> None:
    """With --stay (no terminal needed) the printed user and password sign in to the running
    daemon's run page; Ctrl-C (SIGINT) ends the demo with 0; the printed reopen command
    serves the same pages on the same database afterwards."""
    with child_process(demo_command("--stay"), tmp_path) as demo:
        assert demo.stdout is not None
        output = OutputLines(demo.stdout)
        finance = output.until(FINANCE_LINE, timeout=DEADLINE)
        base, user, password = finance.group(1), finance.group(2), finance.group(3)
        run_id = int(output.until(RUN_PAGE_LINE, timeout=30).group(2))
        reopen = output.until(REOPEN_LINE, timeout=30).group(1)
        plants = planted("\n".join(output.lines))
        assert_run_page(base, run_id, user, password, plants)

        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=90) == 0, output.rest(timeout=5)
        text = output.rest(timeout=5)
    assert_demo_outcome(text, f"sqlite:///{tmp_path / 'var' / 'demo.sqlite3'}", tmp_path)

    # Later, on the same database: the command the demo printed, on a port of our own.
    command = shlex.split(reopen)
    bind = command.index("--bind")
    port = free_port()
    command[bind + 1] = f"127.0.0.1:{port}"
    with child_process([*command, "--workers", "1"], tmp_path) as web:
        reopened = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if web.poll() is not None:
                assert web.stdout is not None
                pytest.fail(f"otacm web exited with {web.returncode}:\n{web.stdout.read()}")
            try:
                if httpx.get(f"{reopened}/finance/sign-in", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "otacm web did not answer"
            time.sleep(0.2)
        assert_run_page(reopened, run_id, user, password, plants)
