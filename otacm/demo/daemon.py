"""The demo's processes: the venue connection the sandbox gives, ``otacm serve`` as a
child process with its own environment, waiting for things to hold, and staying up
until Ctrl-C.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
import httpx
from pydantic import SecretStr

from venue.connection import VenueConnection

if TYPE_CHECKING:
    from otacm.demo.finance import FinanceAccess


def otacm_command_line() -> str:
    """How the person who started the demo runs otacm: the same way (``.venv/bin/otacm``
    from ``./scripts/run``), or ``python -m otacm``."""
    if Path(sys.argv[0]).name == "otacm":
        return shlex.quote(sys.argv[0])
    return f"{shlex.quote(sys.executable)} -m otacm"


def connection_from_sandbox(sandbox_url: str, http: httpx.Client) -> VenueConnection:
    """A venue connection for the sandbox at ``sandbox_url``, from its ``/_sandbox/config``."""
    config = http.get(f"{sandbox_url}/_sandbox/config").raise_for_status().json()
    return VenueConnection(
        name="sandbox",
        api_base_url=sandbox_url,
        tenant=config["tenant"],
        environment=config["environment"],
        company=config["company"],
        api_key=SecretStr(config["apiKey"]),
        partner_ids=[p["id"] for p in config["partners"] if p["active"]],
        webhook_client_states=[SecretStr(secrets.token_urlsafe(24))],
    )


def free_port() -> int:
    """A loopback port that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def daemon_environment(
    connection: VenueConnection,
    database_url: str,
    api_token: str,
    finance: FinanceAccess | None = None,
) -> dict[str, str]:
    """The child's environment: this one without any OTACM_*, plus the demo's venue and,
    with ``finance``, its finance user (hashed) and session key."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTACM_")}
    environment.update(
        {
            "OTACM_DATABASE_URL": database_url,
            "OTACM_CONNECTION_NAME": connection.name,
            "OTACM_API_BASE_URL": connection.api_base_url,
            "OTACM_TENANT": connection.tenant,
            "OTACM_ENVIRONMENT": connection.environment,
            "OTACM_COMPANY": connection.company,
            "OTACM_API_KEY": connection.api_key.get_secret_value(),
            "OTACM_PARTNER_IDS": ",".join(connection.partner_ids),
            "OTACM_WEBHOOK_CLIENT_STATES": ",".join(
                s.get_secret_value() for s in connection.webhook_client_states
            ),
            "OTACM_API_TOKENS": api_token,
        }
    )
    if finance is not None:
        environment["OTACM_FINANCE_USERS"] = finance.users_entry
        environment["OTACM_SESSION_KEY"] = finance.session_key
    return environment


@contextmanager
def running_daemon(environment: dict[str, str], bind: str, log: Path) -> Iterator[str]:
    """``otacm serve`` as a child process until the block ends; yields its base URL.

    Raises:
        click.ClickException: the daemon did not become ready.
    """
    url = f"http://{bind}"
    command = [sys.executable, "-m", "otacm", "serve", "--bind", bind, "--workers", "2"]
    with log.open("w") as output:
        child = subprocess.Popen(command, env=environment, stdout=output, stderr=output)
        try:
            wait_for(lambda: _ready(url), timeout=60, what=f"otacm serve (log: {log})")
            if child.poll() is not None:
                raise click.ClickException(f"otacm serve exited; see {log}")
            yield url
        finally:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Return once ``predicate()`` holds; poll twice a second.

    Raises:
        click.ClickException: it did not hold within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise click.ClickException(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.5)


def stay_until_interrupted() -> None:
    """Block until Ctrl-C (SIGINT) or SIGTERM, either of which then ends the demo normally.

    The handlers are set here rather than inherited: a shell that starts the demo in the
    background leaves SIGINT ignored, and Python keeps it so; the demo must stop anyway.
    """
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    click.echo("\nstopping the daemon and the sandbox")
