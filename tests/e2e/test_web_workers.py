"""A gunicorn worker of the web role that dies — killed, stopped, timed out, recycled after
``--max-requests`` — under ``otacm web`` and ``otacm serve``: the master starts another,
``/healthz`` and ``/metrics`` keep answering, the counts of every worker (dead or alive)
still add up, and the metrics directory the master made is gone once it stops.

The processes are real, started as an operator would, with no ``PROMETHEUS_MULTIPROC_DIR``
of their own; ``TMPDIR`` points at the test's folder so the directory they make is seen.
A worker times out on a request that never finishes (a client sending half a request
line); gunicorn's timeout and max-requests are set through ``GUNICORN_CMD_ARGS``.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from otacm.settings import Settings
from receiver.webhook import WEBHOOK_PATH
from tests.e2e.conftest import (
    OtacmProcess,
    free_port,
    metric,
    otacm_environment,
    wait_until,
)

WORKER_TIMEOUT = 5
"""gunicorn's --timeout for these tests: long enough for a worker to boot on a busy box."""

REJECTED = "otacm_webhook_rejections_total"


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from ``/proc``)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def arguments(pid: int) -> list[str]:
    """A process's command line."""
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


class Web:
    """The gunicorn master of a running web role, and an HTTP client of it."""

    def __init__(self, master: int, http: httpx.Client) -> None:
        self.master = master
        self.http = http
        self.refused = 0

    def workers(self) -> set[int]:
        """The master's worker processes right now."""
        return children(self.master)

    def healthy(self) -> bool:
        """``/healthz`` answers 200; a refused or broken connection fails the test."""
        return self.http.get("/healthz").status_code == 200

    def refuse(self, count: int) -> None:
        """Webhook POSTs holding an empty notification: each refused, and counted."""
        for _ in range(count):
            answer = self.http.post(WEBHOOK_PATH, json={"value": [{}]})
            assert answer.status_code == 400, answer.text
            self.refused += 1

    def counted(self) -> float:
        """The refusals ``/metrics`` reports, summed over every worker."""
        answer = self.http.get("/metrics")
        assert answer.status_code == 200, answer.text
        return metric(answer.text, REJECTED, code="invalid_notification")

    def replaced(self, before: set[int]) -> set[int]:
        """Wait until a worker of ``before`` is gone and two run again, answering meanwhile."""

        def settled() -> set[int] | None:
            assert self.healthy()
            now = self.workers()
            return now if len(now) == 2 and now != before else None

        return wait_until(settled, 4 * WORKER_TIMEOUT, what="the master to replace a worker")


def stall(address: tuple[str, int]) -> socket.socket:
    """A connection that sends half a request line and then nothing: a worker waits on it."""
    connection = socket.create_connection(address, timeout=30)
    connection.sendall(b"GET /healthz HTTP/1.1\r\n")
    return connection


@pytest.mark.parametrize("role", ["web", "serve"])
def test_a_worker_that_dies_is_replaced_and_metrics_stay_whole(
    role: str, otacm: Callable[..., OtacmProcess], settings: Settings, tmp_path: Path
) -> None:
    """SIGKILL, SIGTERM and a timeout of one worker: replaced; /healthz, /metrics answer."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    port = free_port()
    process = otacm(
        role,
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
        environment=otacm_environment(
            settings, TMPDIR=str(temporary), GUNICORN_CMD_ARGS=f"--timeout {WORKER_TIMEOUT}"
        ),
    )
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

        def started() -> set[int] | None:
            assert process.alive(), process.output()
            try:
                if http.get("/readyz").status_code != 200:
                    return None
            except httpx.TransportError:
                return None
            if role == "web":
                master = process.popen.pid
            else:
                (master,) = (p for p in children(process.popen.pid) if "web" in arguments(p))
            return {master} if len(children(master)) == 2 else None

        (master,) = wait_until(started, 60, what=f"otacm {role} to answer with two workers")
        web = Web(master, http)
        (directory,) = temporary.glob("otacm-metrics-*")
        web.refuse(3)
        assert web.counted() == 3

        for signum in (signal.SIGKILL, signal.SIGTERM):
            before = web.workers()
            os.kill(min(before), signum)
            after = web.replaced(before)
            assert min(before) not in after
            web.refuse(3)
            assert web.counted() == web.refused

        before = web.workers()
        with stall(("127.0.0.1", port)):
            after = web.replaced(before)
        assert "WORKER TIMEOUT" in process.output()
        web.refuse(3)
        assert web.counted() == web.refused == 12
        assert directory.is_dir()

    assert process.stop() == 0, process.output()
    assert not directory.exists()


def test_workers_recycled_after_max_requests_keep_answering_and_counting(
    otacm: Callable[..., OtacmProcess], settings: Settings, tmp_path: Path
) -> None:
    """gunicorn's --max-requests recycles workers under otacm web: every answer and count kept."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    port = free_port()
    process = otacm(
        "web",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
        environment=otacm_environment(
            settings, TMPDIR=str(temporary), GUNICORN_CMD_ARGS="--max-requests 4"
        ),
    )
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

        def started() -> bool:
            assert process.alive(), process.output()
            try:
                return http.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(started, 60, what="otacm web to answer")
        web = Web(process.popen.pid, http)
        for _ in range(6):
            web.refuse(4)
            assert web.healthy()
        assert web.counted() == 24
    assert "Autorestarting worker" in process.output()
    assert process.stop() == 0, process.output()
    assert list(temporary.glob("otacm-metrics-*")) == []
