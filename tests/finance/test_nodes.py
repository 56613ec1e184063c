"""Two real ``otacm web`` processes (gunicorn) on one database, as two nodes behind a load
balancer: wrong passwords are counted together, and signing out on one node ends the
sign-in on the other, on SQLite and PostgreSQL."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from storage.testing import free_port
from tests.finance.conftest import CSRF_FIELD, PASSWORD, USER, web_environment
from tests.support.processes import OtacmProcess
from tests.support.stack import wait_until

pytestmark = pytest.mark.process


@pytest.fixture
def nodes(migrated_engine: sa.Engine, tmp_path: Path, user_entry: str) -> Iterator[list[str]]:
    """Two ``otacm web`` nodes sharing the database and the secrets folder; their URLs."""
    environment = web_environment(migrated_engine, user_entry, tmp_path)
    started: list[OtacmProcess] = []
    urls = []
    try:
        for number in range(2):
            port = free_port()
            args = ["web", "--bind", f"127.0.0.1:{port}", "--workers", "1"]
            started.append(OtacmProcess(args, environment, tmp_path / f"web-{number}.log"))
            urls.append(f"http://127.0.0.1:{port}")
        for url, process in zip(urls, started, strict=True):
            wait_until(lambda url=url, process=process: _up(url, process), 60, what=url)
        yield urls
    finally:
        for process in started:
            process.stop()
            sys.stderr.write(f"--- {' '.join(process.args)} ---\n{process.output()}\n")


def _up(url: str, process: OtacmProcess) -> bool:
    assert process.alive(), process.output()
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _attempt(client: httpx.Client, url: str, password: str) -> httpx.Response:
    page = client.get(f"{url}/finance/sign-in")
    found = CSRF_FIELD.search(page.text)
    assert found, page.text
    return client.post(
        f"{url}/finance/sign-in",
        data={"name": USER, "password": password, "csrf_token": found.group(1)},
    )


def test_two_nodes_share_sign_outs_and_throttle_together(nodes: list[str]) -> None:
    """A cookie copied before signing out on one node is refused by the other; then five
    failures spread over both nodes hold the user on either, right password or not."""
    first, second = nodes
    with httpx.Client(timeout=30) as browser, httpx.Client(timeout=30) as thief:
        assert _attempt(browser, first, PASSWORD).status_code == 302
        thief.cookies = httpx.Cookies(browser.cookies)
        assert thief.get(f"{second}/finance/").status_code == 200
        page = browser.get(f"{first}/finance/")
        found = CSRF_FIELD.search(page.text)
        assert found
        signed_out = browser.post(f"{first}/finance/sign-out", data={"csrf_token": found.group(1)})
        assert signed_out.status_code == 302
        assert thief.get(f"{second}/finance/").status_code == 302
        assert thief.get(f"{first}/finance/").status_code == 302

        for url in (first, second, first, second, first):
            assert _attempt(browser, url, "wrong").status_code == 401
        refused = _attempt(browser, second, PASSWORD)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
