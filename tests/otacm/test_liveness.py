"""Liveness files and `otacm health`: what a container's health check reads."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from otacm.cli import main
from otacm.liveness import announce_web, beater, check


@pytest.fixture
def readyz() -> Iterator[tuple[str, list[int]]]:
    """A local server whose /readyz answers the status at the head of the list."""
    statuses = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(statuses[0] if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"0.0.0.0:{server.server_address[1]}", statuses
    finally:
        server.shutdown()
        server.server_close()


def test_a_worker_is_healthy_while_its_file_is_fresh(tmp_path: Path) -> None:
    beat = beater(tmp_path, "worker")
    assert [v.healthy for v in check(tmp_path)] == [True]
    old = time.time() - 300
    os.utime(tmp_path / "worker", (old, old))
    (verdict,) = check(tmp_path, max_age=120)
    assert not verdict.healthy
    assert re.fullmatch(
        r"worker: unhealthy, last pass 30\d s ago \(more than 120 s\)", verdict.line()
    )
    beat()
    assert check(tmp_path, max_age=120)[0].healthy


def test_a_role_without_a_file_has_not_started(tmp_path: Path) -> None:
    assert check(tmp_path) == []
    (verdict,) = check(tmp_path, ["scheduler"])
    assert not verdict.healthy
    assert "has not started" in verdict.detail


def test_without_a_directory_no_file_is_kept(tmp_path: Path) -> None:
    beater(None, "worker")()
    announce_web(None, "127.0.0.1:1")
    assert list(tmp_path.iterdir()) == []


def test_web_is_healthy_while_readyz_answers_200(
    tmp_path: Path, readyz: tuple[str, list[int]]
) -> None:
    """A wildcard bind is asked on loopback; a 503 or a closed port is unhealthy."""
    bind, statuses = readyz
    port = bind.rpartition(":")[2]
    announce_web(tmp_path, bind)
    assert check(tmp_path)[0].line() == f"web: ok, http://127.0.0.1:{port}/readyz: 200"
    statuses[0] = 503
    assert check(tmp_path)[0].line() == f"web: unhealthy, http://127.0.0.1:{port}/readyz: 503"
    announce_web(tmp_path, "127.0.0.1:1")
    assert check(tmp_path)[0].line() == "web: unhealthy, http://127.0.0.1:1/readyz: ConnectError"


def test_otacm_health_says_each_role_and_exits_non_zero_when_one_is_unhealthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readyz: tuple[str, list[int]]
) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["health"]).output.endswith(
        "Error: OTACM_LIVENESS_DIR is not set: no role keeps a liveness file\n"
    )
    monkeypatch.setenv("OTACM_LIVENESS_DIR", str(tmp_path))
    empty = runner.invoke(main, ["health"])
    assert empty.exit_code == 1
    assert "no role has started here" in empty.output
    announce_web(tmp_path, readyz[0])
    beater(tmp_path, "worker")
    healthy = runner.invoke(main, ["health"])
    assert healthy.exit_code == 0, healthy.output
    assert [line.split(",")[0] for line in healthy.output.splitlines()] == ["web: ok", "worker: ok"]
    old = time.time() - 600
    os.utime(tmp_path / "worker", (old, old))
    stale = runner.invoke(main, ["health", "--role", "worker"])
    assert stale.exit_code == 1
    assert re.match(r"worker: unhealthy, last pass 60\d s ago", stale.output)
