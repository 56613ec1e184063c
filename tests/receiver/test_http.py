"""The receiver over real HTTP: werkzeug's server in a thread, and gunicorn as deployed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import Session, sessionmaker

from otacm.settings import Settings
from receiver.testing import served
from receiver.webhook import WEBHOOK_PATH
from storage.migrate import upgrade
from storage.models import Inbox
from tests.receiver.notifications import STATE_A, notification
from tests.receiver.test_metrics import parse, value


@pytest.fixture
def base_url(app: Flask) -> Iterator[str]:
    """The app served by werkzeug's threaded server on a free port."""
    with served(app) as url:
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    """An HTTP client of the served app."""
    with httpx.Client(base_url=base_url, timeout=10) as client:
        yield client


def inbox_count(sessions: sessionmaker[Session]) -> int:
    """How many rows the inbox holds."""
    with sessions.begin() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(Inbox)) or 0


def test_a_post_over_http_is_stored(http: httpx.Client, sessions: sessionmaker[Session]) -> None:
    """A real POST with two notifications is answered 200 once both are stored."""
    response = http.post(WEBHOOK_PATH, json={"value": [notification(), notification()]})

    assert response.status_code == 200
    assert response.json() == {"stored": 2, "duplicates": 0}
    assert inbox_count(sessions) == 2


def test_a_chunked_post_within_the_limit_is_stored(
    http: httpx.Client, sessions: sessionmaker[Session]
) -> None:
    """A body sent chunked, without Content-Length, is read whole and stored."""
    body = httpx.Request("POST", "/", json={"value": [notification()]}).content

    def chunks() -> Iterator[bytes]:
        yield body[:10]
        yield body[10:]

    response = http.post(
        WEBHOOK_PATH, content=chunks(), headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 200
    assert inbox_count(sessions) == 1


def test_a_chunked_post_over_the_limit_is_413(
    settings: Settings, http: httpx.Client, sessions: sessionmaker[Session]
) -> None:
    """A chunked body is cut off at ``webhook_max_bytes`` while it is read: 413."""
    padding = "x" * settings.webhook_max_bytes
    body = httpx.Request("POST", "/", json={"value": [notification(padding=padding)]}).content

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    response = http.post(
        WEBHOOK_PATH, content=chunks(), headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 413
    assert response.json()["code"] == "body_too_large"
    assert inbox_count(sessions) == 0


def test_the_handshake_and_a_refusal_over_http(
    http: httpx.Client, sessions: sessionmaker[Session]
) -> None:
    """validationToken is echoed as text; an unknown state is 401 in the JSON shape."""
    echoed = http.get(WEBHOOK_PATH, params={"validationToken": "abc123"})
    refused = http.post(WEBHOOK_PATH, json={"value": [notification(state="forged")]})

    assert (echoed.status_code, echoed.text) == (200, "abc123")
    assert echoed.headers["content-type"].startswith("text/plain")
    assert refused.status_code == 401
    assert refused.json()["code"] == "unknown_client_state"
    assert inbox_count(sessions) == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.process
def test_gunicorn_serves_the_factory_and_sums_its_workers_metrics(tmp_path: Path) -> None:
    """``gunicorn 'receiver:create_app()'`` with two workers: stored, and counted once each."""
    url = f"sqlite:///{tmp_path / 'otacm.sqlite3'}"
    upgrade(url)
    metrics_directory = tmp_path / "prometheus"
    metrics_directory.mkdir()
    port = _free_port()
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTACM_")},
        "OTACM_DATABASE_URL": url,
        "OTACM_TENANT": "00000000-0000-0000-0000-000000000001",
        "OTACM_COMPANY": "CRONUS International Ltd.",
        "OTACM_API_KEY": "key-for-tests",
        "OTACM_WEBHOOK_CLIENT_STATES": STATE_A,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_directory),
    }
    gunicorn = Path(sys.executable).with_name("gunicorn")
    server = subprocess.Popen(
        [str(gunicorn), "--workers", "2", "--bind", f"127.0.0.1:{port}", "receiver:create_app()"],
        cwd=Path(__file__).resolve().parents[2],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            _wait_until_ready(http, server)
            answers = [
                http.post(WEBHOOK_PATH, json={"value": [notification()]}).status_code
                for _ in range(6)
            ]
            samples = parse(http.get("/metrics").text)
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=30)

    assert answers == [200] * 6, errors.decode(errors="replace")
    assert value(samples, "otacm_webhook_notifications_total", outcome="stored") == 6
    assert value(samples, "otacm_inbox_depth", connection="default", state="pending") == 6


def _wait_until_ready(http: httpx.Client, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"gunicorn exited with {server.returncode}")
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail("gunicorn did not become ready within 30 s")
